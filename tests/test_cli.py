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


def test_help_epilogs_show_runnable_examples():
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "zturbo train configs/quickstart.toml" in top.output
    assert "zturbo sample --model builtin:tiny --lora output/quickstart/quickstart.safetensors" in top.output
    data = runner.invoke(app, ["data", "--help"], env={"COLUMNS": "200"})
    assert "zturbo data inspect examples/data" in data.output
    inspect = runner.invoke(app, ["data", "inspect", "--help"], env={"COLUMNS": "200"})
    assert "[[data]] tables" in inspect.output and "replaces [trigger]" in inspect.output


def test_error_text_in_brackets_is_printed_not_taken_as_markup(tmp_path):
    result = runner.invoke(app, ["sample", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert result.exit_code == 1
    assert "set [model] path to a Z-Image Turbo folder" in result.output and "Traceback" not in result.output


def test_again_command_resumes_only_what_was_saved(tmp_path):
    from zturbo_train.cli import again_command

    run = tmp_path / "my run"
    overrides = ["train.output_dir=my run", "train.lr=2e-4"]
    assert again_command(Path("c.toml"), overrides, run) == "zturbo train c.toml --set 'train.output_dir=my run' --set train.lr=2e-4"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert again_command(Path("c.toml"), [], run) == "zturbo train c.toml --overwrite"  # a run without a state
    (run / "state" / "step-000004").mkdir(parents=True)
    (run / "state" / "step-000004" / "state.json").write_text("{}")
    assert again_command(Path("c.toml"), [], run) == "zturbo train c.toml --resume"


def test_ctrl_c_while_setting_up_is_one_line(tmp_path, monkeypatch):
    import zturbo_train.train.loop as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "run", interrupted)
    config = ROOT / "configs" / "quickstart.toml"
    result = runner.invoke(app, ["train", str(config), "--set", f"train.output_dir={tmp_path / 'run'}"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 130
    assert "interrupted; files already written are complete. Go on with: zturbo train" in result.output
    assert f"--set train.output_dir={tmp_path / 'run'}" in result.output and "Traceback" not in result.output


def test_bad_dtype_names_the_option_and_the_choices():
    result = runner.invoke(app, ["sample", "--model", "builtin:tiny", "--prompt", "x", "--dtype", "fp64"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: --dtype 'fp64' is not one of bf16, fp16, fp32; use e.g. --dtype bf16" in result.output
