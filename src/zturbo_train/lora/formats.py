"""LoRA key converter: the three key styles of the ecosystem in and out of one internal form.

Internal form: `{module_path: LoraWeights}` where module_path names a linear of
ZImageTransformer2DModel exactly as diffusers does (`layers.0.attention.to_out.0`).

Styles written and read:
- comfyui (our default, also ai-toolkit): `diffusion_model.<m>.lora_A.weight`, `.lora_B.weight`, `.alpha`
- diffusers: `transformer.<m>.lora_A.weight` / `.lora_B.weight`, alpha and rank in the
  `lora_adapter_metadata` header that diffusers' `load_lora_weights` reads
- kohya (musubi-tuner, sd-scripts): `lora_unet_<m with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import LoraError
from ..fileio import save_safetensors
from ..zimage import BLOCK_STACKS, TARGET_PATHS

STYLES = ("comfyui", "diffusers", "kohya")
FORMAT_VERSION = "1"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.")
_DOWN = (".lora_A.weight", ".lora_down.weight", ".lora_A.default.weight")
_UP = (".lora_B.weight", ".lora_up.weight", ".lora_B.default.weight")
_ALPHA = (".alpha",)
# kohya names flatten dots to underscores; these are Z-Image's module names with underscores of their own.
_KOHYA_BLOCK = re.compile(rf"^({'|'.join(BLOCK_STACKS)})_(\d+)_(.+)$")
_KOHYA_LEAVES = {path.replace(".", "_"): path for path in TARGET_PATHS.values()}


@dataclass
class LoraWeights:
    """One module's LoRA: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # (rank, in_features), a.k.a. lora_A / lora_down
    up: torch.Tensor  # (out_features, rank), a.k.a. lora_B / lora_up
    alpha: float | None = None  # None: alpha = rank (scale 1), the adapter's convention

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight update, computed in fp32."""
        return (self.up.float() @ self.down.float()).mul_(self.scale).to(dtype)


LoraDict = dict[str, LoraWeights]


# ------------------------------------------------------------------------------ reading


def kohya_to_module(name: str) -> str:
    """`layers_0_attention_to_out_0` -> `layers.0.attention.to_out.0` (unknown names kept as they are)."""
    match = _KOHYA_BLOCK.match(name)
    if match and match.group(3) in _KOHYA_LEAVES:
        return f"{match.group(1)}.{match.group(2)}.{_KOHYA_LEAVES[match.group(3)]}"
    return name


def _split_key(key: str) -> tuple[str, str]:
    """A state-dict key as (module path, part) with part in down / up / alpha."""
    for part, suffixes in (("down", _DOWN), ("up", _UP), ("alpha", _ALPHA)):
        for suffix in suffixes:
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                if module.startswith("lora_unet_"):
                    return kohya_to_module(module.removeprefix("lora_unet_")), part
                for prefix in _PREFIXES:
                    if module.startswith(prefix):
                        module = module[len(prefix):]
                        break
                return module, part
    raise LoraError(f"key {key!r} is not a LoRA weight (expected .lora_A/.lora_B/.lora_down/.lora_up/.alpha); "
                    "only plain LoRA files are supported (not LoKr, DoRA or full checkpoints)")


def parse_state_dict(state_dict: dict[str, torch.Tensor], alphas: dict[str, float] | None = None,
                     source: str = "the LoRA") -> LoraDict:
    """Read any of the three styles (with or without alpha keys) into the internal form."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = _split_key(key)
        parts.setdefault(module, {})[part] = tensor
    loras: LoraDict = {}
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "lora_B/lora_up" if "down" in found else "lora_A/lora_down"
            raise LoraError(f"{source} has no {missing} weight for {module}; the file is incomplete or damaged")
        down, up = found["down"], found["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"{source}: {module} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                            "which are not a LoRA pair (rank must match)")
        alpha = float(found["alpha"].float().reshape(-1)[0]) if "alpha" in found else (alphas or {}).get(module)
        loras[module] = LoraWeights(down=down, up=up, alpha=alpha)
    if not loras:
        raise LoraError(f"{source} holds no LoRA weights")
    return loras


def read_lora_file(path: str | Path) -> tuple[LoraDict, dict[str, str]]:
    """Load a LoRA from a .safetensors file (never pickle) -> (weights, header metadata)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path} is not a safetensors file ({_sniff(path)}); only .safetensors LoRAs are "
                        f"accepted, since pickle files can run code: convert it to safetensors first") from exc
    require_finite(tensors, str(path))
    return parse_state_dict(tensors, _diffusers_alphas(metadata, tensors), source=str(path)), metadata


def require_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/inf weights by name: applied or merged, they turn every image black and every weight NaN."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraError(f"{source}: tensor {key} holds {bad} NaN/inf values of {tensor.numel()}; the file is "
                            "broken (saved from a run whose loss diverged?): use an earlier checkpoint of it")


def _sniff(path: Path) -> str:
    head = path.read_bytes()[:4]
    if head.startswith(b"PK"):
        return "it looks like a PyTorch zip/pickle checkpoint"
    if head[:1] == b"\x80":
        return "it looks like a pickle"
    return "its header is not valid"


def _diffusers_alphas(metadata: dict[str, str], tensors: dict) -> dict[str, float]:
    """Per-module alphas from diffusers' `lora_adapter_metadata` header (peft LoraConfig kwargs)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    except ValueError:
        return {}
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    modules = {_split_key(k)[0] for k in tensors}
    out = {}
    for module in modules:
        value = next((v for pattern, v in patterns.items() if module == pattern or module.endswith("." + pattern)), alpha)
        if value is not None:
            out[module] = float(value)
    return out


