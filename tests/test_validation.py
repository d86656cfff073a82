"""Bad input gets a clear error that names the problem; nothing is silently clipped or dropped."""

import math

import numpy as np
import pytest

from eandc import expand_and_cluster, gaussian_inputs, random_teacher
from eandc.compare import compare

TEACHER = random_teacher(2, [2], activation="tanh", seed=1)
X = gaussian_inputs(500, 2, seed=0)


def run(**kwargs):
    args = dict(query=TEACHER, X=X, activation="tanh", student_widths=[4], n_students=4,
                progress=False, train_options={"adam_steps": 5, "max_iter": 3, "polish_iter": 1})
    args.update(kwargs)
    return expand_and_cluster(**args)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"X": np.zeros(10)}, ValueError, "2-D"),
    ({"X": np.zeros((0, 2))}, ValueError, "empty"),
    ({"X": np.array([[0.0, np.nan]] * 20)}, ValueError, "NaN or inf"),
    ({"X": np.array([["x", "y"]])}, TypeError, "real numeric"),
    ({"query": np.full((500, 1), np.inf)}, ValueError, "teacher outputs contain NaN or inf"),
    ({"query": np.zeros((400, 1))}, ValueError, "400 teacher outputs for 500 queries"),
    ({"query": lambda x: np.ones((len(x), 1))}, ValueError, "constant"),
    ({"query": lambda x: np.ones((3, 1))}, ValueError, r"returned shape \(3, 1\)"),
    ({"activation": "swish"}, ValueError, "unknown activation"),
    ({"gamma": 1.5}, ValueError, "gamma must be in"),
    ({"gamma": 0.0}, ValueError, "gamma must be in"),
    ({"beta": 2.0}, ValueError, "beta must be an angle"),
    ({"beta": -0.1}, ValueError, "beta must be an angle"),
    ({"gamma": 0.2, "n_students": 5}, ValueError, r"gamma \* n_students = 1 < 2"),
    ({"n_students": 1}, ValueError, "n_students must be an integer >= 2"),
    ({"n_hidden_layers": 0}, ValueError, "n_hidden_layers must be a positive integer"),
    ({"student_widths": [4, 4]}, ValueError, "2 entries for 1 hidden layer"),
    ({"student_widths": [0]}, ValueError, "positive integers"),
    ({"student_widths": [200]}, ValueError, "too few queries: 500 queries x 1 output"),
    ({"query": 42}, TypeError, "callable"),
    ({"train_options": {"adam_steps": 0, "adam_batch": 0}}, ValueError, "batch_size must be a positive"),
])
def test_bad_input_is_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        run(**kwargs)


def test_a_teacher_that_raises_is_reported():
    def broken(x):
        raise ZeroDivisionError("no")

    with pytest.raises(RuntimeError, match="teacher raised ZeroDivisionError"):
        run(query=broken)


def test_compare_refuses_mismatched_networks():
    with pytest.raises(ValueError, match="activations differ"):
        compare(TEACHER, random_teacher(2, [2], activation="g"), X)
    with pytest.raises(ValueError, match="depths differ"):
        compare(TEACHER, random_teacher(2, [2, 2], activation="tanh"), X)
    with pytest.raises(TypeError, match="two eandc.MLP"):
        compare(TEACHER, lambda x: x, X)


def test_recorded_pairs_are_accepted():
    y = TEACHER(X)
    result = run(query=y, student_widths=[4], prune_network=False)
    assert result.network.d_in == 2 and result.network.d_out == 1
    assert math.isfinite(result.final_loss)
