"""`zturbo train` end to end on builtin:tiny and the bundled dataset."""

from __future__ import annotations

import json
import math
import signal
import statistics
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from zturbo_train.cli import app
from zturbo_train.config import load_config
from zturbo_train.errors import TrainingError
from zturbo_train.lora.formats import read_lora_file
from zturbo_train.train.loop import run
from zturbo_train.train.step import TrainStep

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def make_config(tmp_path: Path, example_data: Path, **train) -> Path:
    """The quick-start settings, pointed at a temp output folder, with overrides."""
    settings = {
        "steps": 8,
        "lr": 2e-3,
        "batch_size": 2,
        "seed": 3,
        "save_every": 4,
        "sample_every": 4,
        "log_every": 2,
        "gradient_checkpointing": False,
        "output_dir": str(tmp_path / "run"),
        "name": "t",
    }
    settings.update(train)
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.toml"
    path.write_text(
        f'[model]\npath = "builtin:tiny"\nadapter = "builtin:tiny-adapter"\ndtype = "fp32"\n'
        f'[data]\ndir = {json.dumps(str(example_data))}\nresolution = 64\ntrigger_word = "sks"\n'
        f"[lora]\nrank = 8\n[train]\n{body}\n"
        f'[sample]\nprompts = ["sks a red square with a yellow dot"]\nwidth = 64\nheight = 64\n',
        encoding="utf-8",
    )
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, example_data):
    """One 60-step run through the CLI, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = make_config(tmp, example_data, steps=60, lr=5e-3, seed=2, save_every=30, sample_every=30, log_every=5)
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 0, result.output
    return tmp / "run", cfg, result.output


def test_cli_run_writes_everything(trained):
    run_dir, _, output = trained
    assert "training done" in output
    assert (run_dir / "t.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["t-step000030.safetensors"]
    assert (run_dir / "samples" / "step-000000" / "00.png").is_file()
    assert (run_dir / "samples" / "step-000060-grid.png").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["steps"] == 60 and config["model"]["adapter"] == "builtin:tiny-adapter"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"loss", "loss_smooth", "lr", "grad_norm", "sec_per_step", "peak_mem_gib"} <= rows[0].keys()
    _, meta = read_lora_file(run_dir / "t.safetensors")
    assert meta["zturbo.trigger_word"] == "sks" and meta["zturbo.steps"] == "60"
    assert meta["zturbo.rank"] == "8" and meta["zturbo.adapter"] == "builtin:tiny-adapter"
    # what LoRA managers read (lora.metadata.build_metadata), on the final LoRA and on checkpoints
    assert meta["ss_output_name"] == "t" and meta["modelspec.trigger_phrase"] == "sks" and meta["ss_steps"] == "60"
    assert meta["ss_network_dim"] == "8" and meta["ss_base_model_version"] == "zimage" and meta["sshs_model_hash"]
    _, step_meta = read_lora_file(run_dir / "checkpoints" / "t-step000030.safetensors")
    assert step_meta["ss_steps"] == "30" and step_meta["modelspec.architecture"] == "Z-Image/lora"
    assert step_meta["ss_training_started_at"] == meta["ss_training_started_at"] and meta["modelspec.date"]


def test_loss_falls(trained):
    """Per-step losses are noisy (a random sigma per sample, batch 2), so compare 15-step windows of a
    seeded run (bit-for-bit repeatable on CPU; measured 1.87 -> 1.34), and also the loss on fixed noise
    and sigmas over the whole dataset, with and without the LoRA (measured 2.17 -> 1.66)."""
    rows = metrics(trained[0])
    first = statistics.mean(r["loss"] for r in rows[:15])
    last = statistics.mean(r["loss"] for r in rows[-15:])
    assert last < 0.9 * first, (first, last)
    base, tuned = _fixed_noise_loss(trained[1], None), _fixed_noise_loss(trained[1], trained[0] / "t.safetensors")
    assert tuned < 0.85 * base, (base, tuned)


def _fixed_noise_loss(cfg_path: Path, lora: Path | None) -> float:
    """Flow loss over every training batch with 8 fixed (noise, sigma) draws each, adapter applied as in training."""
    from zturbo_train import flow
    from zturbo_train.data.prepare import prepare_dataset
    from zturbo_train.lora.adapter import TrainingAdapter
    from zturbo_train.lora.network import load_lora
    from zturbo_train.models import load_parts

    cfg = load_config(cfg_path)
    data = prepare_dataset(cfg, "cpu")
    transformer = load_parts(cfg.model.path, ["transformer"], dtype="fp32").transformer
    TrainingAdapter.from_config(cfg.model, transformer).apply()
    if lora is not None:
        load_lora(transformer, read_lora_file(lora)[0])
    gen, total, count = torch.Generator().manual_seed(0), 0.0, 0
    with torch.no_grad():
        for position in range(data.batches_per_epoch):
            batch = data.load_batch(0, position)
            for _ in range(8):
                noise = torch.randn(batch.latents.shape, generator=gen)
                sigmas = torch.rand(batch.latents.shape[0], generator=gen) * 0.98 + 0.01
                pred = flow.predict(
                    transformer, flow.noisy_latents(batch.latents, noise, sigmas), flow.model_time(sigmas), batch.text
                )
                total += float(flow.flow_loss(pred, flow.flow_target(batch.latents, noise)))
                count += 1
    return total / count


def _sample_latents(lora: Path | None, prompts: list[str]) -> torch.Tensor:
    """8-step latents from plain tiny (no adapter, as users sample), with or without the LoRA."""
    from zturbo_train.lora.network import load_lora
    from zturbo_train.models import build_pipeline, load_parts

    parts = load_parts("builtin:tiny", dtype="fp32")
    if lora is not None:
        load_lora(parts.transformer, read_lora_file(lora)[0])
    return build_pipeline(parts)(
        prompts,
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        output_type="latent",
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    ).images


def test_lora_moves_samples_toward_the_data(trained):
    """Metric: RMS distance from each sample's latent to the nearest training latent (64x64 bucket), averaged.

    Measured in latent space because that is where the model works: the tiny VAE is random, so
    its decoder maps latents to pixels without any image prior and pixel distances say nothing.
    The random tiny model cannot denoise well in 8 steps, so samples stay far from the data;
    what a LoRA trained on it must do is move them closer (measured 1.43 -> 1.30)."""
    from zturbo_train.data.cache import read_entry
    from zturbo_train.data.prepare import prepare_dataset

    run_dir, cfg_path, _ = trained
    cfg = load_config(cfg_path)
    means = [read_entry(p)["mean"].float() for p in prepare_dataset(cfg, "cpu").latent_paths]
    data = torch.stack([m for m in means if m.shape[-2:] == (8, 8)])
    prompts = cfg.sample.prompts * 4

    def distance(latents: torch.Tensor) -> float:
        rms = ((latents[:, None] - data[None]) ** 2).mean(dim=(2, 3, 4)).sqrt()
        return float(rms.min(dim=1).values.mean())

    base = distance(_sample_latents(None, prompts))
    tuned = distance(_sample_latents(run_dir / "t.safetensors", prompts))
    assert tuned < 0.95 * base, (base, tuned)


def test_saved_lora_in_diffusers_equals_training_preview(trained):
    from diffusers import ZImagePipeline

    run_dir, cfg_path, _ = trained
    cfg = load_config(cfg_path)
    from zturbo_train.testing.tiny import tiny_model_dir

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    pipe.load_lora_weights(str(run_dir / "t.safetensors"))
    image = pipe(
        cfg.sample.prompts[0],
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(cfg.sample.seed),
        output_type="np",
    ).images[0]
    preview = np.asarray(Image.open(run_dir / "samples" / "step-000060" / "00.png"), dtype=np.float32) / 255
    # The preview is an 8-bit PNG: one quantisation step (1/255) plus fp32 summation order.
    assert np.abs(image - preview).max() <= 1.5 / 255


def test_adapter_is_active_in_training_and_inverted_in_previews(tmp_path, example_data):
    """A large random adapter changes the training loss; previews at step 0 (LoRA still zero) equal the plain base."""
    from safetensors.torch import save_file

    from zturbo_train.testing.tiny import build_tiny_adapter

    big = tmp_path / "big.safetensors"
    save_file(build_tiny_adapter(seed=5, scale=0.3), str(big))
    losses, previews = {}, {}
    for name, adapter in (("none", "none"), ("big", str(big))):
        cfg = load_config(
            make_config(tmp_path / name, example_data, steps=2, save_every=0, sample_every=0, log_every=1),
            [f'model.adapter="{adapter}"'],
        )
        result = run(cfg, quiet=True)
        losses[name] = metrics(result.run_dir)[0]["loss"]
        previews[name] = np.asarray(Image.open(result.run_dir / "samples" / "step-000000" / "00.png"))
    # Same seed, batch, noise and sigmas: the adapter is the only difference (measured 2.4 %).
    assert abs(losses["big"] - losses["none"]) > 0.01 * losses["none"], losses
    # Merge mode inverts with a -1 branch: exact up to fp32 summation order, so at most one 8-bit level.
    assert np.abs(previews["big"].astype(int) - previews["none"].astype(int)).max() <= 1


def _interrupt_after(monkeypatch, calls: int, sig=signal.SIGINT):
    original = TrainStep.update
    count = {"n": 0}

    def update(self, lr):
        count["n"] += 1
        if count["n"] == calls:
            signal.raise_signal(sig)
        return original(self, lr)

    monkeypatch.setattr(TrainStep, "update", update)


def test_resume_after_sigint_equals_uninterrupted_run(tmp_path, example_data, monkeypatch):
    settings = dict(steps=6, save_every=0, sample_every=0, lr_scheduler="cosine", warmup_steps=2, log_every=4)
    full = run(load_config(make_config(tmp_path / "a", example_data, **settings)), quiet=True)

    cfg_b = make_config(tmp_path / "b", example_data, **settings)
    _interrupt_after(monkeypatch, 3)
    result = runner.invoke(app, ["train", str(cfg_b), "--quiet", "--set", "train.steps=6"], env={"COLUMNS": "300"})
    assert result.exit_code == 130, result.output
    # The resume command is the one that was run (same --set), so it continues this run and no other.
    assert "stopped at step 3" in result.output
    assert f"Resume with: zturbo train {cfg_b} --set train.steps=6 --resume" in result.output
    assert (tmp_path / "b" / "run" / "state" / "step-000003" / "state.json").is_file()
    monkeypatch.undo()
    resumed = run(load_config(cfg_b), resume=True, quiet=True)
    assert resumed.steps_done == 6
    a, _ = read_lora_file(full.lora_path)
    b, _ = read_lora_file(resumed.lora_path)
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)
    assert [r["loss"] for r in metrics(full.run_dir)] == [r["loss"] for r in metrics(resumed.run_dir)]
    # turbo_drift's start is saved with the state: the resumed run's final preview is judged against its own step 0
    # (with no preview between, the metrics rows could not have told it; checked: without it the ratio is 1.0).
    drift = [{k: v for k, v in metrics(r.run_dir)[-1].items() if k.startswith("turbo_drift")} for r in (full, resumed)]
    assert drift[0] == drift[1] and drift[0]["turbo_drift_ratio"] != 1.0


def test_sigterm_saves_state_and_lora(tmp_path, example_data, monkeypatch):
    cfg = load_config(make_config(tmp_path, example_data, steps=5, save_every=0, sample_every=0))
    _interrupt_after(monkeypatch, 2, signal.SIGTERM)
    result = run(cfg, quiet=True)
    assert result.interrupted and result.steps_done == 2
    # An interrupted run's LoRA is a step checkpoint; the final name is kept for a finished run.
    assert result.lora_path == result.run_dir / "checkpoints" / "t-step000002.safetensors"
    assert result.lora_path.is_file() and (result.run_dir / "state" / "step-000002").is_dir()
    assert not (result.run_dir / "t.safetensors").exists()


def test_nan_loss_stops_and_keeps_last_good_state(tmp_path, example_data, monkeypatch):
    cfg = load_config(make_config(tmp_path, example_data, steps=8, save_every=2, sample_every=0, log_every=1))
    original = TrainStep.loss
    count = {"n": 0}

    def loss(self, latents, embeds, *keys):
        count["n"] += 1
        value = original(self, latents, embeds, *keys)
        return value * float("nan") if count["n"] >= 4 else value

    monkeypatch.setattr(TrainStep, "loss", loss)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 4; stopped without saving it.*--resume"):
        run(cfg, quiet=True)
    states = sorted(p.name for p in (cfg.train.output_dir / "state").iterdir())
    assert states == ["step-000002"]
    assert not (cfg.train.output_dir / "t.safetensors").exists()


def test_output_folder_of_another_run_is_refused(tmp_path, example_data):
    cfg_path = make_config(tmp_path, example_data, steps=1, save_every=0, sample_every=0)
    assert runner.invoke(app, ["train", str(cfg_path), "-q"]).exit_code == 0
    result = runner.invoke(app, ["train", str(cfg_path), "-q"])
    assert result.exit_code == 1
    assert "holds another run; pass --resume to continue it, --overwrite to replace it" in result.output
    assert runner.invoke(app, ["train", str(cfg_path), "-q", "--overwrite"]).exit_code == 0


def test_preview_does_not_change_the_next_loss(tmp_path, example_data):
    """Sampling between steps must leave the RNG streams, modes and weights as they were."""
    from zturbo_train.train.loop import preview, setup

    first = []
    for name, with_preview in (("a", False), ("b", True)):
        cfg = load_config(make_config(tmp_path / name, example_data, steps=2))
        s = setup(cfg, resume=False, overwrite=False, console=None)
        batch = s.dataset.load_batch(0, 0)
        s.step.backward(batch.latents, batch.text)
        s.step.update(1e-2)
        if with_preview:
            preview(s, 1)
        first.append(s.step.loss(batch.latents, batch.text))
        s.adapter.deactivate()
    assert torch.equal(first[0], first[1])


def test_real_config_dry_run_against_tiny(example_data):
    result = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "configs" / "zimage-turbo-lora.toml"),
            "--dry-run",
            "--set",
            "model.path=builtin:tiny",
            "--set",
            "model.adapter=builtin:tiny-adapter",
            "--set",
            f"data.dir={json.dumps(str(example_data))}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "training plan" in result.output and "rank 32" in result.output
    assert "adamw, lr 0.0001 constant" in result.output and "val_loss" not in result.output


def test_dry_run_states_the_optimizer_the_ema_and_the_validation(tmp_path, example_data):
    """The plan says what the run does with each step beyond the LoRA: optimizer and schedule, EMA, val_loss."""
    extra = ["train.ema=true", "train.ema_device='cpu'", "train.ema_every=5", "train.val_fraction=0.2"]
    extra += ["train.warmup_steps=10", "train.lr_scheduler='cosine'", "train.loraplus_ratio=16"]
    cfg = make_config(tmp_path, example_data)
    result = runner.invoke(app, ["train", str(cfg), "--dry-run", *[a for e in extra for a in ("--set", e)]])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "optimizer adamw, lr 0.002 cosine, warm-up 10, LoRA+ ratio 16" in text
    assert "ema decay 0.999 from step 0, in host memory, updated every 5 steps; the main file is the EMA" in text
    assert "validation 20% of the training images held out, val_loss every 100 steps" in text


def test_out_of_memory_names_the_settings_that_lower_memory(tmp_path, example_data, monkeypatch):
    def oom(self, latents, embeds, *keys, **named):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainStep, "backward", oom)
    result = runner.invoke(app, ["train", str(make_config(tmp_path, example_data, steps=3, sample_every=0)), "-q"])
    assert result.exit_code == 1
    assert "error: out of GPU memory at resolution 64, batch 2; lower memory with" in result.output
    assert "train.gradient_checkpointing=true" in result.output and "Traceback" not in result.output


def test_adamw8bit_and_schedules_run(tmp_path, example_data):
    from zturbo_train.config import TrainConfig
    from zturbo_train.train.step import lr_at

    cfg = load_config(
        make_config(tmp_path, example_data, steps=3, save_every=0, sample_every=0, optimizer="adamw8bit", log_every=1)
    )
    result = run(cfg, quiet=True)
    assert result.steps_done == 3 and all(math.isfinite(r["loss"]) for r in metrics(result.run_dir))

    warm = TrainConfig(steps=10, lr=1.0, warmup_steps=2, lr_scheduler="cosine")
    assert [round(lr_at(s, warm), 4) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.0381]
    linear = TrainConfig(steps=10, lr=1.0, lr_scheduler="linear")
    assert [lr_at(s, linear) for s in (0, 5)] == [1.0, 0.5]
    assert lr_at(7, TrainConfig(steps=10, lr=0.3)) == 0.3


def test_same_seed_is_bit_for_bit_repeatable(tmp_path, example_data):
    paths = []
    for name in ("a", "b"):
        cfg = load_config(
            make_config(tmp_path / name, example_data, steps=3, save_every=0, sample_every=0, log_every=1)
        )
        paths.append(run(cfg, quiet=True).lora_path)
    a, b = read_lora_file(paths[0])[0], read_lora_file(paths[1])[0]
    assert all(torch.equal(a[k].up, b[k].up) for k in a)


def test_resume_with_adamw8bit_equals_uninterrupted_run(tmp_path, example_data, monkeypatch):
    """bitsandbytes nests its moments in a dict inside each parameter's optimizer state; they must be saved as
    tensors."""
    settings = dict(steps=4, save_every=0, sample_every=0, optimizer="adamw8bit", log_every=1)
    full = run(load_config(make_config(tmp_path / "a", example_data, **settings)), quiet=True)
    cfg = load_config(make_config(tmp_path / "b", example_data, **settings))
    _interrupt_after(monkeypatch, 2)
    assert run(cfg, quiet=True).steps_done == 2
    monkeypatch.undo()
    resumed = run(cfg, resume=True, quiet=True)
    a, b = read_lora_file(full.lora_path)[0], read_lora_file(resumed.lora_path)[0]
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)


def test_stop_on_a_save_and_sample_step_saves_once_and_skips_the_preview(tmp_path, example_data, monkeypatch):
    """SIGTERM (a preemption with a grace period) must not wait for a preview, nor write the same state twice."""
    import zturbo_train.train.loop as train_module

    cfg = load_config(make_config(tmp_path, example_data, steps=5, save_every=2, sample_every=2))
    saves = []
    original = train_module.save_state
    monkeypatch.setattr(train_module, "save_state", lambda run, step, *a: saves.append(step) or original(run, step, *a))
    _interrupt_after(monkeypatch, 2, signal.SIGTERM)
    result = run(cfg, quiet=True)
    assert result.interrupted and result.steps_done == 2 and saves == [2]
    assert result.lora_path == result.run_dir / "checkpoints" / "t-step000002.safetensors"
    assert not (result.run_dir / "samples" / "step-000002").exists()
    assert (result.run_dir / "samples" / "step-000000").is_dir()


def test_nan_gradient_stops_before_the_poisoned_lora_is_saved(tmp_path, example_data, monkeypatch):
    """A finite loss with a non-finite gradient (fp16/bf16 overflow) turns every LoRA weight into NaN in
    the update: the step's state must not be saved, or the 'last good state' to resume from is broken."""
    cfg = load_config(make_config(tmp_path, example_data, steps=8, save_every=2, sample_every=0, log_every=4))
    original = TrainStep.update
    count = {"n": 0}

    def update(self, lr):
        count["n"] += 1
        if count["n"] == 4:
            for p in self.params:
                p.grad.fill_(float("nan"))
        return original(self, lr)

    monkeypatch.setattr(TrainStep, "update", update)
    with pytest.raises(TrainingError, match=r"gradient norm became nan at step 4; stopped without saving it"):
        run(cfg, quiet=True)
    assert sorted(p.name for p in (cfg.train.output_dir / "state").iterdir()) == ["step-000002"]


