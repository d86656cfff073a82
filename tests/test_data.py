"""MNIST files (checksums, IDX parsing, downloads from a local server) and query sets built from images."""

import gzip
import hashlib
import http.server
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from eandc import data
from eandc.storage import CorruptFileError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TEST_FILES = data.MNIST_FILES["test"]


def _need_shared():
    if not all((SHARED / name).is_file() for name in TEST_FILES):
        pytest.skip(f"the offline MNIST test split is not at {SHARED}")


@pytest.fixture(autouse=True)
def _no_proxy_and_no_user_cache(monkeypatch, tmp_path):
    """Local servers are reached directly; nothing is ever read from or written to the real cache."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("EANDC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def idx_bytes(array, code=0x08, magic_zero=b"\x00\x00"):
    """IDX encoding written independently of eandc: zero bytes, type code, ndim, big-endian dims."""
    array = np.asarray(array)
    header = magic_zero + bytes([code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_gz(path, payload):
    path.write_bytes(gzip.compress(payload, mtime=0))
    return path


# --- the real test split ------------------------------------------------------------------------

def test_mnist_test_split_from_the_shared_folder():
    _need_shared()
    split = data.mnist("test", data_dir=SHARED, download=False)
    assert split.images.shape == (10_000, 784) and split.images.dtype == np.float64
    assert split.labels.shape == (10_000,) and split.labels.dtype == np.int64
    assert split.images.min() == 0.0 and split.images.max() == 1.0
    np.testing.assert_array_equal(np.round(split.images * 255) / 255, split.images)  # pixel / 255
    np.testing.assert_array_equal(np.bincount(split.labels),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(split.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    assert round(float(split.images.mean()), 6) == 0.132515
    assert split.folder == SHARED and split.split == "test" and len(split) == 10_000
    images, labels = split  # unpacks as a pair
    assert images is split.images and labels is split.labels


def test_checksums_match_the_published_sums_file():
    _need_shared()
    published = dict(reversed(line.split()) for line in (SHARED / "SHA256SUMS").read_text().splitlines()
                     if line.strip())
    for name in TEST_FILES:
        assert published[name] == data.MNIST_SHA256[name] == data.sha256_of(SHARED / name)
    assert set(data.MNIST_SHA256) == {name for pair in data.MNIST_FILES.values() for name in pair}
    assert all(len(s) == 64 and int(s, 16) >= 0 for s in data.MNIST_SHA256.values())


def test_environment_variable_names_the_folder(monkeypatch, tmp_path):
    assert data.mnist_folder() == tmp_path / "xdg-cache" / "eandc" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.mnist_folder() == tmp_path / "home" / ".cache" / "eandc" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec ignores relative paths
    assert data.mnist_folder() == tmp_path / "home" / ".cache" / "eandc" / "mnist"
    monkeypatch.setenv("EANDC_DATA", str(SHARED))
    assert data.mnist_folder() == SHARED
    assert data.mnist_folder(tmp_path) == tmp_path  # data_dir wins
    _need_shared()
    split = data.mnist("test", download=False)
    assert split.folder == SHARED and split.labels[0] == 7


def test_a_damaged_file_is_refused_with_both_sums(tmp_path):
    _need_shared()
    for name in TEST_FILES:
        (tmp_path / name).write_bytes((SHARED / name).read_bytes())
    labels = tmp_path / TEST_FILES[1]
    raw = bytearray(labels.read_bytes())
    raw[-10] ^= 0xFF
    labels.write_bytes(bytes(raw))
    actual = hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(data.ChecksumError) as caught:
        data.mnist("test", data_dir=tmp_path, download=False)
    message = str(caught.value)
    assert str(labels) in message and actual in message and data.MNIST_SHA256[TEST_FILES[1]] in message
    assert isinstance(caught.value, CorruptFileError)
    assert caught.value.expected == data.MNIST_SHA256[TEST_FILES[1]] and caught.value.actual == actual
    assert labels.read_bytes() == bytes(raw)  # the user's file is reported, not deleted


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        data.mnist("validation")


# --- the IDX reader on synthetic files ----------------------------------------------------------

def test_read_idx_on_small_synthetic_files(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    out = data.read_idx(write_gz(tmp_path / "images.gz", idx_bytes(images)))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)
    ints = np.array([[-1, 2**20], [7, -(2**31)]], dtype=np.int32)  # byte order matters here
    (tmp_path / "ints.idx").write_bytes(idx_bytes(ints, code=0x0C))  # plain, not gzipped
    out = data.read_idx(tmp_path / "ints.idx")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, ints)
    doubles = np.array([0.5, -1e300])
    out = data.read_idx(write_gz(tmp_path / "doubles.gz", idx_bytes(doubles, code=0x0E)))
    np.testing.assert_array_equal(out, doubles)
    good = write_gz(tmp_path / "good.gz", idx_bytes(images))
    assert data.read_idx(good, sha256=hashlib.sha256(good.read_bytes()).hexdigest()).shape == (3, 4, 5)
    with pytest.raises(data.ChecksumError, match="0" * 64):
        data.read_idx(good, sha256="0" * 64)


def test_read_idx_refuses_malformed_files(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    cases = {
        "magic": (idx_bytes(images, magic_zero=b"\x01\x00"), "bad magic number 0x01000803"),
        "code": (idx_bytes(images, code=0x0A), "unknown IDX type code 0x0a"),
        "short": (idx_bytes(images)[:-1], r"holds 17 bytes of values.*\(2, 3, 3\).*18 bytes.*truncated"),
        "long": (idx_bytes(images) + b"\x00", "holds 19 bytes.*too long"),
        "header": (idx_bytes(images)[:10], "truncated header"),
        "tiny": (b"\x00\x00", "too short for an IDX header"),
    }
    for name, (payload, message) in cases.items():
        with pytest.raises(data.IdxFormatError, match=message):
            data.read_idx(write_gz(tmp_path / f"{name}.gz", payload))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(idx_bytes(images))[:-12])  # a truncated gzip stream
    with pytest.raises(data.IdxFormatError, match="not a readable gzip file"):
        data.read_idx(cut)
    assert issubclass(data.IdxFormatError, CorruptFileError)
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "absent.gz")


# --- downloads from a local server --------------------------------------------------------------

class Server:
    """A local HTTP server: ``routes`` maps a path to bytes; anything else is a 404."""

    def __init__(self, routes):
        self.routes, self.hits = routes, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


SMALL = gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8)), mtime=0)
SMALL_SUM = hashlib.sha256(SMALL).hexdigest()
CORRUPT = SMALL[:-5] + bytes(b ^ 0xFF for b in SMALL[-5:])


def test_download_accepts_a_good_file(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    with Server({"/good/small.gz": SMALL}) as server:
        path = data.download_file("small.gz", folder, SMALL_SUM, mirrors=[server.url + "/good"],
                                  progress=False)
    assert path == folder / "small.gz" and path.read_bytes() == SMALL
    assert sorted(p.name for p in folder.iterdir()) == ["small.gz"]
    np.testing.assert_array_equal(data.read_idx(path, SMALL_SUM), np.arange(10))


def test_download_rejects_a_corrupted_file_and_leaves_nothing(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    with Server({"/bad/small.gz": CORRUPT}) as server:
        with pytest.raises(data.ChecksumError) as caught:
            data.download_file("small.gz", folder, SMALL_SUM, mirrors=[server.url + "/bad/"],
                               progress=False)
    message = str(caught.value)
    assert "small.gz" in message and SMALL_SUM in message
    assert hashlib.sha256(CORRUPT).hexdigest() in message
    assert list(folder.iterdir()) == []  # no temporary file, no target file


def test_download_falls_through_to_the_next_mirror(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    routes = {"/bad/small.gz": CORRUPT, "/good/small.gz": SMALL}
    with Server(routes) as server:
        mirrors = [server.url + "/missing/", server.url + "/bad/", server.url + "/good/"]
        path = data.download_file("small.gz", folder, SMALL_SUM, mirrors=mirrors, progress=False)
        assert server.hits == ["/missing/small.gz", "/bad/small.gz", "/good/small.gz"]
    assert path.read_bytes() == SMALL
    assert sorted(p.name for p in folder.iterdir()) == ["small.gz"]


def test_download_error_when_no_mirror_serves_the_file(tmp_path):
    with Server({}) as server:
        closed = closed_port_url()
        with pytest.raises(data.DownloadError) as caught:
            data.download_file("small.gz", tmp_path, SMALL_SUM,
                               mirrors=[server.url + "/missing/", closed], progress=False)
    message = str(caught.value)
    assert "small.gz" in message and "404" in message and "refused" in message and closed in message
    assert list(tmp_path.iterdir()) == []


def test_mnist_downloads_missing_files_and_verifies_them(tmp_path):
    _need_shared()
    routes = {f"/mnist/{name}": (SHARED / name).read_bytes() for name in TEST_FILES}
    folder = tmp_path / "new" / "mnist"  # created on demand
    with Server(routes) as server:
        split = data.mnist("test", data_dir=folder, mirrors=[closed_port_url(), server.url + "/mnist/"],
                           progress=False)
        assert server.hits == [f"/mnist/{name}" for name in TEST_FILES]
        data.mnist("test", data_dir=folder, mirrors=[server.url + "/mnist/"])  # no second download
        assert len(server.hits) == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(TEST_FILES)
    assert np.bincount(split.labels)[1] == 1135 and split.images.shape == (10_000, 784)


def test_offline_without_files_says_what_is_missing_and_what_to_set(tmp_path):
    mirror = closed_port_url()
    with pytest.raises(data.MnistNotFoundError) as caught:
        data.mnist("train", data_dir=tmp_path, mirrors=[mirror], progress=False, timeout=5)
    message = str(caught.value)
    for needed in (*data.MNIST_FILES["train"], str(tmp_path), "data_dir=", "EANDC_DATA", mirror,
                   "Downloading failed"):
        assert needed in message, needed
    assert list(tmp_path.iterdir()) == [] and isinstance(caught.value, FileNotFoundError)
    with pytest.raises(data.MnistNotFoundError, match=r"(?s)t10k-images.*t10k-labels.*download=False"):
        data.mnist("test", data_dir=tmp_path, download=False)


# --- query sets ---------------------------------------------------------------------------------

def labelled_images(n_images, side=28):
    """Image k's pixel p holds k * side^2 + p, so a query pixel tells which image and pixel it copies."""
    return np.arange(n_images * side * side, dtype=np.float64).reshape(n_images, side * side)


