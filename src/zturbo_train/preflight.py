"""What a command was given, checked before anything heavy is imported or loaded.

A typo in a path, an output folder that cannot be written or a bad option is reported in
about a second as one line, instead of after torch / diffusers import (seconds) or after
the dataset is cached (minutes). Nothing here imports torch or diffusers at module level;
tests/test_cli.py pins that the commands raise these errors with neither imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import ConfigError, DataError, LoraError, TrainingError
from .fileio import check_writable
from .zimage import SIZE_MULTIPLE, TURBO_REPO

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config


# ------------------------------------------------------------------ LoRA arguments


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:STRENGTH]` argument."""

    path: Path
    strength: float = 1.0


def parse_lora_spec(text: str) -> LoraSpec:
    """`PATH[:STRENGTH]`; an existing file wins, so a path containing `:` still works."""
    if Path(text).expanduser().is_file() or ":" not in text:
        return LoraSpec(Path(text).expanduser(), 1.0)
    path, _, strength = text.rpartition(":")
    if not path or "/" in strength or "\\" in strength:
        return LoraSpec(Path(text).expanduser(), 1.0)
    try:
        value = float(strength)
    except ValueError:
        raise ConfigError(
            f"--lora {text!r}: strength {strength!r} is not a number; write PATH:STRENGTH, e.g. {path}:0.8"
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"--lora {text!r}: strength {strength!r} is not a finite number; use e.g. 0.8")
    return LoraSpec(Path(path).expanduser(), value)


def check_lora_files(specs: Sequence[LoraSpec]) -> None:
    """Every --lora names an existing file (read and checked later, still before any model loads)."""
    for spec in specs:
        if not spec.path.is_file():
            hint = "it is a folder; pass the .safetensors file inside" if spec.path.is_dir() else "check the path"
            raise LoraError(f"LoRA file {spec.path} does not exist; {hint}")


def check_dtype(name: str) -> None:
    from .models import check_dtype as check

    check(name)


# ------------------------------------------------------------------ zturbo sample


