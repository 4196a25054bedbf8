"""What a LoRA file is, what it holds, and which tools load it whole (`zturbo inspect`'s library part).

`SUPPORT` is the one table of which tool loads which key style (README shows it, a test
keeps the two equal). It was read from each tool's loading code (Dec 2026): ComfyUI
`comfy/lora.py` + `comfy/utils.py` `z_image_to_diffusers` + `comfy/weight_adapter/`,
diffusers `ZImageLoraLoaderMixin` (`_convert_non_diffusers_z_image_lora_to_diffusers`),
musubi-tuner `networks/lora.py` (`create_network_from_weights` reads `lora_down/lora_up`
keys only), ai-toolkit `toolkit/inference_lora.py` (`InferenceLoRA.load`, what its inference
engine applies) and, for a training start / resume, `toolkit/network_mixins.py` `load_weights`
(Z-Image's `convert_lora_weights_before_load`; `.alpha` dropped, only its own module names).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LoraError
from .formats import (
    KEY_PREFIXES,
    LoraDict,
    LoraWeights,
    diffusers_alphas,
    parse_state_dict,
    read_safetensors,
    require_finite,
    split_key,
)

TOOLS = ("ComfyUI", "diffusers", "musubi-tuner", "ai-toolkit")
# key style -> tool -> "fully ..." / "partly: why" / "no: why"
SUPPORT: dict[str, dict[str, str]] = {
    "comfyui": {
        "ComfyUI": "fully (v0.3.76+)",
        "diffusers": "fully",
        "musubi-tuner": "no: reads `lora_unet_` keys only (write --format musubi)",
        "ai-toolkit": "fully (its inference engine reads `.alpha`); as a training start / resume it drops `.alpha` "
        "(strength off by alpha/rank unless alpha = rank)",
    },
    "diffusers": {
        "ComfyUI": "fully (builds after v0.3.77 read `transformer.`)",
        "diffusers": "fully",
        "musubi-tuner": "no: reads `lora_unet_` keys only",
        "ai-toolkit": "fully (inference engine; also as a training start / resume)",
    },
    "musubi": {
        "ComfyUI": "partly: under `lora_unet_` it knows only its own fused names, so every attention weight is "
        "dropped (a console warning)",
        "diffusers": "fully",
        "musubi-tuner": "fully",
        "ai-toolkit": "fully in its inference engine (`lora_unet_` names matched with `_`); no as a training "
        "start / resume (every key dropped)",
    },
    "comfyui-native": {
        "ComfyUI": "fully (its own trainer and extract nodes write it)",
        "diffusers": "no: the fused `attention.qkv` is not split",
        "musubi-tuner": "no",
        "ai-toolkit": "partly: its inference engine leaves the fused `attention.qkv`, `attention.out`, "
        "`final_layer`, `x_embedder` unmatched (a status line counts them) and applies the rest",
    },
    "lycoris": {
        "ComfyUI": "fully (LoKr, LoHa)",
        "diffusers": "LoKr: fully from 0.42 under `diffusion_model.` + diffusers names (what `train` writes; ComfyUI's "
        "fused or `lycoris_` names are not converted); LoHa: no: refused (`hada_` keys left unconverted)",
        "musubi-tuner": "no",
        "ai-toolkit": "LoKr: fully (inference engine; it also trains LoKr); LoHa: no: `hada_` keys are not read "
        "(a LoHa-only file is refused: matched no modules)",
    },
    "diff": {
        "ComfyUI": "fully (`.diff` / `.diff_b` patches)",
        "diffusers": "no",
        "musubi-tuner": "no",
        "ai-toolkit": "fully for linear layers under diffusers names (inference engine); a 1-D `.diff` (norm "
        "weight) applies only with `lora_mode: merge`; ComfyUI's fused names stay unmatched",
    },
}
WRITTEN = ("comfyui", "diffusers", "musubi")  # the styles `--format` writes; the rest are read only
_COMFY_LEAVES = ("attention.qkv", "attention_qkv", "attention.out", "attention_out", "final_layer.", "final_layer_")


def support_table_markdown() -> str:
    """The README table: key style x tool."""
    lines = ["| key style | " + " | ".join(TOOLS) + " |", "|" + " --- |" * (len(TOOLS) + 1)]
    for style, tools in SUPPORT.items():
        label = f"`{style}`" + (
            " (written)"
            if style in WRITTEN
            else " (`train` writes it for LoKr / LoHa)"
            if style == "lycoris"
            else " (read)"
        )
        lines.append(f"| {label} | " + " | ".join(tools[t] for t in TOOLS) + " |")
    return "\n".join(lines)


def key_style(keys: list[str]) -> dict[str, Any]:
    """How a file names its keys: prefix, weight names, ComfyUI's own module names, update kinds."""
    names = {split_key(k)[0] for k in keys}
    parts = Counter(split_key(k)[1] for k in keys)
    prefixes = sorted({next((p for p in KEY_PREFIXES if n.startswith(p)), "") for n in names})
    comfy_names = any(leaf in n for n in names for leaf in _COMFY_LEAVES)
    pair = (
        "lora_down/lora_up"
        if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)
        else "lora_A/lora_B"
        if parts["down"]
        else None
    )
    lycoris = any(p.startswith(("lokr_", "hada_")) for p in parts)
    if lycoris:
        name = "lycoris"
    elif parts["diff"] and not parts["down"]:
        name = "diff"
    elif comfy_names:
        name = "comfyui-native"
    elif prefixes == ["lora_unet_"]:
        name = "musubi"
    elif prefixes == ["transformer."]:
        name = "diffusers"
    elif prefixes == ["diffusion_model."]:
        name = "comfyui"
    else:
        name = "other"
    return {
        "name": name,
        "prefixes": prefixes,
        "pair_names": pair,
        "comfyui_names": comfy_names,
        "alpha_keys": parts["alpha"] > 0,
        "bias_patches": parts["diff_b"],
    }


