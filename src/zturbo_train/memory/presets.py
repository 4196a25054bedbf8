"""Memory presets: `[train] memory` picks the speed/memory levers a user left on `auto`.

Each preset is a fixed set of levers with a budget (the peak GPU memory it aims under at
1024 px, rank 32, batch 1). Keys the user sets themselves always win over the preset.

| preset | checkpointing | compile | base weights | offload | budget |
| --- | --- | --- | --- | --- | --- |
| high | none | yes | bf16 | none | (none: 80 GB class cards) |
| 24gb | selective (the fewest blocks that fit the budget) | yes | bf16 | none | 22 GiB |
| 16gb | full | yes | bf16 | none | 15 GiB |
| 12gb | full | no | fp8 storage | none | 11 GiB |
| 8gb | full | no | bf16 | blocks streamed from pinned host memory | 7 GiB |

`auto` on CUDA takes the first preset in that (speed) order whose estimated peak
(estimate.py) fits the free memory less a 0.5 GiB margin; the `24gb` row then checkpoints
just enough blocks for the free memory rather than for 22 GiB. Without CUDA it takes
`high` uncompiled: compilation pays on GPUs, and CPU runs are the tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from ..errors import ConfigError
from .estimate import Estimate, ModelShape, Workload, estimate, fit_checkpointing

PRESETS: dict[str, dict[str, Any]] = {
    "high": {"checkpointing": "none", "compile": True, "quantize": "none", "offload": "none"},
    "24gb": {"checkpointing": "selective", "compile": True, "quantize": "none", "offload": "none"},
    "16gb": {"checkpointing": "full", "compile": True, "quantize": "none", "offload": "none"},
    "12gb": {"checkpointing": "full", "compile": False, "quantize": "fp8", "offload": "none"},
    "8gb": {"checkpointing": "full", "compile": False, "quantize": "none", "offload": "blocks"},
}
BUDGET_GIB: dict[str, float | None] = {"high": None, "24gb": 22.0, "16gb": 15.0, "12gb": 11.0, "8gb": 7.0}
SPEED_ORDER = ("high", "24gb", "16gb", "12gb", "8gb")
AUTO_MARGIN_GIB = 0.5  # allocator fragmentation and compile workspace beside the estimate
DEFAULT_FRACTION = 0.5  # selective checkpointing when no budget or model shape is known


@dataclass(frozen=True)
class Levers:
    """The resolved levers of one run (no `auto` left, except the attention backend,
    which is measured on the device when the model is there)."""

    memory: str
    checkpointing: str = "full"
    checkpoint_fraction: float = 1.0
    compile: bool = False
    compile_mode: str = "default"
    attention_backend: str = "auto"
    quantize: str = "none"
    offload: str = "none"
    note: str = ""

    @property
    def loads_on_host(self) -> bool:
        """Quantized and offloaded bases load on the host first, so the GPU never holds full bf16 weights."""
        return self.quantize != "none" or self.offload != "none"

    def describe(self) -> str:
        """One line for logs, the dry-run plan and the bench table."""
        ckpt = self.checkpointing
        if ckpt == "selective":
            ckpt = f"selective {self.checkpoint_fraction:.0%}"
        parts = [
            f"checkpointing {ckpt}",
            "compiled" if self.compile else "eager",
            f"weights {self.quantize}" if self.quantize != "none" else "weights as loaded",
            f"attention {self.attention_backend}",
        ]
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        if self.compile and self.compile_mode != "default":
            parts.append(f"compile mode {self.compile_mode}")
        return ", ".join(parts)


ShapeSource = Callable[[], ModelShape]


def choose(
    memory: str,
    explicit: dict[str, Any],
    *,
    cuda: bool,
    free_gib: float | None = None,
    shape: ShapeSource | None = None,
    work: Workload | None = None,
) -> Levers:
    """Resolve `memory` and the user's explicit lever keys into Levers.

    `explicit` holds only keys the user set (checkpointing, checkpoint_fraction, compile,
    compile_mode, attention_backend, quantize, offload); `shape` is called only when a
    budget has to be checked (auto on CUDA, selective checkpointing).
    """
    if memory == "auto":
        levers = _auto(explicit, cuda, free_gib, shape, work)
    elif memory in PRESETS:
        levers = _combine(memory, explicit, BUDGET_GIB[memory], shape, work)
    else:
        raise ConfigError(f"`train.memory` = {memory!r} is not a preset; use auto or one of {', '.join(PRESETS)}")
    check_compatible(levers, explicit)
    return levers


def _combine(
    name: str,
    explicit: dict[str, Any],
    budget: float | None,
    shape: ShapeSource | None,
    work: Workload | None,
    note: str = "",
) -> Levers:
    settings = {**PRESETS[name], **explicit}
    fraction = settings.pop("checkpoint_fraction", None)
    if settings["checkpointing"] == "selective" and fraction is None:
        fraction = DEFAULT_FRACTION
        if budget is not None and shape is not None and work is not None:
            fitted = fit_checkpointing(
                shape(), work, budget, quantize=settings["quantize"], offload=settings["offload"]
            )
            fraction = 1.0 if fitted is None else fitted
    if fraction is None:
        fraction = {"full": 1.0, "none": 0.0}.get(settings["checkpointing"], DEFAULT_FRACTION)
    return Levers(memory=name, checkpoint_fraction=fraction, note=note, **settings)


def _auto(
    explicit: dict[str, Any], cuda: bool, free_gib: float | None, shape: ShapeSource | None, work: Workload | None
) -> Levers:
    if not cuda or free_gib is None or shape is None or work is None:
        quiet = {"compile": False, **explicit}
        return _combine("high", quiet, None, None, None, note="auto: no CUDA device, so the high preset, uncompiled")
    usable = free_gib - AUTO_MARGIN_GIB
    for name in SPEED_ORDER:
        levers = _combine(name, explicit, usable, shape, work)
        if levers.checkpointing == "selective" and levers.checkpoint_fraction >= 1.0 and name != SPEED_ORDER[-1]:
            continue  # every block checkpointed: that is the next preset, under its own name
        peak = estimate_for(levers, shape(), work).total
        if peak <= usable:
            return replace(levers, note=f"auto: {free_gib:.1f} GiB free, estimated peak {peak:.1f} GiB")
    smallest = SPEED_ORDER[-1]
    levers = _combine(smallest, explicit, usable, shape, work)
    peak = estimate_for(levers, shape(), work).total
    return replace(
        levers,
        note=f"auto: {free_gib:.1f} GiB free is less than even the {smallest} preset's "
        f"estimated {peak:.1f} GiB; lower data.resolution, train.batch_size or lora.rank",
    )


def estimate_for(levers: Levers, shape: ModelShape, work: Workload) -> Estimate:
    """The memory estimate of a workload under these levers."""
    return estimate(
        shape,
        work,
        checkpointing=levers.checkpointing,
        fraction=levers.checkpoint_fraction,
        quantize=levers.quantize,
        offload=levers.offload,
    )


def check_compatible(levers: Levers, explicit: dict[str, Any]) -> None:
    """Refuse combinations that cannot work, naming each key, its value and where it came from."""
    keys = {
        "checkpointing": "train.gradient_checkpointing",
        "compile": "train.compile",
        "quantize": "model.quantize",
        "offload": "model.offload",
    }

    def said(key: str) -> str:
        value = getattr(levers, key)
        text = str(value).lower() if isinstance(value, bool) else f'"{value}"'
        source = "set by you" if key in explicit else f"from the {levers.memory} preset"
        return f"`{keys[key]}` = {text} ({source})"

    if levers.offload == "blocks":
        if levers.checkpointing != "full":
            raise ConfigError(
                f"{said('offload')} needs full checkpointing, but {said('checkpointing')}: without it "
                f"autograd keeps every streamed block on the GPU until backward, so offloading saves "
                f'nothing; set train.gradient_checkpointing = "full" or model.offload = "none"'
            )
        if levers.compile:
            raise ConfigError(
                f"{said('offload')} does not work with {said('compile')}: the streamed weights are "
                f"swapped in around each block call, which a compiled block would recompile for; "
                f"set train.compile = false"
            )
        if levers.quantize in ("nf4", "int8"):
            raise ConfigError(
                f"{said('offload')} streams bf16 or fp8 weights, not {said('quantize')}; an "
                f'{levers.quantize} base already fits 8 GB cards, so set model.offload = "none"'
            )
    if levers.quantize == "fp8" and levers.compile and levers.offload == "none":
        raise ConfigError(
            f"{said('quantize')} does not work with {said('compile')}: diffusers' layerwise casting "
            f"changes weight dtypes inside the block, which the compiled graph and the checkpoint "
            f"recompute disagree on (measured); set train.compile = false, or model.quantize = "
            f'"nf4" for a compiled small base'
        )
    if levers.checkpointing != "selective" and "checkpoint_fraction" in explicit:
        raise ConfigError(
            f"`train.checkpoint_fraction` is set but {said('checkpointing')}; set "
            f'train.gradient_checkpointing = "selective" or remove checkpoint_fraction'
        )
