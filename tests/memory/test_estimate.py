"""The memory estimate: it reproduces the measured reference table, moves the right way with every input, and
`--dry-run` prints it."""

from __future__ import annotations

import pytest

from zturbo_train.memory.estimate import Workload, estimate, reference_workloads


def test_estimate_reproduces_the_reference_table(real_shape):
    assert real_shape.total_params == pytest.approx(6.15e9, rel=0.01)
    for name, work, levers, measured in reference_workloads():
        assert estimate(real_shape, work, **levers).total == pytest.approx(measured, rel=0.07), name


def test_estimate_moves_the_right_way(real_shape):
    def peak(work=Workload(1024), **levers):
        return estimate(real_shape, work, **levers).total

    assert peak(Workload(512)) < peak(Workload(768)) < peak(Workload(1024)) < peak(Workload(1536))
    assert peak(Workload(1024, batch=1)) < peak(Workload(1024, batch=2)) < peak(Workload(1024, batch=4))
    assert peak(Workload(1024, rank=16)) < peak(Workload(1024, rank=32)) < peak(Workload(1024, rank=128))
    assert peak(Workload(1024, optimizer="adamw8bit")) < peak(Workload(1024))
    assert peak(checkpointing="full") < peak(checkpointing="selective", fraction=0.5) < peak(checkpointing="none")
    assert peak(quantize="nf4") < peak(quantize="fp8") < peak(quantize="none")
    assert peak(offload="blocks") < peak(quantize="nf4")
    every = Workload(1024, lora_blocks=("layers", "noise_refiner", "context_refiner"))
    assert peak(Workload(1024)) < peak(every)
    assert 0 < peak(Workload(64)) < 13


def test_dry_run_prints_the_memory_estimate(tmp_path, example_data):
    from typer.testing import CliRunner

    from zturbo_train.cli import app

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'[model]\npath = "builtin:tiny"\nadapter = "none"\n[data]\ndir = "{example_data}"\n'
        f'resolution = 64\n[train]\nmemory = "8gb"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["train", str(cfg), "--dry-run"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "memory" in line and "estimated peak" in line)
    assert "8gb" in line and "offload blocks" in line and "pinned host memory" in line


def test_optimizer_state_and_ema_count_in_the_lora_memory(real_shape):
    """Per LoRA parameter: fp32 weight and gradient (8 bytes) + the optimizer's state + 4 for an EMA copy."""
    from zturbo_train.memory.estimate import lora_params

    for optimizer, state in (("prodigy", 16.0), ("lion", 4.0), ("adamw", 8.0)):
        for ema in (False, True):
            work = Workload(resolution=512, optimizer=optimizer, ema=ema)
            expected = lora_params(real_shape, work) * (8 + state + 4 * ema) / 2**30
            assert estimate(real_shape, work).lora == pytest.approx(expected)


def test_dop_adds_its_embeddings_and_target_to_the_peak(real_shape):
    """By hand: 1024 px batch 2 bf16 with DOP holds two class caption embeddings (128 tokens x 2560) and two base
    predictions (16 x 128 x 128) more; its forwards add no activations (freed between the backward passes).
    Checked to fail with DOP left out of the estimate."""
    plain, dop = Workload(1024, batch=2), Workload(1024, batch=2, preservation=True)
    by_hand = 2 * (128 * 2560 + 16 * 128 * 128) * 2 / 2**30
    assert real_shape.cap_dim == 2560
    for levers in ({"checkpointing": "full"}, {"checkpointing": "none"}):
        added = estimate(real_shape, dop, **levers).total - estimate(real_shape, plain, **levers).total
        assert added == pytest.approx(by_hand, rel=1e-9)
