"""eandc: recover the exact weights and layer widths of a black-box MLP with Expand-and-Cluster.

Martinelli, Şimşek, Gerstner, Brea (ICML 2024, arXiv 2304.12794). A few lines recover a teacher::

    import eandc
    teacher = eandc.random_teacher(d_in=2, widths=[4], activation="g", seed=0)
    X = eandc.gaussian_inputs(10_000, 2, seed=1)
    result = eandc.expand_and_cluster(teacher, X, "g", student_widths=[16])
    print(eandc.compare(teacher, result.network, eandc.gaussian_inputs(5_000, 2, seed=2)).summary())
"""

from . import data
from .activations import ACTIVATIONS, get_activation
from .clustering import cluster_layer
from .compare import Comparison, compare
from .mlp import MLP, StudentBatch
from .recover import ExpandAndClusterResult, expand_and_cluster
from .teachers import gaussian_inputs, query, random_teacher, uniform_inputs

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "Comparison", "ExpandAndClusterResult", "MLP", "StudentBatch",
    "cluster_layer", "compare", "data", "expand_and_cluster", "gaussian_inputs", "get_activation",
    "query", "random_teacher", "uniform_inputs",
]
