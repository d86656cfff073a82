"""Transformations of a network that leave its function unchanged, per symmetry class.

* :func:`permute_neurons`: any activation (hidden neurons can be reordered);
* :func:`flip_neuron`: ``odd`` (tanh), ``odd_constant`` (sigmoid: the next bias absorbs K a),
  and the even-plus-linear classes in the last hidden layer (the linear term absorbs ``c a z``,
  so the network needs an input-to-output linear term: shallow networks only);
* :func:`scale_neuron`: ``even_linear_scaling`` (ReLU, leaky ReLU), by a positive factor.

Each raises ``ValueError`` where the activation has no such symmetry.
"""

from __future__ import annotations

import torch

from .mlp import MLP

__all__ = ["permute_neurons", "flip_neuron", "scale_neuron"]


def _parts(net: MLP):
    return [w.clone() for w in net.weights], [b.clone() for b in net.biases], \
        None if net.skip is None else net.skip.clone()


def permute_neurons(net: MLP, layer: int, order) -> MLP:
    """The network with hidden layer ``layer``'s neurons reordered by ``order``."""
    weights, biases, skip = _parts(net)
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(net.widths[layer])):
        raise ValueError(f"order must be a permutation of range({net.widths[layer]})")
    weights[layer], biases[layer] = weights[layer][order], biases[layer][order]
    weights[layer + 1] = weights[layer + 1][:, order]
    return MLP(weights, biases, net.activation, skip=skip, device=net.device)


def flip_neuron(net: MLP, layer: int, j: int) -> MLP:
    """The network with neuron ``j`` of hidden ``layer`` sign-flipped, compensated exactly."""
    act = net.activation
    weights, biases, skip = _parts(net)
    a = weights[layer + 1][:, j].clone()
    w, b = weights[layer][j].clone(), biases[layer][j].clone()
    weights[layer][j], biases[layer][j] = -w, -b
    if act.symmetry == "odd":
        weights[layer + 1][:, j] = -a
    elif act.symmetry == "odd_constant":  # a s(z) = a K - a s(-z)
        weights[layer + 1][:, j] = -a
        biases[layer + 1] += act.flip_constant * a
    elif act.leaves_linear_term:  # a s(z) = a s(-z) + a c z
        if layer != 0 or net.n_hidden_layers != 1:
            raise ValueError(f"a sign flip of a {act.name} neuron leaves a linear term that only a "
                             "shallow network's input-to-output linear term can absorb")
        net_skip = torch.zeros(net.d_out, net.d_in, dtype=torch.float64) if skip is None else skip
        net_skip = net_skip + act.flip_slope * a[:, None] * w[None, :]
        biases[layer + 1] += act.flip_slope * a * b
        skip = net_skip
    else:
        raise ValueError(f"activation {act.name!r} has no sign symmetry")
    return MLP(weights, biases, act, skip=skip, device=net.device)


def scale_neuron(net: MLP, layer: int, j: int, factor: float) -> MLP:
    """Neuron ``j``'s incoming weights times ``factor`` > 0, its outgoing weights divided by it."""
    if not net.activation.has_scaling_symmetry:
        raise ValueError(f"activation {net.activation.name!r} has no scaling symmetry")
    if not factor > 0:
        raise ValueError(f"the scale factor must be positive, got {factor}")
    weights, biases, skip = _parts(net)
    weights[layer][j] *= factor
    biases[layer][j] *= factor
    weights[layer + 1][:, j] /= factor
    return MLP(weights, biases, net.activation, skip=skip, device=net.device)