def test_resume_with_another_lora_rank_is_a_clear_error(tmp_path, example_data):
    from zturbo_train.errors import LoraError

    cfg_path = make_config(tmp_path, example_data, steps=2, save_every=0, sample_every=0)
    run(load_config(cfg_path), quiet=True)
    with pytest.raises(LoraError, match=r"rank 8.*lora.rank = 4.*resume with the same \[lora\] settings"):
        run(load_config(cfg_path, ["lora.rank=4", "train.steps=3"]), resume=True, quiet=True)


def test_resume_says_where_it_continues_lists_and_records_what_changed(tmp_path, example_data):
    """A resumed run used to train with the new lr silently while config.json kept the old one."""
    cfg_path = make_config(tmp_path, example_data, steps=2, save_every=0, sample_every=0, log_every=1)
    run(load_config(cfg_path), quiet=True)
    run_dir = tmp_path / "run"
    changed = ["--set", "train.steps=4", "--set", "train.lr=1e-3"]
    result = runner.invoke(app, ["train", str(cfg_path), "--resume", *changed], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "resuming at step 2 of 4 from state/step-000002" in result.output
    assert (
        "changed since the saved run (recorded in config-history.jsonl): train.steps 2 -> 4, "
        "train.lr 0.002 -> 0.001" in result.output
    )
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["steps"] == 4
    history = [json.loads(line) for line in (run_dir / "config-history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 2 and history[0]["time"]
    assert history[0]["changes"] == {"train.steps": {"from": 2, "to": 4}, "train.lr": {"from": 2e-3, "to": 1e-3}}
    assert [r["lr"] for r in metrics(run_dir)] == [2e-3, 2e-3, 1e-3, 1e-3]
    again = runner.invoke(app, ["train", str(cfg_path), "--resume", *changed, "-q"])
    assert again.exit_code == 0 and len((run_dir / "config-history.jsonl").read_text().splitlines()) == 1


def test_resume_refuses_fewer_steps_and_settings_that_cannot_change_before_caching(tmp_path, example_data, monkeypatch):
    import zturbo_train.train.distributed as distributed

    cfg_path = make_config(tmp_path, example_data, steps=3, save_every=0, sample_every=0)
    run(load_config(cfg_path), quiet=True)

    def no_caching(*args, **kwargs):
        raise AssertionError("the dataset was prepared before the resume was checked")

    monkeypatch.setattr(distributed, "prepare_dataset", no_caching)
    with pytest.raises(TrainingError, match=r"is already at step 3, past train.steps = 2; set train.steps above 3"):
        run(load_config(cfg_path, ["train.steps=2"]), resume=True, quiet=True)
    with pytest.raises(
        TrainingError,
        match=r"trained with train.optimizer \"adamw\"; this config says "
        r"train.optimizer = \"adamw8bit\", which cannot change on resume",
    ):
        run(load_config(cfg_path, ["train.optimizer=adamw8bit", "train.steps=4"]), resume=True, quiet=True)
    from zturbo_train.errors import LoraError

    with pytest.raises(LoraError, match=r"lora.alpha 8.0; this config says lora.alpha = 16.0"):
        run(load_config(cfg_path, ["lora.alpha=16", "train.steps=4"]), resume=True, quiet=True)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["steps"] == 3 and not (tmp_path / "run" / "config-history.jsonl").exists()


def test_a_changed_dataset_on_resume_is_one_warning_line_not_a_python_warning(tmp_path, data_copy):
    cfg_path = make_config(tmp_path, data_copy, steps=2, save_every=0, sample_every=0)
    run(load_config(cfg_path), quiet=True)
    for suffix in ("png", "txt"):
        (data_copy / f"img_04.{suffix}").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(
            app, ["train", str(cfg_path), "--resume", "--set", "train.steps=3"], env={"COLUMNS": "300"}
        )
    assert result.exit_code == 0, result.output
    assert "warning: the dataset changed since this state was saved; continuing at the start of epoch" in result.output
    assert "UserWarning" not in result.output and not [w for w in caught if "dataset changed" in str(w.message)]


def test_bad_model_or_data_is_reported_before_the_output_folder_is_touched(tmp_path, example_data):
    cfg_path = make_config(tmp_path, example_data, steps=1)
    for override, message in (
        ('model.path="builtin:nothing"', "unknown builtin model"),
        (f"data.dir={json.dumps(str(tmp_path / 'nope'))}", "does not exist"),
    ):
        result = runner.invoke(app, ["train", str(cfg_path), "-q", "--set", override])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "run").exists()


def test_folder_of_a_run_that_saved_nothing_points_to_overwrite(tmp_path, example_data):
    cfg_path = make_config(tmp_path, example_data, steps=1, save_every=0, sample_every=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "t.safetensors").write_bytes(b"old final LoRA")
    result = runner.invoke(app, ["train", str(cfg_path), "-q"])
    assert result.exit_code == 1 and "saved no training state; pass --overwrite" in result.output
    interrupted = runner.invoke(app, ["train", str(cfg_path), "-q", "--resume"])
    assert "nothing to resume" in interrupted.output and "--overwrite" in interrupted.output
    from zturbo_train.train.state import open_run_folder

    open_run_folder(run_dir, resume=False, overwrite=True, name="t")
    assert not (run_dir / "t.safetensors").exists(), "an interrupted new run must not leave the old final LoRA"
    assert runner.invoke(app, ["train", str(cfg_path), "-q", "--overwrite"]).exit_code == 0


def test_noise_is_drawn_on_the_loader_thread_not_in_the_step(tmp_path, example_data, monkeypatch):
    """The hot path gets its noise and sigmas with the batch; the step itself draws nothing."""
    import threading

    from zturbo_train.train import step as step_module

    def no_draw(self, latents):
        raise AssertionError("the training step drew noise itself")

    threads = set()
    original = step_module.draw_noise

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(TrainStep, "_draw", no_draw)
    monkeypatch.setattr(step_module, "draw_noise", recording)
    result = run(load_config(make_config(tmp_path, example_data, steps=3, save_every=0, sample_every=0)), quiet=True)
    assert result.steps_done == 3 and threads == {"zturbo-data"}


def test_lora_alpha_other_than_rank_trains_what_diffusers_loads(tmp_path, example_data):
    """rank 8, alpha 2 (scale 1/4): the final preview equals ZImagePipeline loading the saved file, and the
    LoRA visibly changed the image. Fails if create_lora's scale alpha/rank is replaced by 1 (checked:
    training then runs the LoRA 4x stronger than the file says)."""
    from diffusers import ZImagePipeline

    from zturbo_train.testing.tiny import tiny_model_dir

    cfg = load_config(
        make_config(tmp_path, example_data, steps=6, lr=2e-2, save_every=0, sample_every=0), ["lora.alpha=2"]
    )
    result = run(cfg, quiet=True)
    lora, meta = read_lora_file(result.lora_path)
    assert {w.alpha for w in lora.values()} == {2.0} and meta["zturbo.alpha"] == "2.0"
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    pipe.load_lora_weights(str(result.lora_path))
    image = pipe(
        cfg.sample.prompts[0],
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(cfg.sample.seed),
        output_type="np",
    ).images[0]
    samples = result.run_dir / "samples"
    preview = np.asarray(Image.open(samples / "step-000006" / "00.png"), dtype=np.float32) / 255
    before = np.asarray(Image.open(samples / "step-000000" / "00.png"), dtype=np.float32) / 255
    assert np.abs(preview - before).max() > 20 / 255, "the LoRA must change the preview for the check to mean anything"
    assert np.abs(image - preview).max() <= 1.5 / 255


def test_fp16_training_is_refused_before_anything_is_done(tmp_path, example_data):
    """No gradient scaler: fp16 training is refused with one line that points to bf16, before the output
    folder exists; the step itself refuses too (`zturbo bench` builds it)."""
    from zturbo_train.config import TrainConfig
    from zturbo_train.errors import ConfigError
    from zturbo_train.train.step import StepSettings

    result = runner.invoke(
        app, ["train", str(make_config(tmp_path, example_data, steps=1)), "-q", "--set", 'model.dtype="fp16"']
    )
    assert result.exit_code == 2 and "Traceback" not in result.output  # a configuration error
    assert 'model.dtype = "fp16" cannot train' in result.output and 'set model.dtype = "bf16"' in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="fp16"):
        StepSettings.from_config(TrainConfig(), torch.float16, torch.device("cpu"))
    assert StepSettings.from_config(TrainConfig(), torch.bfloat16, torch.device("cpu")).autocast_dtype == torch.bfloat16


def test_lora_dropout_resumes_bit_exactly_and_is_off_in_previews(tmp_path, example_data, monkeypatch):
    """lora.dropout = 0.5: dropout draws from the global torch RNG, which the state saves, so a run
    stopped at step 2 and resumed ends on the same LoRA bit for bit; the dropout acts in training (the
    LoRA differs from a run without it) and not in previews (the final preview equals diffusers loading
    the saved file; checked: without network.eval() in preview() it does not)."""
    from diffusers import ZImagePipeline

    from zturbo_train.testing.tiny import tiny_model_dir

    settings = dict(steps=4, lr=2e-2, save_every=0, sample_every=0, log_every=1)
    full = run(load_config(make_config(tmp_path / "a", example_data, **settings), ["lora.dropout=0.5"]), quiet=True)
    plain = run(load_config(make_config(tmp_path / "c", example_data, **settings)), quiet=True)
    cfg = load_config(make_config(tmp_path / "b", example_data, **settings), ["lora.dropout=0.5"])
    _interrupt_after(monkeypatch, 2)
    assert run(cfg, quiet=True).steps_done == 2
    monkeypatch.undo()
    resumed = run(cfg, resume=True, quiet=True)
    a, b, c = (read_lora_file(r.lora_path)[0] for r in (full, resumed, plain))
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)
    assert [r["loss"] for r in metrics(full.run_dir)] == [r["loss"] for r in metrics(resumed.run_dir)]
    assert any(not torch.equal(a[k].up, c[k].up) for k in a), "dropout must act in training"

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    pipe.load_lora_weights(str(full.lora_path))
    image = pipe(
        cfg.sample.prompts[0],
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(cfg.sample.seed),
        output_type="np",
    ).images[0]
    preview = np.asarray(Image.open(full.run_dir / "samples" / "step-000004" / "00.png"), dtype=np.float32) / 255
    assert np.abs(image - preview).max() <= 1.5 / 255


