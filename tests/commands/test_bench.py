"""`zturbo bench` on the CPU (builtin:tiny), so the command never rots; GPU rows under `cuda`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from zturbo_train.cli import app

runner = CliRunner()
ROW_KEYS = {
    "preset",
    "levers",
    "resolution",
    "rank",
    "batch",
    "s_per_step",
    "s_min",
    "s_max",
    "first_step_s",
    "images_per_s",
    "peak_gib",
    "reserved_gib",
    "estimate_gib",
    "loss_finite",
}


def bench(tmp_path, *args: str):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--out", str(out), *args], env={"COLUMNS": "200"})
    return result, out


def test_bench_tiny_writes_its_json(tmp_path):
    result, out = bench(
        tmp_path,
        "--model",
        "builtin:tiny",
        "--preset",
        "auto",
        "--preset",
        "8gb",
        "--rank",
        "4",
        "--rank",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--sample-steps",
        "2",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["model"] == "builtin:tiny" and doc["device"] == "cpu" and doc["steps"] == 2
    rows = doc["rows"]
    assert [(r["preset"], r["rank"], r["resolution"], r["batch"]) for r in rows] == [
        ("auto", 4, 64, 1),
        ("auto", 8, 64, 1),
        ("8gb", 4, 64, 1),
        ("8gb", 8, 64, 1),
    ]
    for row in rows:
        assert ROW_KEYS <= row.keys() and "error" not in row
        assert row["s_per_step"] > 0 and row["images_per_s"] > 0 and row["loss_finite"]
        assert row["peak_gib"] is None and row["estimate_gib"] > 0  # no GPU memory to read on the CPU
        assert row["s_min"] <= row["s_per_step"] <= row["s_max"]
    assert rows[0]["levers"]["memory"] == "high" and rows[0]["levers"]["checkpointing"] == "none"
    assert rows[2]["levers"]["offload"] == "blocks" and rows[2]["offload"]["hits"] > 0
    assert [s["preset"] for s in doc["sampling"]] == ["auto", "8gb"]
    assert all(s["steps"] == 2 and s["seconds"] > 0 and s["seconds_no_lora"] > 0 for s in doc["sampling"])
    assert "s/step" in result.output and "sampling" in result.output


def test_bench_overrides_and_batches(tmp_path):
    result, out = bench(
        tmp_path,
        "--model",
        "synthetic:tiny",
        "--batch-size",
        "2",
        "-r",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--sample-steps",
        "0",
        "--set",
        'train.gradient_checkpointing="selective"',
        "--set",
        "train.checkpoint_fraction=0.5",
        "--set",
        'model.dtype="fp32"',
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["batch"] == 2 and row["resolution"] == 32 and doc["sampling"] == []
    assert row["levers"]["checkpointing"] == "selective" and row["levers"]["checkpoint_fraction"] == 0.5
    assert row["images_per_s"] == pytest.approx(2 / row["s_per_step"], rel=1e-2)
    assert result.output == ""


def test_bench_refuses_bad_input(tmp_path):
    result, _ = bench(tmp_path, "--model", "builtin:tiny", "--set", "data.dir=x")
    assert result.exit_code == 2 and "bench takes model.*, train.* and lora.* keys" in result.output
    result, _ = bench(tmp_path, "--model", "builtin:tiny", "--preset", "4gb")
    assert result.exit_code == 2 and "train.memory" in result.output
    if not torch.cuda.is_available():
        result, _ = bench(tmp_path, "--model", "synthetic")
        assert result.exit_code == 2 and "needs a CUDA device" in result.output


def test_bench_help_has_examples():
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "zturbo bench --model builtin:tiny" in result.output


@pytest.mark.cuda
def test_cuda_bench_reports_memory_and_offload(tmp_path):
    result, out = bench(
        tmp_path,
        "--model",
        "synthetic:tiny",
        "-p",
        "16gb",
        "-p",
        "8gb",
        "-r",
        "256",
        "--steps",
        "3",
        "--warmup",
        "2",
        "--sample-steps",
        "2",
        "--set",
        "train.compile=false",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["device"] != "cpu" and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert "error" not in row and row["peak_gib"] > 0 and row["loss_finite"]
    assert doc["rows"][1]["offload"]["misses"] <= 1


def test_bench_times_dop_steps(tmp_path, monkeypatch):
    """`--set train.preservation=dop` times the step with DOP: every warm-up and timed step runs it. Checked to
    fail with the bench's step ignoring DOP."""
    from zturbo_train.train.step import TrainStep

    calls = []
    original = TrainStep.backward_preserving

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "backward_preserving", counted)
    args = ["--model", "builtin:tiny", "--steps", "2", "--warmup", "1", "--sample-steps", "0", "--quiet"]
    result, out = bench(tmp_path, *args, "--set", "train.preservation=dop")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["loss_finite"] and len(calls) == 3
