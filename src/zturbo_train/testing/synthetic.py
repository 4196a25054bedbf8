"""A random Z-Image transformer of the real shapes, made directly where it will run.

`zturbo bench --model synthetic` times the real arithmetic without a 25 GB download. The
model is built on the meta device (no memory), given uninitialised storage on the target
device one top-level part at a time (`to_empty`), and filled there with a seeded random
init, so the fp32 CPU copy a normal construction makes never exists. Random weights are
not zeros on purpose: zeros run faster than real data and hide wrong indexing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .tiny import TINY_TRANSFORMER

# Tongyi-MAI/Z-Image-Turbo transformer/config.json: ~6.15 B parameters.
ZIMAGE_CONFIG: dict[str, Any] = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
SYNTHETIC_MODELS = {"synthetic": "ZIMAGE_CONFIG", "synthetic:tiny": "TINY_TRANSFORMER"}
# Hub models whose transformer config is known here, so `--dry-run` can plan before the download.
KNOWN_HUB_CONFIGS: dict[str, dict[str, Any]] = {"Tongyi-MAI/Z-Image-Turbo": ZIMAGE_CONFIG}


def synthetic_config(name: str) -> dict[str, Any]:
    """The config behind `synthetic` (real shapes) or `synthetic:tiny` (builtin:tiny's shapes)."""
    return {"synthetic": ZIMAGE_CONFIG, "synthetic:tiny": TINY_TRANSFORMER}[name]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_synthetic(
    config: dict[str, Any],
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    home: torch.device | str | None = None,
    seed: int = 0,
):
    """A seeded random ZImageTransformer2DModel in `dtype`, initialised on `device`, then
    moved part by part to `home` (default: `device`); eval mode, frozen."""
    from diffusers import ZImageTransformer2DModel

    device = torch.device(device)
    home = torch.device(home) if home is not None else device
    with default_dtype(dtype), torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
    torch.manual_seed(seed)
    model.to_empty(device=device, recurse=False)
    _init(model, recurse=False)
    for tensor in list(model.parameters(recurse=False)) + list(model.buffers(recurse=False)):
        tensor.data = tensor.data.to(home)
    for child in model.children():
        child.to_empty(device=device)
        _init(child)
        if home != device:
            child.to(home)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _init(module: nn.Module, recurse: bool = True) -> None:
    """Small normal noise everywhere, nn.Linear's own init for linears, ones for norm weights."""
    for p in module.parameters(recurse=recurse):
        p.normal_(0.0, 0.02)
    if not recurse:
        return
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.reset_parameters()
        elif "norm" in type(sub).__name__.lower() and getattr(sub, "weight", None) is not None:
            sub.weight.fill_(1.0)