def test_keep_last_prunes_old_loras_and_states_only(tmp_path, example_data):
    """keep_last = 2 with saves at steps 2, 4, 6 and the end (7): the two newest step LoRAs and states
    stay, the older ones go; the final LoRA and files of another name are never pruned."""
    from zturbo_train.train.state import prune

    cfg = load_config(make_config(tmp_path, example_data, steps=7, save_every=2, sample_every=0, keep_last=2))
    result = run(cfg, quiet=True)
    checkpoints = result.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["t-step000004.safetensors", "t-step000006.safetensors"]
    assert sorted(p.name for p in (result.run_dir / "state").iterdir()) == ["step-000006", "step-000007"]
    assert result.lora_path == result.run_dir / "t.safetensors" and result.lora_path.is_file()
    (checkpoints / "other-step000001.safetensors").write_bytes(b"a user's file")
    (checkpoints / "t-step000008.safetensors").write_bytes(b"newer")
    prune(checkpoints, "t-step*.safetensors", 2)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "other-step000001.safetensors",
        "t-step000006.safetensors",
        "t-step000008.safetensors",
    ]


def test_out_of_memory_while_setting_up_is_one_line_and_loses_nothing(tmp_path, example_data, monkeypatch):
    """OOM while loading the model / creating the LoRA (before any step): one line, no traceback; a new
    run can simply be started again, and a resumed run's saved states and LoRAs are untouched."""
    import zturbo_train.train.loop as loop_module  # setup() calls the create_lora it imported

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg_path = make_config(tmp_path, example_data, steps=2, save_every=0, sample_every=0)
    monkeypatch.setattr(loop_module, "create_lora", oom)
    result = runner.invoke(app, ["train", str(cfg_path), "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "error: out of GPU memory while setting up (loading the model, adapter and LoRA) for resolution 64, "
        "batch 2; lower memory with" in result.output
    )
    assert "nothing was trained or saved; run the same command again" in result.output
    monkeypatch.undo()
    assert runner.invoke(app, ["train", str(cfg_path), "-q"]).exit_code == 0  # the same command again

    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(loop_module, "create_lora", oom)
    result = runner.invoke(app, ["train", str(cfg_path), "-q", "--resume", "--set", "train.steps=3"])
    assert result.exit_code == 1 and "saved states are untouched; run again with --resume" in result.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert run(load_config(cfg_path, ["train.steps=3"]), resume=True, quiet=True).steps_done == 3


# ----------------------------------------------------------------------------- what users see (issue 12)


def test_summary_labels_both_losses_and_output_starts_with_no_blank_line(trained):
    """The bar shows the smoothed loss and the summary used to show the raw last step under "final loss"
    (issue 12): both are labelled now, with the values metrics.jsonl holds. The hidden dataset-check bar
    used to print an empty first line where the output is not a terminal."""
    import re

    run_dir, _, output = trained
    last = metrics(run_dir)[-1]
    assert re.search(rf"loss \(smoothed\)\s+│ {last['loss_smooth']:.4f}", output), output
    assert re.search(rf"last step loss\s+│ {last['loss']:.4f}", output), output
    assert "final loss" not in output
    assert f"loss (smoothed) {last['loss_smooth']:.4f}" in output  # the bar's last draw
    assert output.splitlines()[0].strip(), output[:200]


def test_turbo_drift_is_in_the_preview_rows_the_progress_lines_and_the_summary(trained):
    """Each preview's turbo_drift goes into its step's metrics row and a labelled line (one preview's value,
    never smoothed); the summary shows the last one under its own label, beside the losses'."""
    import re

    run_dir, _, output = trained
    rows = {r["step"]: r for r in metrics(run_dir)}
    assert [s for s, r in rows.items() if "turbo_drift" in r] == [30, 60]
    start = rows[30]["turbo_drift_start"]
    assert start > 0 and rows[60]["turbo_drift_start"] == start
    for step in (30, 60):
        row = rows[step]
        assert row["turbo_drift_ratio"] == pytest.approx(row["turbo_drift"] / start)
        assert (
            f"preview step {step}: turbo_drift {row['turbo_drift']:.3f} ({row['turbo_drift_ratio']:.2f}x step 0)"
            in output
        )
    assert f"preview step 0: turbo_drift {start:.3f} (1.00x step 0)" in output
    last = rows[60]
    assert re.search(
        rf"turbo_drift \(last preview\)\s+│ {last['turbo_drift']:.3f} "
        rf"\({last['turbo_drift_ratio']:.2f}x step 0\)",
        output,
    ), output


def test_dry_run_plans_the_real_model_before_the_download(example_data):
    """No weights anywhere (the tests' ZTURBO_HOME and HF_HOME are empty): the plan comes from
    Z-Image Turbo's known shapes, the dataset is still checked, and the figures say what they are."""
    from io import StringIO

    from rich.console import Console

    from zturbo_train.memory.estimate import shape_from_config
    from zturbo_train.memory.levers import levers_for, workload_of
    from zturbo_train.memory.presets import estimate_for
    from zturbo_train.testing.synthetic import ZIMAGE_CONFIG
    from zturbo_train.train.dry_run import NOT_DOWNLOADED, dry_run

    config = ROOT / "configs" / "zimage-turbo-lora.toml"
    data = f"data.dir={json.dumps(str(example_data))}"
    result = runner.invoke(app, ["train", str(config), "--dry-run", "--set", data], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "training plan" in result.output and "img_05.png" in result.output
    assert f"note: the memory figures are {NOT_DOWNLOADED}; run `zturbo download` before training" in result.output
    assert "Tongyi-MAI/Z-Image-Turbo (not downloaded yet" in result.output
    cfg = load_config(config, [data])
    plan = dry_run(cfg, Console(file=StringIO(), width=200))
    shape = shape_from_config(ZIMAGE_CONFIG)
    peak = estimate_for(levers_for(cfg, torch.device("cpu"), shape), shape, workload_of(cfg)).total
    assert f"estimated peak {peak:.1f} GiB" in plan["memory"] and plan["memory"].endswith(NOT_DOWNLOADED)
    assert 40 < peak < 60  # 6.15 B bf16 weights, uncheckpointed 1024 px activations (high preset without CUDA)
    other = runner.invoke(app, ["train", str(config), "--dry-run", "--set", data, "--set", "model.path=someone/else"])
    assert other.exit_code == 1 and "model someone/else is not downloaded yet" in other.output


def test_rank_above_the_layer_width_warns(tmp_path, example_data):
    """builtin:tiny's linears are at least 64 wide: rank 128 cannot be used in full. Warned in the dry
    run (from the model's shapes) and in training (from the LoRA made)."""
    expected = (
        "warning: lora.rank 128 is above the width of 7 of the 7 kinds of adapted layer (narrowest: "
        "layers.*.attention.to_q, 64x64); a LoRA cannot use rank beyond min(in, out), so the extra rank adds "
        "parameters but no capacity; set lora.rank to 64 or less"
    )
    cfg = make_config(tmp_path, example_data, steps=1, save_every=0, sample_every=0)
    dry = runner.invoke(app, ["train", str(cfg), "--dry-run", "--set", "lora.rank=128"], env={"COLUMNS": "300"})
    assert dry.exit_code == 0 and expected in dry.output, dry.output
    fits = runner.invoke(app, ["train", str(cfg), "--dry-run", "--set", "lora.rank=64"], env={"COLUMNS": "300"})
    assert fits.exit_code == 0 and "warning: lora.rank" not in fits.output
    trained = runner.invoke(app, ["train", str(cfg), "--set", "lora.rank=128"], env={"COLUMNS": "300"})
    assert trained.exit_code == 0 and expected in trained.output, trained.output


def test_train_reports_every_dataset_problem_at_once(tmp_path, example_data):
    """Issue 12: a non-UTF-8 caption stopped `zturbo train` while three unreadable images in the same
    folder went unmentioned; one report now names all of them, before anything is encoded."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(example_data, data)
    (data / "img_00.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name in ("bad1.png", "bad2.jpg", "bad3.webp"):
        (data / name).write_text("not an image")
        (data / name).with_suffix(".txt").write_text("a caption")
    (data / "img_01.txt").unlink()
    (data / "lost.txt").write_text("no image")
    cfg = make_config(tmp_path, data, steps=1)
    result = runner.invoke(app, ["train", str(cfg), "-q"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: 2 dataset problems found before training (nothing was encoded)" in result.output
    for name in (
        "img_00.txt: caption is not UTF-8",
        "img_01.png: has no caption file",
        "bad1.png: is not an image",
        "bad2.jpg: is not an image",
        "bad3.webp: is not an image",
        "lost.txt: caption file with no image",
    ):
        assert name in result.output, name
    assert not list((tmp_path / "run").glob("*"))


def test_run_folder_inside_data_dir_is_left_out_of_the_dataset(tmp_path, example_data):
    """train.output_dir inside data.dir: its previews (no captions) would be errors, or training data."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(example_data, data)
    out = data / "run"
    (out / "samples" / "step-000000").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(out / "samples" / "step-000000" / "00.png")
    cfg = make_config(tmp_path, data, steps=1, output_dir=str(out))
    result = runner.invoke(app, ["train", str(cfg), "--dry-run"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output and "is a zturbo run folder inside data.dir" in result.output
    trained = runner.invoke(
        app, ["train", str(cfg), "--set", "train.save_every=0", "--set", "train.sample_every=0"], env={"COLUMNS": "300"}
    )
    assert trained.exit_code == 0, trained.output
    assert "data: 6 images" in trained.output and "is a zturbo run folder inside data.dir" in trained.output
