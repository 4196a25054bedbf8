"""Every `train.optimizer` (and LoRA+) on builtin:tiny: the loss falls, a resume is bit-exact, a missing extra
is one line."""

from __future__ import annotations

import json
import sys
import typing

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from train.test_loop import _fixed_noise_loss, _interrupt_after, make_config, metrics
from zturbo_train.cli import app
from zturbo_train.config import TrainConfig, load_config
from zturbo_train.lora.formats import read_lora_file
from zturbo_train.lora.network import target_modules
from zturbo_train.memory.estimate import OPTIMIZER_STATE_BYTES
from zturbo_train.models import load_parts
from zturbo_train.train.loop import run
from zturbo_train.train.optimizers import OPTIMIZERS

runner = CliRunner()

# name -> settings that train builtin:tiny in a few steps. Prodigy starts at d0 = 0.01: from its default 1e-6
# its step size d needs about 150 steps on tiny to grow that far (measured: 1.8e-6 at step 60, 2.4e-5 at 100).
PRODIGY_D0 = ["train.optimizer_args={d0 = 1e-2}"]
CASES = {
    "prodigy": dict(optimizer="prodigy", lr=1.0),
    "adafactor": dict(optimizer="adafactor", lr=5e-3),
    "lion": dict(optimizer="lion", lr=6e-3),
    "adamw_schedulefree": dict(optimizer="adamw_schedulefree", lr=2e-2, warmup_steps=2),
    "loraplus": dict(optimizer="adamw", lr=4e-3, loraplus_ratio=4.0),
}
STEPS = 12


def _equal_loras(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)


@pytest.fixture(scope="module")
def base_loss(tmp_path_factory, example_data):
    return _fixed_noise_loss(make_config(tmp_path_factory.mktemp("base"), example_data), None)


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_trains_and_resumes_bit_exactly(case, tmp_path, example_data, monkeypatch, base_loss):
    """An uninterrupted run without saves equals one that saves every 3 steps, is stopped at step 5 and resumed:
    the optimizer state (Prodigy's d and start point, Adafactor's factored moments, schedule-free's z and
    weight sum, LoRA+'s groups) survives safetensors + JSON exactly, and saving (schedule-free's switch to its
    averaged weights) never changes the training weights. Checked to fail with `averaged_weights` not putting
    the training weights back (schedule-free's resumed LoRA differs)."""
    settings = dict(steps=STEPS, sample_every=0, log_every=1, **CASES[case])
    overrides = PRODIGY_D0 if case == "prodigy" else []
    full = run(load_config(make_config(tmp_path / "a", example_data, save_every=0, **settings), overrides), quiet=True)
    cfg = load_config(make_config(tmp_path / "b", example_data, save_every=3, **settings), overrides)
    _interrupt_after(monkeypatch, 5)
    assert run(cfg, quiet=True).steps_done == 5
    monkeypatch.undo()
    resumed = run(cfg, resume=True, quiet=True)
    assert resumed.steps_done == STEPS
    assert _equal_loras(read_lora_file(full.lora_path)[0], read_lora_file(resumed.lora_path)[0])
    assert [r["loss"] for r in metrics(full.run_dir)] == [r["loss"] for r in metrics(resumed.run_dir)]
    tuned = _fixed_noise_loss(tmp_path / "a" / "cfg.toml", full.lora_path)
    assert tuned < 0.9 * base_loss, (case, base_loss, tuned)


def test_schedulefree_saves_and_previews_its_averaged_weights(tmp_path, example_data):
    """The saved LoRA is schedule-free's x = y + (1 - 1/beta1)(z - y) of the saved training weights y and z,
    not y itself (computed here by hand from the state, beta1 = 0.9)."""
    cfg = load_config(
        make_config(tmp_path, example_data, steps=4, save_every=0, sample_every=0, **CASES["adamw_schedulefree"])
    )
    result = run(cfg, quiet=True)
    state = load_file(str(result.run_dir / "state" / "step-000004" / "state.safetensors"))
    meta = json.loads((result.run_dir / "state" / "step-000004" / "state.json").read_text())
    groups = meta["optimizer"]["param_groups"]
    assert groups[0]["train_mode"] is True and groups[0]["betas"][0] == 0.9
    saved = read_lora_file(result.lora_path)[0]
    transformer = load_parts(cfg.model.path, ["transformer"], dtype="fp32").transformer
    names = target_modules(transformer, cfg.lora.blocks, cfg.lora.targets)  # the optimizer's order: down, up
    moved = 0
    for layer, name in enumerate(names):
        for offset, part in enumerate(("down", "up")):
            y = state[f"lora.{name}.{part}"]
            z = state[f"optim.{2 * layer + offset}.z"]
            x = y + (1 - 1 / 0.9) * (z - y)
            assert torch.allclose(getattr(saved[name], part), x, atol=1e-7), (name, part)
            moved += not torch.equal(getattr(saved[name], part), y)
    assert moved > 0


