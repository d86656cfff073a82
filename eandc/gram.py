"""Gauss-Newton matrices of one-hidden-layer students without paying for their outputs.

The dense Levenberg-Marquardt finisher (:func:`eandc.training.levenberg_marquardt`) needs, per
student, ``J^T J`` and ``J^T r`` over all samples and outputs. Built from the Jacobian
(:func:`eandc.training.jacobian`), that costs ``n d_out P^2`` multiply-adds: every output of
every sample adds its own rank-one term. With one hidden layer the outputs share almost
everything, and the sum over them can be taken first:

* a first-layer parameter ``(j, i)`` (neuron ``j``, input ``i`` or the bias) moves output ``k``
  of sample ``n`` by ``v_kj s_j(n) x_i(n)`` (``v`` the output weights, ``s_j`` the activation's
  slope), so the block of two first-layer parameters is
  ``(V^T V)_jj' * sum_n s_j x_i s_j' x_i'``: one ``(H(d+1))^2`` product over the samples, for
  all outputs at once;
* an output-layer parameter ``(k, f)`` (the feature ``f``: a hidden activity, the constant 1,
  or, with the linear term, an input) moves output ``k`` only, by ``F_f(n)``: the block of two
  is ``delta_kk' * sum_n F_f F_f'``, the same ``F^T F`` for every output;
* between the two, ``v_kj * sum_n s_j x_i F_f``.

The first-layer sums depend on the unordered pairs ``{j, j'}`` and ``{i, i'}`` only, so, for
up to ``PAIRS_MAX_INPUTS`` inputs, they are accumulated as one matrix product of neuron pairs by
input pairs per chunk of samples (with more inputs, MNIST's pixels, as the product of the
whole block). With ``f = H + 1`` output features (``H + 1 + d`` with the linear term), a matrix
then costs about ``n (H^2 (d+1)^2 / 4 + H (d+1) f + f^2)`` multiply-adds
(:func:`gram_multiply_adds`) instead of ``n d_out P^2``: for a student 16-64-10 of the MNIST
chapter (in its teacher's input subspace), 77 times less. The result is the same matrix
(tested against the Jacobian's to 1e-12), in the flat parameter order of
:class:`eandc.mlp.Layout`.
"""

from __future__ import annotations

import torch

from .activations import Activation
from .mlp import Layout

__all__ = ["applies", "gauss_newton", "gram_multiply_adds", "natural_order"]

# Elements of one chunk's (students x samples x first-layer parameters) tensor.
CHUNK_ELEMENTS = 4_000_000
# The first-layer block is summed over pairs of inputs up to this many inputs (bias included):
# a chunk holds (inputs + 1)(inputs + 2)/2 products per sample, 308,505 for MNIST's pixels.
PAIRS_MAX_INPUTS = 128


def applies(layout: Layout) -> bool:
    """True for students with one hidden layer (the layouts :func:`gauss_newton` takes)."""
    return layout.n_layers == 2


def _feature_count(layout: Layout) -> int:
    """Features of the output layer: the hidden activities, the constant, the inputs (skip)."""
    return layout.widths[0] + 1 + (layout.d_in if layout.skip else 0)


def _uses_pairs(layout: Layout) -> bool:
    """Whether the first-layer block is summed over pairs of neurons and pairs of inputs (up to
    ``PAIRS_MAX_INPUTS`` inputs) or as one product of the whole block."""
    return layout.d_in + 1 <= PAIRS_MAX_INPUTS


