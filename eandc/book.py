"""The book of results: execute every notebook template for a profile, then build the HTML.

Layout, relative to the book's root (the repository root, where ``_config.yml`` lives)::

    notebooks/<template>.ipynb          parameterized templates (one cell tagged ``parameters``)
    notebooks/profiles/<profile>.toml   for each template, the parameter sets to run
    book/*.md                           prose pages
    book/executed/<name>.ipynb          what papermill writes, the pages the TOC points to
    book/golden/quickstart.ipynb        the committed golden notebook (smoke parameters)
    _config.yml, _toc.yml               Jupyter Book 1
    _build/html/index.html              the book

Profiles: ``smoke`` (CI, each notebook well under a minute), ``standard`` (the default, the whole
book in at most 45 minutes on a 2-core CPU), ``paper`` (paper scale, for a GPU or a cluster). A
profile file holds one array of tables per template; each entry names its output (a path under
``book/executed``, so a chapter can fan out into one page per parameter set) and its
parameters::

    [[quickstart]]
    name = "quickstart"
    [quickstart.parameters]
    activation = "tanh"

:func:`build_book` is what ``make book`` and ``eandc book`` run. An executed notebook whose
template, parameters and ``eandc`` sources are unchanged since it was written is reused, not
executed again (``force=True`` executes everything). Notebooks run in a kernel named
``eandc`` that :func:`ensure_kernel` registers in this environment, with ``TQDM_DISABLE=1``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PROFILES", "KERNEL", "Run", "BookError", "load_profile", "ensure_kernel",
           "execute", "build_html", "build_book", "write_golden", "GOLDEN"]

log = logging.getLogger(__name__)

PROFILES = ("smoke", "standard", "paper")
KERNEL = "eandc"
TEMPLATES = "notebooks"
EXECUTED = "book/executed"
GOLDEN = "book/golden/quickstart.ipynb"
GOLDEN_TEMPLATE, GOLDEN_PROFILE = "quickstart", "smoke"
METADATA_KEY = "eandc_book"


class BookError(RuntimeError):
    """A profile, a template or a notebook execution went wrong; the message says which."""


@dataclass(frozen=True)
class Run:
    """One execution: the template ``notebook`` with ``parameters``, written to ``output``."""

    notebook: str
    name: str
    parameters: dict = field(default_factory=dict)

    def template(self, root: Path) -> Path:
        return Path(root) / TEMPLATES / f"{self.notebook}.ipynb"

    def output(self, root: Path) -> Path:
        return Path(root) / EXECUTED / f"{self.name}.ipynb"


def load_profile(profile: str, root=".") -> list[Run]:
    """The runs of ``profile``: every template in ``notebooks/`` must have at least one."""
    root = Path(root)
    path = root / TEMPLATES / "profiles" / f"{profile}.toml"
    if not path.is_file():
        raise BookError(f"no profile {profile!r}: {path} does not exist (profiles: {', '.join(PROFILES)})")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise BookError(f"{path}: {error}") from None
    templates = sorted(p.stem for p in (root / TEMPLATES).glob("*.ipynb"))
    unknown = sorted(set(spec) - set(templates))
    if unknown:
        raise BookError(f"{path}: no template for {', '.join(unknown)} in {root / TEMPLATES}")
    missing = [t for t in templates if not spec.get(t)]
    if missing:
        raise BookError(f"{path}: no parameter set for {', '.join(missing)}")
    runs, names = [], set()
    for notebook in templates:
        for entry in spec[notebook]:
            name = entry.get("name")
            if not isinstance(name, str) or not name or name.startswith("/") or ".." in name:
                raise BookError(f"{path}: every [[{notebook}]] entry needs a relative name, got {name!r}")
            if name in names:
                raise BookError(f"{path}: output name {name!r} is used twice")
            extra = set(entry) - {"name", "parameters"}
            if extra:
                raise BookError(f"{path}: [[{notebook}]] {name}: unknown keys {sorted(extra)}")
            names.add(name)
            runs.append(Run(notebook, name, {**entry.get("parameters", {}), "profile": profile}))
    return runs


def ensure_kernel() -> str:
    """Register this environment's Python as the Jupyter kernel ``eandc`` (in ``sys.prefix``)
    unless it already is; returns the kernel name."""
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def ours() -> bool:
        try:
            spec = KernelSpecManager().get_kernel_spec(KERNEL)
        except NoSuchKernel:
            return False
        return bool(spec.argv) and os.path.abspath(spec.argv[0]) == os.path.abspath(sys.executable)

    if not ours():
        install(kernel_name=KERNEL, display_name="Python 3 (eandc)", prefix=sys.prefix)
        log.info("registered the Jupyter kernel %r for %s", KERNEL, sys.executable)
        if not ours():
            where = KernelSpecManager().find_kernel_specs().get(KERNEL)
            raise BookError(f"the Jupyter kernel {KERNEL!r} in {where} runs another Python and "
                            f"shadows this environment's; remove it (jupyter kernelspec remove {KERNEL})")
    return KERNEL


def _sources_digest() -> str:
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted([*package.glob("*.py"), *package.glob("*.c")]):  # native.c too
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(run: Run, root: Path, sources: str | None = None) -> str:
    """What an executed notebook depends on: its template, its parameters, eandc's sources."""
    digest = hashlib.sha256(run.template(root).read_bytes())
    digest.update(json.dumps(run.parameters, sort_keys=True).encode())
    digest.update((sources or _sources_digest()).encode())
    return digest.hexdigest()


