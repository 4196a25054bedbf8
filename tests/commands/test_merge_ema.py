"""`zturbo merge --ema RUN`: the post-hoc EMA of a run's saved LoRAs against a computation by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from train.test_loop import make_config
from zturbo_train.cli import app
from zturbo_train.commands.ema import post_hoc_ema
from zturbo_train.config import load_config
from zturbo_train.errors import ConfigError
from zturbo_train.lora.formats import LoraWeights, read_lora_file, write_lora_file
from zturbo_train.train.loop import run

runner = CliRunner()
MODULE = "layers.0.attention.to_q"


def lora_file(path: Path, down: float, up: float, step: int) -> Path:
    """A one-module LoRA whose factors are constant: down = `down`, up = `up` everywhere."""
    weights = {MODULE: LoraWeights(torch.full((2, 8), down), torch.full((8, 2), up), alpha=1.0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lora_file(path, weights, "comfyui", metadata={"steps": step, "trigger_word": "sks"})


def fake_run(root: Path, name: str = "t", ema: bool = False) -> Path:
    """A run folder as training leaves it: config.json, two checkpoints (steps 2, 4) and the final file (step 10)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"train": {"name": name, "ema": ema}}))
    stem = f"{name}-raw" if ema else name
    lora_file(root / "checkpoints" / f"{stem}-step000002.safetensors", 1.0, 1.0, 2)
    lora_file(root / "checkpoints" / f"{stem}-step000004.safetensors", 2.0, 3.0, 4)
    lora_file(root / f"{stem}.safetensors", 4.0, 5.0, 10)
    return root


def merged(path: Path) -> tuple[LoraWeights, dict[str, str]]:
    weights, header = read_lora_file(path)
    return weights[MODULE], header


