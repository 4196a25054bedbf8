"""The speed and memory levers: resolve them from the config, apply them to the transformer.

    levers = resolve_levers(cfg, device)          # memory preset + the keys the user set
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
- attention backend (`train.attention_backend`): diffusers' dispatcher. auto on CUDA times
  the exact candidates (SDPA cuDNN / flash / efficient / default, flash-attn 2 and 3 when
  installed) forward+backward at the run's sequence length and keeps the fastest whose
  output and gradient match fp32 attention; on the CPU it is PyTorch's SDPA.
- quantize / offload: quantize.py and offload.py.
The step itself (step.py) is the same code under every lever.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config, ModelConfig, TrainConfig
from ..errors import ConfigError
from .estimate import ModelShape, Workload, checkpointed_layers, shape_from_config
from .presets import Levers, choose

# config name -> diffusers AttentionBackendName value
ATTENTION_BACKENDS = {
    "native": "native", "sdpa-cudnn": "_native_cudnn", "sdpa-flash": "_native_flash",
    "sdpa-efficient": "_native_efficient", "sdpa-math": "_native_math", "flash-attn": "flash",
    "flash-attn-3": "_flash_3", "sage": "sage",
}
# exact backends auto may pick (sage quantizes Q/K, so it is never picked for you)
AUTO_CANDIDATES = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "native", "flash-attn", "flash-attn-3")
ATTENTION_TOLERANCE = 2e-2  # relative L2 error vs fp32 attention; bf16 backends land near 4e-3
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
    return Workload(resolution=max(r for d in cfg.data for r in d.resolution), batch=cfg.train.batch_size,
                    rank=cfg.lora.rank, targets=tuple(cfg.lora.targets), lora_blocks=tuple(cfg.lora.blocks),
                    optimizer=cfg.train.optimizer, dtype_bytes=DTYPE_BYTES[cfg.model.dtype])


def model_shape(model_ref: str) -> ModelShape:
    """Parameter counts of the model at `model_ref` from its transformer config (meta device)."""
    import json

    from ..models import resolve_model_dir
    from ..testing.synthetic import SYNTHETIC_MODELS, synthetic_config

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


def resolve_levers(model: ModelConfig, train: TrainConfig, work: Workload, device: torch.device,
                   shape: Callable[[], ModelShape] | None = None) -> Levers:
    """Levers for a run on `device`: the memory preset (auto reads free memory) plus explicit keys."""
    if shape is None:
        shape = functools.cache(lambda: model_shape(model.path))
    return choose(train.memory, explicit_levers(model, train), cuda=device.type == "cuda",
                  free_gib=free_gib(device), shape=shape, work=work)


def levers_for(cfg: Config, device: torch.device, shape: ModelShape | None = None) -> Levers:
    """resolve_levers for a whole training config (`shape`: known shapes when the model is not on disk)."""
    return resolve_levers(cfg.model, cfg.train, workload_of(cfg), device,
                          shape=None if shape is None else (lambda: shape))


# ------------------------------------------------------------------------------ applying


@dataclass
class Applied:
    """What apply_levers did, for logs, the bench and tests."""

    levers: Levers
    attention: str = "native"
    quantized: int = 0
    streamer: Any = None


def apply_levers(transformer: nn.Module, levers: Levers, device: torch.device | str, adapter: Any = None,
                 work: Workload | None = None) -> Applied:
    """Apply every lever to a loaded transformer (on the host when levers.loads_on_host).

    Call after the training adapter is applied (it merges into plain weights) and before
    the LoRA is created. Puts the transformer on `device` (all of it, or all but the
    streamed blocks)."""
    from .offload import stream_blocks
    from .quantize import apply_quantization

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
        transformer.enable_gradient_checkpointing(selective_checkpoint({id(transformer.layers[i]) for i in chosen},
                                                                       {id(b) for b in transformer.layers}))
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


def apply_attention(transformer: nn.Module, choice: str, device: torch.device, dtype: torch.dtype,
                    work: Workload | None = None) -> str:
    """Set the attention backend (auto: measured on CUDA, SDPA elsewhere); returns the name used."""
    if choice not in ATTENTION_BACKENDS and choice != "auto":
        raise ConfigError(f"`train.attention_backend` = {choice!r} is not one of auto, {', '.join(ATTENTION_BACKENDS)}")
    if choice == "auto":
        choice = pick_attention(transformer, device, dtype, work) if device.type == "cuda" else "native"
    if choice != "native" or device.type == "cuda":
        try:
            transformer.set_attention_backend(ATTENTION_BACKENDS[choice])
        except Exception as exc:  # noqa: BLE001 - diffusers raises several kinds for a missing package
            raise ConfigError(f"attention backend {choice!r} is not usable here ({exc}); set "
                              f"train.attention_backend = \"auto\" or \"native\"") from None
    return choice


# ------------------------------------------------------------------------------ attention probe


def pick_attention(transformer: nn.Module, device: torch.device, dtype: torch.dtype,
                   work: Workload | None = None, candidates: tuple[str, ...] = AUTO_CANDIDATES) -> str:
    """The fastest exact backend for this model's attention at the workload's sequence length."""
    heads = int(transformer.config.n_heads)
    head_dim = int(transformer.config.dim) // heads
    work = work or Workload(resolution=1024)
    results = probe_attention(candidates, batch=work.batch, seq=work.tokens()["layers"], heads=heads,
                              head_dim=head_dim, device=device, dtype=dtype)
    return fastest_exact(results)


def fastest_exact(results: dict[str, tuple[float, float] | None], tolerance: float = ATTENTION_TOLERANCE) -> str:
    """The quickest backend whose error is within tolerance; native when none qualifies."""
    exact = {name: seconds for name, r in results.items() if r is not None
             for seconds, error in [r] if error <= tolerance}
    return min(exact, key=exact.get) if exact else "native"


Probe = dict[str, "tuple[float, float] | None"]


def probe_attention(candidates: tuple[str, ...], *, batch: int, seq: int, heads: int, head_dim: int,
                    device: torch.device, dtype: torch.dtype, repeats: int = 5) -> Probe:
    """name -> (median seconds of forward+backward, relative error vs fp32) or None when it fails.

    With a batch over 1 a padding mask is included, as Z-Image builds one when caption
    lengths differ, so backends that cannot take a mask drop out."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(batch, seq, heads, head_dim, generator=generator, device=device, dtype=dtype)
                     for _ in range(4))
    mask = None
    if batch > 1:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask[-1, seq - 32:] = False
    reference = _attention_reference(q, k, v, grad, mask)
    return {name: _measure(name, q, k, v, grad, mask, reference, repeats) for name in candidates}


