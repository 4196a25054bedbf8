"""LoRA files in and out: every key style of the ecosystem read into one internal form, three styles written.

Internal form: `{module_path: update}` where module_path names a linear of
ZImageTransformer2DModel exactly as diffusers does (`layers.0.attention.to_out.0`) and the
update is a `LoraWeights` (one low-rank pair: the fast hook path) or a `deltas.DeltaWeights`
(a `.diff` patch, LoKr or LoHa, expanded to a dense delta when applied).

Read (this module is the one place LoRA keys are parsed):
- names: diffusers (`layers.0.attention.to_q`) and ComfyUI's own (`layers.0.attention.qkv`,
  fused q/k/v, split exactly into the three; `attention.out`; `final_layer.linear`, `x_embedder`),
  after `diffusion_model.`, `transformer.`, `base_model.model.`, `model.` or none, or with
  underscores after `lora_unet_`, `lycoris_` or `lora_transformer_`
- weights: `lora_A/lora_B`, `lora_down/lora_up` (`.alpha` optional: alpha = rank without it,
  or from diffusers' `lora_adapter_metadata`), LoKr `lokr_*`, LoHa `hada_*`, `.diff`, `.diff_b`

Written styles (README has which tool loads each fully):
- comfyui (default): `diffusion_model.<m>.lora_A.weight`, `.lora_B.weight`, `.alpha` (`.diff` / `.diff_b`
  for full updates)
- diffusers: `transformer.<m>.lora_A/lora_B.weight` with alpha/rank baked into lora_B, so every tool
  applies one strength, plus the `lora_adapter_metadata` header diffusers reads
- musubi (alias kohya; musubi-tuner's native style): `lora_unet_<m with _>.lora_down/lora_up.weight`, `.alpha`
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import torch

from ..errors import LoraError
from ..fileio import save_safetensors
from ..zimage import BLOCK_STACKS, TARGET_PATHS
from .deltas import LOHA_KEYS, LOKR_KEYS, DeltaWeights
from .metadata import FORMAT_VERSION, build_metadata  # noqa: F401  (FORMAT_VERSION: re-exported)

STYLES = ("comfyui", "diffusers", "musubi")
STYLE_ALIASES = {"kohya": "musubi"}  # the old name: musubi-tuner's (and sd-scripts') `lora_unet_` keys
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")  # module names with `.` written as `_`
KEY_PREFIXES = _PREFIXES + _FLAT_PREFIXES  # every key prefix the reader strips (inspect names them)
_PARTS = {  # key suffix after the module name -> part
    "lora_A.weight": "down",
    "lora_down.weight": "down",
    "lora_A.default.weight": "down",
    "lora_B.weight": "up",
    "lora_up.weight": "up",
    "lora_B.default.weight": "up",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    **{k: k for k in LOKR_KEYS + LOHA_KEYS},
}
_SUFFIXES = sorted(_PARTS, key=len, reverse=True)
FUSED_QKV = "attention.qkv"  # ComfyUI's fused q/k/v linear; parse_state_dict splits it into QKV
QKV = tuple(TARGET_PATHS[t] for t in ("to_q", "to_k", "to_v"))
# Module names flattened with `_`, per block leaf: diffusers' names and ComfyUI's own (qkv, out).
_FLAT_BLOCK = re.compile(rf"^({'|'.join(BLOCK_STACKS)})_(\d+)_(.+)$")
_FLAT_LEAVES = {path.replace(".", "_"): path for path in (*TARGET_PATHS.values(), FUSED_QKV, "attention.out")}
_FLAT_TOP = {
    "all_x_embedder_2-1": "all_x_embedder.2-1",
    "all_final_layer_2-1_linear": "all_final_layer.2-1.linear",
    "all_final_layer_2-1_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "cap_embedder_1": "cap_embedder.1",
    "t_embedder_mlp_0": "t_embedder.mlp.0",
    "t_embedder_mlp_2": "t_embedder.mlp.2",
    "x_embedder": "x_embedder",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
}
# ComfyUI's module names (comfy/utils.py z_image_to_diffusers) -> diffusers'; `attention.qkv` is split instead.
_COMFY_NAMES = {
    "attention.out": "attention.to_out.0",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
    "x_embedder": "all_x_embedder.2-1",
}


@dataclass
class LoraWeights:
    """One module's LoRA: delta W = (alpha / rank) * up @ down (plus an optional `.diff_b` bias delta)."""

    down: torch.Tensor  # (rank, in_features), a.k.a. lora_A / lora_down
    up: torch.Tensor  # (out_features, rank), a.k.a. lora_B / lora_up
    alpha: float | None = None  # None: alpha = rank (scale 1), the adapter's convention
    bias: torch.Tensor | None = None  # delta of the linear's bias, applied as is (ComfyUI's `.diff_b`)
    source: str = ""  # the module's name in the file, for messages

    kind = "lora"
    has_weight = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight update, computed in fp32."""
        return (self.up.float() @ self.down.float()).mul_(self.scale).to(dtype)


Update = Union[LoraWeights, DeltaWeights]
LoraDict = dict[str, Update]


def resolve_style(style: str) -> str:
    """A written style by name or alias (kohya -> musubi)."""
    name = STYLE_ALIASES.get(style, style)
    if name not in STYLES:
        raise LoraError(f"unknown LoRA style {style!r}; choose one of {', '.join(STYLES)} (kohya = musubi)")
    return name


def is_low_rank(loras: LoraDict) -> bool:
    """Every update is a plain LoRA pair without a bias delta (what diffusers and musubi files can hold)."""
    return all(isinstance(u, LoraWeights) and u.bias is None for u in loras.values())


# ------------------------------------------------------------------------------ names


def flat_to_module(name: str) -> str:
    """`layers_0_attention_to_out_0` -> `layers.0.attention.to_out.0` (unknown names kept as they are)."""
    match = _FLAT_BLOCK.match(name)
    if match and match.group(3) in _FLAT_LEAVES:
        return f"{match.group(1)}.{match.group(2)}.{_FLAT_LEAVES[match.group(3)]}"
    return _FLAT_TOP.get(name, name)


kohya_to_module = flat_to_module  # the old name


def module_name(raw: str) -> str:
    """A file's module name (any prefix, dots or underscores, ComfyUI or diffusers names) -> ours.

    A fused ComfyUI `...attention.qkv` is returned as is; `parse_state_dict` splits it.
    """
    for prefix in _FLAT_PREFIXES:
        if raw.startswith(prefix):
            raw = flat_to_module(raw[len(prefix) :])
            break
    else:
        while prefix := next((p for p in _PREFIXES if raw.startswith(p)), None):  # `model.diffusion_model.` too
            raw = raw[len(prefix) :]
    for comfy, ours in _COMFY_NAMES.items():
        if raw == comfy or raw.endswith("." + comfy):
            return raw[: len(raw) - len(comfy)] + ours
    return raw


def split_key(key: str) -> tuple[str, str]:
    """A state-dict key as (module name in the file, part), part one of down/up/alpha/diff/diff_b/lokr_*/hada_*."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], _PARTS[suffix]
    raise LoraError(
        f"key {key!r} is not a LoRA weight (expected .lora_A/.lora_B/.lora_down/.lora_up/.alpha, "
        "LoKr .lokr_*, LoHa .hada_* or .diff/.diff_b); DoRA, OFT and full checkpoints are not supported"
    )


