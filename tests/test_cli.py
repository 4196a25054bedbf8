"""The CLI surface: help, version, and errors as one line with a non-zero exit."""

from pathlib import Path

from typer.testing import CliRunner

from zturbo_train import __version__
from zturbo_train.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "training adapter" in result.output and "check" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_check_prints_resolved_config():
    result = runner.invoke(app, ["check", str(ROOT / "configs" / "quickstart.toml"), "--set", "train.steps=5"])
    assert result.exit_code == 0, result.output
    assert '"steps": 5' in result.output


def test_check_error_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndir = "x"\n[train]\nlearning_rate = 1\n')
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert "error: invalid config: unknown key `train.learning_rate`; did you mean `train.lr`?" in result.output
    assert "Traceback" not in result.output
