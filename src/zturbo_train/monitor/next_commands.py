"""The run's config as TOML (`run.toml`) and the exact commands that go on from a run folder.

`run.toml` is the resolved config of the latest session of the run (absolute paths), so
`zturbo train RUN/run.toml --resume` continues the run from anywhere, whatever config file
and --set started it.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

RUN_TOML = "run.toml"


def to_toml(config: dict[str, Any]) -> str:
    """A config dict (`cfg.model_dump(mode="json")`) as TOML: tables, [[data]] arrays, no None values."""
    lines: list[str] = []
    for section, table in config.items():
        if isinstance(table, dict):
            lines += [f"[{section}]", *_pairs(table), ""]
        elif isinstance(table, list) and all(isinstance(t, dict) for t in table):
            for item in table:
                lines += [f"[[{section}]]", *_pairs(item), ""]
    return "\n".join(lines)


def _pairs(table: dict[str, Any]) -> list[str]:
    return [f"{key} = {_value(value)}" for key, value in table.items() if value is not None]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)  # ints, floats and JSON strings (with \uXXXX escapes) are valid TOML


def newest_lora(root: Path, name: str) -> Path | None:
    """The final LoRA, else the newest step checkpoint, else None."""
    final = root / f"{name}.safetensors"
    if final.is_file():
        return final
    steps = sorted((root / "checkpoints").glob(f"{name}-step*.safetensors"))
    return steps[-1] if steps else None


def commands(root: Path, config: dict[str, Any]) -> dict[str, str]:
    """What to run next: resume (a finished run: train on), sample and merge with the newest LoRA."""
    train, sample, model = config.get("train", {}), config.get("sample", {}), config.get("model", {})
    lora = newest_lora(root, str(train.get("name", "lora")))
    again = ["zturbo", "train", str(root / RUN_TOML), "--resume"]
    finished = lora is not None and lora.parent == root  # the final LoRA is written by a finished run only
    longer = f"train.steps={2 * int(train.get('steps', 0))}"
    out = (
        {"train on to twice the steps": shlex.join([*again, "--set", longer])}
        if finished
        else {"resume": shlex.join(again)}
    )
    if lora is not None:
        prompt = (sample.get("prompts") or ["a photo"])[0]
        out["sample"] = shlex.join(
            [
                "zturbo",
                "sample",
                "--model",
                str(model.get("path")),
                "--lora",
                str(lora),
                "--prompt",
                prompt,
                "--width",
                str(sample.get("width", 1024)),
                "--height",
                str(sample.get("height", 1024)),
                "--steps",
                str(sample.get("steps", 8)),
                "--seed",
                str(sample.get("seed", 42)),
            ]
        )
        out["merge"] = shlex.join(
            ["zturbo", "merge", "--model", str(model.get("path")), "--lora", str(lora), "--out", str(root / "merged")]
        )
    return out