# ------------------------------------------------------------------------------ reading


def _update(found: dict[str, torch.Tensor], alpha: float | None, source: str, what: str) -> Update:
    """One module's parts as a LoraWeights or a DeltaWeights; incomplete or mixed parts are an error."""
    bias = found.get("diff_b")
    lycoris = {k: v for k, v in found.items() if k.startswith(("lokr_", "hada_"))}
    kinds = [
        name
        for name, present in (
            ("LoRA", "down" in found or "up" in found),
            ("LoKr/LoHa", bool(lycoris)),
            ("diff", "diff" in found),
        )
        if present
    ]
    if len(kinds) > 1:
        raise LoraError(f"{what}: {source} mixes {' and '.join(kinds)} weights; one module holds one kind of update")
    if "down" in found or "up" in found:
        if "down" not in found or "up" not in found:
            missing = "lora_B/lora_up" if "down" in found else "lora_A/lora_down"
            raise LoraError(f"{what} has no {missing} weight for {source}; the file is incomplete or damaged")
        down, up = found["down"], found["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(
                f"{what}: {source} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                "which are not a LoRA pair (rank must match)"
            )
        return LoraWeights(down=down, up=up, alpha=alpha, bias=bias, source=source)
    if lycoris:
        return _lycoris_update(lycoris, alpha, bias, source, what)
    if "diff" in found or bias is not None:
        return DeltaWeights("diff", {"diff": found["diff"]} if "diff" in found else {}, None, bias=bias, source=source)
    raise LoraError(f"{what}: {source} has only an alpha and no weights; the file is incomplete or damaged")


