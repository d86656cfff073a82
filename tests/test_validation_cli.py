"""Bad input on the command line and in files: exit code 2 and a one-line reason naming it.

(tests/test_validation.py covers the same for the Python API.)"""

import pickle

import numpy as np
import pytest

import eandc
from eandc.cli import main

TEACHER = eandc.random_teacher(2, [2], activation="tanh", seed=1)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    TEACHER.save("teacher.npz")
    X = eandc.gaussian_inputs(300, 2, seed=0)
    np.save("X.npy", X)
    np.save("y.npy", TEACHER(X))
    (tmp_path / "blackbox.py").write_text(
        "import numpy as np\n"
        "def raises(x):\n    raise KeyError('model not loaded')\n"
        "def wrong_shape(x):\n    return np.zeros((len(x) + 1, 1))\n"
        "def good(x):\n    return np.tanh(x).sum(1)\n"
        "not_callable = 3\n")
    return tmp_path


def fails(capsys, args, message):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("eandc: error: ") and message in err[-1], err
    return err[-1]


BAD_TEACHERS = [
    (["--teacher", "missing.npz"], "teacher file missing.npz does not exist"),
    (["--teacher", "garbage.npz"], "is not a readable"),
    (["--teacher", "foreign.npz"], "is a foreign file: it holds arrays ['a', 'b']"),
    (["--teacher", "checkpoint.npz"], "foreign eandc file (format 'eandc.checkpoint/1')"),
    (["--teacher", "model.pkl"], "unsupported teacher file model.pkl"),
    (["--teacher", "objects.npy", "--queries", "X.npy"], "a pickle"),
    (["--teacher", "no_such_module:predict", "--d-in", "2"], "cannot import 'no_such_module'"),
    (["--teacher", "blackbox.py:nothing", "--d-in", "2"], "has no attribute 'nothing'"),
    (["--teacher", "blackbox.py:not_callable", "--d-in", "2"], "not a callable"),
    (["--teacher", "blackbox.py:raises", "--d-in", "2"], "the teacher raised KeyError"),
    (["--teacher", "blackbox.py:wrong_shape", "--queries", "X.npy"],
     "returned shape (301, 1) for 300 inputs"),
    (["--teacher", "blackbox.py:good"], "give --d-in"),
    (["--teacher", "y.npy", "--queries", "gaussian:200", "--d-in", "2"],
     "300 teacher outputs for 200 queries"),
    (["--teacher", "pairs.npz", "--queries", "X.npy"], "holds its own queries"),
    (["--teacher", "teacher.npz", "--activation", "relu"], "the teacher network uses tanh"),
]


@pytest.mark.parametrize("args, message", BAD_TEACHERS)
def test_bad_teachers_are_named(files, capsys, args, message):
    (files / "garbage.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    np.savez("foreign.npz", a=np.zeros(2), b=np.ones(3))
    from eandc.checkpoint import Checkpoint
    Checkpoint(files / "checkpoint.npz", fingerprint="x").write()
    (files / "model.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}))
    np.save("objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez("pairs.npz", X=np.load("X.npy"), y=np.load("y.npy"))
    fails(capsys, ["recover", *args, "--quiet"], message)


BAD_QUERIES = [
    ("strings.npy", lambda: np.array([["a", "b"]] * 10), "real numeric"),
    ("complex.npy", lambda: np.zeros((300, 2), dtype=complex), "real numeric"),
    ("empty.npy", lambda: np.zeros((0, 2)), "queries is empty"),
    ("nan.npy", lambda: np.where(np.arange(600).reshape(300, 2) == 7, np.nan, 1.0),
     "NaN or inf in 1 row(s), first at row 3"),
    ("flat.npy", lambda: np.zeros(300), "2-D array"),
    ("constant.npy", lambda: np.ones((300, 2)), "constant"),
    ("three.npy", lambda: np.zeros((300, 3)), "3 columns but the teacher network takes 2"),
    ("few.npy", lambda: eandc.gaussian_inputs(20, 2), "too few queries"),
]


@pytest.mark.parametrize("name, make, message", BAD_QUERIES)
def test_bad_query_files_are_named(files, capsys, name, make, message):
    np.save(name, make())
    fails(capsys, ["recover", "--teacher", "teacher.npz", "--queries", name, "--quiet"], message)


@pytest.mark.parametrize("queries, message", [
    ("gaussian:abc", "must be an integer"),
    ("gaussian:0", "must be positive"),
    ("sobol:100", "no such file, and not one of gaussian:N, uniform:N"),
    ("X.csv", "no such file"),
])
def test_bad_query_specs_are_named(files, capsys, queries, message):
    fails(capsys, ["recover", "--teacher", "teacher.npz", "--queries", queries], message)


def test_missing_or_non_writable_output_folder(files, capsys, monkeypatch):
    fails(capsys, ["recover", "--teacher", "teacher.npz", "--out", "no/such/folder"],
          "output folder no/such/folder does not exist")
    (files / "a_file").write_text("")
    fails(capsys, ["recover", "--teacher", "teacher.npz", "--out", "a_file"], "is not a folder")
    (files / "locked").mkdir()
    monkeypatch.setattr("eandc.runs.os.access", lambda *a: False)  # (tests may run as root)
    fails(capsys, ["recover", "--teacher", "teacher.npz", "--out", "locked"],
          "output folder locked is not writable")


def test_not_enough_memory_fails_early_with_the_estimate(files, capsys, monkeypatch):
    monkeypatch.setenv("EANDC_MAX_MEMORY", "64K")
    reason = fails(capsys, ["recover", "--teacher", "teacher.npz", "--queries", "gaussian:300",
                            "--quiet"], "needs about")
    assert "only 64.0 KiB is available" in reason and "students" in reason


def test_unreachable_dask_scheduler(files, capsys):
    (files / "configs.json").write_text('[{"seed": 1}]')
    fails(capsys, ["sweep", "configs.json", "--scheduler", "tcp://127.0.0.1:1",
                   "--scheduler-timeout", "1"], "cannot reach the Dask scheduler at tcp://127.0.0.1:1")


@pytest.mark.parametrize("args, message", [
    (["sweep", "missing.json"], "no such configuration file"),
    (["sweep", "notjson.json"], "is not valid JSON"),
    (["sweep", "typo.json"], "unknown configuration key(s) ['widht']"),
    (["compare", "teacher.npz", "X.npy"], "is not an eandc network"),
    (["compare", "teacher.npz", "."], "no finished run"),
])
def test_bad_sweep_and_compare_inputs(files, capsys, args, message):
    (files / "notjson.json").write_text("{configs: [}")
    (files / "typo.json").write_text('[{"widht": 4}]')
    fails(capsys, args, message)


@pytest.mark.parametrize("args, message", [
    (["demo", "--device", "cuda:0"], "CUDA is not available"),
    (["demo", "--device", "toaster"], "not a torch device"),
    (["recover", "--teacher", "t.npz", "--student-widths", "4,x"], "widths are positive integers"),
    (["recover", "--teacher", "t.npz", "--checkpoint-interval", "-1"], "seconds >= 0"),
    (["recover", "--teacher", "t.npz", "--adam-batch", "0"], "positive integer"),
])
def test_bad_arguments_exit_2_with_the_reason_last(capsys, args, message):
    if "cuda" in args[-1]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
