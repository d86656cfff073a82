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
