"""Block offload computes the same numbers as no offload (bit for bit on the CPU, where the streamer runs the
same swap/restore code with plain copies); stream overlap and the memory saved are the `cuda` tests."""

from __future__ import annotations

import pytest
import torch

from memory.steps import CUDA, TARGETS, batch, make_step, max_diff, run_steps
from zturbo_train.config import TrainConfig
from zturbo_train.lora.network import create_lora
from zturbo_train.memory.estimate import Workload, shape_from_config
from zturbo_train.memory.levers import apply_levers
from zturbo_train.memory.presets import Levers, estimate_for
from zturbo_train.testing.synthetic import ZIMAGE_CONFIG, build_synthetic
from zturbo_train.train.optimizers import build_optimizer
from zturbo_train.train.step import StepSettings, TrainStep


def test_offload_gives_the_same_loss_and_lora_as_no_offload():
    plain, weights, _ = run_steps(Levers("t", checkpointing="full"), steps=4)
    streamed, streamed_weights, applied = run_steps(Levers("t", checkpointing="full", offload="blocks"), steps=4)
    assert streamed == plain and max_diff(streamed_weights, weights) == 0.0
    stats = applied.streamer.stats
    assert stats.misses == 1  # only the very first block of the first step was not prefetched
    assert stats.backward_calls > 0 and stats.hits > 20
    block = applied.streamer.blocks[0].module
    assert all(type(p) is torch.nn.Parameter for p in block.parameters())  # the slots were restored


def test_offload_with_fp8_storage_equals_fp8_layerwise_casting():
    layerwise, weights, _ = run_steps(Levers("t", checkpointing="full", quantize="fp8"))
    streamed, streamed_weights, applied = run_steps(Levers("t", checkpointing="full", quantize="fp8", offload="blocks"))
    assert streamed == layerwise and max_diff(streamed_weights, weights) == 0.0
    homes = applied.streamer.blocks[-1].homes
    assert torch.float8_e4m3fn in {h.dtype for h in homes} and torch.float32 in {h.dtype for h in homes}


def test_offload_prefetch_follows_forward_backward_and_sampling():
    step, network, applied = make_step(Levers("t", checkpointing="full", offload="blocks"))
    streamer = applied.streamer
    n = len(streamer.blocks)
    assert streamer.upcoming(0, backward=False, grad=True) == [1, 2]
    assert streamer.upcoming(n - 1, backward=False, grad=True) == [n - 1, n - 2]  # its recompute comes next
    assert streamer.upcoming(n - 1, backward=False, grad=False) == [0, 1]  # sampling wraps around
    assert streamer.upcoming(n - 1, backward=True, grad=True) == [n - 2, n - 3]
    latents, caps = batch()
    for _ in range(2):
        step.backward(latents, caps)
        step.update(1e-3)
    floor = n - len(step.transformer.layers)  # refiners carry no LoRA: backward stops at layers[0]
    assert streamer._floor == floor and streamer.upcoming(floor, backward=True, grad=True) == [0, 1]
    misses = streamer.stats.misses
    from diffusers import FlowMatchEulerDiscreteScheduler

    from zturbo_train.sampling import generate_latents
    from zturbo_train.zimage import SCHEDULER

    with torch.no_grad():
        generate_latents(
            step.transformer,
            FlowMatchEulerDiscreteScheduler(**SCHEDULER),
            caps[:1],
            width=64,
            height=64,
            seeds=[0],
            steps=3,
        )
    assert streamer.stats.misses - misses <= 1


@pytest.mark.cuda
def test_cuda_offload_matches_and_holds_few_blocks():
    plain, weights, _ = run_steps(Levers("t", checkpointing="full"), dtype="bf16", device=CUDA)
    torch.cuda.reset_peak_memory_stats()
    streamed, streamed_weights, applied = run_steps(
        Levers("t", checkpointing="full", offload="blocks"), dtype="bf16", device=CUDA
    )
    assert streamed == pytest.approx(plain, rel=1e-3) and max_diff(streamed_weights, weights) < 1e-3
    assert applied.streamer.stats.misses == 1
    assert all(h.is_pinned() for entry in applied.streamer.blocks for h in entry.homes)


@pytest.mark.cuda
def test_cuda_full_size_offload_streams_within_the_estimate():
    """One 1024 px step of the real-shape model with blocks streamed: peak under the 8gb budget."""

    model = build_synthetic(ZIMAGE_CONFIG, CUDA, torch.bfloat16, home="cpu")
    levers = Levers("8gb", checkpointing="full", offload="blocks")
    applied = apply_levers(model, levers, CUDA)
    network = create_lora(model, 32, 32.0, ["layers"], TARGETS)
    params = network.trainable_parameters()
    step = TrainStep(
        model,
        params,
        build_optimizer(params, TrainConfig(), CUDA),
        StepSettings.from_config(TrainConfig(), torch.bfloat16, CUDA),
        torch.Generator(device=CUDA).manual_seed(0),
    )
    latents = torch.randn(1, 16, 128, 128, device=CUDA, dtype=torch.bfloat16)
    caps = [torch.randn(128, 2560, device=CUDA, dtype=torch.bfloat16)]
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        loss = step.backward(latents, caps)
        step.update(1e-4)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    est = estimate_for(levers, shape_from_config(ZIMAGE_CONFIG), Workload(1024)).total
    assert torch.isfinite(loss) and peak <= 7.0 and peak <= est * 1.25, (peak, est)
    assert applied.streamer.stats.misses <= 2
