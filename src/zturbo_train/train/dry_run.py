"""`zturbo train --dry-run`: check everything a run needs and print the plan (memory included), training nothing.

It reads the dataset (every problem listed), finds the model folder and the training
adapter, and states the effective batch and the LoRA, so a long run does not fail an
hour in on something a second's check would have found.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..data.inspect import check_errors, inspect_datasets, render
from ..lora.adapter import resolve_adapter
from ..memory.levers import levers_for, model_shape, workload_of
from ..memory.presets import BUDGET_GIB, estimate_for
from ..models import resolve_device, resolve_model_dir


def dry_run(cfg: Config, console) -> dict:
    """Validate dataset, model folder and adapter; print the plan; returns it for tests."""
    from rich.table import Table

    model_dir = resolve_model_dir(cfg.model.path)
    adapter = resolve_adapter(cfg.model.adapter)
    inspection = inspect_datasets(cfg.data)
    render(inspection, console)
    check_errors(inspection)
    counts = inspection.counts()
    plan = {
        "model": str(model_dir),
        "adapter": f"{adapter or 'none'} ({cfg.model.adapter_mode}, weight {cfg.model.adapter_weight:g})",
        "images": counts["images"], "samples per epoch": counts["samples_per_epoch"],
        "steps": cfg.train.steps, "effective batch": cfg.train.batch_size * cfg.train.grad_accum,
        "lora": f"rank {cfg.lora.rank}, alpha {cfg.lora.scale_alpha:g}, {', '.join(cfg.lora.targets)} "
                f"in {', '.join(cfg.lora.blocks)}",
        "memory": memory_line(cfg),
        "output_dir": str(cfg.train.output_dir),
    }
    table = Table(title="training plan", show_header=False)
    for key, value in plan.items():
        table.add_row(key, str(value))
    console.print(table)
    return plan


def memory_line(cfg: Config, device: torch.device | None = None) -> str:
    """What `zturbo train --dry-run` says about memory: the preset, its levers, the estimated peak."""
    device = device or resolve_device()
    levers = levers_for(cfg, device)
    est = estimate_for(levers, model_shape(cfg.model.path), workload_of(cfg))
    text = (f"{levers.memory}: {levers.describe()}; estimated peak {est.total:.1f} GiB (weights {est.weights:.1f}, "
            f"LoRA and optimizer {est.lora:.1f}, activations {est.activations:.1f})")
    if est.host:
        text += f", plus {est.host:.1f} GiB of pinned host memory"
    budget = BUDGET_GIB.get(levers.memory)
    if budget is not None and est.total > budget:
        text += (f"; over the {levers.memory} preset's {budget:g} GiB at this resolution/batch/rank, so pick a "
                 f"smaller preset or lower them")
    return text + (f" [{levers.note}]" if levers.note else "")