def _network(meta: dict[str, str], loras: LoraDict) -> str:
    """The network type: LyCORIS' `ss_network_args` (algo and options) when the writer recorded them, else the
    kinds of update the file holds."""
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    kinds = sorted({u.kind for u in loras.values()})
    if not isinstance(args, dict) or "algo" not in args:
        return ", ".join(kinds)
    options = ", ".join(f"{k} {v}" for k, v in args.items() if k != "algo")
    return f"{args['algo']}" + (f" ({options})" if options else "")


def _count_by(modules: list[str], part: int) -> dict[str, int]:
    """Modules per block stack (part 0) or per target leaf (part 2)."""
    counts: Counter = Counter()
    for module in modules:
        pieces = module.split(".", 2)
        counts[pieces[part] if len(pieces) == 3 and pieces[1].isdigit() else "other"] += 1
    return dict(sorted(counts.items()))


def _training_facts(meta: dict[str, str]) -> dict[str, Any]:
    """Base, trigger and training record from whichever keys the writer used (ours, kohya's, modelspec)."""

    def first(*keys: str) -> Any:
        for key in keys:
            if meta.get(key) not in (None, "", "None"):
                value = meta[key]
                try:
                    return json.loads(value)
                except ValueError:
                    return value
        return None

    trigger = first("modelspec.trigger_phrase", "zturbo.trigger_word")
    if trigger is None and meta.get("ss_tag_frequency"):
        try:
            tags = Counter()
            for counts in json.loads(meta["ss_tag_frequency"]).values():
                tags.update(counts)
            trigger = tags.most_common(1)[0][0] if tags else None
        except (ValueError, AttributeError, TypeError):
            trigger = None
    return {
        "base": first("ss_base_model_version", "modelspec.architecture", "zturbo.base_model"),
        "title": first("modelspec.title", "ss_output_name"),
        "trigger": trigger,
        "steps": first("ss_steps", "zturbo.steps"),
        "epochs": first("ss_epoch", "zturbo.epochs"),
        "resolution": first("modelspec.resolution", "ss_resolution", "zturbo.resolution"),
        "started_at": first("ss_training_started_at", "zturbo.started_at"),
        "date": first("modelspec.date"),
        "writer": first("zturbo.writer", "software", "ss_network_module"),
        "hash": first("sshs_model_hash"),
    }


def describe_file(path: str | Path) -> tuple[dict[str, Any], LoraDict]:
    """Everything `zturbo inspect` shows for one file, as plain data (the CLI prints it or dumps JSON),
    and the updates it holds (for a fit check)."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if not tensors:
        raise LoraError(f"{path} holds no tensors; it is not a LoRA")
    require_finite(tensors, str(path))  # as sample and merge would refuse it: say so here, naming the tensor
    loras = parse_state_dict(tensors, diffusers_alphas(meta, tensors), source=str(path))
    ranked = [u for u in loras.values() if isinstance(u, LoraWeights) or u.rank is not None]
    style = key_style(list(tensors))
    report = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "tensors": len(tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "style": style,
        "modules": len(loras),
        "kinds": dict(Counter(u.kind for u in loras.values())),
        "by_block": _count_by(sorted(loras), 0),
        "by_target": _count_by(sorted(loras), 2),
        "network": _network(meta, loras),
        "ranks": sorted({u.rank for u in ranked}),
        "alphas": sorted({float(u.alpha if u.alpha is not None else u.rank) for u in ranked}),
        "scales": sorted({round(u.scale, 6) for u in loras.values()}),
        "metadata": _training_facts(meta),
        "tools": SUPPORT.get(style["name"], {t: "not checked" for t in TOOLS}),
    }
    return report, loras


def render(report: dict[str, Any]) -> list[str]:
    """Human lines for one report."""
    s, m = report["style"], report["metadata"]
    lines = [
        f"{report['file']}: {report['size_bytes'] / 2**20:.2f} MiB, {report['tensors']} tensors, "
        f"{', '.join(report['dtypes'])}",
        f"  key style: {s['name']} (prefix {', '.join(p or '(none)' for p in s['prefixes'])}; "
        f"{s['pair_names'] or 'no LoRA pairs'}; alpha keys {'yes' if s['alpha_keys'] else 'no'}"
        f"{'; ComfyUI fused names' if s['comfyui_names'] else ''})",
        f"  network: {report['network']}",
        f"  modules: {report['modules']} ({', '.join(f'{k} {v}' for k, v in report['kinds'].items())}); "
        f"by block: {_pairs(report['by_block'])}; by target: {_pairs(report['by_target'])}",
        f"  rank {_list(report['ranks'])}, alpha {_list(report['alphas'])}, effective scale {_list(report['scales'])}",
        f"  base {m['base'] or '?'}, trigger {m['trigger'] or '-'}, title {m['title'] or '-'}, "
        f"steps {m['steps'] or '?'}, resolution {m['resolution'] or '?'}, date {m['date'] or '?'}",
    ]
    lines += [f"  {tool}: {how}" for tool, how in report["tools"].items()]
    if "fit" in report:
        fit = report["fit"]
        lines.append(
            f"  fits {fit['model']}: "
            + (
                "yes"
                if fit["fits"]
                else f"no; would skip {', '.join(fit['skipped_keys'][:6]) or 'nothing'}"
                + (f"; shape mismatches: {'; '.join(fit['misfit'][:3])}" if fit["misfit"] else "")
            )
        )
    return lines


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _list(values: list) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "-"
