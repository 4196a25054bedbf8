"""`zturbo merge --ema RUN --to-lora FILE`: a post-hoc EMA over the LoRAs a run saved, in step order.

The run's checkpoints (`checkpoints/<name>-stepN.safetensors`) and its final file, at steps
s_1 < ... < s_n, stand for the trained weights from the save before up to theirs: the EMA with
decay b per step of that piecewise-constant path, started from the first file, is

    ema = b^(s_n - s_1) w_1 + sum_{i >= 2} (b^(s_n - s_i) - b^(s_n - s_{i-1})) w_i,

weights that add up to 1 (the same as folding the files in one by one with ema <- lerp(ema, w_i,
1 - b^(s_i - s_{i-1}))). Like train.ema it averages the trained factors (a LoRA's down and up, a LoKr's
or LoHa's factor tensors), so the file has the run's network and rank. A run trained with train.ema saved
its trained weights as `<name>-raw`: those are averaged, never the EMA files. Only the checkpoints
`train.keep_last` kept are there to average.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError, LoraError
from ..fileio import safetensors_header
from ..lora.deltas import DeltaWeights
from ..lora.files import LoadedLora, LoraSpec, read_loras
from ..lora.formats import LoraDict, LoraWeights, resolve_style, write_lora_file
from ..models import torch_dtype
from ..preflight import ema_decay
from .merge import check_output

Log = Callable[[str], None]
_STEP = re.compile(r"-step(\d+)\.safetensors$")


def _quiet(message: str) -> None:
    """Default log: say nothing (the CLI passes its console)."""


@dataclass(frozen=True)
class Saved:
    """One LoRA file of a run and the step it was saved at."""

    path: Path
    step: int


def ema_weights(steps: Sequence[int], decay: float) -> list[float]:
    """Each file's weight in the EMA at the last step (see the module docstring); they add up to 1."""
    last = steps[-1]
    kept = [decay ** (last - step) for step in steps]  # the share of the average from each save on
    return [kept[0], *(kept[i] - kept[i - 1] for i in range(1, len(steps)))]


def saved_loras(run: Path) -> list[Saved]:
    """The run's LoRA files in step order: checkpoints, then the final file (its step from its header)."""
    config = run / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"--ema {run} is not a zturbo run folder (no config.json); pass the train.output_dir of a run"
        )
    train = json.loads(config.read_text(encoding="utf-8")).get("train", {})
    name = str(train.get("name", "lora")) + ("-raw" if train.get("ema") else "")
    found = {
        int(m.group(1)): p
        for p in (run / "checkpoints").glob(f"{name}-step*.safetensors")
        if (m := _STEP.search(p.name))
    }
    final = run / f"{name}.safetensors"
    if final.is_file():
        step = safetensors_header(final)[1].get("__metadata__", {}).get("zturbo.steps")
        if step is None:
            raise LoraError(f"{final} does not say its step (no zturbo.steps in its header); it is not a zturbo run's")
        found.setdefault(int(step), final)
    saved = [Saved(found[step], step) for step in sorted(found)]
    if len(saved) < 2:
        raise ConfigError(
            f"a post-hoc EMA needs at least two saved LoRAs; {run} has {len(saved)} of `{name}` (train.save_every "
            f"saves one every N steps, train.keep_last keeps the last N); train with more saves"
        )
    return saved


def average(loras: Sequence[LoadedLora], weights: Sequence[float]) -> LoraDict:
    """The weighted sum of the LoRAs' factors, module by module, in fp32; the files must match in layout."""
    out: LoraDict = {}
    for module in loras[0].weights:
        parts = [item.weights.get(module) for item in loras]
        if any(p is None for p in parts):
            raise LoraError(f"{module} is missing from some of the run's files; they are not of one run")
        out[module] = _average_module(module, parts, weights, loras)
    extra = {m for item in loras for m in item.weights} - set(out)
    if extra:
        raise LoraError(
            f"{sorted(extra)[0]} is in some of the run's files and not in the first; they are not of one run"
        )
    return out


def _average_module(module: str, parts: list, weights: Sequence[float], loras: Sequence[LoadedLora]):
    """One module's factors averaged: a LoRA's down and up, or a LoKr's / LoHa's factor tensors (as train.ema
    averages the trained parameters of either network)."""
    if all(isinstance(p, LoraWeights) for p in parts):
        if len({(p.down.shape, p.up.shape, p.alpha, p.bias is None) for p in parts}) != 1:
            raise LoraError(f"{module}: the run's files differ in rank, alpha or layout; they are not of one run")
        down = sum(w * p.down.float() for w, p in zip(weights, parts))
        up = sum(w * p.up.float() for w, p in zip(weights, parts))
        bias = None if parts[0].bias is None else sum(w * p.bias.float() for w, p in zip(weights, parts))
        return LoraWeights(down, up, parts[0].alpha, bias)
    if all(isinstance(p, DeltaWeights) and p.kind in ("lokr", "loha") and p.rows is None for p in parts):
        layouts = {
            (p.kind, p.alpha, p.bias is None, tuple((k, tuple(t.shape)) for k, t in sorted(p.tensors.items())))
            for p in parts
        }
        if len(layouts) != 1:
            raise LoraError(f"{module}: the run's files differ in network, rank or layout; they are not of one run")
        tensors = {k: sum(w * p.tensors[k].float() for w, p in zip(weights, parts)) for k in parts[0].tensors}
        bias = None if parts[0].bias is None else sum(w * p.bias.float() for w, p in zip(weights, parts))
        return DeltaWeights(parts[0].kind, tensors, parts[0].alpha, None, bias, parts[0].source)
    raise LoraError(
        f"{module}: a post-hoc EMA averages the factors of a LoRA, LoKr or LoHa run; a file holds another kind of "
        f"update there ({', '.join(str(i.spec.path.name) for i in loras)})"
    )


def post_hoc_ema(
    run: Path,
    out: Path,
    decay: float | None = None,
    half_life: float | None = None,
    style: str = "comfyui",
    dtype: str | None = None,
    overwrite: bool = False,
    log: Log = _quiet,
) -> Path:
    """Write the EMA of the run's saved LoRAs as one LoRA file (atomically); returns its path."""
    beta = ema_decay(decay, half_life)
    style = resolve_style(style)
    saved = saved_loras(run)
    check_output(out, overwrite, [run], kind="file")
    loras = read_loras([LoraSpec(item.path, 1.0) for item in saved])
    weights = ema_weights([item.step for item in saved], beta)
    steps = [item.step for item in saved]
    metadata: dict[str, object] = dict(loras[-1].metadata)  # the last file's facts (trigger word, base model ...)
    metadata.update(
        {
            "zturbo.weights": f"post-hoc EMA (decay {beta:.6g} per step) of the LoRAs saved at steps "
            + ", ".join(map(str, steps)),
            "zturbo.post_hoc_ema": {
                "decay": beta,
                "half_life_steps": half_life if half_life is not None else _half_life(beta),
                "steps": steps,
                "weights": weights,
            },
            "zturbo.merged_from": [item.describe() for item in loras],
        }
    )
    result = average(loras, weights)
    write_lora_file(out, result, style=style, metadata=metadata, dtype=torch_dtype(dtype) if dtype else torch.float32)
    log(
        f"wrote {out}: EMA (decay {beta:.6g}, half-life {_half_life(beta):.4g} steps) of {len(saved)} LoRAs "
        f"at steps {', '.join(map(str, steps))}, weights {', '.join(f'{w:.3g}' for w in weights)}"
    )
    return out


def _half_life(decay: float) -> float:
    return math.log(0.5) / math.log(decay)
