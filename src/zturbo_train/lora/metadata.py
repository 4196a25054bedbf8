"""The header every LoRA we write carries: what LoRA managers, galleries and trainers read.

One function, `build_metadata`, used by formats.write_lora_file for the final LoRA, every
checkpoint and `merge --to-lora`. Conventions, looked up rather than guessed:
- `ss_*`: kohya's sd-scripts / musubi-tuner training keys (`ss_network_dim` ... `ss_tag_frequency`,
  a JSON `{dataset: {tag: count}}`); `ss_base_model_version` as ai-toolkit writes it for Z-Image.
- `sshs_model_hash` / `sshs_legacy_hash`: sd-scripts' `precalculate_safetensors_hashes`: the file
  is serialised with its tensors and only its `ss_*` keys; the model hash is the sha256 of the
  bytes after the header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at
  offset 1 MiB (of nothing, for files smaller than that).
- `modelspec.*`: Stability's ModelSpec 1.0.0 as musubi-tuner writes it for Z-Image
  (`Z-Image/lora`, implementation the Z-Image repo, resolution `WxH`, ISO-8601 date).
- `zturbo.*`: our own facts, kept as before (values JSON where not text).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Mapping

import torch

FORMAT_VERSION = "2"  # zturbo.format_version: 2 = musubi style name, diffusers alpha baked, ecosystem keys
BASE_MODEL_VERSION = "zimage"  # ss_base_model_version, as ai-toolkit writes it for Z-Image (Turbo)
ARCHITECTURE = "Z-Image/lora"  # modelspec.architecture, as musubi-tuner writes it
IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"
SAI_MODEL_SPEC = "1.0.0"
NETWORK_MODULE = "networks.lora"
LYCORIS_MODULE = "lycoris.kohya"
LYCORIS_KINDS = ("lokr", "loha")
_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000
# Keys that describe a file's own layout: never carried over from a source file.
OWN_KEYS = (
    "format",
    "zturbo.style",
    "zturbo.format_version",
    "lora_adapter_metadata",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_module",
    "ss_network_args",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.sai_model_spec",
)


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as sd-scripts' `precalculate_safetensors_hashes`."""
    from safetensors.torch import save

    data = save(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        {k: v for k, v in metadata.items() if k.startswith("ss_")},
    )
    header_end = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_SIZE]).hexdigest()[:8]
    return model_hash, legacy_hash


def _fact(facts: Mapping[str, object], name: str) -> object:
    """A fact given plainly (`steps`) or carried over as `zturbo.steps` text."""
    value = facts.get(name, facts.get(f"zturbo.{name}"))
    if isinstance(value, str) and f"zturbo.{name}" in facts and name not in facts:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _resolution(value: object) -> tuple[int, int] | None:
    """A resolution fact (512, [512, 768], "1024") -> (w, h) of the largest side given."""
    if value is None or value == []:
        return None
    sides = value if isinstance(value, (list, tuple)) else [value]
    side = max(int(s) for s in sides)
    return side, side


def _common(values: list[float]) -> float | None:
    return max(set(values), key=values.count) if values else None


def _network(loras, style: str, facts: Mapping[str, object]) -> tuple[str | None, str | None]:
    """(ss_network_dim, ss_network_alpha) as written: the most common rank and alpha (alpha = rank once baked).

    LoKr / LoHa: their factored rank and alpha; a LoKr with both sides whole has none, so the trained
    `lora.rank` / `lora.alpha` facts are written, as LyCORIS' kohya network writes its network_dim."""
    pairs = [u for u in loras.values() if u.kind == "lora"]
    rank = _common([u.rank for u in pairs])
    alpha = _common([float(u.rank if style == "diffusers" or u.alpha is None else u.alpha) for u in pairs])
    if not pairs:
        factored = [u for u in loras.values() if u.kind in LYCORIS_KINDS and u.rank is not None]
        rank = _common([u.rank for u in factored]) or _fact(facts, "rank")
        alpha = _common([float(u.alpha) for u in factored if u.alpha is not None]) or _fact(facts, "alpha")
    return (None if rank is None else str(rank)), (None if alpha is None else f"{float(alpha):g}")


def _network_module(loras) -> str:
    """`lycoris.kohya` for a file with LoKr / LoHa modules (as LyCORIS' kohya network writes it), else kohya's."""
    return LYCORIS_MODULE if any(u.kind in LYCORIS_KINDS for u in loras.values()) else NETWORK_MODULE


def build_metadata(
    loras, tensors: dict[str, torch.Tensor], style: str, facts: Mapping[str, object], name: str
) -> dict[str, str]:
    """The whole header of a LoRA file, from what the caller knows.

    `facts`: plain keys (`name`, `trigger_word`, `steps`, `epochs`, `resolution`, `started_at`
    (unix seconds), `base_model`, ...) become `zturbo.<key>` and feed the ecosystem keys; keys
    with a dot or an `ss_` prefix are carried over from a source file (its own layout keys are
    recomputed). Unknown facts are left out rather than invented.
    """
    from .. import __version__

    header = {k: _text(v) for k, v in facts.items() if ("." in k or k.startswith("ss")) and k not in OWN_KEYS}
    header.update({f"zturbo.{k}": _text(v) for k, v in facts.items() if "." not in k and not k.startswith("ss")})
    header.update(
        {
            "format": "pt",
            "zturbo.format_version": FORMAT_VERSION,
            "zturbo.style": style,
            "zturbo.writer": f"zturbo-train {__version__}",
        }
    )
    title = str(_fact(facts, "name") or name)
    trigger = _fact(facts, "trigger_word")
    started = _fact(facts, "started_at")
    resolution = _resolution(_fact(facts, "resolution"))
    dim, alpha = _network(loras, style, facts)
    args = _fact(facts, "network_args")
    ecosystem = {
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": _network_module(loras),
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args) if args and _network_module(loras) == LYCORIS_MODULE else None,
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps({title: {trigger: 1}}) if trigger else None,
        "ss_training_started_at": None if started is None else str(started),
        "ss_steps": _opt(_fact(facts, "steps")),
        "ss_epoch": _opt(_fact(facts, "epochs")),
        "ss_resolution": None if resolution is None else str(resolution),
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.trigger_phrase": trigger or None,
        "modelspec.resolution": None if resolution is None else f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": _date(started),
    }
    header.update({k: v for k, v in ecosystem.items() if v is not None and not (k in header and _carried(k))})
    header["sshs_model_hash"], header["sshs_legacy_hash"] = addnet_hashes(tensors, header)
    return header


def _carried(key: str) -> bool:
    """Source facts a merge keeps over ours: the tag counts and training record of the original run."""
    return key in ("ss_tag_frequency", "ss_training_started_at", "ss_steps", "ss_epoch", "ss_resolution")


def _date(started: object) -> str:
    """ISO-8601 date of the run's start when known, else of now (the file's creation), to the second."""
    when = datetime.datetime.fromtimestamp(float(started)) if started is not None else datetime.datetime.now()
    return when.replace(microsecond=0).isoformat()


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)
