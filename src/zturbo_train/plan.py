"""`zturbo train --dry-run`: what a run would do, without loading the transformer."""

from __future__ import annotations

from .config import Config


def dry_run(cfg: Config, console) -> dict:
    """Validate the dataset and the model folder, print the plan; returns it for tests."""
    from rich.table import Table

    from .data.inspect import inspect_datasets, render
    from .loader import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.path)
    inspection = inspect_datasets(cfg.data)
    render(inspection, console)
    from .data.inspect import check_errors

    check_errors(inspection)
    counts = inspection.counts
    effective = cfg.train.batch_size * cfg.train.grad_accum
    plan = {"model": str(model_dir), "adapter": cfg.model.adapter, "adapter_mode": cfg.model.adapter_mode,
            "images": counts.get("images", 0), "steps": cfg.train.steps, "effective_batch": effective,
            "lora": f"rank {cfg.lora.rank}, alpha {cfg.lora.scale_alpha:g}, {len(cfg.lora.targets)} targets in "
                    f"{', '.join(cfg.lora.blocks)}", "output_dir": str(cfg.train.output_dir)}
    table = Table(title="training plan", show_header=False)
    for key, value in plan.items():
        table.add_row(key, str(value))
    console.print(table)
    return plan
