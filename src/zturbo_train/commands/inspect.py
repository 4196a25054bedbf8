"""`zturbo inspect FILE... [--model M]`: describe a LoRA file and, with a model, check the fit (headers only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..lora.formats import LoraDict, unplaced_keys, validate
from ..lora.inspect import describe_file
from ..models import resolve_model_dir, transformer_files
from .merge import bias_modules_from_files, linear_shapes_from_files


def inspect_file(path: str | Path, model: str | None = None) -> dict[str, Any]:
    """One file's report (lora.inspect.describe_file), with a `fit` section when `model` is given."""
    report, loras = describe_file(path)
    if model is not None:
        report["fit"] = fit_report(loras, model)
    return report


def fit_report(loras: LoraDict, model: str) -> dict[str, Any]:
    """Whether the LoRA fits a model's transformer (headers only, nothing loaded) and what it would skip."""
    files = transformer_files(resolve_model_dir(model))
    unmatched, misfit = validate(loras, linear_shapes_from_files(files), bias_modules_from_files(files))
    return {
        "model": model,
        "fits": not unmatched and not misfit,
        "skipped_keys": unplaced_keys(loras, unmatched),
        "misfit": misfit,
    }