def _up_to_date(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text()).get("metadata", {})
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get(METADATA_KEY, {}).get("fingerprint") == key and \
        not meta.get("papermill", {}).get("exception")


def _execute_one(template: Path, output: Path, parameters: dict, cwd: Path) -> None:
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel()
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits it: no progress bars in pages
    try:
        papermill.execute_notebook(str(template), str(output), parameters=parameters,
                                   kernel_name=kernel, progress_bar=False, cwd=str(cwd),
                                   log_output=False)
    finally:
        if saved is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = saved


def _relative_paths(path: Path, root: Path) -> None:
    """Papermill records absolute input and output paths; keep them relative to the root."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = os.path.relpath(meta[key], root)
    nbformat.write(nb, path)


def execute(runs: list[Run], root=".", force: bool = False,
            report: Callable[[str], None] = log.info) -> list[Path]:
    """Execute each run with papermill (reusing up-to-date outputs unless ``force``); returns
    the executed notebooks. Executes every run even when one fails, then raises
    :class:`BookError` naming the failures (the failed notebooks keep their traceback)."""
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    root = Path(root).resolve()
    sources = _sources_digest()
    failed, outputs = [], []
    for i, run in enumerate(runs, 1):
        output, key = run.output(root), fingerprint(run, root, sources)
        outputs.append(output)
        label = f"[{i}/{len(runs)}] {run.notebook} -> {output.relative_to(root)}"
        if not force and _up_to_date(output, key):
            report(f"{label}: up to date, reused")
            continue
        start = time.perf_counter()
        try:
            _execute_one(run.template(root), output, run.parameters, run.template(root).parent)
        except PapermillExecutionError as error:
            failed.append(f"{output.relative_to(root)}: {error.ename}: {error.evalue}")
            report(f"{label}: FAILED after {time.perf_counter() - start:.0f} s ({error.ename})")
            continue
        nb = nbformat.read(output, as_version=4)
        nb.metadata[METADATA_KEY] = {"fingerprint": key, "template": f"{TEMPLATES}/{run.notebook}.ipynb",
                                     "parameters": run.parameters}
        nbformat.write(nb, output)
        report(f"{label}: executed in {time.perf_counter() - start:.0f} s")
    if failed:
        raise BookError("notebooks failed:\n  " + "\n  ".join(failed))
    return outputs


def _jupyter_book() -> list[str]:
    exe = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if exe is None:
        raise BookError("jupyter-book is not installed in this environment: pip install -e '.[book]'")
    return [exe]


def build_html(root=".", report: Callable[[str], None] = log.info) -> Path:
    """``jupyter-book build ROOT -W -n --keep-going --all`` (warnings are errors); returns the
    path of ``index.html``."""
    root = Path(root).resolve()
    command = [*_jupyter_book(), "build", str(root), "-W", "-n", "--keep-going", "--all"]
    report("building the HTML: " + " ".join(command[1:]))
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise BookError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    index = root / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BookError(f"jupyter-book build wrote no {index}")
    return index


def build_book(profile: str = "standard", root=".", force: bool = False,
               report: Callable[[str], None] = log.info) -> Path:
    """Execute every template for ``profile``, build the HTML; returns ``index.html``'s path."""
    root = Path(root).resolve()
    for name in ("_config.yml", "_toc.yml"):
        if not (root / name).is_file():
            raise BookError(f"{root} has no {name}: run from the repository root, or pass its path")
    start = time.perf_counter()
    runs = load_profile(profile, root)
    report(f"profile {profile}: {len(runs)} notebook(s) to execute")
    execute(runs, root, force=force, report=report)
    index = build_html(root, report=report)
    report(f"book built in {time.perf_counter() - start:.0f} s")
    return index


def write_golden(root=".", report: Callable[[str], None] = log.info) -> Path:
    """Execute the quickstart with its smoke parameters into ``book/golden/`` (the notebook the
    tests compare outputs against); run it after changing the quickstart template."""
    root = Path(root).resolve()
    run = next(r for r in load_profile(GOLDEN_PROFILE, root) if r.notebook == GOLDEN_TEMPLATE)
    output = root / GOLDEN
    start = time.perf_counter()
    _execute_one(run.template(root), output, run.parameters, run.template(root).parent)
    _relative_paths(output, root)
    report(f"golden notebook {GOLDEN} written in {time.perf_counter() - start:.0f} s")
    return output


def add_command(commands) -> None:
    """Add the ``book`` subcommand (run by :func:`command`) to the ``eandc`` command line."""
    book = commands.add_parser("book", help="execute the notebooks for a profile and build the HTML book")
    book.set_defaults(func=command)
    book.add_argument("--verbose", action="store_true", help="log what each step does")
    book.add_argument("--profile", default="standard", choices=PROFILES,
                      help="smoke (CI, about a minute), standard (default, <= 45 min on 2 cores), paper")
    book.add_argument("--force", action="store_true", help="execute every notebook, even up-to-date ones")
    book.add_argument("--root", default=".", help="the book's root, where _config.yml is (default .)")
    book.add_argument("--golden", action="store_true",
                      help=f"only rewrite the golden notebook {GOLDEN} (smoke quickstart)")


def command(args) -> int:
    """Run ``eandc book``: 0 when the book is built, 1 when a notebook or the build fails."""
    try:
        if args.golden:
            write_golden(args.root, report=print)
            return 0
        index = build_book(args.profile, args.root, force=args.force, report=print)
    except BookError as error:
        print(f"eandc book: {error}", file=sys.stderr)
        return 1
    print(f"open {index}")
    return 0
