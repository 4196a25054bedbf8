"""The memory presets: each resolves to the levers BENCHMARKS.md documents, auto picks the fastest that fits,
explicit keys win."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory.steps import CPU
from zturbo_train.config import validate_config
from zturbo_train.errors import ConfigError
from zturbo_train.memory.estimate import Workload
from zturbo_train.memory.levers import resolve_levers
from zturbo_train.memory.presets import BUDGET_GIB, PRESETS, Levers, choose, estimate_for

ROOT = Path(__file__).resolve().parents[2]


def documented_presets() -> dict[str, dict[str, str]]:
    """The preset table of BENCHMARKS.md: preset -> column -> cell."""
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    section = text.split("## Presets", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


def test_each_preset_resolves_to_the_documented_levers(real_shape):
    documented = documented_presets()
    assert set(documented) == set(PRESETS)
    work = Workload(1024)
    for name, row in documented.items():
        levers = choose(name, {}, cuda=True, free_gib=139.0, shape=lambda: real_shape, work=work)
        assert levers.memory == name
        assert levers.checkpointing == row["gradient_checkpointing"].split()[0], name
        assert levers.compile == (row["compile"] == "true"), name
        assert levers.quantize == row["quantize"] and levers.offload == row["offload"], name
        peak = estimate_for(levers, real_shape, work).total
        assert f"{peak:.1f}" == row["estimated peak GiB"], (name, peak)
        if BUDGET_GIB[name] is not None:
            assert peak <= BUDGET_GIB[name], (name, peak)


def test_selective_preset_checkpoints_the_fewest_blocks_that_fit(real_shape):
    work = Workload(1024)
    levers = choose("24gb", {}, cuda=True, free_gib=139.0, shape=lambda: real_shape, work=work)
    assert levers.checkpointing == "selective" and levers.checkpoint_fraction == pytest.approx(0.8)
    fewer = Levers("24gb", checkpointing="selective", checkpoint_fraction=0.8 - 1 / 30)
    assert estimate_for(levers, real_shape, work).total <= 22.0 < estimate_for(fewer, real_shape, work).total
    explicit = choose(
        "24gb", {"checkpoint_fraction": 0.5}, cuda=True, free_gib=139.0, shape=lambda: real_shape, work=work
    )
    assert explicit.checkpoint_fraction == 0.5


@pytest.mark.parametrize(
    "free, preset",
    [(139.0, "high"), (60.0, "high"), (40.0, "24gb"), (23.5, "24gb"), (15.8, "16gb"), (12.0, "12gb"), (7.5, "8gb")],
)
def test_auto_picks_the_fastest_preset_that_fits_free_memory(real_shape, free, preset):
    work = Workload(1024)
    levers = choose("auto", {}, cuda=True, free_gib=free, shape=lambda: real_shape, work=work)
    assert levers.memory == preset
    assert estimate_for(levers, real_shape, work).total <= free - 0.5
    assert f"{free:.1f} GiB free" in levers.note


def test_auto_without_room_or_without_cuda(real_shape):
    tight = choose("auto", {}, cuda=True, free_gib=3.0, shape=lambda: real_shape, work=Workload(1024))
    assert tight.memory == "8gb" and "lower data.resolution" in tight.note
    cpu = choose("auto", {}, cuda=False)
    assert cpu.memory == "high" and not cpu.compile and cpu.checkpointing == "none"
    assert choose("auto", {"compile": True}, cuda=False).compile


def test_explicit_keys_win_and_conflicts_name_key_value_and_source(real_shape):
    work = Workload(1024)
    kw = dict(cuda=True, free_gib=139.0, shape=lambda: real_shape, work=work)
    assert choose("16gb", {"quantize": "nf4"}, **kw).quantize == "nf4"
    assert choose("high", {"checkpointing": "full"}, **kw).checkpointing == "full"
    with pytest.raises(ConfigError, match=r"`train.compile` = true \(set by you\).*train.compile = false"):
        choose("8gb", {"compile": True}, **kw)
    with pytest.raises(ConfigError, match=r'`train.gradient_checkpointing` = "none" \(set by you\)'):
        choose("8gb", {"checkpointing": "none"}, **kw)
    with pytest.raises(
        ConfigError,
        match=r'`model.quantize` = "fp8" \(set by you\).*`train.compile` = true '
        r"\(from the 16gb preset\)",
    ):
        choose("16gb", {"quantize": "fp8"}, **kw)
    with pytest.raises(ConfigError, match="not nf4|streams bf16 or fp8"):
        choose("8gb", {"quantize": "nf4"}, **kw)
    with pytest.raises(ConfigError, match="checkpoint_fraction"):
        choose("16gb", {"checkpoint_fraction": 0.5}, **kw)


def test_resolve_levers_reads_the_config():
    cfg = validate_config(
        {
            "data": {"dir": "x", "resolution": 64},
            "model": {"path": "builtin:tiny"},
            "train": {"memory": "12gb", "attention_backend": "sdpa-math"},
        }
    )
    levers = resolve_levers(cfg.model, cfg.train, Workload(64), CPU)
    assert (levers.memory, levers.quantize, levers.checkpointing, levers.attention_backend) == (
        "12gb",
        "fp8",
        "full",
        "sdpa-math",
    )
    assert levers.loads_on_host
