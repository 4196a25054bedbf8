"""The run folder and training state: atomic saves, resume, keep-last-N.

A run folder describes itself: `config.json` (the resolved config), `metrics.jsonl`,
the final `<name>.safetensors`, `checkpoints/` (intermediate LoRAs), `state/` (what
resume needs) and `samples/` (previews). State is safetensors for tensors (LoRA,
optimizer moments, RNG states) plus JSON for the rest: never pickle, so a state file
from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..fileio import save_safetensors, write_json

STATE_VERSION = 1


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def states(self) -> Path:
        return self.root / "state"

    def lora(self, name: str, step: int | None = None) -> Path:
        return self.root / f"{name}.safetensors" if step is None else self.checkpoints / f"{name}-step{step:06d}.safetensors"

    def holds_run(self) -> bool:
        return self.config.exists() or self.states.exists() or self.metrics.exists()


def open_run_folder(root: Path, resume: bool, overwrite: bool, name: str) -> RunFolder:
    """Refuse to mix two runs in one folder unless the user said to resume or overwrite."""
    run = RunFolder(Path(root))
    if run.root.exists() and not run.root.is_dir():
        raise TrainingError(f"train.output_dir {run.root} is a file; set it to a folder")
    if run.holds_run() and not (resume or overwrite):
        if latest_state(run) is None:
            raise TrainingError(f"output folder {run.root} holds an earlier run that saved no training state; "
                                f"pass --overwrite to replace it, or set train.output_dir to a new folder")
        raise TrainingError(f"output folder {run.root} holds another run; pass --resume to continue it, "
                            f"--overwrite to replace it, or set train.output_dir to a new folder")
    if resume and latest_state(run) is None:
        raise TrainingError(f"nothing to resume in {run.root}: it has no saved training state; "
                            f"drop --resume to start a new run (with --overwrite if the folder holds files of one)")
    if overwrite and not resume:
        for path in (run.config, run.metrics, run.lora(name)):
            path.unlink(missing_ok=True)
        for folder in (run.samples, run.checkpoints, run.states):
            shutil.rmtree(folder, ignore_errors=True)
    run.root.mkdir(parents=True, exist_ok=True)
    return run


# ------------------------------------------------------------------------------ state


def latest_state(run: RunFolder) -> Path | None:
    """The newest complete state folder (incomplete ones are never renamed into place)."""
    if not run.states.is_dir():
        return None
    done = sorted(p for p in run.states.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_state(run: RunFolder, step: int, lora: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               rng: dict[str, Any], extra: dict[str, Any], keep_last: int) -> Path:
    """Write state/step-N atomically (temp folder, then rename), then prune to the last `keep_last`."""
    target = run.states / f"step-{step:06d}"
    tmp = run.states / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update({f"lora.{k}": v for k, v in lora.items()})
    rng_tensors, rng_meta = _split_rng(rng)
    tensors.update(rng_tensors)
    save_safetensors(tmp / "state.safetensors", {k: v.cpu() for k, v in tensors.items()})
    write_json(tmp / "state.json", {"version": STATE_VERSION, "step": step, "optimizer": optim_meta,
                                    "rng": rng_meta, **extra})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    prune(run.states, "step-*", keep_last)
    return target


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a saved state, checked for version."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("version") != STATE_VERSION:
        raise TrainingError(f"{path} was saved by another version of zturbo-train (state v{meta.get('version')}); "
                            f"start a new run or use the matching version to resume")
    return load_file(str(path / "state.safetensors")), meta


def lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))


def prune(folder: Path, pattern: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` entries matching `pattern` (names sort by step)."""
    entries = sorted(folder.glob(pattern))
    for old in entries[:-keep_last] if keep_last > 0 else entries:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# ------------------------------------------------------------------------------ optimizer


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> safetensors-able tensors plus a JSON part.

    Nested dicts (bitsandbytes keeps its moments under `__bnb_optimizer_quant_state__`)
    are flattened with `/` between the keys, so their tensors are saved as tensors too."""
    tensors, scalars = {}, {}

    def walk(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}/", value)
            elif torch.is_tensor(value):
                tensors[f"optim.{prefix}{key}"] = value.detach().clone()
            else:
                scalars[f"{prefix}{key}"] = value

    for index, values in state["state"].items():
        walk(f"{index}.", values)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}

    def put(key: str, value: Any) -> None:
        index, name = key.split(".", 1)
        *outer, leaf = name.split("/")
        target = state.setdefault(int(index), {})
        for part in outer:
            target = target.setdefault(part, {})
        target[leaf] = value

    for key, value in tensors.items():
        if key.startswith("optim."):
            put(key.removeprefix("optim."), value)
    for key, value in meta["scalars"].items():
        put(key, value)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------ RNG


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a training step draws from."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "train": generator.get_state(),
                           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(generator: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.train"])
    version, internal, gauss = meta["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _split_rng(rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": rng["torch"], "rng.train": rng["train"]}
    for index, state in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{index}"] = state
    return tensors, {"python": rng["python"]}
