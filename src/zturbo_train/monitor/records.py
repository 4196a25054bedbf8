"""What a run folder holds, read back without torch: metric rows, preview steps, the resolved config.

The loggers, the plots and the report all read the run folder rather than the training
loop's objects, so what they show is what is on disk, and `zturbo report` works on any
run folder (finished, stopped or still training).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# what the progress bar, the end-of-run summary, the report and loss.png call metrics.jsonl's loss_smooth and loss
LOSS_LABEL = "loss (smoothed)"
LAST_LOSS_LABEL = "last step loss"
HISTORY = "config-history.jsonl"  # written by train/resume.py at a resume that changed settings
AXES = ("step", "time")  # the x axis and the wall clock of a row: carried by the loggers, not logged as values
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """Every finite number of a metrics row but its axes, whatever its key (val_loss, turbo_drift ...)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key not in AXES and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def parse_rows(text: str) -> list[dict[str, Any]]:
    """Rows of complete JSON lines; a torn or foreign line (a crash mid-write) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return parse_rows(path.read_text(encoding="utf-8")) if path.is_file() else []


def read_history(root: Path) -> list[dict[str, Any]]:
    """config-history.jsonl: one row per resume that changed a setting ({"step", "changes": {key: {from, to}}})."""
    return [row for row in read_metrics(root / HISTORY) if isinstance(row.get("changes"), dict)]


class MetricsTail:
    """Reads the lines appended to metrics.jsonl since the last call (only whole lines)."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = path, offset

    def new_rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        return parse_rows(whole.decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class Preview:
    """One preview step on disk: the image of each prompt, in prompt order."""

    step: int
    images: tuple[Path, ...]


def previews(samples: Path) -> list[Preview]:
    """Complete preview steps, oldest first (a step is complete once its grid, written last, exists)."""
    found = []
    for folder in samples.glob("step-*") if samples.is_dir() else ():
        match = _STEP_FOLDER.match(folder.name)
        if match and folder.is_dir() and (samples / f"{folder.name}-grid.png").is_file():
            found.append(Preview(int(match.group(1)), tuple(sorted(folder.glob("[0-9][0-9].png")))))
    return sorted(found, key=lambda p: p.step)


def read_config(root: Path) -> dict[str, Any]:
    """The resolved config the run wrote (config.json); empty when there is none yet."""
    path = root / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """`section.key` -> value, lists and tables as text: what hyper-parameter tables take."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        elif value is not None:
            out[name] = json.dumps(value)
    return out
