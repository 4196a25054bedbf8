"""The levers on builtin:tiny (CPU): checkpointing, compile, a run under each preset, the synthetic model.

Checkpointing none/selective/full and the compiled step compute the same numbers as the plain
step. Offload, quantization, attention, presets and the estimate have their own files beside
this one; what needs a GPU (no host sync in the step, compiled CUDA step) is the `cuda` tests
at the end.
"""

from __future__ import annotations

import re

import pytest
import torch

from memory.steps import CPU, CUDA, TARGETS, batch, make_step, max_diff, run_steps
from zturbo_train.config import validate_config
from zturbo_train.errors import ConfigError
from zturbo_train.lora.network import create_lora
from zturbo_train.memory.levers import apply_checkpointing
from zturbo_train.memory.presets import Levers
from zturbo_train.testing.synthetic import ZIMAGE_CONFIG, build_synthetic
from zturbo_train.train.step import draw_noise

# ------------------------------------------------------------------------------ config


def test_checkpointing_accepts_booleans_and_names():
    base = {"data": {"dir": "x"}}
    assert validate_config({**base, "train": {"gradient_checkpointing": True}}).train.gradient_checkpointing == "full"
    assert validate_config({**base, "train": {"gradient_checkpointing": False}}).train.gradient_checkpointing == "none"
    cfg = validate_config({**base, "train": {"gradient_checkpointing": "selective", "checkpoint_fraction": 0.25}})
    assert cfg.train.checkpoint_fraction == 0.25 and cfg.train.memory == "auto" and cfg.model.quantize == "auto"
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        validate_config({**base, "train": {"gradient_checkpointing": "some"}})
    with pytest.raises(ConfigError, match="model.quantize"):
        validate_config({**base, "model": {"quantize": "fp4"}})


# ------------------------------------------------------------------------------ levers on the tiny model


def test_checkpointing_modes_compute_the_same_step():
    full, weights_full, _ = run_steps(Levers("t", checkpointing="full"))
    for levers in (Levers("t", checkpointing="none"), Levers("t", checkpointing="selective", checkpoint_fraction=0.5)):
        losses, weights, _ = run_steps(levers)
        assert losses == full and max_diff(weights, weights_full) == 0.0


def test_dop_computes_the_same_step_under_every_lever():
    """DOP's LoRA-off forward (no gradient) and its second forward and backward under checkpointing (none,
    selective, full) and streamed blocks give bit-identical losses and LoRA, the streamer missing no block but the
    first; fp8 storage streamed equals fp8 layerwise. DOP's loss is non-zero (the LoRA moves the class captions'
    prediction)."""
    full, weights_full, _ = run_steps(Levers("t", checkpointing="full"), dop=True)
    assert all(dop > 0 for _, dop in full)
    for levers in (
        Levers("t", checkpointing="none"),
        Levers("t", checkpointing="selective", checkpoint_fraction=0.5),
        Levers("t", checkpointing="full", offload="blocks"),
    ):
        losses, weights, applied = run_steps(levers, dop=True)
        assert losses == full and max_diff(weights, weights_full) == 0.0, levers
    assert applied.streamer.stats.misses == 1  # the streamer prefetches through DOP's extra forwards too
    fp8, fp8_weights, _ = run_steps(Levers("t", checkpointing="full", quantize="fp8"), dop=True)
    streamed, streamed_weights, _ = run_steps(
        Levers("t", checkpointing="full", quantize="fp8", offload="blocks"), dop=True
    )
    assert streamed == fp8 and max_diff(streamed_weights, fp8_weights) == 0.0


def test_selective_checkpointing_recomputes_only_the_chosen_blocks(tiny_transformer):
    calls = [0] * len(tiny_transformer.layers)
    for index, block in enumerate(tiny_transformer.layers):
        block.register_forward_pre_hook(lambda *args, i=index: calls.__setitem__(i, calls[i] + 1))
    chosen = apply_checkpointing(tiny_transformer, "selective", 0.5)
    network = create_lora(tiny_transformer, 4, 4.0, ["layers"], TARGETS, seed=1)
    latents, caps = batch()
    from zturbo_train.flow import predict

    predict(tiny_transformer, latents, torch.rand(2), caps).square().mean().backward()
    assert chosen == {0} and calls == [2, 1]  # block 0 ran again in backward, block 1 did not
    assert all(p.grad is not None for p in network.parameters())


