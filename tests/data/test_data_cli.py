"""`zturbo data inspect` through the CLI: tables, JSON, config input, and errors as one clear exit."""

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from zturbo_train.cli import app

runner = CliRunner()


def inspect(*args: str):
    return runner.invoke(app, ["data", "inspect", *map(str, args)], env={"COLUMNS": "250"})


def test_help_shows_examples():
    result = inspect("--help")
    assert result.exit_code == 0
    assert "zturbo data inspect examples/data" in result.output and "--resolution" in result.output


def test_tables_for_the_example_dataset(example_data):
    result = inspect(example_data, "--resolution", "64", "--resolution", "96", "--trigger", "sks")
    assert result.exit_code == 0, result.output
    for text in (
        "Images",
        "Buckets",
        "img_02.png",
        "128x96",
        "80x48",
        "sks a red square",
        "6 images, 12 samples per epoch, 0 skipped, 0 warnings, 0 errors, 0 captions missing",
    ):
        assert text in result.output, text
    assert "Skipped files" not in result.output


def test_skipped_files_and_missing_captions_are_shown_with_reasons(data_copy):
    (data_copy / "img_01.png").write_text("not an image")
    (data_copy / "img_04.txt").unlink()
    Image.new("RGB", (40, 40)).save(data_copy / "small.png")
    (data_copy / "small.txt").write_text("tiny")
    result = inspect(data_copy, "-r", "64", "--default-caption", "a photo", "--trigger", "sks")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "is not an image Pillow can read" in out and "smaller than the 64 px minimum" in out
    assert "has no caption file img_04.txt; using data.default_caption" in out
    assert (
        "5 images, 5 samples per epoch, 2 skipped, 1 warnings, 0 errors, 1 captions missing, 1 default captions"
    ) in out


def test_errors_are_listed_then_exit_non_zero(data_copy):
    (data_copy / "img_04.txt").unlink()
    result = inspect(data_copy, "-r", "64")
    assert result.exit_code == 1
    assert "Images" in result.output  # the tables came first
    assert "error: 1 dataset problem found before training" in result.output
    assert (
        "img_04.png: has no caption file img_04.txt; write a caption there or set data.default_caption" in result.output
    )
    assert "Traceback" not in result.output


def test_strict_flag(data_copy):
    (data_copy / "img_04.txt").unlink()
    result = inspect(data_copy, "-r", "64", "--default-caption", "x", "--strict")
    assert result.exit_code == 1 and "an error because data.strict = true" in result.output


def test_json_output(example_data):
    result = inspect(example_data, "-r", "64", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["counts"]["images"] == 6 and len(report["images"]) == 6
    assert report["images"][2]["buckets"] == ["64:80x48"]
    assert {b["bucket"] for b in report["buckets"]} == {"64x64", "80x48", "48x80"}


def test_from_a_config(tmp_path, example_data):
    config = tmp_path / "run.toml"
    config.write_text(
        f'[[data]]\ndir = "{example_data}"\nresolution = 64\n\n'
        f'[[data]]\ndir = "{example_data}"\nresolution = 96\nrepeats = 2\n'
    )
    result = inspect("--config", config, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["samples_per_epoch"] == 6 + 12


def test_missing_folder_and_bad_options(tmp_path):
    result = inspect(tmp_path / "nope")
    assert result.exit_code == 1
    assert "error: `data.dir`" in result.output and "does not exist" in result.output
    result = inspect(tmp_path, "-r", "100")
    assert result.exit_code == 2 and "`data.resolution` = [100]: 100 is not allowed" in result.output
    result = inspect()
    assert result.exit_code == 2 and "give either a folder" in result.output


def test_empty_folder(tmp_path):
    result = inspect(tmp_path)
    assert result.exit_code == 1 and "holds no images" in result.output


def test_problem_lines_print_file_names_as_written():
    """A file named like rich markup ("[bw] ...") is printed as it is, not eaten as a style."""
    from io import StringIO

    from rich.console import Console

    from zturbo_train.data.dataset import Problem
    from zturbo_train.data.prepare import report_problems

    out = StringIO()
    report_problems([Problem(Path("/d/[bw] photo.png"), "warn", "is 32x32 px")], Console(file=out, width=200))
    assert "warn: /d/[bw] photo.png: is 32x32 px" in out.getvalue()
