"""Every ``eandc`` command shown in README.md runs, as written, on small inputs; and every
command of ``eandc --help`` appears in the README."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import eandc
from eandc.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The ``eandc ...`` lines of the README's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "eandc":
                commands.append(words[1:])
    return commands


def test_every_command_of_the_help_is_in_the_readme():
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if a.choices and "demo" in a.choices]
    shown = {words[0] for words in readme_commands() if words and not words[0].startswith("-")}
    assert set(subparsers.choices) <= shown


def test_the_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    distributed = pytest.importorskip("dask.distributed")
    monkeypatch.chdir(tmp_path)
    teacher = eandc.random_teacher(2, [2], activation="tanh", seed=1)
    teacher.save("teacher.npz")
    X = eandc.gaussian_inputs(2000, 2, seed=5)
    np.savez("pairs.npz", X=X, y=teacher(X))
    Path("blackbox.py").write_text(
        "import numpy as np\n\ndef predict(x):\n"
        "    return np.tanh(x @ np.array([[1.0, -0.5], [0.3, 0.8]]).T + [0.2, -0.4]) @ [1.5, -1.0]\n")
    Path("configs.json").write_text(json.dumps(
        [dict(activation="tanh", widths=[2], seed=seed, rho=2, n_queries=500, n_students=4,
              n_held_out=500) for seed in (1, 2)]))
    commands = readme_commands()
    assert len(commands) >= 8
    first_run = None
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", dashboard_address=None) as cluster:
        for words in commands:
            if words[:1] == ["book"]:  # builds the Jupyter Book: tests/test_book.py
                continue
            words = [w.replace("tcp://HOST:PORT", cluster.scheduler_address) for w in words]
            if any("HASH" in w for w in words):
                words = [w.replace("results/recover/HASH", str(first_run)) for w in words]
            if words == ["--help"]:
                with pytest.raises(SystemExit) as exit_info:
                    main(words)
                assert exit_info.value.code == 0
                continue
            code = main(words)
            assert code == 0, (words, capsys.readouterr())
            if words[0] == "recover" and first_run is None:
                [first_run] = Path("results/recover").iterdir()
    out = capsys.readouterr().out
    assert "exact recovery" in out and out.count("recovered widths [2]") >= 3
    assert "2 computed" in out and "2 already done" in out  # the Dask run found the pool's
