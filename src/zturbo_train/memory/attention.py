"""The attention kernel: set diffusers' backend, or on CUDA measure the exact candidates and keep the fastest.

`auto` on CUDA times SDPA cuDNN / flash / efficient / default, and flash-attn 2 and 3 when
installed, forward+backward at the run's sequence length, and keeps the fastest whose
output and gradient match fp32 attention; on the CPU it is PyTorch's SDPA ("native").
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .estimate import Workload

# config name -> diffusers AttentionBackendName value
ATTENTION_BACKENDS = {
    "native": "native",
    "sdpa-cudnn": "_native_cudnn",
    "sdpa-flash": "_native_flash",
    "sdpa-efficient": "_native_efficient",
    "sdpa-math": "_native_math",
    "flash-attn": "flash",
    "flash-attn-3": "_flash_3",
    "sage": "sage",
}
# exact backends auto may pick (sage quantizes Q/K, so it is never picked for you)
AUTO_CANDIDATES = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "native", "flash-attn", "flash-attn-3")
ATTENTION_TOLERANCE = 2e-2  # relative L2 error vs fp32 attention; bf16 backends land near 4e-3


def apply_attention(
    transformer: nn.Module, choice: str, device: torch.device, dtype: torch.dtype, work: Workload | None = None
) -> str:
    """Set the attention backend (auto: measured on CUDA, SDPA elsewhere); returns the name used."""
    if choice not in ATTENTION_BACKENDS and choice != "auto":
        raise ConfigError(f"`train.attention_backend` = {choice!r} is not one of auto, {', '.join(ATTENTION_BACKENDS)}")
    if choice == "auto":
        choice = pick_attention(transformer, device, dtype, work) if device.type == "cuda" else "native"
    if choice != "native" or device.type == "cuda":
        try:
            transformer.set_attention_backend(ATTENTION_BACKENDS[choice])
        except Exception as exc:  # noqa: BLE001 - diffusers raises several kinds for a missing package
            raise ConfigError(
                f"attention backend {choice!r} is not usable here ({exc}); set "
                f'train.attention_backend = "auto" or "native"'
            ) from None
    return choice


def pick_attention(
    transformer: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    work: Workload | None = None,
    candidates: tuple[str, ...] = AUTO_CANDIDATES,
) -> str:
    """The fastest exact backend for this model's attention at the workload's sequence length."""
    heads = int(transformer.config.n_heads)
    head_dim = int(transformer.config.dim) // heads
    work = work or Workload(resolution=1024)
    results = probe_attention(
        candidates,
        batch=work.batch,
        seq=work.tokens()["layers"],
        heads=heads,
        head_dim=head_dim,
        device=device,
        dtype=dtype,
    )
    return fastest_exact(results)


def fastest_exact(results: dict[str, tuple[float, float] | None], tolerance: float = ATTENTION_TOLERANCE) -> str:
    """The quickest backend whose error is within tolerance; native when none qualifies."""
    exact = {
        name: seconds for name, r in results.items() if r is not None for seconds, error in [r] if error <= tolerance
    }
    return min(exact, key=exact.get) if exact else "native"


Probe = dict[str, "tuple[float, float] | None"]


def probe_attention(
    candidates: tuple[str, ...],
    *,
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 5,
) -> Probe:
    """name -> (median seconds of forward+backward, relative error vs fp32) or None when it fails.

    With a batch over 1 a padding mask is included, as Z-Image builds one when caption
    lengths differ, so backends that cannot take a mask drop out."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (
        torch.randn(batch, seq, heads, head_dim, generator=generator, device=device, dtype=dtype) for _ in range(4)
    )
    mask = None
    if batch > 1:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask[-1, seq - 32 :] = False
    reference = _attention_reference(q, k, v, grad, mask)
    return {name: _measure(name, q, k, v, grad, mask, reference, repeats) for name in candidates}


def _attention_reference(q, k, v, grad, mask):
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
