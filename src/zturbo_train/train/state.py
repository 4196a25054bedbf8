"""The run folder and training state: atomic saves, resume, keep-last-N.

A run folder describes itself: `config.json` (the resolved config), `metrics.jsonl`,
the final `<name>.safetensors`, `checkpoints/` (intermediate LoRAs), `state/` (what
resume needs) and `samples/` (previews). State is safetensors for tensors (LoRA,
optimizer moments, RNG states) plus JSON for the rest: never pickle, so a state file
from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LoraError, TrainingError
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
    def config_history(self) -> Path:
        return self.root / "config-history.jsonl"

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
        return (
            self.root / f"{name}.safetensors"
            if step is None
            else self.checkpoints / f"{name}-step{step:06d}.safetensors"
        )

    def holds_run(self) -> bool:
        return self.config.exists() or self.states.exists() or self.metrics.exists()


class RunLock:
    """One live `zturbo train` per run folder: an OS lock (fcntl.flock) on `<run>/.zturbo-train.lock`.

    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a
    crashed run never leaves the folder stuck; the file names the holder (pid, host) for the error.
    """

    NAME = ".zturbo-train.lock"

    def __init__(self) -> None:
        self._handle: Any = None

    def acquire(self, root: Path) -> None:
        import fcntl

        handle = open(root / self.NAME, "a+", encoding="utf-8")  # never truncated before we hold it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise TrainingError(
                f"train.output_dir {root} is in use by another `zturbo train` ({holder}); wait for "
                f"it to finish or stop it, or set train.output_dir to another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle.flush()
        self._handle = handle

    @classmethod
    def is_held(cls, root: Path) -> bool:
        """Whether a live `zturbo train` holds `root` now: a shared, non-blocking probe of the same lock.

        A shared probe conflicts only with the trainer's exclusive lock and is dropped at once; it
        never creates the file, so a folder that never trained stays untouched.
        """
        import fcntl

        try:
            handle = open(root / cls.NAME, encoding="utf-8")
        except OSError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def release(self) -> None:
        if self._handle is not None:
            self._handle.truncate(0)  # before unlocking, so a new holder's line is never cut
            self._handle.close()  # closing drops the flock
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on host {holder['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "a process that is just starting"


def open_run_folder(root: Path, resume: bool, overwrite: bool, name: str, lock: RunLock | None = None) -> RunFolder:
    """Refuse to mix two runs in one folder unless the user said to resume or overwrite.

    With `lock`, the folder is locked first (for as long as the lock is held), so the checks, the
    clearing of `--overwrite` and the removal of temp files a killed save left cannot race another run."""
    run = RunFolder(Path(root))
    if run.root.exists() and not run.root.is_dir():
        raise TrainingError(f"train.output_dir {run.root} is a file; set it to a folder")
    if resume and not run.root.is_dir():
        raise TrainingError(f"nothing to resume: {run.root} does not exist; drop --resume to start a new run")
    run.root.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire(run.root)
    if run.holds_run() and not (resume or overwrite):
        if latest_state(run) is None:
            raise TrainingError(
                f"output folder {run.root} holds an earlier run that saved no training state; "
                f"pass --overwrite to replace it, or set train.output_dir to a new folder"
            )
        raise TrainingError(
            f"output folder {run.root} holds another run; pass --resume to continue it, "
            f"--overwrite to replace it, or set train.output_dir to a new folder"
        )
    if resume and latest_state(run) is None:
        raise TrainingError(
            f"nothing to resume in {run.root}: it has no saved training state; "
            f"drop --resume to start a new run (with --overwrite if the folder holds files of one)"
        )
    if overwrite and not resume:
        for path in (run.config, run.metrics, run.lora(name), run.lora(f"{name}-raw")):
            path.unlink(missing_ok=True)
        for folder in (run.samples, run.checkpoints, run.states):
            shutil.rmtree(folder, ignore_errors=True)
    remove_leftovers(run)
    return run


def remove_leftovers(run: RunFolder) -> list[Path]:
    """Delete what a killed save left: `state/.tmp-step-*` folders and atomic-write temp files (`.name.XXXX.tmp`).

    Only called while the run lock is held (or by a single process), so no live save is touched."""
    found = list(run.states.glob(".tmp-step-*")) if run.states.is_dir() else []
    for folder in (run.root, run.checkpoints, run.states, run.samples, *run.samples.glob("step-*")):
        if folder.is_dir():
            found += [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


# ------------------------------------------------------------------------------ state


def latest_state(run: RunFolder) -> Path | None:
    """The newest state folder with its state.json (a save in progress is never named step-*); whether its
    files read whole is for load_latest_state to find out."""
    if not run.states.is_dir():
        return None
    done = sorted(p for p in run.states.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_state(
    run: RunFolder,
    step: int,
    lora: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict[str, Any],
    extra: dict[str, Any],
    keep_last: int,
    more: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write state/step-N atomically (temp folder, then rename), then prune to the last `keep_last`.
    `more`: further tensors under their own keys (the EMA's `ema.N`)."""
    target = run.states / f"step-{step:06d}"
    tmp = run.states / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update({f"lora.{k}": v for k, v in lora.items()})
    rng_tensors, rng_meta = _split_rng(rng)
    tensors.update(rng_tensors)
    tensors.update(more or {})
    save_safetensors(tmp / "state.safetensors", {k: v.cpu() for k, v in tensors.items()})
    write_json(
        tmp / "state.json", {"version": STATE_VERSION, "step": step, "optimizer": optim_meta, "rng": rng_meta, **extra}
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    prune(run.states, "step-*", keep_last)
    return target


class DamagedState(TrainingError):
    """A saved state that cannot be read whole (torn file, invalid JSON, NaN weights)."""


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a saved state, checked for version; DamagedState when a file is torn or invalid."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..lora.formats import require_finite

    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        missing = {"step", "optimizer", "rng"} - set(meta) if isinstance(meta, dict) else {"everything"}
        if missing or not isinstance(meta["step"], int):
            raise ValueError(f"it lacks {', '.join(sorted(missing)) or 'a step number'}")
    except (OSError, ValueError) as exc:
        raise DamagedState(f"state.json is unreadable ({exc})") from None
    if meta.get("version") != STATE_VERSION:
        raise TrainingError(
            f"{path} was saved by another version of zturbo-train (state v{meta.get('version')}); "
            f"start a new run or use the matching version to resume"
        )
    try:
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise DamagedState(f"state.safetensors is unreadable ({exc})") from None
    try:
        require_finite({k: v for k, v in tensors.items() if not k.startswith("rng.")}, "state.safetensors")
    except LoraError as exc:
        raise DamagedState(str(exc).split(";")[0]) from None
    if not any(k.startswith("lora.") for k in tensors):
        raise DamagedState("state.safetensors holds no LoRA weights")
    return tensors, meta


def load_latest_state(
    run: RunFolder,
    log: Callable[[str], None],
    set_aside: bool = True,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest state that loads whole. A damaged newer one is reported with its reason and (with
    `set_aside`, rank 0) renamed to `state/damaged-step-N`, so pruning and later resumes skip it but nothing is lost."""
    damaged = []
    for path in sorted(run.states.glob("step-*"), reverse=True):
        try:
            tensors, meta = load_state(path)
        except DamagedState as exc:
            damaged.append(f"{path.name}: {exc}")
            aside = path.with_name(f"damaged-{path.name}")
            if set_aside:
                shutil.rmtree(aside, ignore_errors=True)
                path.rename(aside)
            log(
                f"warning: {path} is damaged ({exc}); "
                + (f"moved it to {aside.name}, " if set_aside else "")
                + "trying the state before it"
            )
            continue
        if damaged:
            log(f"resuming from {path} (step {meta['step']}), the newest intact state")
        return path, tensors, meta
    raise TrainingError(
        f"no intact training state in {run.states} ({'; '.join(damaged) or 'none saved'}); "
        f"start the run again with --overwrite"
    )


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
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "train": generator.get_state(), "python": random.getstate()}
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