def gram_multiply_adds(layout: Layout, n: int) -> float:
    """Multiply-adds of one student's matrix on ``n`` samples, as :func:`gauss_newton` computes
    it: the first-layer block (pairs of neurons x pairs of inputs, or the whole block with many
    inputs), the cross block and the output block."""
    H, d = layout.widths[0], layout.d_in
    first, features = H * (d + 1), _feature_count(layout)
    if _uses_pairs(layout):
        first_block = (H * (H + 1) // 2) * ((d + 1) * (d + 2) // 2)
    else:
        first_block = first * first
    return float(n) * (first_block + first * features + features * features)


def natural_order(layout: Layout) -> torch.Tensor:
    """Where each parameter of the natural order (first layer neuron by neuron, inputs then
    bias; then each output's features: hidden activities, constant, inputs) sits in the flat
    layout of ``layout``."""
    d, H, K = layout.d_in, layout.widths[0], layout.d_out
    (w1, b1), (w2, b2) = layout.layer_slices()
    first = torch.empty(H, d + 1, dtype=torch.long)
    first[:, :d] = w1.start + torch.arange(H * d).reshape(H, d)
    first[:, d] = b1.start + torch.arange(H)
    output = torch.empty(K, _feature_count(layout), dtype=torch.long)
    output[:, :H] = w2.start + torch.arange(K * H).reshape(K, H)
    output[:, H] = b2.start + torch.arange(K)
    if layout.skip:
        output[:, H + 1:] = layout.skip_slice.start + torch.arange(K * d).reshape(K, d)
    return torch.cat([first.flatten(), output.flatten()])


def _pair_index(size: int) -> torch.Tensor:
    """``(size, size)``: the position of the unordered pair {a, b} in ``triu_indices(size)``."""
    index = torch.empty(size, size, dtype=torch.long)
    rows, cols = torch.triu_indices(size, size)
    index[rows, cols] = torch.arange(rows.shape[0])
    index[cols, rows] = torch.arange(rows.shape[0])
    return index


def _pair_products(a: torch.Tensor) -> torch.Tensor:
    """``a[..., j] * a[..., j']`` for the pairs ``j <= j'`` in the order of ``triu_indices``."""
    size = a.shape[-1]
    out = a.new_empty(*a.shape[:-1], size * (size + 1) // 2)
    start = 0
    for j in range(size):
        torch.mul(a[..., j:j + 1], a[..., j:], out=out[..., start:start + size - j])
        start += size - j
    return out


def _pair_lookup(n_neurons: int, n_inputs: int) -> torch.Tensor:
    """``(H n_inputs, H n_inputs)``: where entry ((j, i), (j', i')) of the first-layer block
    sits in the flattened (neuron pairs x input pairs) sums."""
    neuron = torch.arange(n_neurons).repeat_interleave(n_inputs)
    inputs = torch.arange(n_inputs).repeat(n_neurons)
    n_input_pairs = n_inputs * (n_inputs + 1) // 2
    return (_pair_index(n_neurons)[neuron[:, None], neuron[None, :]] * n_input_pairs
            + _pair_index(n_inputs)[inputs[:, None], inputs[None, :]])


def gauss_newton(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
                 y: torch.Tensor):
    """``(J^T J, J^T r, sum of squared residuals)`` of each student (``theta``: ``(N, P)``),
    as :func:`eandc.training._gauss_newton` returns them, for one hidden layer."""
    if not applies(layout):
        raise ValueError(f"the structured Gauss-Newton matrix takes one hidden layer, the layout "
                         f"has {len(layout.widths)}")
    N, P = theta.shape
    d, H, K = layout.d_in, layout.widths[0], layout.d_out
    weights, biases, skip = layout.unflatten(theta)
    w1, b1, v, b2 = weights[0], biases[0], weights[1], biases[1]
    n_first, n_feat = H * (d + 1), _feature_count(layout)
    dtype, device = theta.dtype, theta.device
    # sum_n s_j s_j' x_i x_i' depends on the unordered pairs {j, j'} and {i, i'} only: with few
    # inputs it is accumulated as (pairs of neurons) x (pairs of inputs), a quarter of the
    # products; with many, as the product of the whole block (the pairs would not fit a chunk)
    pairs = _uses_pairs(layout)
    n_neuron_pairs, n_input_pairs = H * (H + 1) // 2, (d + 1) * (d + 2) // 2
    if pairs:
        R = torch.zeros(N, n_neuron_pairs, n_input_pairs, dtype=dtype, device=device)
    else:
        M = torch.zeros(N, n_first, n_first, dtype=dtype, device=device)
    C = torch.zeros(N, n_first, n_feat, dtype=dtype, device=device)    # sum s x F
    Q = torch.zeros(N, n_feat, n_feat, dtype=dtype, device=device)     # sum F F'
    g1 = torch.zeros(N, H, d + 1, dtype=dtype, device=device)
    g2 = torch.zeros(N, K, n_feat, dtype=dtype, device=device)
    sse = torch.zeros(N, dtype=dtype, device=device)
    widest = max(N * n_first, N * n_neuron_pairs + n_input_pairs if pairs else 0)
    rows = max(64, CHUNK_ELEMENTS // max(1, widest))
    for start in range(0, X.shape[0], rows):
        x = X[start:start + rows]
        m = x.shape[0]
        x1 = torch.cat([x, x.new_ones(m, 1)], 1)                            # (m, d+1)
        h, s = activation.value_and_derivative(x @ w1.transpose(1, 2) + b1[:, None, :])
        out = h @ v.transpose(1, 2) + b2[:, None, :]
        features = [h, h.new_ones(N, m, 1)]
        if skip is not None:
            out = out + x @ skip.transpose(1, 2)
            features.append(x.expand(N, m, d))
        F = torch.cat(features, 2)                                           # (N, m, n_feat)
        r = out - y[start:start + m]                                         # (N, m, K)
        A = (s[:, :, :, None] * x1[None, :, None, :]).reshape(N, m, n_first)
        At = A.transpose(1, 2)
        if pairs:
            R += _pair_products(s).transpose(1, 2) @ _pair_products(x1)
        else:
            M += At @ A
        C += At @ F
        Q += F.transpose(1, 2) @ F
        g1 += ((r @ v) * s).transpose(1, 2) @ x1
        g2 += r.transpose(1, 2) @ F
        sse += r.square().sum((1, 2))
    # first-layer block: (V^T V)_jj' on every (i, i') entry of the (j, j') block
    coupling = (v.transpose(1, 2) @ v).repeat_interleave(d + 1, 1).repeat_interleave(d + 1, 2)
    cross = v.transpose(1, 2).repeat_interleave(d + 1, 1)                  # (N, n_first, K)
    gram_natural = torch.empty(N, P, P, dtype=dtype, device=device)
    first_block = R.flatten(1)[:, _pair_lookup(H, d + 1)] if pairs else M
    gram_natural[:, :n_first, :n_first] = coupling * first_block
    # cross block: row (j, i), column (k, f) = v_kj C[(j, i), f]
    block = (cross[:, :, :, None] * C[:, :, None, :]).reshape(N, n_first, K * n_feat)
    gram_natural[:, :n_first, n_first:] = block
    gram_natural[:, n_first:, :n_first] = block.transpose(1, 2)
    eye = torch.eye(K, dtype=dtype, device=device)
    gram_natural[:, n_first:, n_first:] = (eye[None, :, None, :, None] * Q[:, None, :, None, :]
                                           ).reshape(N, K * n_feat, K * n_feat)
    # from the natural order to the layout's: flat parameter a is natural parameter inverse[a]
    order = natural_order(layout).to(device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(P, device=device)
    grad = torch.empty(N, P, dtype=dtype, device=device)
    grad[:, order] = torch.cat([g1.flatten(1), g2.flatten(1)], 1)
    return gram_natural[:, inverse][:, :, inverse], grad, sse
