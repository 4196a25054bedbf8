"""`zturbo train --dry-run`: check everything a run needs and print the plan (memory included), training nothing.

It reads the dataset (every problem listed), finds the model folder and the training
adapter, and states the effective batch and the LoRA, so a long run does not fail an
hour in on something a second's check would have found.

Before `zturbo download` (33 GB) a dry run still answers "does this preset fit": for a
Hub model whose shapes are known (testing.synthetic.KNOWN_HUB_CONFIGS) the memory figures
come from those shapes, and the plan says they are estimates for the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.inspect import check_errors, inspect_datasets, render
from ..errors import AdapterNotDownloadedError, ModelNotDownloadedError
from ..lora.adapter import resolve_adapter
from ..lora.factored import network_label
from ..memory.estimate import ModelShape, adapted_linears, network_warning, preservation_bytes, shape_from_config
from ..memory.levers import levers_for, model_shape, workload_of
from ..memory.presets import BUDGET_GIB, estimate_for
from ..models import resolve_device, resolve_model_dir
from ..preflight import check_optimizer
from ..testing.synthetic import KNOWN_HUB_CONFIGS
from .optimizers import check_arguments

NOT_DOWNLOADED = "estimated for the real model (weights not downloaded)"


def dry_run(cfg: Config, console) -> dict:
    """Validate dataset, model folder and adapter; print the plan; returns it for tests."""
    from rich.markup import escape
    from rich.table import Table

    check_optimizer(cfg)
    check_arguments(cfg.train)
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
        "images": counts["images"],
        "samples per epoch": counts["samples_per_epoch"],
        **regularisation_plan(inspection),
        "steps": cfg.train.steps,
        "effective batch": cfg.train.batch_size * cfg.train.grad_accum,
        **training_plan(cfg),
        "lora": f"{network_label(cfg.lora.model_dump())} rank {cfg.lora.rank}, alpha {cfg.lora.scale_alpha:g}, "
        f"{', '.join(cfg.lora.targets)} in {', '.join(cfg.lora.blocks)}",
        "memory": memory if known is None else f"{memory}; {NOT_DOWNLOADED}",
        **({"preservation": preservation_line(cfg, shape)} if cfg.train.preservation == "dop" else {}),
        "output_dir": str(cfg.train.output_dir),
    }
    table = Table(title="training plan", show_header=False)
    for key, value in plan.items():
        table.add_row(key, escape(str(value)))  # the memory line ends in [a note], which is not markup
    console.print(table)
    adapted = adapted_linears(shape, cfg.lora.blocks, cfg.lora.targets)
    warning = network_warning(cfg.lora, adapted, adapted)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if known is not None:
        console.print(
            f"note: the memory figures are {NOT_DOWNLOADED}; run `zturbo download` before training",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    return plan


def training_plan(cfg: Config) -> dict[str, str]:
    """The optimizer and schedule, and the EMA and validation when on: what the run does with each step."""
    t = cfg.train
    warmup = f", warm-up {t.warmup_steps}" if t.warmup_steps else ""
    extras = "".join(
        [
            f", LoRA+ ratio {t.loraplus_ratio:g}" if t.loraplus_ratio != 1.0 else "",
            f", {t.optimizer_args}" if t.optimizer_args else "",
        ]
    )
    rows = {"optimizer": f"{t.optimizer}, lr {t.lr:g} {t.lr_scheduler}{warmup}{extras}"}
    if t.ema:
        where = "in host memory" if t.ema_device == "cpu" else "on the training device"
        every = f", updated every {t.ema_every} steps" if t.ema_every > 1 else ""
        rows["ema"] = f"decay {t.ema_decay:g} from step {t.ema_start}, {where}{every}; the main file is the EMA"
    fraction = f"{t.val_fraction:.0%} of the training images" if t.val_fraction else ""
    held = [str(t.val_dir) if t.val_dir else "", fraction]
    if any(held):
        rows["validation"] = f"{' and '.join(h for h in held if h)} held out, val_loss every {t.val_every} steps"
    return rows


def regularisation_plan(inspection) -> dict[str, str]:
    """The plan's line on the regularisation sets ({} without any)."""
    rows = inspection.regularisation_rows()
    if not rows:
        return {}
    return {
        "regularisation": "; ".join(
            f"{folder}: {images} images, {count} samples per epoch (ratio {ratio:g}), loss weight {weight:g}"
            for folder, images, count, ratio, weight in rows
        )
    }


def _model(ref: str) -> tuple[str, dict | None]:
    """(what the plan says about the model, its known config when it is not downloaded, else None)."""
    try:
        return str(resolve_model_dir(ref)), None
    except ModelNotDownloadedError:
        if ref not in KNOWN_HUB_CONFIGS:
            raise
        return f"{ref} (not downloaded yet: `zturbo download`)", KNOWN_HUB_CONFIGS[ref]


def _adapter(ref: str, downloaded: bool) -> str:
    """The adapter file; before the download (model not there either) the reference and what fetches it."""
    try:
        path: Path | None = resolve_adapter(ref)
    except AdapterNotDownloadedError:
        if downloaded:
            raise
        return f"{ref} (not downloaded yet: `zturbo download`)"
    return str(path or "none")


# Step time with DOP over without, measured on builtin:tiny on the CPU (scripts/dop_cost.py, BENCHMARKS.md);
# counting passes predicts 7/3 (a backward ~ two forwards): plain 1 + 2, DOP adds 1 (no grad) + 1 + 2.
DOP_STEP_TIME = "about 2.3x the step time"


def preservation_line(cfg: Config, shape: ModelShape) -> str:
    """What `--dry-run` says about train.preservation = "dop": which words, its weight, its time and memory."""
    words = ", ".join(sorted({repr(d.trigger_word) for d in cfg.data if d.trigger_word}))
    mib = preservation_bytes(shape, workload_of(cfg)) / 2**20
    # a regularisation set never has a trigger (refused): only a training table without one is news
    bare = [str(i) for i, d in enumerate(cfg.data) if not d.trigger_word and not d.regularisation]
    unused = f"; [data] table {', '.join(bare)} has no trigger_word, so its images get no DOP" if bare else ""
    return (
        f"dop: {words} -> {cfg.train.preservation_class!r} in each caption, weight {cfg.train.preservation_weight:g}; "
        f"per micro-batch one more forward without gradient (the LoRA off: the target) and one more forward and "
        f"backward on the class captions: {DOP_STEP_TIME} (builtin:tiny, CPU); peak memory +{mib:.1f} MiB{unused}"
    )


def memory_line(cfg: Config, device: torch.device | None = None, shape: ModelShape | None = None) -> str:
    """What `zturbo train --dry-run` says about memory: the preset, its levers, the estimated peak
    (`shape`: the model's known shapes when its weights are not downloaded)."""
    device = device or resolve_device()
    levers = levers_for(cfg, device, shape)
    est = estimate_for(levers, shape or model_shape(cfg.model.path), workload_of(cfg))
    text = (
        f"{levers.memory}: {levers.describe()}; estimated peak {est.total:.1f} GiB (weights {est.weights:.1f}, "
        f"LoRA and optimizer {est.lora:.1f}, activations {est.activations:.1f})"
    )
    if est.host:
        text += f", plus {est.host:.1f} GiB of pinned host memory"
    budget = BUDGET_GIB.get(levers.memory)
    if budget is not None and est.total > budget:
        text += (
            f"; over the {levers.memory} preset's {budget:g} GiB at this resolution/batch/rank, so pick a "
            f"smaller preset or lower them"
        )
    return text + (f" [{levers.note}]" if levers.note else "")
