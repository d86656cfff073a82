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


@pytest.fixture(autouse=True)
def _float64_default():
    yield
    torch.set_default_dtype(torch.float32)
