import math

import numpy as np
import pytest
import torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_mlp(sizes, activation, seed=0, skip=False):
    """An MLP with standard normal parameters (helper for tests)."""
    from eandc import MLP

    gen = np.random.default_rng(seed)
    weights = [gen.normal(size=(o, i)) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [gen.normal(size=o) for o in sizes[1:]]
    return MLP(weights, biases, activation,
               skip=gen.normal(size=(sizes[-1], sizes[0])) if skip else None)


def random_students(activation, widths, skip, n_students=3, n=257, d_in=3, d_out=2, seed=0):
    """Random students (weights N(0, 1/fan_in), as eandc initialises them), inputs and targets.

    The scale keeps pre-activations well below 20, where torch's softplus switches to the
    identity while ``value_and_derivative`` still returns sigmoid(z) = 1 - 2e-9 as derivative.
    """
    from eandc import ACTIVATIONS
    from eandc.mlp import Layout

    gen = torch.Generator().manual_seed(seed)
    layout = Layout(d_in, widths, d_out, skip)
    weights, biases = [], []
    for fan_in, fan_out in zip(layout.sizes[:-1], layout.sizes[1:]):
        weights.append(torch.randn(n_students, fan_out, fan_in, generator=gen, dtype=torch.float64)
                       / math.sqrt(fan_in))
        biases.append(torch.randn(n_students, fan_out, generator=gen, dtype=torch.float64))
    skip_w = torch.randn(n_students, d_out, d_in, generator=gen, dtype=torch.float64) if skip else None
    theta = layout.flatten(weights, biases, skip_w)
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return theta, layout, ACTIVATIONS[activation], X, y


@pytest.fixture(autouse=True)
def _float64_default():
    yield
    torch.set_default_dtype(torch.float32)