def test_image_queries_copy_the_images():
    images = np.random.default_rng(0).uniform(size=(5, 784)).astype(np.float32)
    X = data.image_queries(images)
    assert X.dtype == np.float64 and X.shape == (5, 784)
    np.testing.assert_array_equal(X, images.astype(np.float64))
    X[0, 0] = 7
    assert images[0, 0] != 7
    with pytest.raises(ValueError, match="NaN"):
        data.image_queries(np.full((2, 784), np.nan))


def test_noise_overlay_follows_its_recipe_and_statistics():
    images = np.random.default_rng(1).uniform(size=(50, 784))
    X = data.noise_overlay_queries(images, 400, noise_std=0.3, seed=5)
    rng = np.random.default_rng(5)
    chosen = rng.integers(0, 50, size=400)
    np.testing.assert_array_equal(X, images[chosen] + rng.normal(0, 0.3, size=(400, 784)))
    noise = X - images[chosen]
    assert abs(noise.mean()) < 0.002 and abs(noise.std() - 0.3) < 0.002  # 313,600 draws
    assert X.min() < 0 and X.max() > 1  # not clipped by default
    np.testing.assert_array_equal(data.noise_overlay_queries(images, 400, 0.3, seed=5), X)
    assert not np.array_equal(data.noise_overlay_queries(images, 400, 0.3, seed=6), X)
    clipped = data.noise_overlay_queries(images, 400, noise_std=0.3, seed=5, clip=True)
    np.testing.assert_array_equal(clipped, np.clip(X, 0, 1))
    with pytest.raises(ValueError, match="noise_std"):
        data.noise_overlay_queries(images, 4, noise_std=-1)


