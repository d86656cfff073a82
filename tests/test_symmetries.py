import pytest
import torch
from conftest import random_mlp

from eandc.activations import ACTIVATIONS, get_activation
from eandc.symmetries import flip_neuron, permute_neurons, scale_neuron

X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_permutation_leaves_function_unchanged(name):
    net = random_mlp([3, 5, 4, 2], name)
    moved = permute_neurons(permute_neurons(net, 0, [4, 2, 0, 1, 3]), 1, [3, 1, 2, 0])
    torch.testing.assert_close(moved(X), net(X), rtol=1e-13, atol=1e-13)
    assert not torch.equal(moved.theta, net.theta)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_sign_flip_leaves_function_unchanged_where_it_is_a_symmetry(name):
    act = get_activation(name)
    net = random_mlp([3, 5, 2], name)
    if act.symmetry == "none":
        with pytest.raises(ValueError, match="no sign symmetry"):
            flip_neuron(net, 0, 1)
        return
    flipped = flip_neuron(flip_neuron(net, 0, 1), 0, 3)
    torch.testing.assert_close(flipped(X), net(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flipped.weights[0][1], -net.weights[0][1])
    if act.leaves_linear_term:
        assert flipped.skip is not None and flipped.skip.abs().max() > 0


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_sign_flip_in_a_deep_network(name):
    net = random_mlp([3, 5, 4, 2], name)
    flipped = flip_neuron(flip_neuron(net, 0, 2), 1, 1)
    torch.testing.assert_close(flipped(X), net(X), rtol=1e-12, atol=1e-12)


def test_even_linear_flip_in_a_deep_layer_is_refused():
    with pytest.raises(ValueError, match="linear term"):
        flip_neuron(random_mlp([3, 5, 4, 2], "softplus"), 1, 0)


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_positive_scaling_leaves_function_unchanged(name):
    net = random_mlp([3, 5, 4, 2], name)
    scaled = scale_neuron(scale_neuron(net, 0, 1, 3.7), 1, 2, 0.2)
    torch.testing.assert_close(scaled(X), net(X), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        scale_neuron(net, 0, 1, -1.0)


def test_scaling_is_refused_without_the_symmetry():
    with pytest.raises(ValueError, match="no scaling symmetry"):
        scale_neuron(random_mlp([3, 5, 2], "tanh"), 0, 1, 2.0)
