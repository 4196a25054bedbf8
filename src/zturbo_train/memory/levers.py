"""The speed and memory levers: resolve them from the config, apply them to the transformer.

    levers = levers_for(cfg, device)              # memory preset + the keys the user set
    apply_levers(transformer, levers, device, adapter)   # after the adapter merge, before the LoRA

What each lever does and why it is built the way it is:
- checkpointing (`train.gradient_checkpointing`): full and none are diffusers' own switch.
  selective recomputes only a share of the 30 main blocks (spread evenly; the refiners are
  always checkpointed, which costs nothing when no LoRA sits in them): each block not
  recomputed saves a third of its backward time and costs ~1.1 GiB at 1024 px.
- compile (`train.compile`): regional compilation of the repeated blocks
  (`compile_repeated_blocks`): one compiled graph serves all 30 blocks, so compile time is
  one block's, and the LoRA hooks are traced into it (fused with the linears around them).
  Shapes are automatic-dynamic: the second bucket shape recompiles once as dynamic.
- attention backend (`train.attention_backend`): attention.py.
- quantize / offload: quantize.py and offload.py.
The presets that choose these are presets.py; the step itself (train/step.py) is the same
code under every lever.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, ModelConfig, TrainConfig
from ..errors import ConfigError
from ..models import resolve_model_dir
from ..testing.synthetic import SYNTHETIC_MODELS, synthetic_config
from .attention import apply_attention
from .estimate import ModelShape, Workload, checkpointed_layers, network_of, shape_from_config
from .offload import stream_blocks
from .presets import Levers, choose
from .quantize import apply_quantization

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ------------------------------------------------------------------------------ resolving


def explicit_levers(model: ModelConfig, train: TrainConfig) -> dict[str, Any]:
    """The lever keys the user set (anything but auto): they win over the memory preset."""
    out: dict[str, Any] = {"compile_mode": train.compile_mode, "attention_backend": train.attention_backend}
    if train.gradient_checkpointing != "auto":
        out["checkpointing"] = train.gradient_checkpointing
    if train.checkpoint_fraction is not None:
        out["checkpoint_fraction"] = train.checkpoint_fraction
    if train.compile != "auto":
        out["compile"] = bool(train.compile)
    if model.quantize != "auto":
        out["quantize"] = model.quantize
    if model.offload != "auto":
        out["offload"] = model.offload
    return out


def workload_of(cfg: Config) -> Workload:
    """The largest step the config trains: its biggest resolution, batch, LoRA and optimizer."""
    return Workload(
        resolution=max(r for d in cfg.data for r in d.resolution),
        batch=cfg.train.batch_size,
        rank=cfg.lora.rank,
        targets=tuple(cfg.lora.targets),
        lora_blocks=tuple(cfg.lora.blocks),
        optimizer=cfg.train.optimizer,
        **network_of(cfg.lora),
        ema=cfg.train.ema and cfg.train.ema_device == "gpu",  # an EMA on the host takes no GPU memory
        preservation=cfg.train.preservation == "dop",
        dtype_bytes=DTYPE_BYTES[cfg.model.dtype],
    )


def model_shape(model_ref: str) -> ModelShape:
    """Parameter counts of the model at `model_ref` from its transformer config (meta device)."""
    import json

    if model_ref in SYNTHETIC_MODELS:
        return shape_from_config(synthetic_config(model_ref))
    path = resolve_model_dir(model_ref) / "transformer" / "config.json"
    return shape_from_config(json.loads(path.read_text(encoding="utf-8")))


def free_gib(device: torch.device) -> float | None:
    """Free memory of a CUDA device in GiB (None elsewhere)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


def resolve_levers(
    model: ModelConfig,
    train: TrainConfig,
    work: Workload,
    device: torch.device,
    shape: Callable[[], ModelShape] | None = None,
) -> Levers:
    """Levers for a run on `device`: the memory preset (auto reads free memory) plus explicit keys."""
    if shape is None:
        shape = functools.cache(lambda: model_shape(model.path))
    return choose(
        train.memory,
        explicit_levers(model, train),
        cuda=device.type == "cuda",
        free_gib=free_gib(device),
        shape=shape,
        work=work,
    )


