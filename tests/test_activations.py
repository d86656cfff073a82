import math

import pytest
import torch

from eandc.activations import ACTIVATIONS, get_activation

NAMES = sorted(ACTIVATIONS)
Z = torch.linspace(-6, 6, 2001, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_autograd(name):
    act = get_activation(name)
    z = Z[Z.abs() > 1e-3].clone().requires_grad_(True)  # ReLU-like kinks at 0
    value, slope = act.value_and_derivative(z)
    (auto,) = torch.autograd.grad(value.sum(), z)
    torch.testing.assert_close(slope, auto, rtol=1e-12, atol=1e-12)


REFERENCE = {
    "g": lambda z: torch.sigmoid(4 * z) + torch.nn.functional.softplus(z),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01),
}


@pytest.mark.parametrize("name", NAMES)
def test_values_match_torch(name):
    torch.testing.assert_close(get_activation(name)(Z), REFERENCE[name](Z), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_symmetry_identity_holds(name):
    act = get_activation(name)
    s, s_neg = act(Z), act(-Z)
    if act.symmetry == "none":  # g(z) - g(-z) = tanh(2z) + z: not linear, no symmetry
        diff = s - s_neg
        torch.testing.assert_close(diff, torch.tanh(2 * Z) + Z, rtol=1e-13, atol=1e-13)
        assert (diff / Z).std() > 0.1
    elif act.symmetry == "odd":
        torch.testing.assert_close(s_neg, -s, rtol=0, atol=1e-15)
    elif act.symmetry == "odd_constant":
        torch.testing.assert_close(s_neg, act.flip_constant - s, rtol=0, atol=1e-15)
    else:
        torch.testing.assert_close(s - s_neg, act.flip_slope * Z, rtol=1e-13, atol=1e-13)
    if act.has_scaling_symmetry:
        torch.testing.assert_close(act(2.5 * Z), 2.5 * s, rtol=1e-15, atol=1e-15)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*tanh"):
        get_activation("swish")
    with pytest.raises(TypeError):
        get_activation(3)
    assert get_activation("Leaky-ReLU").name == "leaky_relu"
    assert math.isclose(get_activation("leaky_relu").flip_slope, 1.01)


@pytest.mark.parametrize("name", ["g", "softplus"])
def test_softplus_is_exact_for_large_inputs(name):
    # torch's default softplus returns z above 20 (an error of 2e-9 its derivative does not see);
    # value and derivative must agree with log1p(exp(-|z|)) + max(z, 0) to rounding everywhere.
    z = torch.linspace(-60, 60, 2401, dtype=torch.float64)
    value, slope = get_activation(name).value_and_derivative(z)
    exact = torch.clamp_min(z, 0) + torch.log1p(torch.exp(-z.abs()))
    if name == "g":
        exact = exact + torch.sigmoid(4 * z)
    assert torch.allclose(value, exact, rtol=1e-15, atol=1e-16)
    h = 1e-5
    numeric = (get_activation(name)(z + h) - get_activation(name)(z - h)) / (2 * h)
    assert torch.allclose(slope, numeric, rtol=1e-8, atol=1e-9)