@dataclass
class SampleSettings:
    """Everything `zturbo sample` takes; see the CLI for each option's meaning."""

    prompts: list[str]
    loras: list[LoraSpec] = field(default_factory=list)
    model: str = TURBO_REPO
    steps: int = 8
    guidance: float = 0.0
    seed: int | None = None
    count: int = 1
    width: int = 1024
    height: int = 1024
    negative: str = ""
    out_dir: Path = Path("samples")
    compare: bool = False
    low_mem: bool = False
    device: str = "auto"
    dtype: str = "bf16"
    batch_size: int = 1
    allow_partial: bool = False  # a LoRA that fits only in part: warn and use the rest instead of refusing it
    drift: bool = False  # report turbo_drift (drift.py) per image, with and without the LoRAs


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and `#` comments skipped."""
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist; pass a UTF-8 text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"prompts file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts; write one prompt per line")
    return prompts


def check_size(width: int, height: int) -> None:
    """Z-Image needs sides that are multiples of 16 (VAE factor 8 times patch 2)."""
    for name, side in (("width", width), ("height", height)):
        if side < SIZE_MULTIPLE or side % SIZE_MULTIPLE:
            raise ConfigError(
                f"{name} {side} is not a multiple of {SIZE_MULTIPLE}; use e.g. "
                f"{max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)}"
            )


def check_sample(s: SampleSettings) -> None:
    """Refuse bad options, missing LoRA files and an unwritable --out before anything heavy loads."""
    if not s.prompts or not all(p.strip() for p in s.prompts):
        raise ConfigError("no prompt given (or an empty one); pass --prompt TEXT or --prompts FILE")
    check_size(s.width, s.height)
    for name, value in (("steps", s.steps), ("count", s.count), ("batch-size", s.batch_size)):
        if value < 1:
            raise ConfigError(f"--{name} {value} must be at least 1")
    if s.guidance < 0:
        raise ConfigError(f"--guidance {s.guidance} must be 0 or more (Turbo: 0)")
    if s.compare and not s.loras:
        raise ConfigError("--compare shows images without and with LoRAs; add at least one --lora")
    if s.out_dir.exists() and not s.out_dir.is_dir():
        raise ConfigError(f"--out {s.out_dir} is a file; images go into a folder, pass a folder path")
    check_dtype(s.dtype)
    check_lora_files(s.loras)
    check_writable(s.out_dir, "--out")


# ------------------------------------------------------------------ zturbo merge


def check_merge(
    specs: Sequence[LoraSpec],
    out: Path | None,
    to_lora: Path | None,
    adapter: str | None,
    style: str | None,
    dtype: str | None,
    ema: tuple[Path | None, float | None, float | None] = (None, None, None),
) -> None:
    """The option combinations, the LoRA files and the output's folder of `zturbo merge`; `ema` is
    (--ema RUN, --ema-decay, --ema-half-life)."""
    run, decay, half_life = ema
    if run is not None:
        if to_lora is None or out is not None or specs or adapter is not None:
            raise ConfigError(
                "--ema RUN writes one LoRA from the run's own saved LoRAs: pass --to-lora FILE, "
                "and no --lora, --out or --adapter"
            )
        if not (run / "config.json").is_file():
            raise ConfigError(f"--ema {run} is not a zturbo run folder (no config.json); pass a run's train.output_dir")
        ema_decay(decay, half_life)
    elif decay is not None or half_life is not None:
        raise ConfigError("--ema-decay and --ema-half-life go with --ema RUN (a post-hoc EMA of a run's LoRAs)")
    if (out is None) == (to_lora is None):
        raise ConfigError(
            "pass exactly one of --out DIR (merge into the model) and --to-lora FILE (merge into one LoRA)"
        )
    if to_lora is not None:
        if adapter is not None:
            raise ConfigError("--adapter folds into a model; use it with --out, not --to-lora")
        if not specs and run is None:
            raise ConfigError("--to-lora needs at least one --lora PATH[:STRENGTH] (or --ema RUN)")
    else:
        if style is not None:
            raise ConfigError("--format sets the style of a --to-lora file; a merged model has no LoRA keys")
        if not specs and adapter is None:
            raise ConfigError("nothing to merge; pass --lora PATH[:STRENGTH] (repeatable) and/or --adapter REF")
    if dtype is not None:
        check_dtype(dtype)
    check_lora_files(specs)
    # both outputs are written beside themselves and renamed into place: their folder must take writes
    target, what = (out, "--out") if out is not None else (to_lora, "--to-lora")
    check_writable(target.expanduser().absolute().parent, f"the folder of {what} {target}:")


def ema_decay(decay: float | None, half_life: float | None) -> float:
    """`merge --ema`'s decay per step: --ema-decay, or from --ema-half-life in steps (decay^half_life = 1/2)."""
    if (decay is None) == (half_life is None):
        raise ConfigError("give the EMA's speed once: --ema-decay (e.g. 0.999) or --ema-half-life STEPS (e.g. 100)")
    if half_life is not None:
        decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0
        if not 0.0 < decay < 1.0:  # a half-life too long or short for a float decay (inf, 1e20, 1e-4) is none
            raise ConfigError(
                f"--ema-half-life {half_life:g} must be a positive, finite number of steps whose decay per step "
                f"0.5^(1/half-life) lies strictly between 0 and 1, e.g. 100"
            )
        return decay
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"--ema-decay {decay:g} must be between 0 and 1 (not included), e.g. 0.999")
    return decay


# ------------------------------------------------------------------ zturbo train


def check_optimizer(cfg: "Config") -> None:
    """An optimizer from the `optimizers` extra that is not installed: the pip command, before any work."""
    from .train.optimizers import missing_package

    problem = missing_package(cfg.train.optimizer)
    if problem is not None:
        raise ConfigError(problem)


def check_train(cfg: "Config", resume: bool, overwrite: bool, writes_run: bool = True) -> None:
    """The cheap checks of `zturbo train`, before the output folder is touched or anything is cached:
    the flags, every output location, the model folder, the data folders, the adapter file.
    `writes_run` False (ranks other than 0, which never write the run folder) skips that folder."""
    from .data.dataset import list_images
    from .models import resolve_model_dir
    from .paths import default_cache_dir

    if resume and overwrite:
        raise TrainingError(
            "--resume continues the run in train.output_dir and --overwrite replaces it; pass one of them"
        )
    check_optimizer(cfg)
    if writes_run:
        check_writable(cfg.train.output_dir, "train.output_dir")
    check_writable(default_cache_dir(), "the latent cache folder ($ZTURBO_HOME/cache)")
    resolve_model_dir(cfg.model.path)
    for data in cfg.data:
        list_images(data.dir)
    from .lora.adapter import resolve_adapter  # imports torch: the last checks
    from .models import torch_dtype
    from .train.optimizers import check_arguments
    from .train.step import check_training_dtype

    check_training_dtype(torch_dtype(cfg.model.dtype))
    check_arguments(cfg.train)
    resolve_adapter(cfg.model.adapter)