def _attention_reference(q, k, v, grad, mask):
    import torch.nn.functional as F

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    q32, k32, v32 = (t.transpose(1, 2) for t in leaves)
    attn_mask = mask[:, None, None, :] if mask is not None else None
    out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=attn_mask).transpose(1, 2)
    out.backward(grad.float())
    return out.detach(), leaves[0].grad


def _measure(name, q, k, v, grad, mask, reference, repeats) -> tuple[float, float] | None:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = ATTENTION_BACKENDS[name]
    attn_mask = mask[:, None, None, :] if mask is not None else None

    def once():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = dispatch_attention_fn(*leaves, attn_mask=attn_mask, backend=backend)
        out.backward(grad)
        return out, leaves[0].grad

    try:
        out, dq = once()
        error = max(_relative(out, reference[0]), _relative(dq, reference[1]))
        seconds = [_timed(once, q.device) for _ in range(repeats)]
    except Exception:  # noqa: BLE001 - a backend that fails here is simply not a candidate
        return None
    return statistics.median(seconds), error


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    value = value.detach().float()
    if not torch.isfinite(value).all():
        return float("inf")
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


# ------------------------------------------------------------------------------ the dry-run line


def memory_line(cfg: Config, device: torch.device | None = None, shape: ModelShape | None = None) -> str:
    """What `zturbo train --dry-run` says about memory: the preset, its levers, the estimated peak
    (`shape`: the model's known shapes when its weights are not downloaded)."""
    from .presets import BUDGET_GIB, estimate_for

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    levers = levers_for(cfg, device, shape)
    est = estimate_for(levers, shape or model_shape(cfg.model.path), workload_of(cfg))
    text = (f"{levers.memory}: {levers.describe()}; estimated peak {est.total:.1f} GiB (weights {est.weights:.1f}, "
            f"LoRA and optimizer {est.lora:.1f}, activations {est.activations:.1f})")
    if est.host:
        text += f", plus {est.host:.1f} GiB of pinned host memory"
    budget = BUDGET_GIB.get(levers.memory)
    if budget is not None and est.total > budget:
        text += (f"; over the {levers.memory} preset's {budget:g} GiB at this resolution/batch/rank, so pick a "
                 f"smaller preset or lower them")
    return text + (f" [{levers.note}]" if levers.note else "")
