"""Compact base weights: fp8 storage (diffusers layerwise casting) and bitsandbytes nf4 / int8.

Only the big linears of the transformer blocks change (attention q/k/v/out, feed-forward
w1/w2/w3: 98 % of the parameters). Modulation (adaLN), norms, embedders, pad tokens and
the final layer stay in the model dtype: they are 2 % of the weights and the most
sensitive to rounding.

- fp8: weights are stored as float8_e4m3fn and cast to the compute dtype one layer at a
  time around its forward (diffusers' `apply_layerwise_casting` on exactly these
  linears). Halves weight memory; a full-checkpointing run keeps one upcast layer.
- nf4 / int8: each linear is replaced by a bitsandbytes Linear4bit (NF4, double-quantised
  absmax, compute in the model dtype) or Linear8bitLt (LLM.int8, threshold 6). The
  module keeps its name, and the forward hooks already on it (a live training adapter)
  move to the replacement, so LoRA hooks and adapter switches work unchanged.

Quantize after the training adapter is merged (the merge needs plain float weights); a
merged adapter then cannot be folded out again, so the caller bakes it (adapter.bake()).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..zimage import BLOCK_STACKS, QUANT_LEAVES

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
INT8_THRESHOLD = 6.0


def block_linears(transformer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path, module) of every QUANT_LEAVES linear in every block stack."""
    for stack in BLOCK_STACKS:
        for index, block in enumerate(getattr(transformer, stack, None) or []):
            for leaf in QUANT_LEAVES:
                try:
                    yield f"{stack}.{index}.{leaf}", block.get_submodule(leaf)
                except AttributeError:
                    continue


def store_fp8(transformer: nn.Module, compute_dtype: torch.dtype) -> int:
    """fp8 storage with per-layer upcast to `compute_dtype`; returns how many linears changed."""
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting

    count = 0
    for _, linear in block_linears(transformer):
        apply_layerwise_casting(
            linear,
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=compute_dtype,
            skip_modules_pattern=None,
            skip_modules_classes=None,
        )
        count += 1
    return count


def quantize_bnb(transformer: nn.Module, kind: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Replace the block linears by bitsandbytes nf4/int8 layers on `device`; returns how many."""
    bnb = _import_bnb(kind)
    count = 0
    for name, linear in list(block_linears(transformer)):
        quantized = _quantized(bnb, linear, kind, torch.device(device), compute_dtype)
        move_hooks(linear, quantized)
        transformer.set_submodule(name, quantized)
        count += 1
    return count


def _quantized(bnb, linear: nn.Module, kind: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to(
            device
        )
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        raise ConfigError(f"`model.quantize` = {kind!r} is not a bitsandbytes type; use nf4 or int8")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(device, compute_dtype), requires_grad=False)
    # Left in training mode (the default) on purpose: in eval mode on CPUs with AVX512-bf16,
    # Linear4bit repacks its weight for inference in place and needs out_features % 32 == 0.
    return layer


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the forward hooks of `old` (the same dicts, so existing handles still remove them)."""
    for attr in HOOK_DICTS:
        if hasattr(old, attr):
            object.__setattr__(new, attr, getattr(old, attr))


def _import_bnb(kind: str):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"`model.quantize` = {kind!r} needs bitsandbytes; install it with "
            f'`pip install bitsandbytes`, or set model.quantize = "fp8"'
        ) from None
    return bnb


def apply_quantization(transformer: nn.Module, kind: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """fp8 / nf4 / int8 as `model.quantize` says; returns how many linears changed (0 for none)."""
    if kind == "none":
        return 0
    if kind == "fp8":
        return store_fp8(transformer, compute_dtype)
    return quantize_bnb(transformer, kind, device, compute_dtype)
