"""`zturbo train` end to end on builtin:tiny and the bundled dataset."""

from __future__ import annotations

import json
import math
import signal
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from zturbo_train.cli import app
from zturbo_train.config import load_config
from zturbo_train.errors import TrainingError
from zturbo_train.keys import read_lora_file
from zturbo_train.step import TrainStep
from zturbo_train.train import run

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def make_config(tmp_path: Path, example_data: Path, **train) -> Path:
    """The quick-start settings, pointed at a temp output folder, with overrides."""
    settings = {"steps": 8, "lr": 2e-3, "batch_size": 2, "seed": 3, "save_every": 4, "sample_every": 4,
                "log_every": 2, "gradient_checkpointing": False, "output_dir": str(tmp_path / "run"), "name": "t"}
    settings.update(train)
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.toml"
    path.write_text(
        f'[model]\npath = "builtin:tiny"\nadapter = "builtin:tiny-adapter"\ndtype = "fp32"\n'
        f'[data]\ndir = {json.dumps(str(example_data))}\nresolution = 64\ntrigger_word = "sks"\n'
        f"[lora]\nrank = 8\n[train]\n{body}\n"
        f'[sample]\nprompts = ["sks a red square with a yellow dot"]\nwidth = 64\nheight = 64\n', encoding="utf-8")
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
    # what LoRA managers read (lora_meta.build_metadata), on the final LoRA and on checkpoints
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
    from zturbo_train.adapter import TrainingAdapter
    from zturbo_train.data.prepare import prepare_dataset
    from zturbo_train.loader import load_parts
    from zturbo_train.lora import load_lora

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
                pred = flow.predict(transformer, flow.noisy_latents(batch.latents, noise, sigmas),
                                    flow.model_time(sigmas), batch.text)
                total += float(flow.flow_loss(pred, flow.flow_target(batch.latents, noise)))
                count += 1
    return total / count


def _sample_latents(lora: Path | None, prompts: list[str]) -> torch.Tensor:
    """8-step latents from plain tiny (no adapter, as users sample), with or without the LoRA."""
    from zturbo_train.loader import build_pipeline, load_parts
    from zturbo_train.lora import load_lora

    parts = load_parts("builtin:tiny", dtype="fp32")
    if lora is not None:
        load_lora(parts.transformer, read_lora_file(lora)[0])
    return build_pipeline(parts)(prompts, height=64, width=64, num_inference_steps=8, guidance_scale=0.0,
                                 output_type="latent",
                                 generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images


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
    from zturbo_train.tiny import tiny_model_dir

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    pipe.load_lora_weights(str(run_dir / "t.safetensors"))
    image = pipe(cfg.sample.prompts[0], height=64, width=64, num_inference_steps=8, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(cfg.sample.seed), output_type="np").images[0]
    preview = np.asarray(Image.open(run_dir / "samples" / "step-000060" / "00.png"), dtype=np.float32) / 255
    # The preview is an 8-bit PNG: one quantisation step (1/255) plus fp32 summation order.
    assert np.abs(image - preview).max() <= 1.5 / 255


def test_adapter_is_active_in_training_and_inverted_in_previews(tmp_path, example_data):
    """A large random adapter changes the training loss; previews at step 0 (LoRA still zero) equal the plain base."""
    from safetensors.torch import save_file

    from zturbo_train.tiny import build_tiny_adapter

    big = tmp_path / "big.safetensors"
    save_file(build_tiny_adapter(seed=5, scale=0.3), str(big))
    losses, previews = {}, {}
    for name, adapter in (("none", "none"), ("big", str(big))):
        cfg = load_config(make_config(tmp_path / name, example_data, steps=2, save_every=0, sample_every=0,
                                      log_every=1), [f'model.adapter="{adapter}"'])
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
    from zturbo_train.train import preview, setup

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
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "zimage-turbo-lora.toml"), "--dry-run",
                                 "--set", "model.path=builtin:tiny", "--set", "model.adapter=builtin:tiny-adapter",
                                 "--set", f"data.dir={json.dumps(str(example_data))}"])
    assert result.exit_code == 0, result.output
    assert "training plan" in result.output and "rank 32" in result.output


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
    from zturbo_train.step import lr_at

    cfg = load_config(make_config(tmp_path, example_data, steps=3, save_every=0, sample_every=0,
                                  optimizer="adamw8bit", log_every=1))
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
        cfg = load_config(make_config(tmp_path / name, example_data, steps=3, save_every=0, sample_every=0,
                                      log_every=1))
        paths.append(run(cfg, quiet=True).lora_path)
    a, b = read_lora_file(paths[0])[0], read_lora_file(paths[1])[0]
    assert all(torch.equal(a[k].up, b[k].up) for k in a)


def test_resume_with_adamw8bit_equals_uninterrupted_run(tmp_path, example_data, monkeypatch):
    """bitsandbytes nests its moments in a dict inside each parameter's optimizer state; they must be saved as tensors."""
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
    import zturbo_train.train as train_module

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


def test_bad_model_or_data_is_reported_before_the_output_folder_is_touched(tmp_path, example_data):
    cfg_path = make_config(tmp_path, example_data, steps=1)
    for override, message in (("model.path=\"builtin:nothing\"", "unknown builtin model"),
                              (f"data.dir={json.dumps(str(tmp_path / 'nope'))}", "does not exist")):
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
    from zturbo_train.checkpoint import open_run_folder

    open_run_folder(run_dir, resume=False, overwrite=True, name="t")
    assert not (run_dir / "t.safetensors").exists(), "an interrupted new run must not leave the old final LoRA"
    assert runner.invoke(app, ["train", str(cfg_path), "-q", "--overwrite"]).exit_code == 0


def test_noise_is_drawn_on_the_loader_thread_not_in_the_step(tmp_path, example_data, monkeypatch):
    """The hot path gets its noise and sigmas with the batch; the step itself draws nothing."""
    import threading

    from zturbo_train import step as step_module

    def no_draw(self, latents, seeds):
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
