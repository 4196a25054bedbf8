"""`zturbo merge`: LoRAs folded into the base model, merged into one LoRA, or converted.

Into the base: the transformer is rewritten shard by shard (safe_open one source shard,
add `strength * scale * up @ down` to each adapted weight in fp32, cast, write the shard
atomically), so memory holds one shard, never the model twice. The other parts are hard
links (copies where links are impossible). Everything is written into a temp folder
beside the output and renamed into place, so a crash leaves no half model.

Into one LoRA (`--to-lora`): ranks are concatenated and each LoRA's strength and
alpha/rank scale folded into its `up` rows, so the sum of the updates is exact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .. import __version__
from ..errors import AdapterError, ConfigError, LoraError, ModelError, ZTurboError
from ..fileio import header_entries, save_safetensors, temp_dir, write_json
from ..lora.adapter import read_adapter, resolve_adapter
from ..lora.deltas import DeltaWeights
from ..lora.files import LoadedLora, LoraSpec, file_sha256, read_loras
from ..lora.formats import (
    STYLES,
    LoraDict,
    LoraWeights,
    Update,
    partial_warning,
    require_fit,
    resolve_style,
    write_lora_file,
)
from ..models import INDEX_NAME, resolve_model_dir, torch_dtype, transformer_files
from ..zimage import TURBO_REPO

Log = Callable[[str], None]
PROVENANCE_NAME = "zturbo_merge.json"


def _quiet(message: str) -> None:
    """Default log: say nothing (the CLI passes its console)."""


# ------------------------------------------------------------------ reading the base without loading it


def linear_shapes_from_files(files: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D `.weight`, by module path: the same table formats.linear_shapes gives a loaded model."""
    return {
        key.removesuffix(".weight"): (shape[0], shape[1])
        for key, (shape, _) in header_entries(files).items()
        if key.endswith(".weight") and len(shape) == 2
    }


def bias_modules_from_files(files: Iterable[Path]) -> set[str]:
    """Module paths with a `.bias` tensor (where a `.diff_b` can land), from the headers alone."""
    return {key.removesuffix(".bias") for key in header_entries(files) if key.endswith(".bias")}


# ------------------------------------------------------------------ output paths


def check_output(out: Path, overwrite: bool, sources: Sequence[Path] = (), kind: str = "folder") -> None:
    """Refuse an output that is the wrong kind, overlaps an input, or exists without `--overwrite`.

    `--overwrite` replaces only what merge wrote before (a folder with zturbo_merge.json, a LoRA whose
    header has zturbo.merged_from); a run, a dataset, a model or any other file is refused with the reason."""
    out_real = out.expanduser().resolve()
    for source in sources:
        source_real = source.expanduser().resolve()
        if (
            out_real == source_real
            or source_real in out_real.parents
            or out_real in source_real.parents
            or (out.is_file() and source.is_file() and os.path.samefile(out, source))
        ):
            suffix = "-merged.safetensors" if kind == "file" else "-merged"
            suggestion = source_real.parent / (source_real.stem + suffix)
            raise ConfigError(f"output {out} overlaps the input {source}; write to a new path such as {suggestion}")
    if kind == "folder" and out.is_file():
        raise ConfigError(f"--out {out} is an existing file; a merged model is a folder, pass a new folder path")
    if kind == "file" and out.is_dir():
        raise ConfigError(f"--to-lora {out} is an existing folder; pass a .safetensors file path")
    if kind == "file" and out.suffix != ".safetensors":
        raise ConfigError(f"--to-lora {out} must end in .safetensors; LoRAs are written only as safetensors")
    if not out.exists():
        return
    foreign = _foreign_folder(out) if kind == "folder" else _foreign_file(out)
    if foreign:
        raise ConfigError(
            f"{out} {foreign}; merge replaces only its own earlier output, with or without "
            f"--overwrite: choose a new path"
        )
    if not overwrite:
        raise ConfigError(
            f"{out} already exists; pass --overwrite to replace it (an earlier merge output), or choose another path"
        )


def _run_holding(path: Path) -> Path | None:
    """The training run folder `path` is or lies in (its own folder, checkpoints/ or state/step-N/), if any."""
    from ..train.state import RunFolder

    for folder in [path, *path.parents][:4]:
        if RunFolder(folder).holds_run():
            return folder
    return None


