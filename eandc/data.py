"""MNIST for black-box experiments: the official IDX files, checked and downloaded, and query sets.

:func:`mnist` returns one split of MNIST (LeCun, Cortes & Burges) as an :class:`MnistSplit`:
``images`` float64 of shape ``(n, 784)`` scaled to ``[0, 1]`` (pixel / 255, rows of the 28 x 28
image one after the other) and ``labels`` int64 of shape ``(n,)``. It reads the four official
gzip files (:data:`MNIST_FILES`) from one folder, chosen by :func:`mnist_folder`:

1. the ``data_dir`` argument, else
2. the folder named by the environment variable ``EANDC_DATA`` (the folder holding the files), else
3. a per-user cache: ``$XDG_CACHE_HOME/eandc/mnist``, or ``~/.cache/eandc/mnist``.

Every file's SHA-256 is checked against :data:`MNIST_SHA256` before it is parsed; a mismatch
raises :class:`ChecksumError`. A missing file is downloaded from the first of :data:`MIRRORS`
that serves it: streamed to a temporary file in the same folder, checked, then renamed, so the
folder never holds a partial or unverified file. When no mirror can be reached,
:class:`MnistNotFoundError` says which files are missing where and how to provide them.

A black box can be queried anywhere, not only on digits. The query sets below build inputs from
available images (all float64, shape ``(n, 784)``, deterministic given ``seed`` through
``numpy.random.default_rng``):

* :func:`image_queries`: the images themselves;
* :func:`noise_overlay_queries`: random images plus i.i.d. Gaussian pixel noise;
* :func:`contrast_queries`: random images scaled by random factors in ``[-1, 1]`` (negatives
  included), plus the same noise;
* :func:`tile_queries`: patchworks whose tiles come from different random images, each tile
  kept at its own position;
* :func:`query_set`: the same by name (:data:`QUERY_SETS`).

:func:`varying_pixels` marks the pixels that vary across a query set (MNIST's border pixels are
0 in almost every image), so that distances can leave out the ones that never do.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .storage import CorruptFileError, user_cache_folder
from .teachers import check_inputs

__all__ = [
    "MIRRORS", "MNIST_FILES", "MNIST_SHA256", "QUERY_SETS", "ChecksumError", "IdxFormatError",
    "DownloadError", "MnistNotFoundError", "MnistSplit", "mnist", "mnist_folder", "read_idx",
    "download_file", "sha256_of", "image_queries", "noise_overlay_queries", "contrast_queries",
    "tile_queries", "query_set", "varying_pixels",
]

log = logging.getLogger(__name__)

ENV_VAR = "EANDC_DATA"

# Mirrors serving the four official files under their official names (tried in this order).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MNIST_SIZES = {"train": 60_000, "test": 10_000}

# SHA-256 of the gzip files as published in torchvision's MNIST dataset definition,
# pytorch/vision, torchvision/prototype/datasets/_builtin/mnist.py (MNIST._CHECKSUMS), commit
# 1ec2509e8715d5373b194b688ee0cc75262baec9. The two test sums equal the SHA256SUMS shipped with
# the offline copy of the test split, whose files also match torchvision's MD5s
# (torchvision/datasets/mnist.py): 9fb629c4189551a2d022fa330f9573f3, ec29112dd5afa0611ce80d1b7f02629c.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# IDX type codes (third byte of the magic number) and the big-endian numpy dtypes they stand for
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_CHUNK = 1 << 20  # bytes read at a time while downloading or hashing


class ChecksumError(CorruptFileError):
    """A file's SHA-256 differs from the published one."""

    def __init__(self, path, expected: str, actual: str, detail: str = ""):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(f"{path}: SHA-256 {actual} does not match the expected {expected}{detail}")


class IdxFormatError(CorruptFileError):
    """A file is not a well-formed IDX file (or not the one expected)."""


class DownloadError(OSError):
    """No mirror delivered a file."""


class MnistNotFoundError(FileNotFoundError):
    """MNIST files are missing and could not be downloaded."""


@dataclass(frozen=True)
class MnistSplit:
    """One MNIST split: ``images`` float64 ``(n, 784)`` in ``[0, 1]``, ``labels`` int64 ``(n,)``.

    Unpacks as a pair: ``images, labels = mnist("test")``.
    """

    images: np.ndarray
    labels: np.ndarray
    split: str
    folder: Path

    def __iter__(self):
        return iter((self.images, self.labels))

    def __len__(self) -> int:
        return len(self.labels)


