"""`zturbo bench`: seconds per training step, peak memory and 8-step sampling time, per preset.

It runs the training step of `zturbo train` itself (step.TrainStep, optimizers.build_optimizer,
levers.apply_levers, lora.create_lora), not a copy, so what it times is what training
runs. Models: `synthetic` (a random Z-Image transformer of the real shapes built straight
on the GPU, no download), `synthetic:tiny`, builtin:tiny or any Z-Image folder.

Method (BENCHMARKS.md): per preset a fresh model; per (rank, resolution, batch) a fresh
LoRA and optimizer, `warmup` steps (compilation happens there and is reported as
`first_step_s`), then `steps` timed steps, each synchronised with the device before the
clock is read; the median is reported. Peak memory is `max_memory_allocated` over warm-up
and timed steps. Sampling: the transformer's 8 Euler steps at `sample_size` through
sample.generate_latents (the preview/`zturbo sample` loop) with the LoRA attached, and
again with it detached (comparable with a plain pipeline), one warm-up run, median of two.
Inputs are random latents and caption embeddings of `caption_tokens` tokens, batch 1 by
default; the training adapter is left out (merged, it costs nothing per step). With
`--set train.preservation=dop` each step also runs DOP (train/preservation.py) on a second set of
random embeddings of the same length.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..config import apply_override, validate_config
from ..errors import ConfigError
from ..fileio import write_json
from ..lora.factored import network_options
from ..lora.network import create_lora
from ..memory.estimate import Workload, network_of
from ..memory.levers import apply_levers, model_shape, resolve_levers
from ..memory.presets import estimate_for
from ..models import autocast, load_parts, resolve_device, torch_dtype
from ..sampling import generate_latents
from ..testing.synthetic import SYNTHETIC_MODELS, build_synthetic, synthetic_config
from ..train.optimizers import build_optimizer
from ..train.preservation import Preservation
from ..train.step import StepSettings, TrainStep
from ..zimage import SCHEDULER

DEFAULT_RESOLUTIONS = {"builtin:tiny": [64], "synthetic:tiny": [64]}
TINY_MODELS = {"builtin:tiny", "synthetic:tiny"}


@dataclass
class BenchSettings:
    """What `zturbo bench` measures; lists multiply into rows."""

    model: str = "synthetic"
    presets: list[str] = field(default_factory=lambda: ["auto"])
    resolutions: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=lambda: [32])
    batches: list[int] = field(default_factory=lambda: [1])
    overrides: list[str] = field(default_factory=list)
    steps: int = 8
    warmup: int = 3
    sample_steps: int = 8
    sample_size: int | None = None
    caption_tokens: int = 128
    device: str = "auto"
    out: Path = Path("bench.json")
    profile: bool = False
    label: str | None = None  # marks the rows of a variant run (e.g. other --set values)

    def resolved_resolutions(self) -> list[int]:
        return self.resolutions or DEFAULT_RESOLUTIONS.get(self.model, [1024, 512])


# ------------------------------------------------------------------------------ device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) in GiB since the last reset; None off CUDA."""
    if device.type != "cuda":
        return None, None
    return (torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of `fn` with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------ configuration


def preset_configs(settings: BenchSettings, preset: str, rank: int):
    """(model, train, lora) config sections for one preset, with the user's --set overrides."""
    # a trigger word, so train.preservation = "dop" (which needs one) can be timed on the random captions
    raw: dict[str, Any] = {
        "data": {"dir": ".", "trigger_word": "sks"},
        "train": {"memory": preset},
        "lora": {"rank": rank},
    }
    if not settings.model.startswith("synthetic"):
        raw["model"] = {"path": settings.model}
    for item in settings.overrides:
        section = item.partition(".")[0]
        if section not in ("model", "train", "lora"):
            raise ConfigError(
                f"--set {item!r}: bench takes model.*, train.* and lora.* keys, e.g. --set train.compile=false"
            )
        apply_override(raw, item)
    cfg = validate_config(raw)
    cfg.lora.rank = rank
    return cfg.model, cfg.train, cfg.lora


def workload(
    settings: BenchSettings,
    lora,
    train,
    dtype_bytes: int,
    resolution: int | None = None,
    batch: int | None = None,
    rank: int | None = None,
):
    return Workload(
        resolution=resolution or max(settings.resolved_resolutions()),
        batch=batch or max(settings.batches),
        rank=rank or lora.rank,
        targets=tuple(lora.targets),
        lora_blocks=tuple(lora.blocks),
        optimizer=train.optimizer,
        **network_of(lora),
        caption_tokens=settings.caption_tokens,
        dtype_bytes=dtype_bytes,
        preservation=train.preservation == "dop",
    )


def load_transformer(model: str, dtype_name: str, device: torch.device, on_host: bool):
    """The transformer to time: synthetic (built in place) or loaded from a model folder."""
    home = torch.device("cpu") if on_host else device
    if model in SYNTHETIC_MODELS:
        return build_synthetic(synthetic_config(model), device=device, dtype=torch_dtype(dtype_name), home=home)
    return load_parts(model, ["transformer"], dtype=dtype_name, device=str(home)).transformer


def load_scheduler(model: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if model in SYNTHETIC_MODELS:
        return FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return load_parts(model, ["scheduler"]).scheduler


# ------------------------------------------------------------------------------ measuring


def train_once(step, latents, embeds, class_embeds) -> torch.Tensor:
    """One training step (backward + update) as `zturbo train` runs it; with DOP on, `class_embeds` stand in for
    the class captions (other embeddings of the same length). Returns the training loss."""
    if step.preservation is not None:
        loss = step.backward_preserving(latents, embeds, class_embeds)[0]
    else:
        loss = step.backward(latents, embeds)
    step.update(1e-4)
    return loss


def measure_steps(step, latents, embeds, warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Warm-up then timed steps of TrainStep (backward + update); median seconds and the last loss."""
    times, loss = [], None

    class_embeds = [e.roll(1, 0) for e in embeds]

    def one():
        return train_once(step, latents, embeds, class_embeds)

    for index in range(warmup + steps):
        seconds, loss = timed(one, device)
        times.append(seconds)
    timed_part = times[warmup:]
    median = statistics.median(timed_part)
    return {
        "s_per_step": round(median, 4),
        "s_min": round(min(timed_part), 4),
        "s_max": round(max(timed_part), 4),
        "first_step_s": round(times[0], 2),
        "images_per_s": round(latents.shape[0] / median, 3),
        "loss_finite": bool(math.isfinite(float(loss))),
    }


def measure_sampling(
    transformer, scheduler, embeds, size: int, steps: int, device: torch.device, dtype: torch.dtype, runs: int = 2
) -> float:
    """Median seconds of `steps` transformer steps of the preview loop (one warm-up run first)."""

    def once():
        with torch.no_grad(), autocast(device, dtype):
            return generate_latents(
                transformer, scheduler, embeds, width=size, height=size, seeds=[0], steps=steps, device=device
            )

    timed(once, device)
    return round(statistics.median(timed(once, device)[0] for _ in range(runs)), 3)


# kernel name fragment -> what it is, for "where the time goes"
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "matmul", "sm90_xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm")),
    ("fused (compiled)", ("triton",)),
    ("copy", ("memcpy", "copy_", "aten::to")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")


def profile_steps(step, latents, embeds, device: torch.device, steps: int = 2, top: int = 12) -> dict[str, Any]:
    """Where a step's time goes: device-busy time by kernel class and the top kernels (per step).

    Wall time well above the device-busy time means launch/Python overhead or waiting for
    host copies, not arithmetic."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    start = time.perf_counter()
    class_embeds = [e.roll(1, 0) for e in embeds]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_once(step, latents, embeds, class_embeds)
        sync(device)
    wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if _self_time(e, cuda) > 0]
    by_class: dict[str, float] = {}
    for event in events:
        if cuda and not str(getattr(event, "device_type", "")).endswith("CUDA"):
            continue
        by_class[kernel_class(event.key)] = by_class.get(kernel_class(event.key), 0.0) + _self_time(event, cuda)
    events.sort(key=lambda e: _self_time(e, cuda), reverse=True)
    return {
        "wall_s": round(wall, 4),
        "device_busy_s": round(sum(by_class.values()) / steps, 4) if cuda else None,
        "by_class_s": {k: round(v / steps, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": e.key[:90], "calls": e.count // steps, "self_s": round(_self_time(e, cuda) / steps, 5)}
            for e in events[:top]
        ],
    }


def _self_time(event, cuda: bool) -> float:
    """Self time of a profiler row in seconds (device time on CUDA, CPU time elsewhere)."""
    if cuda:
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0)
    else:
        micros = event.self_cpu_time_total
    return micros / 1e6


def random_inputs(
    batch: int,
    resolution: int,
    caption_tokens: int,
    cap_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
):
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn(batch, 16, resolution // 8, resolution // 8, generator=generator, device=device, dtype=dtype)
    embeds = [
        torch.randn(caption_tokens, cap_dim, generator=generator, device=device, dtype=dtype) for _ in range(batch)
    ]
    return latents, embeds


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------ one preset


class Report:
    """The JSON document, rewritten after every row so a killed run keeps what it measured."""

    def __init__(self, settings: BenchSettings, device: torch.device):
        import diffusers

        self.path = settings.out
        self.doc: dict[str, Any] = {
            "zturbo_version": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": settings.model,
            "caption_tokens": settings.caption_tokens,
            "steps": settings.steps,
            "warmup": settings.warmup,
            "rows": [],
            "sampling": [],
        }

    def add(self, kind: str, row: dict[str, Any]) -> None:
        self.doc[kind].append(row)
        write_json(self.path, self.doc)


def bench_preset(
    settings: BenchSettings, preset: str, device: torch.device, report: Report, log: Callable[[str], None]
) -> None:
    """Every (rank, resolution, batch) row and the sampling time of one preset, on a fresh model."""
    model_cfg, train_cfg, lora_cfg = preset_configs(settings, preset, settings.ranks[0])
    dtype = torch_dtype(model_cfg.dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    shape = model_shape(settings.model if settings.model.startswith("synthetic") else model_cfg.path)
    levers = resolve_levers(
        model_cfg, train_cfg, workload(settings, lora_cfg, train_cfg, dtype_bytes), device, shape=lambda: shape
    )
    reset_memory(device)
    transformer = load_transformer(settings.model, model_cfg.dtype, device, levers.loads_on_host)
    applied = apply_levers(transformer, levers, device, work=workload(settings, lora_cfg, train_cfg, dtype_bytes))
    levers = applied.levers
    log(f"{preset}: {levers.describe()}{'; ' + levers.note if levers.note else ''}")
    base = {"preset": preset, "levers": asdict(levers), **({"variant": settings.label} if settings.label else {})}
    cap_dim = int(transformer.config.cap_feat_dim)
    for rank in settings.ranks:
        _, train_cfg, lora_cfg = preset_configs(settings, preset, rank)
        network, step = _training_step(transformer, train_cfg, lora_cfg, dtype, device)
        for resolution in settings.resolved_resolutions():
            for batch in settings.batches:
                work = workload(settings, lora_cfg, train_cfg, dtype_bytes, resolution, batch, rank)
                est = estimate_for(levers, shape, work)
                row = {
                    **base,
                    "resolution": resolution,
                    "rank": rank,
                    "batch": batch,
                    "estimate_gib": round(est.total, 2),
                }
                row.update(_row(step, levers, resolution, batch, settings, cap_dim, device, dtype))
                if applied.streamer is not None:
                    row["offload"] = asdict(applied.streamer.stats)
                report.add("rows", row)
                log(_row_line(row))
        if rank == settings.ranks[0] and settings.sample_steps:
            report.add("sampling", _sampling(transformer, network, settings, preset, cap_dim, device, dtype))
        network.detach()
        del step, network
        reset_memory(device)
    del transformer, applied
    reset_memory(device)


def _training_step(transformer, train_cfg, lora_cfg, dtype: torch.dtype, device: torch.device):
    network = create_lora(
        transformer,
        lora_cfg.rank,
        lora_cfg.scale_alpha,
        lora_cfg.blocks,
        lora_cfg.targets,
        seed=0,
        **network_options(lora_cfg),
    )
    network.train()
    params = network.trainable_parameters()
    optimizer = build_optimizer(params, train_cfg, device)
    generator = torch.Generator(device=device).manual_seed(0)
    settings = StepSettings.from_config(train_cfg, dtype, device)
    preservation = Preservation.from_config(train_cfg, network)
    return network, TrainStep(transformer, params, optimizer, settings, generator, preservation=preservation)


def _row(
    step,
    levers,
    resolution: int,
    batch: int,
    settings: BenchSettings,
    cap_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    if levers.compile:
        torch._dynamo.reset()  # each shape compiles fresh and static, as in a one-bucket run
    try:
        latents, embeds = random_inputs(batch, resolution, settings.caption_tokens, cap_dim, device, dtype)
        reset_memory(device)
        out = measure_steps(step, latents, embeds, settings.warmup, settings.steps, device)
        allocated, reserved = peak_gib(device)
        out["peak_gib"] = None if allocated is None else round(allocated, 2)
        out["reserved_gib"] = None if reserved is None else round(reserved, 2)
        if settings.profile:
            out["profile"] = profile_steps(step, latents, embeds, device)
        return out
    except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
        step.optimizer.zero_grad(set_to_none=True)
        return {"error": "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:300]}"}


def _sampling(
    transformer, network, settings: BenchSettings, preset: str, cap_dim: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    size = settings.sample_size or max(settings.resolved_resolutions())
    row: dict[str, Any] = {"preset": preset, "resolution": size, "steps": settings.sample_steps}
    try:
        scheduler = load_scheduler(settings.model)
        _, embeds = random_inputs(1, size, settings.caption_tokens, cap_dim, device, dtype, seed=1)
        network.eval()
        reset_memory(device)
        row["seconds"] = measure_sampling(transformer, scheduler, embeds, size, settings.sample_steps, device, dtype)
        row["peak_gib"] = peak_gib(device)[0]
        network.detach()
        row["seconds_no_lora"] = measure_sampling(
            transformer, scheduler, embeds, size, settings.sample_steps, device, dtype
        )
        network.attach(transformer)
    except Exception as exc:  # noqa: BLE001
        row["error"] = "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        if not network.attached:
            network.attach(transformer)
        network.train()
    return row


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['resolution']} px rank {row['rank']} batch {row['batch']}: {row['error']}"
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
    return (
        f"  {row['resolution']} px rank {row['rank']} batch {row['batch']}: {row['s_per_step']:.4f} s/step, "
        f"{row['images_per_s']:.2f} img/s, peak {peak} (estimate {row['estimate_gib']:.2f})"
    )


# ------------------------------------------------------------------------------ the command


def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Measure every preset; write settings.out as JSON after each row; return the document."""
    if settings.steps < 1 or settings.warmup < 0:
        raise ConfigError(
            f"--steps {settings.steps} / --warmup {settings.warmup}: need at least 1 timed step and no negative warm-up"
        )
    device = resolve_device(settings.device)
    if settings.model == "synthetic" and device.type != "cuda":
        raise ConfigError(
            "--model synthetic builds the full 6 B transformer and needs a CUDA device; on the CPU "
            "use --model synthetic:tiny or builtin:tiny"
        )
    report = Report(settings, device)
    for preset in settings.presets:
        bench_preset(settings, preset, device, report, log)
    write_json(settings.out, report.doc)
    return report.doc


def render(doc: dict[str, Any]) -> list:
    """The rich tables of a bench document: training rows, then sampling."""
    from rich.table import Table

    table = Table(title=f"zturbo bench: {doc['model']} on {doc['device']} (median of {doc['steps']} steps)")
    for column in ("preset", "px", "rank", "batch", "s/step", "img/s", "peak GiB", "est. GiB", "1st s"):
        table.add_column(column, justify="left" if column == "preset" else "right", no_wrap=True)
    levers: dict[str, str] = {}
    for row in doc["rows"]:
        name = f"{row['preset']} ({row['variant']})" if row.get("variant") else row["preset"]
        levers[name] = short_levers(row["levers"])
        if "error" in row:
            cells = [row["error"], "", "", "", ""]
        else:
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            cells = [
                f"{row['s_per_step']:.4f}",
                f"{row['images_per_s']:.2f}",
                peak,
                f"{row['estimate_gib']:.2f}",
                f"{row['first_step_s']:.1f}",
            ]
        table.add_row(name, str(row["resolution"]), str(row["rank"]), str(row["batch"]), *cells)
    table.caption = "; ".join(f"{name}: {text}" for name, text in levers.items())
    sampling = Table(title="sampling (transformer only)")
    for column in ("preset", "px", "steps", "s with LoRA", "s without", "peak GiB"):
        sampling.add_column(column, justify="left" if column == "preset" else "right")
    for row in doc["sampling"]:
        if "error" in row:
            sampling.add_row(row["preset"], str(row["resolution"]), str(row["steps"]), row["error"], "", "")
            continue
        peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}"
        sampling.add_row(
            row["preset"],
            str(row["resolution"]),
            str(row["steps"]),
            f"{row['seconds']:.3f}",
            f"{row['seconds_no_lora']:.3f}",
            peak,
        )
    return [table, sampling] if doc["sampling"] else [table]


def short_levers(levers: dict[str, Any]) -> str:
    """`ckpt full, compiled, fp8, sdpa-cudnn` for a table cell."""
    ckpt = levers["checkpointing"]
    if ckpt == "selective":
        ckpt = f"sel {levers['checkpoint_fraction']:.0%}"
    parts = [
        f"ckpt {ckpt}",
        "compiled" if levers["compile"] else "eager",
        levers["quantize"],
        levers["attention_backend"],
    ]
    if levers["offload"] != "none":
        parts.append("offload")
    return ", ".join(parts)