def _foreign_folder(out: Path) -> str | None:
    """Why an existing --out folder is not merge's to replace, or None when it is (merge output or empty)."""
    from ..data.dataset import IMAGE_EXTS
    from ..train.state import RunFolder

    if RunFolder(out).holds_run():
        return "holds a training run (its config, state, LoRAs and previews)"
    names = sorted(p.name for p in out.iterdir())
    if PROVENANCE_NAME in names or not names:
        return None
    run = _run_holding(out.parent)
    if run is not None:
        return f"lies inside the training run {run}"
    images = [n for n in names if Path(n).suffix.lower() in IMAGE_EXTS]
    if images:
        return f"holds images ({len(images)}, e.g. {images[0]}): a dataset, not a merge output"
    if "model_index.json" in names:
        return f"is a model folder without {PROVENANCE_NAME} (a download or a copy), not a merge output"
    return f"holds files merge did not write ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _foreign_file(out: Path) -> str | None:
    """Why an existing --to-lora file is not merge's to replace, or None when merge wrote it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(out), framework="pt") as handle:
            if "zturbo.merged_from" in (handle.metadata() or {}):
                return None
    except (SafetensorError, OSError, ValueError):
        pass
    run = _run_holding(out.parent)
    if run is not None:
        return f"is a file of the training run {run}"
    return "was not written by `zturbo merge` (its header has no zturbo.merged_from)"


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a file (no extra disk space); copy where links are impossible (other file system)."""
    real = Path(os.path.realpath(source))
    try:
        os.link(real, target)
    except OSError:
        shutil.copy2(real, target)


def _copy_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            _link_or_copy(item, target / item.name)


def _publish_folder(tmp: Path, out: Path) -> None:
    """Move the finished temp folder into place; an old output is removed only after the new one is there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ into the base model


Plan = dict[str, list[tuple[Update, float]]]


def _merge_plan(
    loras: Sequence[LoadedLora],
    adapter: LoraDict | None,
    adapter_weight: float,
    shapes: dict[str, tuple[int, int]],
    log: Log,
    allow_partial: bool = False,
    biases: set[str] | None = None,
) -> Plan:
    """module -> [(update, weight)] for every update that lands in this model.

    The adapter must fit whole (a partial adapter means another model); a LoRA that
    matches only in part is an error, or with `allow_partial` merged where it matches, with a warning.
    """
    plan: Plan = {}
    if adapter is not None:
        try:
            require_fit(adapter, shapes, "the training adapter", can_allow=False)
        except LoraError as exc:
            raise AdapterError(f"{exc}; pass the Z-Image Turbo training adapter (v1, v2 or its file)") from None
        for module, lora in adapter.items():
            plan.setdefault(module, []).append((lora, adapter_weight))
    for item in loras:
        unmatched = require_fit(item.weights, shapes, str(item.spec.path), partial_ok=allow_partial, biases=biases)
        if unmatched:
            log(partial_warning(item.spec.path.name, item.weights, unmatched))
        for module, lora in item.weights.items():
            if module not in unmatched:
                plan.setdefault(module, []).append((lora, item.spec.strength))
    return plan


def _shard_update(key: str, plan: Plan) -> list[tuple[torch.Tensor, float]]:
    """The fp32 deltas (weight or bias) that land on one tensor of the base model."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix) and key.removesuffix(suffix) in plan:
            pairs = [
                (u.delta(torch.float32) if suffix == ".weight" else u.bias, s)
                for u, s in plan[key.removesuffix(suffix)]
            ]
            return [(d.float(), s) for d, s in pairs if d is not None]
    return []