def _lycoris_update(t: dict[str, torch.Tensor], alpha: float | None, bias, source: str, what: str) -> DeltaWeights:
    if any(k.startswith("hada_") for k in t):
        need = [k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in t]
        kind = "loha"
    else:
        need = [f"lokr_w{n}" for n in "12" if f"lokr_w{n}" not in t and not {f"lokr_w{n}_a", f"lokr_w{n}_b"} <= set(t)]
        kind = "lokr"
    if need:
        raise LoraError(
            f"{what}: the {kind} module {source} lacks {', '.join(need)}; the file is incomplete or damaged"
        )
    update = DeltaWeights(kind, t, alpha, bias=bias, source=source)
    try:
        update.shape
    except (KeyError, IndexError, RuntimeError) as exc:
        raise LoraError(f"{what}: the {kind} factors of {source} do not fit together ({exc})") from None
    return update


def _split_fused(module: str, update: Update, what: str) -> dict[str, Update]:
    """ComfyUI's fused `attention.qkv` -> to_q, to_k, to_v: rows q, k, v of up (or of the delta), down shared."""
    block = module[: -len(FUSED_QKV)]
    rows = update.shape[0] if update.has_weight else int(update.bias.shape[0])
    if rows % 3:
        raise LoraError(f"{what}: {update.source} has {rows} output rows, which do not split into q, k and v")
    if isinstance(update, LoraWeights):
        biases = update.bias.chunk(3) if update.bias is not None else (None,) * 3
        parts = [
            LoraWeights(update.down, up, update.alpha, b, update.source) for up, b in zip(update.up.chunk(3), biases)
        ]
    else:
        parts = update.split_rows(3)
    return {block + leaf: part for leaf, part in zip(QKV, parts)}


def parse_state_dict(
    state_dict: dict[str, torch.Tensor], alphas: dict[str, float] | None = None, source: str = "the LoRA"
) -> LoraDict:
    """Read any supported style into the internal form (module path -> update)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, part = split_key(key)
        parts.setdefault(name, {})[part] = tensor
    loras: LoraDict = {}
    for name, found in parts.items():
        module = module_name(name)
        alpha = float(found.pop("alpha").float().reshape(-1)[0]) if "alpha" in found else (alphas or {}).get(module)
        update = _update(found, alpha, name, source)
        split = _split_fused(module, update, source) if module.endswith(FUSED_QKV) else {module: update}
        for path, piece in split.items():
            if path in loras:
                raise LoraError(
                    f"{source} holds two updates for {path} ({loras[path].source} and {piece.source}); keep one of them"
                )
            loras[path] = piece
    if not loras:
        raise LoraError(f"{source} holds no LoRA weights")
    return loras


def read_lora_file(path: str | Path) -> tuple[LoraDict, dict[str, str]]:
    """Load a LoRA from a .safetensors file (never pickle) -> (weights, header metadata)."""
    tensors, metadata = read_safetensors(path)
    require_finite(tensors, str(path))
    return parse_state_dict(tensors, diffusers_alphas(metadata, tensors), source=str(path)), metadata


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the header metadata of a LoRA file; not safetensors or truncated -> LoraError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(
            f"{path} is not a safetensors file ({sniff(path)}); only .safetensors LoRAs are "
            f"accepted, since pickle files can run code: convert it to safetensors, or download it "
            f"again if it is cut short"
        ) from exc
    return tensors, metadata


def require_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/inf weights by name: applied or merged, they turn every image black and every weight NaN."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraError(
                f"{source}: tensor {key} holds {bad} NaN/inf values of {tensor.numel()}; the file is "
                "broken (saved from a run whose loss diverged?): use an earlier checkpoint of it"
            )


def sniff(path: Path) -> str:
    """Why a file is not safetensors, in a few words."""
    data = path.read_bytes()
    if data.startswith(b"PK"):
        return "it looks like a PyTorch zip/pickle checkpoint"
    if data[:1] == b"\x80":
        return "it looks like a pickle"
    if len(data) >= 8 and 8 + int.from_bytes(data[:8], "little") > len(data):
        return f"it is truncated: the header alone claims {int.from_bytes(data[:8], 'little')} bytes of {len(data)}"
    if len(data) >= 8:
        try:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + int.from_bytes(data[:8], "little") + end > len(data):
                return f"it is truncated: {len(data)} bytes where the header needs more"
        except (ValueError, KeyError, TypeError):
            pass
    return "its header is not valid"


def diffusers_alphas(metadata: dict[str, str], tensors: dict) -> dict[str, float]:
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
    modules = {module_name(split_key(k)[0]) for k in tensors}
    out = {}
    for module in modules:
        value = next(
            (v for pattern, v in patterns.items() if module == pattern or module.endswith("." + pattern)), alpha
        )
        if value is not None:
            out[module] = float(value)
    return out


# ------------------------------------------------------------------------------ writing


def to_state_dict(loras: LoraDict, style: str = "comfyui", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The internal form as a state dict of one style (alpha written as a key where the style has one)."""
    style = resolve_style(style)
    if style != "comfyui" and not is_low_rank(loras):
        kinds = sorted(
            {
                u.kind if u.has_weight else "diff_b"
                for u in loras.values()
                if not isinstance(u, LoraWeights) or u.bias is not None
            }
        )
        raise LoraError(
            f"the {style} style holds plain LoRA pairs only, and this LoRA has {', '.join(kinds)} "
            "updates (full patches, LoKr, LoHa or bias deltas); write --format comfyui, which ComfyUI "
            "loads whole"
        )
    out: dict[str, torch.Tensor] = {}
    for module, update in sorted(loras.items()):
        out.update(_WRITERS[style](module, update, dtype))
    return _unshared(out)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share storage (q, k, v split from one fused pair): safetensors refuses shared memory."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size()
        seen.add(storage.data_ptr())
        out[key] = tensor.clone() if shared else tensor
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype else tensor


