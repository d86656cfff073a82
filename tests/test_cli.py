import subprocess
import sys

import pytest

from eandc.cli import main


def test_demo_on_the_default_teacher_recovers_it_exactly(capsys):
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exact recovery" in out and "recovered widths   [4]" in out


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "eandc.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out


@pytest.mark.parametrize("args, message", [
    (["demo", "--width", "0"], "positive integer"),
    (["demo", "--activation", "swish"], "invalid choice"),
    (["demo", "--queries", "20"], "too few queries"),
])
def test_bad_arguments_exit_non_zero_with_a_reason(args, message):
    proc = subprocess.run([sys.executable, "-m", "eandc.cli", *args, "--quiet"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]  # the reason, on the last line


# ---------------------------------------------------------------------------------------------
# recover, compare, sweep: the success paths (bad input: tests/test_validation_cli.py).

import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import eandc  # noqa: E402
from eandc.storage import load_arrays  # noqa: E402

FAST = ["--queries", "gaussian:500", "--students", "4", "--rho", "2", "--adam-steps", "100",
        "--max-iter", "100", "--quiet"]


def test_help_lists_every_command_and_each_has_the_common_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("recover", "compare", "demo", "sweep"):
        assert f"    {command} " in out
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        sub = capsys.readouterr().out
        assert all(option in sub for option in ("--seed", "--device", "--quiet"))


@pytest.fixture
def teacher_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eandc.random_teacher(2, [2], activation="tanh", seed=1).save("teacher.npz")
    return tmp_path / "teacher.npz"


def _only_run(root="results"):
    [folder] = Path(root).glob("recover/*")
    return folder


def test_recover_from_a_network_file_writes_network_and_report_and_is_not_redone(teacher_file,
                                                                                   capsys):
    assert main(["recover", "--teacher", "teacher.npz", *FAST, "--device", "cpu"]) == 0
    folder = _only_run()
    report = json.loads((folder / "result.json").read_text())
    assert report["metrics"]["widths"] == [2] and report["metrics"]["comparison"]["exact"]
    assert report["config"]["student_widths"] == [4] and report["config"]["seed"] == 0
    assert report["hash"] == folder.name and report["machine"]["torch"]
    assert eandc.MLP.load(folder / "network.npz").widths == [2]
    assert not (folder / "checkpoint.npz").exists()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("recovered widths [2]")
    mtime = (folder / "result.json").stat().st_mtime_ns
    assert main(["recover", "--teacher", "teacher.npz", *FAST[:-1]]) == 0  # identical: not redone
    assert "already computed" in capsys.readouterr().out
    assert (folder / "result.json").stat().st_mtime_ns == mtime
    assert main(["recover", "--teacher", "teacher.npz", *FAST, "--seed", "3"]) == 0
    assert len(list(Path("results").glob("recover/*"))) == 2  # another seed, another run
    assert main(["recover", "--teacher", "teacher.npz", *FAST, "--retry-max-iter", "200"]) == 0
    reports = [json.loads(f.read_text()) for f in Path("results").glob("recover/*/result.json")]
    [retry] = [r for r in reports if r["config"]["retry_with"]]
    assert retry["config"]["retry_with"] == [{"max_iter": 200}]
    assert retry["metrics"]["attempts"] == 1  # exact at once: no second attempt
    assert main(["recover", "--teacher", "teacher.npz", *FAST, "--adam-batch", "128"]) == 0
    reports = [json.loads(f.read_text()) for f in Path("results").glob("recover/*/result.json")]
    [minibatch] = [r for r in reports if "adam_batch" in r["config"]["train_options"]]
    assert minibatch["config"]["train_options"]["adam_batch"] == 128
    assert minibatch["metrics"]["widths"] == [2]


def test_recover_from_recorded_pairs_and_entry_points(teacher_file, capsys, monkeypatch):
    teacher = eandc.MLP.load(teacher_file)
    X = eandc.gaussian_inputs(500, 2, seed=1)  # what gaussian:500 with --seed 0 draws
    np.savez("pairs.npz", X=X, y=teacher(X))
    np.save("X.npy", X)
    np.save("y.npy", teacher(X)[:, 0])  # outputs of shape (n,) are one output column
    (teacher_file.parent / "blackbox.py").write_text(
        "import numpy as np\nfrom eandc import MLP\nNET = MLP.load('teacher.npz')\n"
        "def predict(x):\n    return NET(np.asarray(x))\n")
    small = ["--students", "4", "--student-widths", "4", "--adam-steps", "100", "--max-iter", "100",
             "--activation", "tanh", "--quiet"]
    assert main(["recover", "--teacher", "pairs.npz", *small, "--out", "pairs"]) == 0
    reference = load_arrays(_only_run("pairs") / "network.npz")[0]
    assert eandc.MLP.load(_only_run("pairs") / "network.npz").widths == [2]
    monkeypatch.syspath_prepend(str(teacher_file.parent))
    for source, out in ((["--teacher", "y.npy", "--queries", "X.npy"], "npy"),
                        (["--teacher", "blackbox.py:predict", "--d-in", "2",
                          "--queries", "gaussian:500"], "file"),
                        (["--teacher", "blackbox:predict", "--queries", "X.npy"], "module")):
        assert main(["recover", *source, *small, "--out", out]) == 0
        arrays = load_arrays(_only_run(out) / "network.npz")[0]
        assert all(np.array_equal(arrays[k], reference[k]) for k in reference)  # same data, seed
        assert _only_run(out).name == _only_run("pairs").name  # hence the same configuration


def test_a_damaged_result_is_reported_and_recomputed_identically(teacher_file, capsys):
    assert main(["recover", "--teacher", "teacher.npz", *FAST]) == 0
    folder = _only_run()
    original = load_arrays(folder / "network.npz")[0]
    data = (folder / "network.npz").read_bytes()
    (folder / "network.npz").write_bytes(data[: len(data) - 40])  # truncated
    capsys.readouterr()
    assert main(["recover", "--teacher", "teacher.npz", *FAST]) == 0
    err = capsys.readouterr().err
    assert "damaged result, recomputing it" in err and "network.npz" in err
    recomputed = load_arrays(folder / "network.npz")[0]
    assert all(np.array_equal(original[k], recomputed[k]) for k in original)
    report = json.loads((folder / "result.json").read_text())
    report["metrics"]["widths"] = [3]  # an edited report no longer matches its checksum
    (folder / "result.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["recover", "--teacher", "teacher.npz", *FAST]) == 0
    assert "result.json does not match its checksum" in capsys.readouterr().err
    assert json.loads((folder / "result.json").read_text())["metrics"]["widths"] == [2]


def test_compare_a_result_folder_with_its_teacher(teacher_file, capsys):
    assert main(["recover", "--teacher", "teacher.npz", *FAST]) == 0
    folder = _only_run()
    capsys.readouterr()
    assert main(["compare", "teacher.npz", str(folder), "--json", "comparison.json",
                 "--require-exact", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("exact")
    document = json.loads(Path("comparison.json").read_text())
    assert document["exact"] and document["widths_match"] and document["relative_rmse"] < 1e-9
    eandc.random_teacher(2, [2], activation="tanh", seed=9).save("other.npz")
    assert main(["compare", "other.npz", str(folder / "network.npz")]) == 0
    assert main(["compare", "other.npz", str(folder), "--require-exact"]) == 1
    assert "not exact" in capsys.readouterr().err


def test_sweep_command_runs_and_reruns(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = dict(activation="tanh", widths=[2], rho=2, n_queries=500, n_students=4,
                n_held_out=500, train_options=dict(adam_steps=100, max_iter=100))
    Path("configs.json").write_text(json.dumps({"kind": "toy", "configs": [dict(tiny, seed=1)]}))
    assert main(["sweep", "configs.json", "--workers", "1", "--quiet"]) == 0
    assert "1 computed, 0 already done, 0 failed" in capsys.readouterr().out
    assert main(["sweep", "configs.json", "--quiet"]) == 0
    assert "0 computed, 1 already done" in capsys.readouterr().out
    assert os.path.exists("results/toy/summary.csv")
