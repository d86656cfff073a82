"""The ``eandc`` command line.

``eandc demo`` draws a random teacher, recovers it with Expand-and-Cluster and prints the
comparison. Exit code 0 on success, 1 when the recovery is not exact, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import __version__
from .activations import ACTIVATIONS
from .compare import compare
from .recover import expand_and_cluster
from .teachers import gaussian_inputs, random_teacher


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eandc", description=__doc__.splitlines()[0] + " "
                                     "Recover black-box MLPs with Expand-and-Cluster.")
    parser.add_argument("--version", action="version", version=f"eandc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="recover a random teacher and print the comparison")
    demo.add_argument("--activation", default="g", choices=sorted(ACTIVATIONS))
    demo.add_argument("--d-in", type=_positive, default=2, help="input dimension (default 2)")
    demo.add_argument("--width", type=_positive, default=4, help="teacher width (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="teacher and training seed (default 0)")
    demo.add_argument("--queries", type=_positive, default=10_000, help="number of queries")
    demo.add_argument("--students", type=_positive, default=10, help="number of students N")
    demo.add_argument("--rho", type=_positive, default=4,
                      help="overparameterisation factor: students are rho x width wide (default 4)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--verbose", action="store_true", help="log what each phase does")
    return parser


def demo(args) -> int:
    teacher = random_teacher(args.d_in, [args.width], activation=args.activation, seed=args.seed)
    X = gaussian_inputs(args.queries, args.d_in, seed=args.seed + 1)
    held_out = gaussian_inputs(5_000, args.d_in, seed=args.seed + 2)
    print(f"teacher: {teacher}, seed {args.seed}; {args.queries} Gaussian queries; "
          f"{args.students} students {args.rho * args.width} wide")
    start = time.perf_counter()
    result = expand_and_cluster(teacher, X, args.activation, student_widths=[args.rho * args.width],
                                n_students=args.students, seed=args.seed, progress=not args.quiet)
    seconds = time.perf_counter() - start
    comparison = compare(teacher, result.network, held_out)
    print(result.summary())
    print(comparison.summary())
    exact = comparison.exact(distance_tol=1e-10, rmse_tol=1e-9)
    print(f"{'exact recovery' if exact else 'recovery NOT exact'} in {seconds:.1f} s")
    return 0 if exact else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return demo(args)
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"eandc: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