# --- where the files are -----------------------------------------------------------------------

def default_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/eandc/mnist`` (when set to an absolute path), else ``~/.cache/eandc/mnist``."""
    return user_cache_folder("mnist")


def _resolve_folder(data_dir) -> tuple[Path, str]:
    """The folder to read MNIST from and a phrase saying how it was chosen."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "given as data_dir="
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser(), f"named by ${ENV_VAR}"
    return default_cache_folder(), "the per-user cache"


def mnist_folder(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder :func:`mnist` reads: ``data_dir``, else ``$EANDC_DATA``, else the user cache."""
    return _resolve_folder(data_dir)[0]


# --- checksums and IDX parsing -----------------------------------------------------------------

def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verified_bytes(path: Path, expected: str) -> bytes:
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected.lower():
        raise ChecksumError(path, expected.lower(), actual,
                            "; the file is damaged or not the official one: delete it to download it again")
    return raw


def _decompressed(raw: bytes, path) -> bytes:
    if raw[:2] != b"\x1f\x8b":  # not gzip: a plain IDX file
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise IdxFormatError(f"{path} is not a readable gzip file ({error})") from error


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse uncompressed IDX bytes into an array of native byte order (checks header and size)."""
    if len(data) < 4:
        raise IdxFormatError(f"{name}: {len(data)} bytes, too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IdxFormatError(f"{name}: bad magic number 0x{data[:4].hex()} (an IDX file starts with "
                             "two zero bytes, a type code and the number of dimensions)")
    if code not in IDX_DTYPES:
        raise IdxFormatError(f"{name}: unknown IDX type code 0x{code:02x} (known: "
                             f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{name}: truncated header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxFormatError(f"{name}: holds {len(data) - header} bytes of values, but its header "
                             f"announces shape {shape} of {dtype.name} ({expected} bytes); "
                             f"the file is {'truncated' if len(data) - header < expected else 'too long'}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array.

    Checks the magic number, type code, dimensions and that the number of bytes matches them;
    with ``sha256``, first checks the file's checksum (:class:`ChecksumError`). A malformed file
    raises :class:`IdxFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = _verified_bytes(path, sha256) if sha256 is not None else path.read_bytes()
    return parse_idx(_decompressed(raw, path), str(path))


# --- downloading -------------------------------------------------------------------------------

def _fetch_to(url: str, handle, timeout: float, progress: bool, desc: str) -> str:
    """Stream ``url`` into the open binary ``handle``; return the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
                  leave=False) as bar:
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"{url}: connection closed after {received} of {total} bytes")
    handle.flush()
    os.fsync(handle.fileno())
    return digest.hexdigest()


def download_file(name: str, folder: str | os.PathLike, sha256: str, mirrors=MIRRORS,
                  timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``name`` into ``folder`` from the first mirror that serves it with this SHA-256.

    Each mirror is a base URL; the file is fetched from ``mirror + name``. The bytes go to a
    temporary file in ``folder``, which is renamed to ``name`` only once its checksum matches;
    on a network error or a wrong checksum it is deleted and the next mirror is tried. When every
    mirror fails, raises :class:`ChecksumError` if one of them served wrong bytes, else
    :class:`DownloadError`; either way ``folder`` is left as it was. Returns the path.
    """
    folder = Path(folder)
    target = folder / name
    expected = sha256.lower()
    if not mirrors:
        raise DownloadError(f"cannot download {name}: no mirrors given")
    failures, bad_sum = [], None
    for mirror in mirrors:
        url = mirror if mirror.endswith("/") else mirror + "/"
        url += name
        log.info("downloading %s from %s", name, url)
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        except OSError as error:
            raise DownloadError(f"cannot download {name}: cannot write in {folder} ({error})") from error
        try:
            with os.fdopen(fd, "wb") as handle:
                actual = _fetch_to(url, handle, timeout, progress, name)
            if actual != expected:
                bad_sum = bad_sum or (url, actual)
                failures.append(f"{url}: SHA-256 {actual}, expected {expected}")
                log.warning("%s: wrong SHA-256 %s (expected %s); trying the next mirror",
                            url, actual, expected)
                continue
            os.replace(tmp, target)
            log.info("saved %s (SHA-256 verified)", target)
            return target
        except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError
            failures.append(f"{url}: {error}")
            log.warning("could not download %s: %s", url, error)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    listing = "".join(f"\n  {line}" for line in failures)
    if bad_sum is not None:
        raise ChecksumError(bad_sum[0], expected, bad_sum[1],
                            f"; nothing was saved in {folder}. Mirrors tried:{listing}")
    raise DownloadError(f"could not download {name} from any mirror:{listing}")


# --- MNIST -------------------------------------------------------------------------------------

def _missing_message(split, folder, how, missing, mirrors, reason) -> str:
    names = ", ".join(missing)
    sources = ", ".join(mirrors) if mirrors else "(no mirrors given)"
    return (f"MNIST {split} split: {names} not found in {folder} ({how}). {reason}\n"
            f"Either put the official files there, or point eandc at a folder that holds them "
            f"with mnist(..., data_dir=FOLDER) or the environment variable {ENV_VAR}=FOLDER. "
            f"The files can be downloaded from {sources} "
            f"(SHA-256 sums: eandc.data.MNIST_SHA256).")


def _ensure_files(split, folder, how, download, mirrors, timeout, progress) -> None:
    missing = [name for name in MNIST_FILES[split] if not (folder / name).is_file()]
    if not missing:
        return
    if not download:
        raise MnistNotFoundError(_missing_message(split, folder, how, missing, mirrors,
                                                  "Downloading was switched off (download=False)."))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in missing:
            download_file(name, folder, MNIST_SHA256[name], mirrors, timeout, progress)
    except OSError as error:  # DownloadError, or the folder cannot be created
        still = [name for name in missing if not (folder / name).is_file()]
        raise MnistNotFoundError(_missing_message(split, folder, how, still, mirrors,
                                                  f"Downloading failed: {error}")) from error


def _check_mnist_arrays(images, labels, split, folder) -> None:
    n = MNIST_SIZES[split]
    if images.dtype != np.uint8 or images.shape != (n, 28, 28):
        raise IdxFormatError(f"MNIST {split} images in {folder}: expected uint8 of shape ({n}, 28, 28), "
                             f"got {images.dtype} of shape {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (n,):
        raise IdxFormatError(f"MNIST {split} labels in {folder}: expected uint8 of shape ({n},), "
                             f"got {labels.dtype} of shape {labels.shape}")
    if labels.max() > 9:
        raise IdxFormatError(f"MNIST {split} labels in {folder}: a label is {labels.max()}, not a digit")


def mnist(split: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
          mirrors=MIRRORS, timeout: float = 60.0, progress: bool = True) -> MnistSplit:
    """One MNIST split (``"train"``: 60,000 images, ``"test"``: 10,000) as an :class:`MnistSplit`.

    Reads the official IDX gzip files from ``data_dir``, else from ``$EANDC_DATA``, else from the
    per-user cache (:func:`mnist_folder`). Missing files are downloaded there from ``mirrors``
    (unless ``download=False``); every file's SHA-256 is checked against :data:`MNIST_SHA256`
    before use. ``images`` are float64 ``(n, 784)`` in ``[0, 1]`` (pixel / 255), ``labels``
    int64 ``(n,)``.

    Raises :class:`ChecksumError` for a file with another checksum, :class:`IdxFormatError` for a
    malformed one, :class:`MnistNotFoundError` when files are missing and cannot be downloaded.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    folder, how = _resolve_folder(data_dir)
    mirrors = MIRRORS if mirrors is None else tuple(mirrors)
    _ensure_files(split, folder, how, download, mirrors, timeout, progress)
    image_file, label_file = MNIST_FILES[split]
    images = read_idx(folder / image_file, MNIST_SHA256[image_file])
    labels = read_idx(folder / label_file, MNIST_SHA256[label_file])
    _check_mnist_arrays(images, labels, split, folder)
    log.info("loaded MNIST %s split from %s: %d images", split, folder, len(labels))
    return MnistSplit(images.reshape(len(images), -1) / 255.0, labels.astype(np.int64), split, folder)


# --- query sets --------------------------------------------------------------------------------

DEFAULT_NOISE_STD = 0.1  # std of the Gaussian pixel noise of the "noise" and "contrast" query sets
DEFAULT_MAX_FACTOR = 1.0  # the "contrast" query set scales images by factors in [-this, this]

QUERY_SETS = {
    "images": "the images themselves: n of them drawn without replacement (all, in order, if n is None)",
    "noise": f"random images plus N(0, {DEFAULT_NOISE_STD}^2) noise on every pixel, not clipped",
    "contrast": f"random images times factors uniform in [-{DEFAULT_MAX_FACTOR}, {DEFAULT_MAX_FACTOR}], "
                f"plus N(0, {DEFAULT_NOISE_STD}^2) noise on every pixel",
    "tiles2x2": "2 x 2 patchworks of quarters of 4 different random images, each at its own position",
    "tiles4x4": "4 x 4 patchworks of 7 x 7 tiles of 16 different random images, each at its own position",
}


def _images(images) -> np.ndarray:
    return check_inputs(images, "images").numpy()


def _check_count(n) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return int(n)


def image_queries(images) -> np.ndarray:
    """The images themselves as queries: a float64 copy of shape ``(n, d)``."""
    return _images(images).copy()


def noise_overlay_queries(images, n: int, noise_std: float = DEFAULT_NOISE_STD, seed: int = 0,
                          *, clip: bool = False) -> np.ndarray:
    """``n`` random images with i.i.d. ``N(0, noise_std^2)`` noise added to every pixel.

    Recipe: ``rng = default_rng(seed)``; the images are ``images[rng.integers(0, len(images), n)]``
    (drawn with replacement), then the noise is ``rng.normal(0, noise_std, (n, d))``. The sum is
    not clipped (a black box can be queried outside ``[0, 1]``, and clipping would make the noise
    on the many zero pixels one-sided); ``clip=True`` clips it to ``[0, 1]``.
    """
    images = _images(images)
    n = _check_count(n)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(images), size=n)
    queries = images[chosen] + rng.normal(0.0, noise_std, size=(n, images.shape[1]))
    return np.clip(queries, 0.0, 1.0) if clip else queries


def contrast_queries(images, n: int, max_factor: float = DEFAULT_MAX_FACTOR,
                     noise_std: float = DEFAULT_NOISE_STD, seed: int = 0) -> np.ndarray:
    """``n`` random images, each scaled by its own factor uniform in ``[-max_factor, max_factor]``,
    plus i.i.d. ``N(0, noise_std^2)`` noise on every pixel.

    Why: a neuron's preactivation on an image, ``w . x + b``, becomes ``a (w . x) + b`` on the
    image scaled by ``a``; as ``a`` runs over ``[-1, 1]`` it sweeps ``[b - |w . x|, b + |w . x|]``,
    through the bend of the activation, on both sides. On the images themselves a classifier's
    neurons sit mostly on one side of it: a linear map explains 97.8-98.9% of the logits' variance of
    the standard profile's g, softplus and ReLU teachers on the images and noise overlays, which
    makes their neurons hard to tell apart (see ``eandc.mnist``).

    Recipe: ``rng = default_rng(seed)``; the images are ``images[rng.integers(0, len(images), n)]``,
    the factors ``rng.uniform(-max_factor, max_factor, n)``, then the noise
    ``rng.normal(0, noise_std, (n, d))``.
    """
    images = _images(images)
    n = _check_count(n)
    if not (max_factor > 0 and np.isfinite(max_factor)):
        raise ValueError(f"max_factor must be a positive number, got {max_factor}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(images), size=n)
    factors = rng.uniform(-max_factor, max_factor, size=n)
    return factors[:, None] * images[chosen] + rng.normal(0.0, noise_std, size=(n, images.shape[1]))


def _grid(tiles) -> tuple[int, int]:
    grid = (tiles, tiles) if isinstance(tiles, (int, np.integer)) else tuple(tiles)
    if len(grid) != 2 or any(isinstance(t, bool) or int(t) != t or t < 1 for t in grid):
        raise ValueError(f"tiles must be a positive integer or a pair (rows, columns), got {tiles!r}")
    return int(grid[0]), int(grid[1])


def _distinct_sources(rng, n_images: int, n: int, k: int) -> np.ndarray:
    """``(n, k)`` image indices, all different within a row, each row uniform among such tuples.

    Column ``t`` draws ``r = rng.integers(0, n_images - t, n)`` and takes the ``r``-th image (from
    0) among those not yet used in that row.
    """
    sources = np.empty((n, k), dtype=np.int64)
    for t in range(k):
        choice = rng.integers(0, n_images - t, size=n)
        used = np.sort(sources[:, :t], axis=1)
        for s in range(t):  # skip, in increasing order, the images already used
            choice += choice >= used[:, s]
        sources[:, t] = choice
    return sources


def tile_queries(images, n: int, tiles=(2, 2), seed: int = 0) -> np.ndarray:
    """``n`` patchworks: each tile of a query comes from another random image, at its own position.

    The square images (``d = side^2``, 784 for MNIST) are cut into a grid of ``tiles`` (an int
    ``k`` means ``k x k``) as equal as possible: row ``i`` of the grid covers image rows
    ``i * side // rows`` to ``(i + 1) * side // rows``, and likewise for columns. Tile ``t`` (grid
    cells in row-major order) of query ``q`` is the same tile of image ``sources[q, t]``. With
    ``rng = default_rng(seed)``, tile ``t`` of all queries draws ``r = rng.integers(0, len(images) - t, n)``
    and takes the ``r``-th image not yet used in its query, so the tiles of a query come from
    different images, all such choices being equally likely (this needs at least as many images
    as tiles).
    """
    images = _images(images)
    n = _check_count(n)
    rows, cols = _grid(tiles)
    side = int(round(np.sqrt(images.shape[1])))
    if side * side != images.shape[1]:
        raise ValueError(f"tile_queries needs square images; {images.shape[1]} pixels are not a square")
    if rows > side or cols > side:
        raise ValueError(f"a {rows} x {cols} grid does not fit {side} x {side} images")
    if len(images) < rows * cols:
        raise ValueError(f"{rows} x {cols} tiles from different images need at least {rows * cols} "
                         f"images, got {len(images)}")
    rng = np.random.default_rng(seed)
    sources = _distinct_sources(rng, len(images), n, rows * cols)
    pictures = images.reshape(len(images), side, side)
    queries = np.empty((n, side, side))
    row_edges = [i * side // rows for i in range(rows + 1)]
    col_edges = [j * side // cols for j in range(cols + 1)]
    for i in range(rows):
        for j in range(cols):
            r, c = slice(row_edges[i], row_edges[i + 1]), slice(col_edges[j], col_edges[j + 1])
            queries[:, r, c] = pictures[:, r, c][sources[:, i * cols + j]]
    return queries.reshape(n, side * side)


def query_set(name: str, images, n: int | None = None, seed: int = 0, **options) -> np.ndarray:
    """The query set ``name`` (one of :data:`QUERY_SETS`) of ``n`` queries built from ``images``.

    ``"images"``: ``n`` images drawn without replacement by ``default_rng(seed).permutation``
    (``n=None``: all of them, in order); ``"noise"``: :func:`noise_overlay_queries` (``options``
    such as ``noise_std=`` or ``clip=`` are passed on); ``"contrast"``: :func:`contrast_queries`
    (``max_factor=``, ``noise_std=``); ``"tiles2x2"`` and ``"tiles4x4"``: :func:`tile_queries`
    with that grid. All but ``"images"`` need ``n``.
    """
    if name not in QUERY_SETS:
        raise ValueError(f"unknown query set {name!r}; known: {', '.join(QUERY_SETS)}")
    if name == "images":
        if options:
            raise TypeError(f"query set 'images' takes no options, got {sorted(options)}")
        images = _images(images)
        if n is None:
            return images.copy()
        n = _check_count(n)
        if n > len(images):
            raise ValueError(f"cannot draw {n} different images from {len(images)}")
        return images[np.random.default_rng(seed).permutation(len(images))[:n]]
    if n is None:
        raise ValueError(f"query set {name!r} needs the number of queries n")
    if name == "noise":
        return noise_overlay_queries(images, n, seed=seed, **options)
    if name == "contrast":
        return contrast_queries(images, n, seed=seed, **options)
    grid = {"tiles2x2": (2, 2), "tiles4x4": (4, 4)}[name]
    return tile_queries(images, n, tiles=grid, seed=seed, **options)


def varying_pixels(X, tol: float = 0.0) -> np.ndarray:
    """Boolean mask ``(d,)``: True for the pixels whose range (max - min) over the queries exceeds ``tol``."""
    X = check_inputs(X, "queries").numpy()
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    return np.ptp(X, axis=0) > tol