# ------------------------------------------------------------------------------ writing


def to_state_dict(loras: LoraDict, style: str = "comfyui", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The internal form as a state dict of one style (alpha written as a key where the style has one)."""
    if style not in STYLES:
        raise LoraError(f"unknown LoRA style {style!r}; choose one of {', '.join(STYLES)}")
    out: dict[str, torch.Tensor] = {}
    for module, lora in sorted(loras.items()):
        down, up = (t.to(dtype) if dtype else t for t in (lora.down, lora.up))
        alpha = torch.tensor(float(lora.alpha if lora.alpha is not None else lora.rank))
        if style == "kohya":
            base = "lora_unet_" + module.replace(".", "_")
            out.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha})
        elif style == "comfyui":
            base = f"diffusion_model.{module}"
            out.update({f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up, f"{base}.alpha": alpha})
        else:
            out.update({f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up})
    return out


def diffusers_metadata(loras: LoraDict) -> dict[str, str]:
    """peft LoraConfig kwargs as diffusers' `save_lora_weights` writes them, with per-module rank/alpha patterns."""
    ranks = {m: l.rank for m, l in loras.items()}
    alphas = {m: float(l.alpha if l.alpha is not None else l.rank) for m, l in loras.items()}
    base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    base_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": base_rank, "lora_alpha": base_alpha, "target_modules": sorted(loras),
        "rank_pattern": {m: r for m, r in ranks.items() if r != base_rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != base_alpha},
        "init_lora_weights": False, "use_dora": False, "lora_bias": False,
    }
    return {DIFFUSERS_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)}


def write_lora_file(path: str | Path, loras: LoraDict, style: str = "comfyui",
                    metadata: dict[str, object] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Atomically write a LoRA in one style, with our metadata (and diffusers' where that style needs it)."""
    header = {"format": "pt", "zturbo.format_version": FORMAT_VERSION, "zturbo.style": style,
              "modelspec.architecture": "Z-Image-Turbo/lora"}
    header.update({k if "." in k else f"zturbo.{k}": _meta_text(v) for k, v in (metadata or {}).items()})
    if style == "diffusers":
        header.update(diffusers_metadata(loras))
    return save_safetensors(path, to_state_dict(loras, style, dtype), header)


def _meta_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------------------------ checking


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear in the transformer, by module path."""
    return {name: (m.out_features, m.in_features) for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))}


def validate(loras: LoraDict, shapes: dict[str, tuple[int, int]]) -> tuple[list[str], list[str]]:
    """(modules the model lacks, modules whose shapes do not fit) for a LoRA against a model."""
    unmatched = sorted(m for m in loras if m not in shapes)
    misfit = sorted(
        f"{m}: LoRA {tuple(l.up.shape[:1]) + tuple(l.down.shape[1:])} vs model {shapes[m]}"
        for m, l in loras.items() if m in shapes and (l.up.shape[0], l.down.shape[1]) != shapes[m]
    )
    return unmatched, misfit


def require_fit(loras: LoraDict, shapes: dict[str, tuple[int, int]], what: str, partial_ok: bool = False) -> list[str]:
    """Raise unless the LoRA fits the model; return the unmatched modules when `partial_ok`."""
    unmatched, misfit = validate(loras, shapes)
    if misfit:
        raise LoraError(f"{what} does not fit this model ({len(misfit)} shape mismatches, e.g. "
                        f"{'; '.join(misfit[:3])}); it was made for another model")
    if unmatched and (not partial_ok or len(unmatched) == len(loras)):
        raise LoraError(f"{what} has {len(unmatched)} of {len(loras)} modules this model lacks (e.g. "
                        f"{', '.join(unmatched[:3])}); it was made for another model")
    return unmatched


def summarize(loras: LoraDict) -> dict[str, object]:
    """Rank, alpha and module count, for logs and metadata."""
    ranks = sorted({l.rank for l in loras.values()})
    alphas = sorted({float(l.alpha if l.alpha is not None else l.rank) for l in loras.values()})
    return {"modules": len(loras), "ranks": ranks, "alphas": alphas}


def modules_of(loras: Iterable[str]) -> list[str]:
    """Distinct leaf names (to_q, w1, ...) the LoRA targets, for metadata."""
    return sorted({m.split(".", 2)[-1] for m in loras})