def _alpha(lora: LoraWeights) -> torch.Tensor:
    return torch.tensor(float(lora.alpha if lora.alpha is not None else lora.rank))


def _write_comfyui(module: str, update: Update, dtype) -> dict[str, torch.Tensor]:
    base = f"diffusion_model.{module}"
    out = {}
    if isinstance(update, LoraWeights):
        out = {
            f"{base}.lora_A.weight": _cast(update.down, dtype),
            f"{base}.lora_B.weight": _cast(update.up, dtype),
            f"{base}.alpha": _alpha(update),
        }
    elif update.kind in ("lokr", "loha") and update.rows is None:  # LyCORIS' own keys, as ComfyUI reads them
        out.update({f"{base}.{key}": _cast(tensor, dtype) for key, tensor in sorted(update.tensors.items())})
        if update.alpha is not None:
            out[f"{base}.alpha"] = torch.tensor(float(update.alpha))
    elif update.has_weight:
        out[f"{base}.diff"] = update.delta(dtype or torch.float32)
    if update.bias is not None:
        out[f"{base}.diff_b"] = _cast(update.bias, dtype)
    return out


def _write_diffusers(module: str, lora: LoraWeights, dtype) -> dict[str, torch.Tensor]:
    """alpha/rank baked into lora_B (in fp32): the file means the same to tools that ignore the header."""
    up = lora.up if lora.scale == 1.0 else lora.up.float() * lora.scale
    return {
        f"transformer.{module}.lora_A.weight": _cast(lora.down, dtype),
        f"transformer.{module}.lora_B.weight": _cast(up, dtype or lora.up.dtype),
    }


def _write_musubi(module: str, lora: LoraWeights, dtype) -> dict[str, torch.Tensor]:
    base = "lora_unet_" + module.replace(".", "_")
    return {
        f"{base}.lora_down.weight": _cast(lora.down, dtype),
        f"{base}.lora_up.weight": _cast(lora.up, dtype),
        f"{base}.alpha": _alpha(lora),
    }


_WRITERS = {"comfyui": _write_comfyui, "diffusers": _write_diffusers, "musubi": _write_musubi}


def diffusers_metadata(loras: LoraDict) -> dict[str, str]:
    """peft LoraConfig kwargs as diffusers' `save_lora_weights` writes them; alpha = rank, since the scale is baked."""
    ranks = {m: u.rank for m, u in loras.items()}
    base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "r": base_rank,
        "lora_alpha": base_rank,
        "target_modules": sorted(loras),
        "rank_pattern": {m: r for m, r in ranks.items() if r != base_rank},
        "alpha_pattern": {m: float(r) for m, r in ranks.items() if r != base_rank},
        "init_lora_weights": False,
        "use_dora": False,
        "lora_bias": False,
    }
    return {DIFFUSERS_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)}