def test_the_ema_of_three_checkpoints_equals_the_hand_computation(tmp_path):
    """Decay 0.9, saves at steps 2, 4, 10. By hand: weights 0.9^8 = 0.43046721, 0.9^6 - 0.9^8 = 0.10097379 and
    1 - 0.9^6 = 0.468559 (they add up to 1), so down = 0.43046721 + 2 x 0.10097379 + 4 x 0.468559 = 2.50665079 and
    up = 0.43046721 + 3 x 0.10097379 + 5 x 0.468559 = 3.07618358; folding the files in one by one (ema <- lerp(ema,
    w_i, 1 - 0.9^(steps between))) gives the same. A half-life of ln(1/2)/ln(0.9) steps is the same decay. Guards
    the exponent `last - step` (checked: `step - steps[0]` -> down -0.90) and the step order of the files
    (checked: reversed -> weights 2.32, -1.09, -0.24 and the test fails)."""
    run_dir = fake_run(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    result = runner.invoke(app, ["merge", "--ema", str(run_dir), "--ema-decay", "0.9", "--to-lora", str(out)])
    assert result.exit_code == 0, result.output
    assert "at steps 2, 4, 10" in result.output
    lora, header = merged(out)
    assert torch.allclose(lora.down, torch.full((2, 8), 2.50665079), atol=1e-6)
    assert torch.allclose(lora.up, torch.full((8, 2), 3.07618358), atol=1e-6)
    assert lora.alpha == 1.0 and lora.rank == 2
    folded = torch.tensor(1.0)
    for value, gap in ((2.0, 2), (4.0, 6)):
        folded = torch.lerp(folded, torch.tensor(value), 1 - 0.9**gap)
    assert math.isclose(folded.item(), 2.50665079, rel_tol=1e-6)
    facts = json.loads(header["zturbo.post_hoc_ema"])
    assert facts["steps"] == [2, 4, 10] and math.isclose(sum(facts["weights"]), 1.0)
    assert "post-hoc EMA (decay 0.9 per step) of the LoRAs saved at steps 2, 4, 10" == header["zturbo.weights"]
    assert header["zturbo.trigger_word"] == "sks" and len(json.loads(header["zturbo.merged_from"])) == 3
    again = post_hoc_ema(run_dir, tmp_path / "half.safetensors", half_life=math.log(0.5) / math.log(0.9))
    assert torch.allclose(merged(again)[0].down, lora.down, atol=1e-6)


def test_a_run_with_train_ema_is_averaged_from_its_raw_weights(tmp_path):
    """With train.ema the main files hold the live EMA; the post-hoc one averages the trained (`-raw`) weights
    (checked: the `-raw` suffix dropped -> the EMA files are read and the test fails)."""
    run_dir = fake_run(tmp_path / "run", ema=True)
    lora_file(run_dir / "t.safetensors", 100.0, 100.0, 10)  # the live EMA's file: must not be read
    out = post_hoc_ema(run_dir, tmp_path / "ema.safetensors", decay=0.9)
    assert torch.allclose(merged(out)[0].down, torch.full((2, 8), 2.50665079), atol=1e-6)


def test_a_real_run_folder(tmp_path, example_data):
    """On a tiny training run (saves at steps 2 and 4, the end at 6) the EMA is the weighted sum of those files."""
    cfg = load_config(make_config(tmp_path, example_data, steps=6, save_every=2, sample_every=0, keep_last=5))
    result = run(cfg, quiet=True)
    files = [result.run_dir / "checkpoints" / f"t-step{s:06d}.safetensors" for s in (2, 4)] + [result.lora_path]
    out = post_hoc_ema(result.run_dir, tmp_path / "ema.safetensors", decay=0.5)
    weights = [0.5**4, 0.5**2 - 0.5**4, 1 - 0.5**2]
    loras = [read_lora_file(f)[0] for f in files]
    ema = read_lora_file(out)[0]
    assert set(ema) == set(loras[0])
    for module, update in ema.items():
        expected = sum(w * lora[module].up.float() for w, lora in zip(weights, loras))
        assert torch.allclose(update.up, expected, atol=1e-7)


def test_refusals_are_one_line(tmp_path):
    run_dir = fake_run(tmp_path / "run")

    def merge(*args: str) -> str:
        result = runner.invoke(app, ["merge", *args])
        assert result.exit_code != 0
        return result.output

    assert "pass --to-lora FILE, and no --lora" in merge("--ema", str(run_dir), "--ema-decay", "0.9")
    assert "give the EMA's speed once" in merge("--ema", str(run_dir), "--to-lora", str(tmp_path / "a.safetensors"))
    assert "between 0 and 1" in merge("--ema", str(run_dir), "--ema-decay", "1.5", "--to-lora", str(tmp_path / "a.sa"))
    assert "no config.json" in merge("--ema", str(tmp_path), "--ema-decay", "0.9", "--to-lora", str(tmp_path / "a"))
    assert "go with --ema RUN" in merge(
        "--lora", str(run_dir / "t.safetensors"), "--ema-decay", "0.9", "--to-lora", "x"
    )
    inside = merge("--ema", str(run_dir), "--ema-decay", "0.9", "--to-lora", str(run_dir / "ema.safetensors"))
    assert "overlaps the input" in inside and "run-merged.safetensors" in inside
    (run_dir / "t.safetensors").unlink()
    (run_dir / "checkpoints" / "t-step000004.safetensors").unlink()
    with pytest.raises(ConfigError, match="needs at least two saved LoRAs; .* has 1 of `t`"):
        post_hoc_ema(run_dir, tmp_path / "ema.safetensors", decay=0.9)


@pytest.mark.parametrize("half_life", ["inf", "1e20", "1e-4"])
def test_a_half_life_whose_decay_is_not_between_0_and_1_is_refused_before_writing(tmp_path, half_life):
    """A half-life so long (or short) that decay = 0.5^(1/half_life) rounds to 1 (or 0) is refused in one line,
    and nothing is written: it used to write the file, then stop on a ZeroDivisionError (math.log(1)) or a
    ValueError (math.log(0)) in the report line. Checked to fail with the range check in `ema_decay` removed."""
    run_dir = fake_run(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    result = runner.invoke(app, ["merge", "--ema", str(run_dir), "--ema-half-life", half_life, "--to-lora", str(out)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"--ema-half-life {float(half_life):g}" in result.output and "e.g. 100" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
