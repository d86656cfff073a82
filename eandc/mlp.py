"""Multilayer perceptrons: one network (:class:`MLP`) and many students at once (:class:`StudentBatch`).

Both keep their parameters as one flat float64 vector (a ``(P,)`` tensor for a network, an
``(N, P)`` tensor for N students), laid out by :class:`Layout`: for each layer its weight matrix
(rows = output units) and its bias, then, when present, the input-to-output linear term. The
flat form is what the second-order trainer works on; ``weights``/``biases`` are views of it.

The output layer is linear (identity). The optional linear term ``skip`` adds ``x @ skip.T`` to
the output: the even-plus-linear activations (softplus, GELU, SiLU, ReLU) can hide a linear
function in their neurons, and this term gives it a place of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .activations import Activation, get_activation
from .storage import CorruptFileError, load_arrays, save_arrays

__all__ = ["Layout", "MLP", "StudentBatch"]

FORMAT = "eandc.MLP/1"


@dataclass(frozen=True)
class Layout:
    """Sizes of an MLP and where each parameter lives in the flat vector."""

    d_in: int
    widths: tuple[int, ...]
    d_out: int
    skip: bool = False

    def __post_init__(self):
        sizes = (self.d_in, *self.widths, self.d_out)
        if any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
            raise ValueError(f"layer sizes must be positive integers, got {sizes}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.d_in, *self.widths, self.d_out)

    @property
    def n_layers(self) -> int:
        """Number of weight layers (hidden layers + output layer)."""
        return len(self.widths) + 1

    def layer_slices(self) -> list[tuple[slice, slice]]:
        """(weight slice, bias slice) of each layer in the flat vector."""
        out, start = [], 0
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            w = slice(start, start + fan_in * fan_out)
            b = slice(w.stop, w.stop + fan_out)
            out.append((w, b))
            start = b.stop
        return out

    @property
    def skip_slice(self) -> slice | None:
        if not self.skip:
            return None
        start = self.layer_slices()[-1][1].stop
        return slice(start, start + self.d_in * self.d_out)

    @property
    def size(self) -> int:
        """Number of parameters P."""
        end = self.layer_slices()[-1][1].stop
        return end + (self.d_in * self.d_out if self.skip else 0)

    def unflatten(self, theta: torch.Tensor):
        """Views (weights, biases, skip) of a flat ``(..., P)`` parameter tensor."""
        lead = theta.shape[:-1]
        weights, biases = [], []
        for (w, b), fan_in, fan_out in zip(self.layer_slices(), self.sizes[:-1], self.sizes[1:]):
            weights.append(theta[..., w].reshape(*lead, fan_out, fan_in))
            biases.append(theta[..., b])
        skip = None
        if self.skip:
            skip = theta[..., self.skip_slice].reshape(*lead, self.d_out, self.d_in)
        return weights, biases, skip

    def flatten(self, weights, biases, skip=None) -> torch.Tensor:
        """The flat ``(..., P)`` tensor of the given per-layer tensors."""
        lead = weights[0].shape[:-2]
        parts = []
        for w, b in zip(weights, biases):
            parts += [w.reshape(*lead, -1), b.reshape(*lead, -1)]
        if self.skip:
            if skip is None:
                skip = torch.zeros(*lead, self.d_out, self.d_in, dtype=weights[0].dtype,
                                   device=weights[0].device)
            parts.append(skip.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)


def forward(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor):
    """Outputs ``(..., n, d_out)`` of the network(s) with flat parameters ``theta`` ``(..., P)``."""
    weights, biases, skip = layout.unflatten(theta)
    a = X
    for w, b in zip(weights[:-1], biases[:-1]):
        a = activation(a @ w.transpose(-1, -2) + b.unsqueeze(-2))
    out = a @ weights[-1].transpose(-1, -2) + biases[-1].unsqueeze(-2)
    if skip is not None:
        out = out + X @ skip.transpose(-1, -2)
    return out


def _as_tensor(X, device=None) -> tuple[torch.Tensor, bool]:
    """(float64 tensor, whether the caller gave numpy) for a 2-D input array."""
    was_numpy = not isinstance(X, torch.Tensor)
    tensor = torch.as_tensor(np.asarray(X) if was_numpy else X, dtype=torch.float64, device=device)
    return tensor, was_numpy


class _Network:
    """What MLP and StudentBatch share: a layout, an activation and a flat parameter tensor."""

    def __init__(self, theta: torch.Tensor, layout: Layout, activation):
        self.layout = layout
        self.activation = get_activation(activation)
        self.theta = theta

    @property
    def widths(self) -> list[int]:
        """Hidden layer widths."""
        return list(self.layout.widths)

    @property
    def d_in(self) -> int:
        return self.layout.d_in

    @property
    def d_out(self) -> int:
        return self.layout.d_out

    @property
    def n_hidden_layers(self) -> int:
        return len(self.layout.widths)

    @property
    def weights(self) -> list[torch.Tensor]:
        return self.layout.unflatten(self.theta)[0]

    @property
    def biases(self) -> list[torch.Tensor]:
        return self.layout.unflatten(self.theta)[1]

    @property
    def skip(self) -> torch.Tensor | None:
        return self.layout.unflatten(self.theta)[2]

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def __call__(self, X):
        tensor, was_numpy = _as_tensor(X, self.theta.device)
        if tensor.ndim != 2 or tensor.shape[1] != self.d_in:
            raise ValueError(f"inputs must have shape (n, {self.d_in}), got {tuple(tensor.shape)}")
        out = forward(self.theta, self.layout, self.activation, tensor)
        return out.detach().cpu().numpy() if was_numpy else out


class MLP(_Network):
    """A fully connected network: ``d_in -> widths... -> d_out``, one activation, linear output.

    Build it from per-layer arrays (``weights[l]`` of shape ``(fan_out, fan_in)``)::

        net = MLP([W1, W2], [b1, b2], activation="tanh")
        y = net(X)                       # X: (n, d_in) numpy array or tensor

    ``skip`` (shape ``(d_out, d_in)``) is the optional input-to-output linear term.
    """

    def __init__(self, weights, biases, activation="g", skip=None, device=None):
        weights = [torch.as_tensor(w, dtype=torch.float64, device=device) for w in weights]
        biases = [torch.as_tensor(b, dtype=torch.float64, device=device) for b in biases]
        if len(weights) < 1 or len(weights) != len(biases):
            raise ValueError("need one bias per weight matrix, and at least one layer")
        for l, (w, b) in enumerate(zip(weights, biases)):
            if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(f"layer {l}: weight must be (fan_out, fan_in) and bias (fan_out,);"
                                 f" got {tuple(w.shape)} and {tuple(b.shape)}")
            if l and w.shape[1] != weights[l - 1].shape[0]:
                raise ValueError(f"inconsistent widths: layer {l} takes {w.shape[1]} inputs but "
                                 f"layer {l - 1} has {weights[l - 1].shape[0]} units")
        d_in, d_out = weights[0].shape[1], weights[-1].shape[0]
        if skip is not None:
            skip = torch.as_tensor(skip, dtype=torch.float64, device=device)
            if tuple(skip.shape) != (d_out, d_in):
                raise ValueError(f"skip must have shape ({d_out}, {d_in}), got {tuple(skip.shape)}")
        layout = Layout(d_in, tuple(w.shape[0] for w in weights[:-1]), d_out, skip is not None)
        super().__init__(layout.flatten(weights, biases, skip), layout, activation)

    @classmethod
    def from_flat(cls, theta: torch.Tensor, layout: Layout, activation) -> MLP:
        net = cls.__new__(cls)
        _Network.__init__(net, theta.detach().clone().to(torch.float64), layout, activation)
        return net

    def copy(self) -> MLP:
        return MLP.from_flat(self.theta, self.layout, self.activation)

    def to(self, device) -> MLP:
        return MLP.from_flat(self.theta.to(device), self.layout, self.activation)

    def with_skip(self) -> MLP:
        """The same function with an (initially zero) input-to-output linear term."""
        if self.layout.skip:
            return self.copy()
        return MLP(self.weights, self.biases, self.activation,
                   skip=torch.zeros(self.d_out, self.d_in, dtype=torch.float64), device=self.device)

    @property
    def n_parameters(self) -> int:
        return self.layout.size

    def hidden(self, X) -> list[torch.Tensor]:
        """Post-activations of every hidden layer, each ``(n, width)``."""
        a, _ = _as_tensor(X, self.device)
        out = []
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            a = self.activation(a @ w.T + b)
            out.append(a)
        return out

    def to_torch(self) -> torch.nn.Module:
        """An equivalent ``torch.nn.Module`` (float64), independent of this object."""
        return TorchMLP(self)

    def __repr__(self) -> str:
        sizes = "-".join(str(s) for s in self.layout.sizes)
        extra = " + linear term" if self.layout.skip else ""
        return f"MLP({sizes}, activation={self.activation.name!r}{extra})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the network to one ``.npz`` file: plain arrays plus JSON metadata, atomically."""
        arrays = {f"weight{l}": w.detach().cpu().numpy() for l, w in enumerate(self.weights)}
        arrays.update({f"bias{l}": b.detach().cpu().numpy() for l, b in enumerate(self.biases)})
        if self.layout.skip:
            arrays["skip"] = self.skip.detach().cpu().numpy()
        meta = {"format": FORMAT, "activation": self.activation.name,
                "sizes": list(self.layout.sizes), "skip": self.layout.skip}
        return save_arrays(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> MLP:
        """Read a network written by :meth:`save`; a foreign or damaged file raises an error."""
        arrays, meta = load_arrays(path)
        if meta.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not an eandc network file (format "
                                   f"{meta.get('format')!r}, expected {FORMAT!r})")
        n_layers = len(meta["sizes"]) - 1
        try:
            weights = [arrays[f"weight{l}"] for l in range(n_layers)]
            biases = [arrays[f"bias{l}"] for l in range(n_layers)]
        except KeyError as missing:
            raise CorruptFileError(f"{path} lacks array {missing}") from None
        return cls(weights, biases, meta["activation"], skip=arrays.get("skip"), device=device)


class TorchMLP(torch.nn.Module):
    """A plain ``torch.nn.Module`` built from an :class:`MLP` (see :meth:`MLP.to_torch`)."""

    def __init__(self, net: MLP):
        super().__init__()
        self._activation = net.activation
        self.layers = torch.nn.ModuleList()
        for w, b in zip(net.weights, net.biases):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64, device=net.device)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            self.layers.append(layer)
        self.skip = None
        if net.layout.skip:
            self.skip = torch.nn.Linear(net.d_in, net.d_out, bias=False, dtype=torch.float64,
                                        device=net.device)
            with torch.no_grad():
                self.skip.weight.copy_(net.skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x
        for layer in self.layers[:-1]:
            a = self._activation(layer(a))
        out = self.layers[-1](a)
        return out if self.skip is None else out + self.skip(x)


class StudentBatch(_Network):
    """N networks of one layout, parameters stacked in an ``(N, P)`` tensor (students first).

    Calling it on ``(n, d_in)`` inputs returns ``(N, n, d_out)`` outputs.
    """

    def __init__(self, theta: torch.Tensor, layout: Layout, activation):
        if theta.ndim != 2 or theta.shape[1] != layout.size:
            raise ValueError(f"theta must have shape (N, {layout.size}), got {tuple(theta.shape)}")
        super().__init__(theta, layout, activation)

    @classmethod
    def from_networks(cls, networks: list[MLP]) -> StudentBatch:
        layouts = {n.layout for n in networks}
        if len(layouts) != 1:
            raise ValueError("all networks of a batch must have the same sizes")
        return cls(torch.stack([n.theta for n in networks]), layouts.pop(), networks[0].activation)

    @property
    def n_students(self) -> int:
        return self.theta.shape[0]

    def __len__(self) -> int:
        return self.n_students

    def student(self, i: int) -> MLP:
        return MLP.from_flat(self.theta[i], self.layout, self.activation)

    def __repr__(self) -> str:
        sizes = "-".join(str(s) for s in self.layout.sizes)
        return f"StudentBatch({self.n_students} x {sizes}, activation={self.activation.name!r})"
