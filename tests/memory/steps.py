"""Shared by the tests in tests/memory: a tiny training step under given levers, and its inputs."""

from __future__ import annotations

import torch

from zturbo_train.config import TrainConfig
from zturbo_train.lora.network import create_lora
from zturbo_train.memory.levers import apply_levers
from zturbo_train.memory.presets import Levers
from zturbo_train.models import load_parts
from zturbo_train.train.optimizers import build_optimizer
from zturbo_train.train.preservation import Preservation
from zturbo_train.train.step import StepSettings, TrainStep

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def make_step(
    levers: Levers, dtype: str = "fp32", device: torch.device = CPU, lora_scale: float = 0.05, dop: bool = False
):
    """builtin:tiny with the levers applied and a seeded LoRA (non-zero up, so every gradient flows); `dop`: with
    train.preservation's second loss (train/preservation.py)."""
    on_host = levers.loads_on_host and device.type == "cuda"
    transformer = load_parts(
        "builtin:tiny", parts=["transformer"], dtype=dtype, device="cpu" if on_host else str(device)
    ).transformer
    applied = apply_levers(transformer, levers, device)
    network = create_lora(transformer, 4, 4.0, ["layers"], TARGETS, seed=1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for layer in network.layers:
            layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * lora_scale)
    params = network.trainable_parameters()
    train = TrainConfig()
    optimizer = build_optimizer(params, train, device)
    settings = StepSettings.from_config(train, transformer.dtype, device)
    preservation = Preservation(network, 1.0) if dop else None
    generator = torch.Generator(device=device).manual_seed(0)
    step = TrainStep(transformer, params, optimizer, settings, generator, preservation=preservation)
    return step, network, applied


def batch(device: torch.device = CPU, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    caps = [torch.randn(7, 32, generator=generator), torch.randn(7, 32, generator=generator)]
    return latents.to(device, dtype), [c.to(device, dtype) for c in caps]


def run_steps(levers: Levers, steps: int = 3, dtype: str = "fp32", device: torch.device = CPU, dop: bool = False):
    """Losses of a few optimizer steps and the LoRA weights after them (`dop`: the training and DOP losses)."""
    step, network, applied = make_step(levers, dtype, device, dop=dop)
    latents, caps = batch(device, step.model_dtype)
    losses = []
    for _ in range(steps):
        if dop:
            losses.append(tuple(map(float, step.backward_preserving(latents, caps, caps[::-1]))))
        else:
            losses.append(float(step.backward(latents, caps)))
        step.update(1e-3)
    return losses, [p.detach().float().cpu().clone() for p in network.parameters()], applied


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))