def _merge_shard(source: Path, target: Path, plan: Plan, dtype: torch.dtype, keep_fp32: Sequence[str]) -> int:
    """Write one output shard: updated weights in fp32, then cast. Returns its byte size for the index."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            updates = _shard_update(key, plan)
            if updates:
                tensor = tensor.float()
                for delta, strength in updates:
                    tensor += delta * strength
            if tensor.is_floating_point() and not any(part in key for part in keep_fp32):
                tensor = tensor.to(dtype)
            tensors[key] = tensor
    save_safetensors(target, tensors, {**metadata, "format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_transformer(model_dir: Path, out_dir: Path, plan: Plan, dtype: torch.dtype, log: Log) -> None:
    """The transformer folder, shard by shard, with the same layout (and index) as the source."""
    from diffusers import ZImageTransformer2DModel

    source_dir, target_dir = model_dir / "transformer", out_dir / "transformer"
    target_dir.mkdir(parents=True)
    for item in source_dir.iterdir():
        if item.suffix == ".json" and item.name != INDEX_NAME:
            _link_or_copy(item, target_dir / item.name)
    keep_fp32 = list(getattr(ZImageTransformer2DModel, "_keep_in_fp32_modules", None) or [])
    files = transformer_files(model_dir)
    total = 0
    for number, source in enumerate(files, 1):
        total += _merge_shard(source, target_dir / source.name, plan, dtype, keep_fp32)
        log(f"merged shard {number}/{len(files)}: {source.name}")
    index = source_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        write_json(target_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def merge_into_model(
    specs: Sequence[LoraSpec],
    out: Path,
    model: str = TURBO_REPO,
    adapter: str | None = None,
    adapter_weight: float = 1.0,
    dtype: str = "bf16",
    overwrite: bool = False,
    log: Log = _quiet,
    allow_partial: bool = False,
) -> Path:
    """Write a diffusers Z-Image folder whose transformer is base + adapter + sum of strength * LoRA."""

    if not specs and adapter is None:
        raise ConfigError("nothing to merge; pass --lora PATH[:STRENGTH] (repeatable) and/or --adapter REF")
    model_dir = resolve_model_dir(model)
    adapter_path = resolve_adapter(adapter) if adapter is not None else None
    check_output(out, overwrite, [model_dir, *(s.path for s in specs), *([adapter_path] if adapter_path else [])])
    loras = read_loras(specs)
    adapter_weights = read_adapter(adapter_path) if adapter_path is not None else None
    files = transformer_files(model_dir)
    plan = _merge_plan(
        loras,
        adapter_weights,
        adapter_weight,
        linear_shapes_from_files(files),
        log,
        allow_partial=allow_partial,
        biases=bias_modules_from_files(files),
    )
    tmp = temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        for item in sorted(model_dir.iterdir()):
            if item.name.startswith(".") or item.name == "transformer":
                continue
            (_copy_tree if item.is_dir() else _link_or_copy)(item, tmp / item.name)
        _write_transformer(model_dir, tmp, plan, torch_dtype(dtype), log)
        _write_provenance(tmp, model, loras, adapter_path, adapter_weight, dtype)
        _publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({len(plan)} layers updated); use it with `zturbo sample --model {out}`")
    return out


def _write_provenance(
    out_dir: Path, model: str, loras: Sequence[LoadedLora], adapter: Path | None, adapter_weight: float, dtype: str
) -> None:
    """What went into the folder, so it describes itself."""
    write_json(
        out_dir / PROVENANCE_NAME,
        {
            "base_model": model,
            "dtype": dtype,
            "loras": [l.describe() for l in loras],
            "adapter": None
            if adapter is None
            else {"path": str(adapter), "weight": adapter_weight, "sha256": file_sha256(adapter)},
            "tool": f"zturbo-train {__version__}",
        },
    )


# ------------------------------------------------------------------ into one LoRA


def combine_loras(items: Sequence[tuple[LoraDict, float]]) -> tuple[LoraDict, bool]:
    """Sum of strength * LoRA as one LoRA, exactly.

    Plain LoRA pairs: ranks concatenated, scales folded into `up`. A module only one LoRA
    touches keeps its tensors and alpha (its strength, when not 1, folded into `up`). Where
    a full patch, LoKr or LoHa takes part, the module's sum becomes one dense `.diff` patch (a LoKr or LoHa
    alone keeps its factors, its strength folded into w1, unless it is a slice of ComfyUI's fused qkv).
    Returns (LoRA, whether any tensor was rescaled or expanded).
    """
    by_module: dict[str, list[tuple[Update, float]]] = {}
    for weights, strength in items:
        for module, update in weights.items():
            by_module.setdefault(module, []).append((update, strength))
    out: LoraDict = {}
    rescaled = False
    for module, parts in by_module.items():
        _check_pair_shapes(module, parts)
        out[module], changed = _combine(module, parts)
        rescaled = rescaled or changed
    return out, rescaled


# A LoKr or LoHa alone at a strength: that factor scaled keeps the file its size (a dense patch of Z-Image is GBs).
_SCALED_FACTOR = {"lokr": ("lokr_w1", "lokr_w1_a"), "loha": ("hada_w1_a",)}


def _combine(module: str, parts: Sequence[tuple[Update, float]]) -> tuple[Update, bool]:
    """One module's updates as one (see combine_loras); (update, whether tensors changed)."""
    first, strength = parts[0]
    if (
        len(parts) == 1
        and strength == 1.0
        and (isinstance(first, LoraWeights) or first.kind == "diff" or not first.rows)
    ):
        return first, False
    biases = [u.bias.float() * s for u, s in parts if u.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    if len(parts) == 1 and isinstance(first, DeltaWeights) and first.kind in _SCALED_FACTOR and not first.rows:
        key = next(k for k in _SCALED_FACTOR[first.kind] if k in first.tensors)  # the update is linear in it
        tensors = {**first.tensors, key: first.tensors[key].float() * strength}
        return DeltaWeights(first.kind, tensors, first.alpha, bias=bias, source=first.source), True
    if all(isinstance(u, LoraWeights) for u, _ in parts):
        if len(parts) == 1:
            return LoraWeights(first.down, first.up.float() * strength, first.alpha, bias, first.source), True
        down = torch.cat([u.down.float() for u, _ in parts])
        up = torch.cat([u.up.float() * (s * u.scale) for u, s in parts], dim=1)
        return LoraWeights(down, up, None, bias, module), True  # alpha = rank: scale 1, everything is in `up`
    deltas = [u.delta(torch.float32) * s for u, s in parts if u.has_weight]
    tensors = {"diff": torch.stack(deltas).sum(0)} if deltas else {}
    return DeltaWeights("diff", tensors, None, bias=bias, source=module), True


def _check_pair_shapes(module: str, parts: Sequence[tuple[Update, float]]) -> None:
    shapes = {tuple(u.shape) for u, _ in parts if u.has_weight}
    if len(shapes) > 1:
        raise LoraError(
            f"the LoRAs disagree on the shape of {module} ({sorted(shapes)}); they were made for "
            "different models and cannot be merged"
        )


def merge_to_lora(
    specs: Sequence[LoraSpec],
    out: Path,
    style: str = "comfyui",
    dtype: str | None = None,
    model: str | None = None,
    model_required: bool = True,
    overwrite: bool = False,
    log: Log = _quiet,
    allow_partial: bool = False,
) -> Path:
    """One LoRA file equal to applying all `specs` at their strengths (or one LoRA in another style).

    With `model`, the result is checked against that model's transformer; when the model is
    only the default and is not downloaded (`model_required` False), the check is skipped.
    """
    if not specs:
        raise ConfigError("--to-lora needs at least one --lora PATH[:STRENGTH]")
    try:
        style = resolve_style(style)
    except ZTurboError:
        raise ConfigError(f"--format {style!r} is not one of {', '.join(STYLES)} (kohya = musubi)") from None
    check_output(out, overwrite, [s.path for s in specs], kind="file")
    loras = read_loras(specs)
    combined, rescaled = combine_loras([(item.weights, item.spec.strength) for item in loras])
    if model is not None:
        combined = _keep_fitting(combined, model, model_required, log, allow_partial)
    torch_type = _lora_dtype(dtype, rescaled)
    metadata = _merged_metadata(loras)
    write_lora_file(out, combined, style=style, metadata=metadata, dtype=torch_type)
    log(f"wrote {out} ({style} style, {len(combined)} modules, {_ranks(combined)})")
    return out


def _keep_fitting(loras: LoraDict, model: str, required: bool, log: Log, allow_partial: bool = False) -> LoraDict:
    """Check the result against a model's transformer (headers only): a partial fit is an error, or with
    `allow_partial` the modules it lacks are dropped, with a warning."""
    try:
        model_dir = resolve_model_dir(model)
    except ModelError:
        if required:
            raise
        log(f"note: {model} is not downloaded, so the LoRA was not checked against it (pass --model to check)")
        return loras
    files = transformer_files(model_dir)
    unmatched = require_fit(
        loras,
        linear_shapes_from_files(files),
        "the merged LoRA",
        partial_ok=allow_partial,
        biases=bias_modules_from_files(files),
    )
    if unmatched:
        log(partial_warning("the merged LoRA", loras, unmatched))
    return {m: u for m, u in loras.items() if m not in unmatched}


def _lora_dtype(dtype: str | None, rescaled: bool) -> torch.dtype | None:
    """Explicit --dtype wins; otherwise rescaled tensors stay fp32 (exact) and untouched ones keep their dtype."""
    if dtype is not None:
        return torch_dtype(dtype)
    return torch.float32 if rescaled else None


def _merged_metadata(loras: Sequence[LoadedLora]) -> dict[str, object]:
    """One source: its own metadata carries over (trigger word, base model...). Several: the list of sources."""
    meta: dict[str, object] = {}
    if len(loras) == 1:
        meta.update(loras[0].metadata)  # metadata.build_metadata recomputes the keys that describe the layout
    else:
        meta["modelspec.merged_from"] = ", ".join(
            item.metadata.get("modelspec.title", item.spec.path.stem) for item in loras
        )
    meta["zturbo.merged_from"] = [item.describe() for item in loras]
    return meta


_KIND_NAMES = {"lokr": "LoKr", "loha": "LoHa", "diff": "full patches"}


def _ranks(loras: LoraDict) -> str:
    """`ranks 8, 16; 3 LoKr of rank 4; 2 full patches`: what the written file holds, by kind."""
    ranks = sorted({u.rank for u in loras.values() if isinstance(u, LoraWeights)})
    parts = ["ranks " + ", ".join(map(str, ranks))] if ranks else []
    for kind, name in _KIND_NAMES.items():
        group = [u for u in loras.values() if not isinstance(u, LoraWeights) and u.kind == kind]
        inner = sorted({u.rank for u in group if u.rank is not None})
        if group:
            parts.append(f"{len(group)} {name}" + (f" of rank {', '.join(map(str, inner))}" if inner else ""))
    return "; ".join(parts)
