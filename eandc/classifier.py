"""Teachers trained on labelled data: the MNIST teachers of the book, by a fixed recipe.

Expand-and-Cluster is judged on teachers whose weights are known. For MNIST the teachers are
MLPs ``784 -> widths -> 10`` trained here on images and labels, and then treated as black boxes
(queries in, logits out). The recipe of :func:`train_classifier`:

* initialisation: weights ``N(0, 1 / fan_in)``, biases ``N(0, bias_std^2)`` for hidden units
  (default ``bias_std`` 1: every neuron starts with a distinct incoming vector), output biases
  0; ``numpy.random.default_rng(seed)``. A ReLU neuron whose bias lies below the range of its
  ``w . x`` over the images is dead on all of them from the start and stays so (no gradient
  reaches it); a smaller ``bias_std`` makes that rarer;
* loss: cross-entropy of the logits (the output layer is linear, as in every eandc MLP);
* optimiser: Adam, learning rate ``lr`` (default 1e-3), mini-batches of ``batch_size`` (128)
  reshuffled each epoch, ``epochs`` passes (default 30), in float32 (the teacher's weights are
  then stored in float64: from then on it is an exact, known function);
* no weight decay, no early stopping: the weights of pixels that never vary in the training
  images keep their initial values, which a black-box method can only see through queries that
  make those pixels vary.

:func:`accuracy` scores a network on held-out images.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import get_activation
from .mlp import MLP
from .teachers import check_inputs

__all__ = ["train_classifier", "accuracy", "predict"]

log = logging.getLogger(__name__)


def _check_labels(labels, n: int, n_classes: int | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or (n_classes is not None and labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def train_classifier(X, labels, widths, activation="g", *, n_classes=None, epochs=30, lr=1e-3,
                     batch_size=128, bias_std=1.0, seed=0, progress=True) -> MLP:
    """An MLP ``d_in -> widths -> n_classes`` trained on (X, labels) by the recipe in the module doc."""
    X = check_inputs(X, name="images")
    labels = _check_labels(labels, X.shape[0], n_classes)
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    widths = [int(widths)] if isinstance(widths, (int, np.integer)) else [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be positive integers, got {widths}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("epochs, batch_size and lr must be positive")
    if not bias_std >= 0:
        raise ValueError(f"bias_std must be >= 0, got {bias_std}")
    act = get_activation(activation)
    rng = np.random.default_rng(seed)
    sizes = [X.shape[1], *widths, n_classes]
    params = []
    for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=(fan_out, fan_in))
        b = rng.normal(0.0, bias_std, size=fan_out) if l < len(widths) else np.zeros(fan_out)
        params += [torch.tensor(w, dtype=torch.float32, requires_grad=True),
                   torch.tensor(b, dtype=torch.float32, requires_grad=True)]
    optimizer = torch.optim.Adam(params, lr=lr)
    inputs = X.to(torch.float32)
    targets = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(int(seed))
    bar = tqdm(range(epochs), desc="teacher", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(inputs.shape[0], generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            a = inputs[rows]
            for w, b in zip(params[0:-2:2], params[1:-2:2]):
                a = act(a @ w.T + b)
            logits = a @ params[-2].T + params[-1]
            loss = torch.nn.functional.cross_entropy(logits, targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        bar.set_postfix(loss=f"{total / len(order):.3f}")
    net = MLP([p.detach().double() for p in params[0::2]], [p.detach().double() for p in params[1::2]],
              act.name)
    log.info("trained classifier %s: training cross-entropy %.4f", net, total / len(order))
    return net


def predict(net, X) -> np.ndarray:
    """Class of the largest output of ``net`` for every row of ``X``."""
    with torch.no_grad():
        return np.asarray(torch.as_tensor(net(check_inputs(X))).argmax(-1).cpu())


def accuracy(net, X, labels) -> float:
    """Fraction of rows of ``X`` whose largest output is the label."""
    labels = _check_labels(labels, np.shape(X)[0], None)
    return float((predict(net, X) == labels).mean())