def levers_for(cfg: Config, device: torch.device, shape: ModelShape | None = None) -> Levers:
    """resolve_levers for a whole training config (`shape`: known shapes when the model is not on disk)."""
    return resolve_levers(
        cfg.model, cfg.train, workload_of(cfg), device, shape=None if shape is None else (lambda: shape)
    )


# ------------------------------------------------------------------------------ applying


@dataclass
class Applied:
    """What apply_levers did, for logs, the bench and tests."""

    levers: Levers
    attention: str = "native"
    quantized: int = 0
    streamer: Any = None


def apply_levers(
    transformer: nn.Module,
    levers: Levers,
    device: torch.device | str,
    adapter: Any = None,
    work: Workload | None = None,
) -> Applied:
    """Apply every lever to a loaded transformer (on the host when levers.loads_on_host).

    Call after the training adapter is applied (it merges into plain weights) and before
    the LoRA is created. Puts the transformer on `device` (all of it, or all but the
    streamed blocks)."""
    device = torch.device(device)
    dtype = next(transformer.parameters()).dtype
    applied = Applied(levers)
    if levers.offload == "blocks":
        applied.streamer = stream_blocks(transformer, device, dtype, fp8=levers.quantize == "fp8")
    else:
        applied.quantized = apply_quantization(transformer, levers.quantize, device, dtype)
        transformer.to(device)
    if adapter is not None:
        adapter.to(device)  # a live adapter attached while the base was on the host
        if levers.quantize != "none":
            adapter.bake()
    apply_checkpointing(transformer, levers.checkpointing, levers.checkpoint_fraction)
    applied.attention = apply_attention(transformer, levers.attention_backend, device, dtype, work)
    if levers.compile:
        apply_compile(transformer, levers.compile_mode)
    applied.levers = replace(levers, attention_backend=applied.attention)
    return applied


def apply_checkpointing(transformer: nn.Module, mode: str, fraction: float = 1.0) -> set[int]:
    """full / none / selective; returns the indices of the `layers` blocks that are recomputed."""
    n = len(transformer.layers)
    chosen = checkpointed_layers(n, mode, fraction)
    if mode == "none":
        transformer.disable_gradient_checkpointing()
    elif mode == "full":
        transformer.enable_gradient_checkpointing()
    elif mode == "selective":
        transformer.enable_gradient_checkpointing(
            selective_checkpoint({id(transformer.layers[i]) for i in chosen}, {id(b) for b in transformer.layers})
        )
    else:
        raise ConfigError(f"`train.gradient_checkpointing` = {mode!r} is not one of full, none, selective")
    return chosen


def selective_checkpoint(recompute: set[int], layers: set[int]) -> Callable:
    """diffusers' checkpointing function, but plain calls for the main blocks not in `recompute`."""
    from torch.utils.checkpoint import checkpoint

    def run(module: nn.Module, *args: Any) -> Any:
        if id(module) in layers and id(module) not in recompute:
            return module(*args)
        return checkpoint(module.__call__, *args, use_reentrant=False)

    return run


RECOMPILE_LIMIT = 64


def apply_compile(transformer: nn.Module, mode: str = "default", backend: str | None = None) -> None:
    """Regional compilation: each repeated block through torch.compile (graphs shared by all blocks).

    One block forward serves noise refiner, context refiner and main blocks, with and without
    gradients, with the LoRA hooks and with the adapter's inversion hooks for previews, per
    shape: more than dynamo's default 8 graphs per function, after which it silently runs
    eager. The limit is raised so every variant stays compiled (each compiles once)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    kwargs = {} if mode == "default" else {"mode": mode}
    if backend is not None:  # tests trace with aot_eager: dynamo and autograd, no code generation
        kwargs["backend"] = backend
    transformer.compile_repeated_blocks(fullgraph=False, **kwargs)