@pytest.mark.parametrize(
    "settings",
    [["train.memory=8gb"], ["train.memory=12gb"], ["train.memory=16gb", "train.compile=false", "model.quantize=nf4"]],
    ids=["8gb-offload", "12gb-fp8", "nf4"],
)
def test_train_end_to_end_under_a_preset(tmp_path, example_data, settings):
    """`zturbo train` with the adapter merged, previews (adapter inverted) and saving, over a
    streamed, fp8 or nf4 base; the run must say which levers it used."""
    import json

    from typer.testing import CliRunner

    from zturbo_train.cli import app

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'[model]\npath = "builtin:tiny"\nadapter = "builtin:tiny-adapter"\ndtype = "bf16"\n'
        f"[data]\ndir = {json.dumps(str(example_data))}\nresolution = 64\n[lora]\nrank = 4\n"
        f"[train]\nsteps = 3\nbatch_size = 2\nlr = 1e-3\nsample_every = 0\nsave_every = 0\n"
        f'output_dir = {json.dumps(str(tmp_path / "run"))}\nname = "t"\n'
        f'[sample]\nprompts = ["a red square"]\nwidth = 64\nheight = 64\n',
        encoding="utf-8",
    )
    args = ["train", str(cfg)] + [a for item in settings for a in ("--set", item)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    memory = settings[0].split("=")[1]
    assert f"memory {memory}:" in result.output
    assert (tmp_path / "run" / "t.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step-000003-grid.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)


# ------------------------------------------------------------------------------ compile


@pytest.mark.slow
def test_compiled_step_equals_eager():
    """Regional compilation (inductor on the CPU, ~100 s on 2 cores): same losses and LoRA within fp32 rounding."""
    eager, weights, _ = run_steps(Levers("t", checkpointing="full"), steps=2)
    compiled, compiled_weights, _ = run_steps(Levers("t", checkpointing="full", compile=True), steps=2)
    torch._dynamo.reset()
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert max_diff(compiled_weights, weights) < 1e-5


def test_compiled_graphs_do_not_grow_with_the_number_of_blocks():
    """One block graph serves every block with a LoRA hook (dynamo traces through the aot_eager backend,
    which skips code generation): 4 graphs for 10 blocks, the same as for 3, none past the limit."""
    import torch._dynamo.utils as dynamo_utils

    from zturbo_train.flow import predict
    from zturbo_train.memory.levers import apply_compile
    from zturbo_train.testing.tiny import TINY_TRANSFORMER

    counts = []
    for layers in (3, 10):
        torch._dynamo.reset()
        dynamo_utils.counters.clear()
        model = build_synthetic({**TINY_TRANSFORMER, "n_layers": layers}, CPU, torch.float32)
        create_lora(model, 4, 4.0, ["layers"], TARGETS)
        apply_checkpointing(model, "full")
        apply_compile(model, backend="aot_eager")
        latents, caps = batch()
        predict(model, latents[:1], torch.rand(1), caps[:1]).square().mean().backward()
        counts.append(dynamo_utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert counts[0] == counts[1] <= 6, counts


# ------------------------------------------------------------------------------ synthetic model


def test_synthetic_model_has_the_real_class_shapes_and_a_seeded_init(tiny_transformer):
    from zturbo_train.testing.tiny import TINY_TRANSFORMER

    model = build_synthetic(TINY_TRANSFORMER, CPU, torch.float32, seed=3)
    again = build_synthetic(TINY_TRANSFORMER, CPU, torch.float32, seed=3)
    real = dict(tiny_transformer.named_parameters())
    mine = dict(model.named_parameters())
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in real.items()}
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in mine.values())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert torch.equal(model.layers[0].attention_norm1.weight, torch.ones_like(model.layers[0].attention_norm1.weight))
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------ GPU only


@pytest.mark.cuda
def test_cuda_step_has_no_host_sync_and_no_new_device_allocations():
    step, _, _ = make_step(Levers("t", checkpointing="full"), dtype="bf16", device=CUDA)
    latents, caps = batch(CUDA, torch.bfloat16)
    noise, sigmas = (
        t.pin_memory().to(CUDA, non_blocking=True)  # as the loader hands them over
        for t in draw_noise([1, 2], tuple(latents.shape[1:]), step.settings)
    )
    for _ in range(3):
        step.backward(latents, caps)
        step.backward(latents, caps, weights=[1.0, 0.5], noise=noise, sigmas=sigmas)
        step.update(1e-3)
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step.backward(latents, caps)
            step.backward(latents, caps, weights=[1.0, 0.5], noise=noise, sigmas=sigmas)  # the data-parallel path
            step.update(1e-3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments


@pytest.mark.cuda
def test_cuda_dop_step_has_no_host_sync_and_no_new_device_allocations():
    """DOP's step (the LoRA switched off by a Python flag, a second forward and backward) syncs with the host
    as little as the plain one: never, and allocates no new segments once warm. (Written without a GPU at hand:
    not yet run.)"""
    step, _, _ = make_step(Levers("t", checkpointing="full"), dtype="bf16", device=CUDA, dop=True)
    latents, caps = batch(CUDA, torch.bfloat16)
    noise, sigmas = (
        t.pin_memory().to(CUDA, non_blocking=True) for t in draw_noise([1, 2], tuple(latents.shape[1:]), step.settings)
    )

    def steps():
        for _ in range(3):
            step.backward_preserving(latents, caps, caps[::-1], noise=noise, sigmas=sigmas, preserve=[1.0, 0.0])
            step.update(1e-3)

    steps()
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments


@pytest.mark.cuda
def test_cuda_compiled_step_equals_eager():
    eager, weights, _ = run_steps(Levers("t", checkpointing="full"), steps=2, dtype="bf16", device=CUDA)
    compiled, compiled_weights, _ = run_steps(
        Levers("t", checkpointing="full", compile=True), steps=2, dtype="bf16", device=CUDA
    )
    torch._dynamo.reset()
    assert compiled == pytest.approx(eager, rel=2e-2) and max_diff(compiled_weights, weights) < 2e-2


@pytest.mark.cuda
def test_cuda_synthetic_model_is_built_in_place_in_bf16():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_synthetic(ZIMAGE_CONFIG, CUDA, torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() / 2**30
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(6.15e9, rel=0.01) and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert peak < 12.5, peak  # 11.5 GiB of bf16 weights; an fp32 copy would have shown 23 GiB
    assert re.match(r"cuda", str(next(model.parameters()).device))
