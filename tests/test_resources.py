"""Memory: training that cannot fit stops before allocating, with the estimate."""

import time

import pytest
import torch

from eandc.activations import get_activation
from eandc.mlp import Layout
from eandc.resources import ResourceError, format_size, parse_size, training_memory
from eandc.training import init_students, train_students


def test_sizes_parse_and_print():
    assert parse_size("512M") == 512 * 2**20 and parse_size("4G") == 4 * 2**30
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")
    assert format_size(3 * 2**30) == "3.0 GiB"


def test_estimate_grows_with_the_gauss_newton_systems():
    small = training_memory(Layout(2, (8,), 1), 10, 10_000, 1_000)
    big = training_memory(Layout(2, (16,), 1), 10, 10_000, 1_000)
    P_small, P_big = Layout(2, (8,), 1).size, Layout(2, (16,), 1).size
    assert small["Gauss-Newton systems"] == 4 * 10 * P_small**2 * 8
    assert big["Gauss-Newton systems"] / small["Gauss-Newton systems"] == (P_big / P_small) ** 2


def test_students_too_big_for_the_machine_fail_at_once(monkeypatch):
    monkeypatch.setenv("EANDC_MAX_MEMORY", "64G")  # (at most: less if the machine has less)
    layout = Layout(200, (250,), 1)  # 50,501 parameters: 10 Gauss-Newton systems of ~20 GB each
    X = torch.randn(1000, 200, dtype=torch.float64)
    y = X[:, :1].clone()
    students = init_students(layout, get_activation("tanh"), 10, y)
    start = time.perf_counter()
    with pytest.raises(ResourceError, match=r"needs about .* GiB \(largest: Gauss-Newton systems"):
        train_students(students, X, y, finisher="dense")  # ("auto" goes matrix-free)
    assert time.perf_counter() - start < 5
