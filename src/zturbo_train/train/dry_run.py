"""`zturbo train --dry-run`: check everything a run needs and print the plan, training nothing.

It reads the dataset (every problem listed), finds the model folder and the training
adapter, and states the effective batch and the LoRA, so a long run does not fail an
hour in on something a second's check would have found.

Before `zturbo download` (33 GB) a dry run still answers "does this preset fit": for a
Hub model whose shapes are known (synthetic.KNOWN_HUB_CONFIGS) the memory figures come
from those shapes, and the plan says they are estimates for the real model.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config

NOT_DOWNLOADED = "estimated for the real model (weights not downloaded)"


def dry_run(cfg: Config, console) -> dict:
    """Validate dataset, model folder and adapter; print the plan; returns it for tests."""
    from rich.markup import escape
    from rich.table import Table

    from ..data.inspect import check_errors, inspect_datasets, render
    from ..memory.estimate import ModelShape, adapted_linears, rank_warning, shape_from_config
    from ..memory.levers import memory_line, model_shape

    model, known = _model(cfg.model.path)
    adapter = _adapter(cfg.model.adapter, downloaded=known is None)
    inspection = inspect_datasets(cfg.data, exclude=[cfg.train.output_dir])
    render(inspection, console)
    check_errors(inspection)
    counts = inspection.counts()
    shape: ModelShape = model_shape(cfg.model.path) if known is None else shape_from_config(known)
    memory = memory_line(cfg, shape=shape)
    plan = {
        "model": model,
        "adapter": f"{adapter} ({cfg.model.adapter_mode}, weight {cfg.model.adapter_weight:g})",
        "images": counts["images"], "samples per epoch": counts["samples_per_epoch"],
        "steps": cfg.train.steps, "effective batch": cfg.train.batch_size * cfg.train.grad_accum,
        "lora": f"rank {cfg.lora.rank}, alpha {cfg.lora.scale_alpha:g}, {', '.join(cfg.lora.targets)} "
                f"in {', '.join(cfg.lora.blocks)}",
        "memory": memory if known is None else f"{memory}; {NOT_DOWNLOADED}",
        "output_dir": str(cfg.train.output_dir),
    }
    table = Table(title="training plan", show_header=False)
    for key, value in plan.items():
        table.add_row(key, escape(str(value)))  # the memory line ends in [a note], which is not markup
    console.print(table)
    warning = rank_warning(cfg.lora.rank, adapted_linears(shape, cfg.lora.blocks, cfg.lora.targets))
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if known is not None:
        console.print(f"note: the memory figures are {NOT_DOWNLOADED}; run `zturbo download` before training",
                      highlight=False, soft_wrap=True, markup=False)
    return plan


def _model(ref: str) -> tuple[str, dict | None]:
    """(what the plan says about the model, its known config when it is not downloaded, else None)."""
    from .errors import ModelNotDownloadedError
    from ..models import resolve_model_dir
    from ..testing.synthetic import KNOWN_HUB_CONFIGS

    try:
        return str(resolve_model_dir(ref)), None
    except ModelNotDownloadedError:
        if ref not in KNOWN_HUB_CONFIGS:
            raise
        return f"{ref} (not downloaded yet: `zturbo download`)", KNOWN_HUB_CONFIGS[ref]


def _adapter(ref: str, downloaded: bool) -> str:
    """The adapter file; before the download (model not there either) the reference and what fetches it."""
    from ..lora.adapter import resolve_adapter
    from .errors import AdapterNotDownloadedError

    try:
        path: Path | None = resolve_adapter(ref)
    except AdapterNotDownloadedError:
        if downloaded:
            raise
        return f"{ref} (not downloaded yet: `zturbo download`)"
    return str(path or "none")
