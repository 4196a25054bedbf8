"""TensorBoard and Weights & Biases: scalars, preview images and the config of a run.

Each logger takes plain values (a step, a dict of floats, image files) from the monitor's
thread. Neither gets a token from us: W&B finds its own login (`wandb login`, WANDB_API_KEY)
and honours its own WANDB_MODE; without a login and not offline it is refused up front,
never prompted for from a background thread.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from ..fileio import write_json

TENSORBOARD_DIR = "tensorboard"
WANDB_FILE = "wandb.json"  # the W&B run id, so a resumed run logs into the same W&B run
_NO_LOGIN_MODES = {"offline", "dryrun", "disabled"}


class Logger(Protocol):
    name: str

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def images(self, step: int, images: list[tuple[str, Path, str]]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in <run>/tensorboard; a resumed run purges what the old session logged past its state."""

    name = "tensorboard"

    def __init__(self, root: Path, config: dict[str, Any], hparams: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparam_summaries

        purge = None if resume_step is None else resume_step + 1
        # events reach the disk within seconds (TensorBoard's default is two minutes), and at close
        self.writer = SummaryWriter(log_dir=str(root / TENSORBOARD_DIR), purge_step=purge, flush_secs=5)
        # each session records the config it ran with, at the step it started from
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", resume_step or 0)
        for summary in hparam_summaries(hparams, {}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, step: int, images: list[tuple[str, Path, str]]) -> None:
        import numpy as np
        from PIL import Image

        for tag, path, _ in images:
            with Image.open(path) as image:
                self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run folder. Its id and the last step sent are kept in <run>/wandb.json: a resumed run
    logs into the same W&B run and skips the steps W&B already has (a resume recomputes them bit for bit)."""

    name = "wandb"

    def __init__(self, root: Path, log: Any, name: str, config: dict[str, Any], resume: bool, quiet: bool = False):
        import wandb

        mode = wandb.setup().settings.mode  # WANDB_MODE, or what `wandb offline` wrote
        if mode not in _NO_LOGIN_MODES and not wandb.login(prompt=False, verify=False):
            raise RuntimeError(
                "no W&B login found; run `wandb login` (or set WANDB_API_KEY), "
                "or set WANDB_MODE=offline and `wandb sync` later"
            )
        self.file = root / WANDB_FILE
        stored = _read(self.file) if resume else {}
        if not isinstance(stored.get("id"), str):
            stored = {"id": secrets.token_hex(4), "step": -1}  # W&B ids are [a-z0-9]
        self.state = {"id": stored["id"], "project": log.project, "step": int(stored.get("step", -1))}
        self.floor = self.state["step"]  # what W&B has from the sessions before this one
        write_json(self.file, self.state)
        self.wandb = wandb
        self.run = wandb.init(
            project=log.project,
            entity=log.entity,
            name=log.run_name or name,
            id=stored["id"],
            resume="allow",
            config=config,
            dir=None if os.environ.get("WANDB_DIR") else str(root),
            settings=wandb.Settings(silent=True) if quiet else None,  # `train --quiet`: no W&B banner either
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._log(step, values)

    def images(self, step: int, images: list[tuple[str, Path, str]]) -> None:
        self._log(step, {tag: self.wandb.Image(str(path), caption=caption) for tag, path, caption in images})

    def _log(self, step: int, values: dict[str, Any]) -> None:
        if step > self.floor:
            self.run.log(values, step=step)
            if step > self.state["step"]:
                self.state["step"] = step
                write_json(self.file, self.state)

    def close(self) -> None:
        self.run.finish()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