def write_lora_file(
    path: str | Path,
    loras: LoraDict,
    style: str = "comfyui",
    metadata: dict[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Atomically write a LoRA in one style, with the metadata LoRA managers read (metadata.build_metadata).

    `metadata`: what the caller knows (name, trigger_word, steps, epochs, resolution, started_at,
    base_model ...; see build_metadata) and keys carried over from a source file.
    """
    style = resolve_style(style)
    tensors = to_state_dict(loras, style, dtype)
    header = build_metadata(loras, tensors, style, metadata or {}, name=Path(path).stem)
    if style == "diffusers":
        header.update(diffusers_metadata(loras))
    return save_safetensors(path, tensors, header)


# ------------------------------------------------------------------------------ checking


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear in the transformer, by module path."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))
    }


def bias_modules(transformer: torch.nn.Module) -> set[str]:
    """Module paths of the linears that have a bias (where a `.diff_b` can land)."""
    return {
        name
        for name, m in transformer.named_modules()
        if name and isinstance(getattr(m, "bias", None), torch.Tensor) and hasattr(m, "in_features")
    }


def validate(
    loras: LoraDict, shapes: dict[str, tuple[int, int]], biases: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """(modules the model lacks, modules whose shapes do not fit) for a LoRA against a model."""
    unmatched = sorted(m for m in loras if m not in shapes)
    misfit = []
    for m, update in sorted(loras.items()):
        if m not in shapes:
            continue
        if update.has_weight and tuple(update.shape) != tuple(shapes[m]):
            misfit.append(f"{m}: LoRA {tuple(update.shape)} vs model {shapes[m]}")
        if update.bias is not None and (biases is not None and m not in biases):
            misfit.append(f"{m}: a bias delta (.diff_b), but the model's layer has no bias")
        elif update.bias is not None and int(update.bias.shape[0]) != shapes[m][0]:
            misfit.append(f"{m}: bias delta of {int(update.bias.shape[0])} vs model {shapes[m][0]} outputs")
    return unmatched, misfit


def unplaced_keys(loras: LoraDict, modules: Iterable[str]) -> list[str]:
    """The file's own names for modules that could not be placed (what the user can find in the file)."""
    return sorted({(loras[m].source or m) + ".*" for m in modules})


def require_fit(
    loras: LoraDict,
    shapes: dict[str, tuple[int, int]],
    what: str,
    partial_ok: bool = False,
    biases: set[str] | None = None,
    can_allow: bool = True,
) -> list[str]:
    """Raise unless the LoRA fits the model; with `partial_ok`, return the modules it lacks instead.

    A LoRA that matches nothing, or whose shapes disagree, is always an error (another model).
    `can_allow`: the caller has an `--allow-partial` to suggest (the training adapter has none).
    """
    unmatched, misfit = validate(loras, shapes, biases)
    if misfit:
        raise LoraError(
            f"{what} does not fit this model ({len(misfit)} shape mismatches, e.g. "
            f"{'; '.join(misfit[:3])}); it was made for another model"
        )
    if unmatched and (not partial_ok or len(unmatched) == len(loras)):
        keys = unplaced_keys(loras, unmatched)
        hint = (
            "pass --allow-partial to use the rest anyway"
            if can_allow and len(unmatched) < len(loras)
            else "it was made for another model"
        )
        raise LoraError(
            f"{what} has {len(unmatched)} of {len(loras)} modules this model lacks (keys it could not "
            f"place: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}); {hint}"
        )
    return unmatched


def partial_warning(what: str, loras: LoraDict, unmatched: list[str]) -> str:
    """The `--allow-partial` warning: how many modules were left out and which keys."""
    keys = unplaced_keys(loras, unmatched)
    return (
        f"warning: {what}: {len(unmatched)} of {len(loras)} modules are not in this model and were skipped "
        f"(--allow-partial): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
    )


def summarize(loras: LoraDict) -> dict[str, object]:
    """Rank, alpha and module count, for logs and metadata."""
    pairs = [u for u in loras.values() if isinstance(u, LoraWeights)]
    ranks = sorted({u.rank for u in pairs})
    alphas = sorted({float(u.alpha if u.alpha is not None else u.rank) for u in pairs})
    return {"modules": len(loras), "ranks": ranks, "alphas": alphas}


def modules_of(loras: Iterable[str]) -> list[str]:
    """Distinct leaf names (to_q, w1, ...) the LoRA targets, for metadata."""
    return sorted({m.split(".", 2)[-1] for m in loras})