def test_loraplus_first_step_moves_up_matrices_ratio_times_as_far(tmp_path, example_data):
    """Adam's first step is lr * g / (|g| + eps) and the down matrices get no gradient while up = 0: with
    loraplus_ratio 4 the up matrices after one step are 4 x those of a plain run, the down ones unchanged.
    Checked to fail with the lr_scale dropped in TrainStep.update."""
    loras = {}
    for ratio in (1.0, 4.0):
        cfg = load_config(
            make_config(
                tmp_path / str(ratio),
                example_data,
                steps=1,
                save_every=0,
                sample_every=0,
                lr=1e-3,
                loraplus_ratio=ratio,
            )
        )
        loras[ratio] = read_lora_file(run(cfg, quiet=True).lora_path)[0]
        assert metrics(cfg.train.output_dir)[0]["lr"] == 1e-3  # the base lr is logged
    plain, plus = loras[1.0], loras[4.0]
    assert any(plain[k].up.abs().max() > 0 for k in plain)
    for k in plain:
        assert torch.equal(plain[k].down, plus[k].down)
        assert torch.allclose(plus[k].up, 4 * plain[k].up, rtol=1e-5, atol=0), k


@pytest.mark.parametrize("name", [n for n, kind in OPTIMIZERS.items() if kind.package])
def test_missing_extra_is_one_line_naming_the_pip_install_before_any_work(name, tmp_path, example_data, monkeypatch):
    monkeypatch.setitem(sys.modules, OPTIMIZERS[name].package, None)  # what importing an absent package sees
    cfg = make_config(tmp_path, example_data, optimizer=name, lr=1.0 if name == "prodigy" else 1e-3)
    for extra in ([], ["--dry-run"]):
        result = runner.invoke(app, ["train", str(cfg), "-q", *extra])
        assert result.exit_code == 2, result.output  # a config error
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert f'train.optimizer = "{name}" needs the {OPTIMIZERS[name].pip} package' in lines[0]
        assert 'pip install "zturbo-train[optimizers]"' in lines[0]
        assert not (tmp_path / "run").exists()


def test_every_optimizer_is_configurable_estimated_and_in_the_extra():
    from pathlib import Path

    import tomllib

    names = set(typing.get_args(TrainConfig.model_fields["optimizer"].annotation))
    assert names == set(OPTIMIZERS) == set(OPTIMIZER_STATE_BYTES)
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pips = {kind.pip for kind in OPTIMIZERS.values() if kind.pip}
    assert pips == {spec.split(">")[0] for spec in extras["optimizers"]}  # dev holds every extra: test_packaging


def test_optimizer_args_reach_the_optimizer_and_bad_ones_are_one_line(tmp_path, example_data):
    cfg_path = make_config(tmp_path, example_data, steps=1, save_every=0, sample_every=0, optimizer="lion")
    cfg = load_config(cfg_path, ["train.optimizer_args={betas = [0.5, 0.75]}"])
    run(cfg, quiet=True)
    saved = json.loads((cfg.train.output_dir / "state" / "step-000001" / "state.json").read_text())
    assert saved["optimizer"]["param_groups"][0]["betas"] == [0.5, 0.75]
    for bad, message in (
        ("{foo = 1}", 'train.optimizer_args {"foo": 1} do not fit optimizer lion ('),
        ("{lr = 1}", "`train.optimizer_args` sets lr; remove it"),
    ):
        result = runner.invoke(
            app, ["train", str(cfg_path), "-q", "--overwrite", "--set", f"train.optimizer_args={bad}"]
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
