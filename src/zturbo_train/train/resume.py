"""`--resume` with the config given now: what continues from where, what changed, what cannot change.

The saved run is described by its `config.json` (kept equal to what last ran). Settings that
shape the saved LoRA or optimizer state (FROZEN) are refused when they differ; everything else
(lr, steps, cadences, data, ...) may change, is listed when the run resumes, and is recorded:
`config.json` becomes the config that now runs and `config-history.jsonl` gets a row with the
step, the time and the differences, so the run folder still says how it was trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .. import __version__
from ..errors import LoraError, TrainingError
from ..fileio import append_line, write_json

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from .state import RunFolder

# Why each cannot change: the saved tensors have that shape, scale, base or optimizer layout.
FROZEN = {
    "model.path": "the LoRA was trained on that base",
    "model.adapter": "the LoRA was trained on that de-distilled base",
    "lora.type": "the saved LoRA and optimizer state are of that network",
    "lora.rank": "the saved LoRA and optimizer state have that shape",
    "lora.factor": "the saved LoKr factors have that shape",
    "lora.full_matrix": "the saved LoKr factors have that shape",
    "lora.decompose_both": "the saved LoKr factors have that shape",
    "lora.alpha": "it scales the saved LoRA",
    "lora.targets": "the saved LoRA adapts those layers",
    "lora.blocks": "the saved LoRA adapts those blocks",
    "train.optimizer": "the saved optimizer state is of that optimizer",
    "train.optimizer_args": "the saved optimizer state holds them",
    "train.loraplus_ratio": "the saved optimizer state has its parameter groups",
}
_ERRORS = {"lora": LoraError}  # by section; anything else is a TrainingError
_NOT_SETTINGS = {"zturbo_version"}


@dataclass(frozen=True)
class ResumePlan:
    """The state a run resumes from and how the config now differs from the one it was saved with."""

    state: Path
    step: int
    changes: dict[str, tuple[Any, Any]]

    def describe(self, run: "RunFolder", steps: int) -> list[str]:
        """`resuming at step 40 of 60 from state/step-000040`, then one line per changed setting."""
        lines = [f"resuming at step {self.step} of {steps} from {self.state.relative_to(run.root)}"]
        if self.changes:
            lines.append(
                "changed since the saved run (recorded in config-history.jsonl): "
                + ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in self.changes.items())
            )
        return lines


def plan_resume(run: "RunFolder", cfg: "Config", state: Path) -> ResumePlan:
    """Compare `cfg` with the saved run; refuse what cannot change and a step count it is already past."""
    step = int(json.loads((state / "state.json").read_text(encoding="utf-8"))["step"])
    if cfg.train.steps < step:
        raise TrainingError(
            f"the run in {run.root} is already at step {step}, past train.steps = {cfg.train.steps}; "
            f"set train.steps above {step} to train on (e.g. --set train.steps={2 * step}), "
            f"or start a new run with --overwrite or another train.output_dir"
        )
    changes = config_changes(saved_config(run, state), current_config(cfg))
    frozen = [key for key in changes if key in FROZEN]
    if frozen:
        error = _ERRORS.get(frozen[0].split(".")[0], TrainingError)
        was = ", ".join(f"{key} {_show(changes[key][0])}" for key in frozen)
        now = ", ".join(f"{key} = {_show(changes[key][1])}" for key in frozen)
        why = "; ".join(f"{key}: {FROZEN[key]}" for key in frozen)
        raise error(
            f"the run in {run.root} was trained with {was}; this config says {now}, which cannot change on "
            f"resume ({why}); resume with the same [lora] settings, model and optimizer, or start a new "
            f"run with --overwrite or another train.output_dir"
        )
    return ResumePlan(state, step, changes)


def record_resume(run: "RunFolder", cfg: "Config", plan: ResumePlan) -> None:
    """config.json becomes what now runs; the differences get a row in config-history.jsonl."""
    if not plan.changes:
        return
    append_line(
        run.config_history,
        json.dumps(
            {
                "step": plan.step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "zturbo_version": __version__,
                "changes": {key: {"from": old, "to": new} for key, (old, new) in plan.changes.items()},
            }
        ),
    )
    write_json(run.config, {"zturbo_version": __version__, **current_config(cfg)})


def current_config(cfg: "Config") -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def saved_config(run: "RunFolder", state: Path) -> dict[str, Any]:
    """The run's config.json; the one saved with the state where config.json is missing or unreadable."""
    for path, pick in ((run.config, lambda doc: doc), (state / "state.json", lambda doc: doc.get("config"))):
        try:
            found = pick(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and found:
            return found
    return {}


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, now)} for every setting that differs; [[data]] tables by index (data.0.dir)."""
    if not saved:
        return {}
    old, new = dict(_flatten(_effective(saved))), dict(_flatten(_effective(now)))
    keys = [k for k in dict.fromkeys([*new, *old]) if k not in _NOT_SETTINGS]
    return {key: (old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)}


# [lora] keys added after runs were saved, at the value those runs trained with (a LoRA).
_LORA_BEFORE = {"type": "lora", "factor": -1, "full_matrix": False, "decompose_both": False}


def _effective(doc: dict[str, Any]) -> dict[str, Any]:
    """lora.alpha unset means alpha = rank: compare the scale, not how it was written; keys a run saved before
    they existed compare as the value it trained with."""
    lora = doc.get("lora")
    if not isinstance(lora, dict):
        return doc
    lora = {**_LORA_BEFORE, **lora}
    if lora.get("alpha") is None and "rank" in lora:
        lora["alpha"] = float(lora["rank"])
    return {**doc, "lora": lora}


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif prefix == "data" and isinstance(value, list):
        for index, item in enumerate(value):
            yield from _flatten(item, f"data.{index}")
    else:
        yield prefix, value


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)