def test_contrast_queries_follow_their_recipe():
    images = np.random.default_rng(1).uniform(size=(50, 784))
    X = data.contrast_queries(images, 400, max_factor=0.5, noise_std=0.2, seed=5)
    rng = np.random.default_rng(5)
    chosen = rng.integers(0, 50, size=400)
    factors = rng.uniform(-0.5, 0.5, size=400)
    np.testing.assert_array_equal(X, factors[:, None] * images[chosen] + rng.normal(0, 0.2, (400, 784)))
    assert factors.min() < -0.45 and factors.max() > 0.45  # both signs, the whole range
    scaled = data.contrast_queries(images, 400, max_factor=0.5, noise_std=0.0, seed=5)
    ratio = scaled / images[chosen]  # without noise, each query is a multiple of its image
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-12)
    assert np.abs(ratio).max() <= 0.5
    np.testing.assert_array_equal(data.contrast_queries(images, 400, 0.5, 0.2, seed=5), X)
    with pytest.raises(ValueError, match="max_factor"):
        data.contrast_queries(images, 4, max_factor=0)
    with pytest.raises(ValueError, match="noise_std"):
        data.contrast_queries(images, 4, noise_std=-0.1)


@pytest.mark.parametrize("tiles, row_edges, col_edges", [((2, 2), [0, 14, 28], [0, 14, 28]),
                                                     (4, [0, 7, 14, 21, 28], [0, 7, 14, 21, 28]),
                                                     ((3, 2), [0, 9, 18, 28], [0, 14, 28])])
