"""Activation functions, their derivatives, and the symmetry class each one belongs to.

Every activation is known by name. Training needs the value and the derivative together (one
pass over the pre-activations gives both), clustering and comparison need the symmetry class:

=====================================  ======================  ===================================
activation                             symmetry class          identity that makes it a symmetry
=====================================  ======================  ===================================
``g(x) = sigmoid(4x) + softplus(x)``   ``none``                (none)
``tanh``                               ``odd``                 s(-z) = -s(z)
``sigmoid``                            ``odd_constant``        s(-z) = 1 - s(z)
``softplus``, ``gelu``, ``silu``       ``even_linear``         s(-z) = s(z) - z
``relu``, ``leaky_relu``               ``even_linear_scaling`` s(-z) = s(z) - c z, s(kz) = k s(z)
=====================================  ======================  ===================================

(``leaky_relu`` has slope 0.01 on the negative side, so c = 1.01 for it and 1 for ``relu``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "SYMMETRY_CLASSES"]

SYMMETRY_CLASSES = ("none", "odd", "odd_constant", "even_linear", "even_linear_scaling")

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class Activation:
    """An activation function with its derivative and its symmetry class.

    ``flip_constant`` is K in s(-z) = K - s(z) (odd classes); ``flip_slope`` is c in
    s(z) - s(-z) = c z (even-plus-linear classes).
    """

    name: str
    value_and_derivative: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    symmetry: str
    flip_constant: float = 0.0
    flip_slope: float = 0.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.value_and_derivative(z)[0]

    @property
    def has_sign_symmetry(self) -> bool:
        return self.symmetry != "none"

    @property
    def has_scaling_symmetry(self) -> bool:
        return self.symmetry == "even_linear_scaling"

    @property
    def leaves_linear_term(self) -> bool:
        """True for the classes whose sign flip leaves a linear term behind."""
        return self.symmetry in ("even_linear", "even_linear_scaling")


# torch's softplus returns z itself above its threshold (default 20), an error of 2e-9 there that
# its derivative sigmoid(z) does not see; above 40, log1p(exp(-z)) < 5e-18 is below float64's
# resolution of z, so this threshold keeps value and derivative exact to rounding.
SOFTPLUS_THRESHOLD = 40.0


def _softplus_value(z):
    return torch.nn.functional.softplus(z, threshold=SOFTPLUS_THRESHOLD)


def _g(z):
    s4 = torch.sigmoid(4 * z)
    return s4 + _softplus_value(z), 4 * s4 * (1 - s4) + torch.sigmoid(z)


def _tanh(z):
    t = torch.tanh(z)
    return t, 1 - t * t


def _sigmoid(z):
    s = torch.sigmoid(z)
    return s, s * (1 - s)


def _softplus(z):
    return _softplus_value(z), torch.sigmoid(z)


_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT2PI = 1 / math.sqrt(2 * math.pi)


def _gelu(z):
    cdf = 0.5 * (1 + torch.erf(z * _INV_SQRT2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT2PI
    return z * cdf, cdf + z * pdf


def _silu(z):
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def _relu(z):
    positive = z > 0
    return torch.where(positive, z, torch.zeros_like(z)), positive.to(z.dtype)


def _leaky_relu(z):
    positive = z > 0
    slope = torch.where(positive, torch.ones_like(z), torch.full_like(z, LEAKY_SLOPE))
    return z * slope, slope


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("g", _g, "none"),
        Activation("tanh", _tanh, "odd", flip_constant=0.0),
        Activation("sigmoid", _sigmoid, "odd_constant", flip_constant=1.0),
        Activation("softplus", _softplus, "even_linear", flip_slope=1.0),
        Activation("gelu", _gelu, "even_linear", flip_slope=1.0),
        Activation("silu", _silu, "even_linear", flip_slope=1.0),
        Activation("relu", _relu, "even_linear_scaling", flip_slope=1.0),
        Activation("leaky_relu", _leaky_relu, "even_linear_scaling", flip_slope=1.0 + LEAKY_SLOPE),
    )
}


def get_activation(activation: str | Activation) -> Activation:
    """Look an activation up by name (case-insensitive); an unknown name raises ``ValueError``."""
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name (str), got {type(activation).__name__}")
    key = activation.strip().lower().replace("-", "_")
    if key not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[key]