def test_tiles_come_from_different_images_at_their_own_positions(tiles, row_edges, col_edges):
    images = labelled_images(20)
    X = data.tile_queries(images, 300, tiles=tiles, seed=2)
    assert X.shape == (300, 784) and X.dtype == np.float64
    source, pixel = np.divmod(X.reshape(300, 28, 28), 784)
    np.testing.assert_array_equal(pixel, np.broadcast_to(np.arange(784).reshape(28, 28), (300, 28, 28)))
    rows, cols = len(row_edges) - 1, len(col_edges) - 1
    per_tile = []
    for i in range(rows):
        for j in range(cols):
            block = source[:, row_edges[i]:row_edges[i + 1], col_edges[j]:col_edges[j + 1]]
            first = block[:, :1, :1]
            assert (block == first).all()  # one tile, one source image
            per_tile.append(first[:, 0, 0])
    per_tile = np.stack(per_tile, axis=1)
    assert all(len(set(row)) == rows * cols for row in per_tile)  # different images in each query
    assert len(np.unique(per_tile)) == 20  # every image gets used
    rng = np.random.default_rng(2)  # the recipe: tile t takes the r-th image not yet used, r < 20 - t
    draws = [rng.integers(0, 20 - t, size=300) for t in range(rows * cols)]
    for q in range(300):
        unused = list(range(20))
        assert [unused.pop(draw[q]) for draw in draws] == list(per_tile[q])
    np.testing.assert_array_equal(data.tile_queries(images, 300, tiles=tiles, seed=2), X)
    assert not np.array_equal(data.tile_queries(images, 300, tiles=tiles, seed=3), X)


def test_tile_sources_are_uniform():
    X = data.tile_queries(labelled_images(5), 20_000, tiles=2, seed=0)
    source = X.reshape(-1, 28, 28)[:, [0, 0, 14, 14], [0, 14, 0, 14]] // 784  # one pixel per tile
    for t in range(4):
        counts = np.bincount(source[:, t].astype(int), minlength=5)
        assert np.abs(counts - 4000).max() < 300, counts  # binomial std 57


def test_tile_queries_refuse_impossible_requests():
    with pytest.raises(ValueError, match="at least 16 images"):
        data.tile_queries(labelled_images(15), 3, tiles=4)
    with pytest.raises(ValueError, match="square"):
        data.tile_queries(np.zeros((8, 10)), 3)
    with pytest.raises(ValueError, match="tiles must be"):
        data.tile_queries(labelled_images(8), 3, tiles=(2, 0))


def test_query_set_dispatches_by_name():
    images = labelled_images(40) / (40 * 784)
    assert set(data.QUERY_SETS) == {"images", "noise", "contrast", "tiles2x2", "tiles4x4"}
    np.testing.assert_array_equal(data.query_set("images", images), images)
    chosen = data.query_set("images", images, 10, seed=4)
    np.testing.assert_array_equal(chosen, images[np.random.default_rng(4).permutation(40)[:10]])
    np.testing.assert_array_equal(data.query_set("noise", images, 30, seed=1),
                                  data.noise_overlay_queries(images, 30, data.DEFAULT_NOISE_STD, seed=1))
    np.testing.assert_array_equal(data.query_set("noise", images, 30, seed=1, noise_std=0.5),
                                  data.noise_overlay_queries(images, 30, 0.5, seed=1))
    np.testing.assert_array_equal(data.query_set("contrast", images, 30, seed=1),
                                  data.contrast_queries(images, 30, 1.0, data.DEFAULT_NOISE_STD, seed=1))
    np.testing.assert_array_equal(data.query_set("tiles2x2", images, 30, seed=1),
                                  data.tile_queries(images, 30, (2, 2), seed=1))
    np.testing.assert_array_equal(data.query_set("tiles4x4", images, 30, seed=1),
                                  data.tile_queries(images, 30, 4, seed=1))
    with pytest.raises(ValueError, match="unknown query set 'blur'"):
        data.query_set("blur", images, 3)
    with pytest.raises(ValueError, match="cannot draw 41"):
        data.query_set("images", images, 41)
    with pytest.raises(ValueError, match="needs the number of queries"):
        data.query_set("tiles2x2", images)


def test_varying_pixels():
    X = np.zeros((4, 6))
    X[:, 1] = [0, 1, 0, 0]
    X[:, 3] = [0.5, 0.5, 0.5, 0.5]  # constant, though not zero
    X[:, 4] = [0, 0, 1e-9, 0]
    np.testing.assert_array_equal(data.varying_pixels(X), [False, True, False, False, True, False])
    np.testing.assert_array_equal(data.varying_pixels(X, tol=1e-6), [False, True, False, False, False, False])
    _need_shared()
    images = data.mnist("test", data_dir=SHARED, download=False).images
    mask = data.varying_pixels(images)
    assert mask.shape == (784,) and mask.sum() == 668 and not mask[0] and mask[14 * 28 + 14]
    assert data.varying_pixels(data.noise_overlay_queries(images[:10], 5, 0.1)).all()
