"""`zturbo train`: setup, the loop, previews, checkpoints, resume.

    run(cfg) -> setup (caches, model, adapter, LoRA, optimizer, resume)
             -> loop(step.backward / step.update, log, maybe_save, maybe_preview)
             -> final save

The step itself lives in train/step.py (shared with `zturbo bench`); here sit the things beside
it: reading the loss only when logging (one host sync per `log_every` steps), saving
atomically, previews with the training adapter inverted, and stopping cleanly on Ctrl-C,
SIGTERM, a NaN loss or out-of-memory without losing the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from rich.markup import escape

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from rich.console import Console

    from ..data.batches import TrainDataset
from .. import __version__
from ..config import Config
from ..drift import DriftMonitor, DriftProbe
from ..errors import TrainingError
from ..fileio import append_line, write_json, write_text, write_with
from ..images import make_grid
from ..lora.adapter import TrainingAdapter
from ..lora.factored import network_args, network_options
from ..lora.formats import linear_shapes, modules_of, write_lora_file
from ..lora.network import LoraNetwork, create_lora
from ..memory.estimate import network_warning
from ..memory.levers import apply_levers, levers_for, workload_of
from ..models import autocast, load_parts, resolve_device, torch_dtype
from ..monitor import Monitor
from ..monitor.records import LOSS_LABEL
from ..preflight import check_train
from ..sampling import generate_images
from . import distributed
from .ema import LoraEma
from .optimizers import averaged_weights, build_optimizer, param_groups
from .preservation import Preservation
from .resume import plan_resume, record_resume
from .state import (
    RunFolder,
    RunLock,
    capture_rng,
    latest_state,
    load_latest_state,
    lora_tensors,
    open_run_folder,
    prune,
    restore_optimizer,
    restore_rng,
    save_state,
)
from .step import StepSettings, TrainStep, lr_at
from .validation import Validation


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path | None
    steps_done: int
    final_loss: float | None  # the last logged step's raw loss
    seconds: float
    interrupted: bool = False
    previews: list[Path] = field(default_factory=list)
    rank: int = 0
    smoothed_loss: float | None = None  # the moving average the progress bar shows
    turbo_drift: dict[str, float] | None = None  # the last preview's turbo_drift fields (drift.py); None: no previews


@dataclass
class Session:
    """Everything set up for training, so the loop functions take one argument."""

    cfg: Config
    run: RunFolder
    device: torch.device
    transformer: ZImageTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    adapter: TrainingAdapter
    network: LoraNetwork
    step: TrainStep
    dataset: TrainDataset
    preview_embeds: list[torch.Tensor]
    negative_embeds: list[torch.Tensor] | None
    console: Console | None  # None when setup() is called without one
    start_step: int = 0
    data_state: dict | None = None
    rank: int = 0
    world: int = 1
    started_at: float = field(default_factory=time.time)  # unix seconds, for the LoRA's ss_training_started_at
    drift: DriftMonitor = field(default_factory=DriftMonitor)  # each preview's turbo_drift against step 0's
    metrics_log: MetricsLog | None = None  # the loop's log, so a preview can add turbo_drift to its step's row
    ema: LoraEma | None = None  # train.ema: the average the saved LoRA and previews use
    validation: Validation | None = None  # held-out views (every rank flushes the log at its steps; rank 0 evaluates)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------ setup


def setup(
    cfg: Config,
    resume: bool,
    overwrite: bool,
    console,
    device: torch.device | None = None,
    ranks: distributed.Ranks | None = None,
    lock: RunLock | None = None,
) -> Session:
    """Caches first (one encoder at a time), then the transformer, adapter, LoRA, optimizer, state.

    `lock` (held by the caller for the whole run) is taken on the output folder before anything in it changes.
    Under torchrun (`ranks`): rank 0 locks and opens the output folder, the ranks share the caching,
    and the step is wrapped in DDP over the LoRA once every rank holds the same state.
    """
    from ..data.prepare import scan_dataset

    ranks = ranks or distributed.Ranks()
    device = device or resolve_device()
    check_train(cfg, resume, overwrite, writes_run=ranks.is_main)
    with distributed.phase(ranks, "checking the data"):  # every dataset problem before the output folder is touched
        scanned = scan_dataset(cfg, console)
    plan = None
    with distributed.phase(ranks, "opening the output folder"):  # rank 0 checks, clears or creates it
        run = (
            open_run_folder(cfg.train.output_dir, resume, overwrite, cfg.train.name, lock)
            if ranks.is_main
            else RunFolder(cfg.train.output_dir)
        )
        if resume and ranks.is_main:  # before caching: a setting that cannot change is refused in a second
            plan = plan_resume(run, cfg, latest_state(run))
            for line in plan.describe(run, cfg.train.steps) if console is not None else ():
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    dataset = distributed.prepare_dataset(cfg, device, ranks, console, scanned)
    dtype = torch_dtype(cfg.model.dtype)
    levers = levers_for(cfg, device)  # quantized or offloaded bases load on the host first
    parts = load_parts(cfg.model.path, ["vae", "scheduler"], dtype=cfg.model.dtype, device=str(device))
    parts.transformer = load_parts(
        cfg.model.path, ["transformer"], dtype=cfg.model.dtype, device="cpu" if levers.loads_on_host else str(device)
    ).transformer
    transformer = parts.transformer
    adapter = TrainingAdapter.from_config(cfg.model, transformer)
    adapter.apply()
    levers = apply_levers(transformer, levers, device, adapter, workload_of(cfg)).levers
    if console is not None:
        console.print(
            f"[dim]memory {levers.memory}: {levers.describe()}{'; ' + levers.note if levers.note else ''}[/]",
            highlight=False,
            soft_wrap=True,
        )
    network = create_lora(
        transformer,
        cfg.lora.rank,
        cfg.lora.scale_alpha,
        cfg.lora.blocks,
        cfg.lora.targets,
        cfg.lora.dropout,
        seed=cfg.train.seed,
        **network_options(cfg.lora),
    )
    warning = network_warning(cfg.lora, linear_shapes(transformer), network.names)
    if warning and console is not None:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    network.train()
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    params = network.trainable_parameters()
    optimizer = build_optimizer(param_groups(network, cfg.train.loraplus_ratio), cfg.train, device)
    step = TrainStep(
        transformer,
        params,
        optimizer,
        StepSettings.from_config(cfg.train, dtype, device),
        generator,
        preservation=Preservation.from_config(cfg.train, network),
    )
    negative = (
        dataset.prompt_embeddings([cfg.sample.negative] * len(cfg.sample.prompts)) if cfg.sample.guidance > 0 else None
    )
    session = Session(
        cfg,
        run,
        device,
        transformer,
        parts.vae,
        parts.scheduler,
        adapter,
        network,
        step,
        dataset,
        dataset.prompt_embeddings(cfg.sample.prompts),
        negative,
        console,
        rank=ranks.rank,
        world=ranks.world,
    )
    t = cfg.train
    session.ema = LoraEma(params, t.ema_decay, t.ema_start, t.ema_device, t.ema_every) if t.ema else None
    session.validation = Validation.build(dataset, cfg.train.seed, cfg.train.val_every, step.settings, device)
    if resume:
        _resume(session)
        if plan is not None:
            record_resume(run, cfg, plan)
    elif ranks.is_main:
        write_json(run.config, {"zturbo_version": __version__, **cfg.model_dump(mode="json")})
    distributed.data_parallel(session, ranks)
    return session


def _resume(s: Session) -> None:
    """Continue from the newest state: LoRA, optimizer, RNG streams, data position, step."""
    if latest_state(s.run) is None:  # rank 0 found one: this rank's machine does not see the run folder
        raise TrainingError(
            f"rank {s.rank} sees no saved state in {s.run.root}; for --resume on several machines "
            f"put train.output_dir on a filesystem they all see"
        )
    log = (
        (lambda line: s.console.print(line, highlight=False, markup=False, soft_wrap=True))
        if s.console is not None
        else print
    )
    _, tensors, meta = load_latest_state(s.run, log, set_aside=s.is_main)
    s.network.load_state_tensors(lora_tensors(tensors))
    restore_optimizer(s.step.optimizer, tensors, meta)
    if s.ema is not None:
        s.ema.load(tensors, meta["step"])
    restore_rng(s.step.generator, tensors, meta)
    s.start_step, s.data_state = meta["step"], meta["data"]
    if s.is_main:
        _truncate_metrics(s.run.metrics, s.start_step)
        s.drift.start = meta.get("turbo_drift_start")  # the run's own step 0, not the first preview after resuming


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step, so the log a user plots has one line per step."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue

    write_text(path, "".join(f"{line}\n" for line in kept))


# ------------------------------------------------------------------------------ saving


def lora_metadata(s: Session, step: int, weights: str | None = None) -> dict[str, object]:
    """`weights` (with train.ema): which weights the file holds, "ema" or "raw"."""
    cfg = s.cfg
    every = f", updated every {cfg.train.ema_every} steps" if cfg.train.ema_every > 1 else ""
    which = {
        "ema": f"ema (decay {cfg.train.ema_decay:g} per step, from step {cfg.train.ema_start}{every})",
        "raw": "raw (the trained weights; the EMA is the main file)",
    }.get(weights)
    return {
        **({"weights": which} if which else {}),
        "base_model": cfg.model.path,
        "adapter": cfg.model.adapter,
        "adapter_weight": cfg.model.adapter_weight,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.scale_alpha,
        **({"network_args": network_args(cfg.lora)} if cfg.lora.type != "lora" else {}),
        "targets": modules_of(s.network.names),
        "trigger_word": cfg.train_data[0].trigger_word,
        **regularisation_fact(cfg),
        "steps": step,
        "resolution": sorted({r for d in cfg.data for r in d.resolution}),
        "zturbo_version": __version__,
        "started_at": int(s.started_at),
    }


def regularisation_fact(cfg: Config) -> dict[str, object]:
    """The regularisation sets a LoRA was trained with (its `zturbo.regularisation` metadata), {} without one."""
    sets = [{"dir": str(d.dir), "ratio": d.share, "loss_weight": d.loss_weight} for d in cfg.data if d.regularisation]
    return {"regularisation": sets} if sets else {}


def save_lora(s: Session, step: int, final: bool) -> Path:
    name = s.cfg.train.name
    path = s.run.lora(name, None if final else step)
    if s.ema is not None:  # the trained weights beside the average: <name>-raw.safetensors
        write_lora_file(
            s.run.lora(f"{name}-raw", None if final else step),
            s.network.to_lora_dict(),
            "comfyui",
            lora_metadata(s, step, "raw"),
        )
    with shown_weights(s):
        write_lora_file(
            path, s.network.to_lora_dict(), "comfyui", lora_metadata(s, step, "ema" if s.ema is not None else None)
        )
    if not final:
        prune(s.run.checkpoints, f"{name}-step*.safetensors", s.cfg.train.keep_last)
        prune(s.run.checkpoints, f"{name}-raw-step*.safetensors", s.cfg.train.keep_last)
    return path


@contextmanager
def shown_weights(s: Session) -> Iterator[None]:
    """The weights saved as the LoRA, previewed and validated: the EMA (train.ema), schedule-free's average, or
    the trained ones; the trained weights are back as they were afterwards."""
    with averaged_weights(s.step.optimizer, s.step.params):
        if s.ema is None:
            yield
        else:
            with s.ema.swapped_in():
                yield


def save_training_state(s: Session, step: int, loader) -> Path:
    lora = s.network.state_tensors()
    extra = {"data": loader.state_dict(), "config": s.cfg.model_dump(mode="json"), "turbo_drift_start": s.drift.start}
    return save_state(
        s.run,
        step,
        lora,
        s.step.optimizer,
        capture_rng(s.step.generator),
        extra,
        s.cfg.train.keep_last,
        s.ema.state_tensors() if s.ema is not None else None,
    )


# ------------------------------------------------------------------------------ previews


@torch.no_grad()
def preview(s: Session, step: int) -> list[Path]:
    """Draw the [sample] prompts with the adapter inverted (what users get on plain Turbo), and their turbo_drift."""
    cfg = s.cfg.sample
    if not cfg.prompts:
        return []
    seeds = [cfg.seed + i for i in range(len(cfg.prompts))]
    probe = DriftProbe()
    s.network.eval()
    try:
        with s.adapter.inverted(), autocast(s.device, s.step.settings.autocast_dtype), shown_weights(s):
            images = generate_images(
                s.transformer,
                s.scheduler,
                s.vae,
                s.preview_embeds,
                width=cfg.width,
                height=cfg.height,
                seeds=seeds,
                steps=cfg.steps,
                guidance=cfg.guidance,
                negative_embeds=s.negative_embeds,
                device=s.device,
                observe=probe.observe,
            )
    finally:
        s.network.train()
    _report_drift(s, step, probe.value())
    folder = s.run.samples / f"step-{step:06d}"
    paths = [
        write_with(folder / f"{i:02d}.png", lambda tmp, im=im: im.save(tmp, format="PNG"))
        for i, im in enumerate(images)
    ]
    grid = make_grid([images], [f"step {step}" + (" (EMA weights)" if s.ema is not None else "")])
    paths.append(write_with(s.run.samples / f"step-{step:06d}-grid.png", lambda tmp: grid.save(tmp, format="PNG")))
    return paths


def _report_drift(s: Session, step: int, drift: float) -> None:
    """turbo_drift into the step's metrics row and the progress output; a one-line warning past the threshold."""
    fields, warning = s.drift.update(step, drift)
    if s.metrics_log is not None and step > 0:
        s.metrics_log.note(step, fields)
    if s.console is not None:
        s.console.print(f"[dim]{s.drift.line(step, fields)}[/]", highlight=False, soft_wrap=True)
        if warning:
            s.console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------ the loop


class StopRequest:
    """Ctrl-C / SIGTERM set a flag the loop checks between steps; a second Ctrl-C aborts at once.

    `poll()` after each step turns the request into `reason`; with `agree` (data parallel)
    a request on any rank stops every rank after the same step.
    """

    def __init__(self, agree: Any = None):
        self.requested: str | None = None
        self.reason: str | None = None
        self.agree = agree

    def poll(self) -> str | None:
        if self.agree is None:
            self.reason = self.requested
        elif self.agree(self.requested is not None):
            self.reason = self.requested or "a stop on another rank"
        return self.reason

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = signal.Signals(signum).name

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class MetricsLog:
    """Buffers per-step tensors on the device and reads them in one sync every `every` steps.

    metrics.jsonl is only ever appended to (monitor/ tails it by offset). A preview's fields
    (turbo_drift) reach their step's row through `note`: merged at flush while the row is
    pending, or into the row `flush(hold=step)` kept back for them until `release()`.
    """

    def __init__(self, path: Path, every: int, write: bool, reduce: Any = None):
        self.path, self.every, self.write = path, every, write
        self.reduce = reduce  # mean over ranks under data parallel, so every rank sees the same loss
        self.pending: list[tuple[int, list[torch.Tensor], float, float, dict]] = []
        self.notes: dict[int, dict] = {}  # extra fields (turbo_drift) for rows not written yet
        self.held: dict | None = None  # the row of a step whose preview is still to come
        self.smooth: float | None = None
        self.last_loss: float | None = None
        self.window_start = time.perf_counter()

    def add(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        lr: float,
        epoch: int,
        extra: dict[str, torch.Tensor] | None = None,
        dop_loss: torch.Tensor | None = None,
    ) -> None:
        """`extra`: more device scalars for the step's row (val_loss, rank 0's), read in the same flush.
        `dop_loss` (train.preservation) is every rank's, so it is averaged over the ranks as the loss is."""
        values = [loss, grad_norm] + ([] if dop_loss is None else [dop_loss])
        self.pending.append((step, values, lr, epoch, extra or {}))

    def note(self, step: int, fields: dict) -> None:
        """Add fields to step's row (held or pending); a step whose row is already written gets a row of its own."""
        if self.held is not None and self.held["step"] == step:
            self.held.update(fields)
        elif any(p[0] == step for p in self.pending):
            self.notes.setdefault(step, {}).update(fields)
        elif self.write:
            append_line(self.path, json.dumps({"step": step, **fields}))

    def release(self) -> None:
        """Write the row `flush(hold=...)` kept back (after its preview, or when none came)."""
        if self.held is not None and self.write:
            append_line(self.path, json.dumps(self.held))
        self.held = None

    def flush(self, device: torch.device, hold: int | None = None) -> dict | None:
        """Read the buffered values (one host sync); raise on a NaN/inf loss before anything is saved.

        The row of step `hold` (a preview is due there) is kept back for `note` until `release()`."""
        self.release()
        if not self.pending:
            return None
        values = torch.stack([torch.stack([v.float() for v in row]) for _, row, _, _, _ in self.pending])
        values = (values if self.reduce is None else self.reduce(values)).cpu().tolist()
        now = time.perf_counter()
        per_step = (now - self.window_start) / len(self.pending)
        self.window_start = now
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row = None
        for (step, _, lr, epoch, extra), (loss, norm, *dop) in zip(self.pending, values):
            # a non-finite gradient (finite loss) has already turned the LoRA weights into NaN in the update
            for what, value in (("loss", loss), ("gradient norm", norm), *(("DOP loss", v) for v in dop)):
                if not math.isfinite(value):
                    self.pending.clear()
                    raise TrainingError(
                        f"the {what} became {value} at step {step}; stopped without saving it. "
                        f"Lower train.lr or set train.max_grad_norm, then resume from the last good "
                        f"state with --resume"
                    )
            self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
            self.last_loss = loss
            row = {
                "step": step,
                "loss": loss,
                "loss_smooth": self.smooth,
                "lr": lr,
                "grad_norm": norm,
                **({"dop_loss": dop[0]} if dop else {}),
                "sec_per_step": per_step,
                "peak_mem_gib": peak,
                "epoch": epoch,
                "time": time.time(),
                **{key: float(value) for key, value in extra.items()},
                **self.notes.pop(step, {}),
            }
            if step == hold:
                self.held = row
            elif self.write:
                append_line(self.path, json.dumps(row))
        self.pending.clear()
        return row


def run(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console=None,
    quiet: bool = False,
    device: torch.device | None = None,
) -> TrainResult:
    """Train a LoRA as `cfg` says; returns where the results went. Under torchrun, one rank of a data-parallel run."""
    from rich.console import Console

    with distributed.launched() as ranks, RunLock() as lock:  # one live run per output folder, until it returns
        console = console or Console(stderr=True, quiet=quiet or not ranks.is_main)
        started = time.perf_counter()
        try:
            s = setup(cfg, resume, overwrite, console, device, ranks, lock)
        except torch.cuda.OutOfMemoryError:  # before any step: nothing was trained, no saved state was touched
            raise TrainingError(out_of_memory_message(cfg, setting_up=True, resume=resume)) from None
        if ranks.parallel:
            console.print(distributed.batch_line(cfg.train, ranks, s.device), highlight=False, soft_wrap=True)
        try:
            return loop(s, started)
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(out_of_memory_message(cfg)) from None
        finally:
            s.adapter.deactivate()


def out_of_memory_message(cfg: Config, setting_up: bool = False, resume: bool = False) -> str:
    where = "while setting up (loading the model, adapter and LoRA) for" if setting_up else "at"
    if not setting_up:
        kept = "the last saved state is kept; resume with --resume"
    elif resume:
        kept = "nothing was trained and the saved states are untouched; run again with --resume"
    else:
        kept = "nothing was trained or saved; run the same command again"
    return (
        f"out of GPU memory {where} resolution {max(r for d in cfg.data for r in d.resolution)}, batch "
        f"{cfg.train.batch_size}; lower memory with --set train.memory=12gb (or 8gb), "
        f"train.gradient_checkpointing=true, train.batch_size=1, train.optimizer=adamw8bit, "
        f"a smaller data.resolution or lora.rank ({kept})"
    )


def _preview_due(s: Session, step: int, stop_reason: str | None) -> bool:
    """Whether `loop` draws a preview after this step (so the step's row waits for its turbo_drift)."""
    cfg = s.cfg.train
    if not (s.is_main and s.cfg.sample.prompts):
        return False
    return step == cfg.steps or bool(cfg.sample_every and step % cfg.sample_every == 0 and not stop_reason)


def _preview(s: Session, step: int, log: MetricsLog) -> list[Path]:
    """A preview, then its step's row written (also when the preview fails: the row is never lost to it)."""
    try:
        return preview(s, step)
    finally:
        log.release()


def loop(s: Session, started: float) -> TrainResult:
    cfg = s.cfg.train
    log = MetricsLog(s.run.metrics, cfg.log_every, s.is_main, distributed.mean_over_ranks if s.world > 1 else None)
    s.metrics_log = log
    previews: list[Path] = []
    if s.start_step == 0 and s.is_main:
        previews += preview(s, 0)
    step, due_save = s.start_step, False
    resumed_at = s.start_step if s.data_state is not None else None
    with (
        Monitor(s.cfg, s.run.root, resumed_at, active=s.is_main, quiet=s.console.quiet) as monitor,
        s.dataset.loader(s.device, state=s.data_state, draw=s.step.draw_for, warn=_warning(s)) as loader,
        StopRequest(distributed.any_rank if s.world > 1 else None).installed() as stop,
        _progress(s, cfg.steps) as bar,
    ):
        while step < cfg.steps and stop.reason is None:
            lr = lr_at(step, cfg)
            batches = [next(loader) for _ in range(cfg.grad_accum)]
            losses, dops = zip(*(s.step.backward_batch(b) for b in batches))
            norm = s.step.update(lr)
            step += 1
            if s.ema is not None:
                s.ema.update(step)
            stop.poll()
            due_val = s.validation is not None and s.validation.due(step, cfg.steps)
            log.add(
                step,
                _mean(losses),
                norm,
                lr,
                batches[-1].epoch,
                {"val_loss": validation_loss(s)} if due_val and s.is_main else None,
                None if dops[0] is None else _mean(dops),
            )
            due_save = cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps
            if step % cfg.log_every == 0 or due_save or step == cfg.steps or stop.reason or due_val:
                _show(bar, step, log.flush(s.device, hold=step if _preview_due(s, step, stop.reason) else None))
                monitor.on_metrics()
            else:
                bar.update(step)
            if due_save and s.is_main:
                lora_path = save_lora(s, step, final=False)
                save_training_state(s, step, loader)
                monitor.on_save(step)
            # a stop (SIGTERM: preemption with a grace period) saves at once, without drawing a preview first
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps and s.is_main and not stop.reason:
                previews += _preview(s, step, log)
                monitor.on_preview(step)
        interrupted = stop.reason is not None and step < cfg.steps
        if s.is_main:
            if not (interrupted and due_save):  # stopped right after a save: it is already on disk
                save_training_state(s, step, loader)
                lora_path = save_lora(s, step, final=not interrupted)
            if not interrupted:
                previews += _preview(s, step, log)
        log.release()
    result = TrainResult(
        s.run.root,
        lora_path if s.is_main else None,
        step,
        log.last_loss,
        time.perf_counter() - started,
        interrupted,
        previews,
        s.rank,
        smoothed_loss=log.smooth,
        turbo_drift=s.drift.last,
    )
    return result


def _mean(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The step's value over its micro-batches (no new tensor for one)."""
    return torch.stack(values).mean() if len(values) > 1 else values[0]


def validation_loss(s: Session) -> torch.Tensor:
    """val_loss of the LoRA as it is saved (the EMA, schedule-free's average, or the trained weights), on the device."""
    with shown_weights(s):
        return s.validation.loss(s.transformer, s.network, s.device)


def _warning(s: Session):
    """Library notes (the dataset changed since the saved state, ...) as one `warning:` line on our console."""

    def warn(message: str) -> None:
        s.console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    return warn


@contextmanager
def _progress(s: Session, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{LOSS_LABEL} {{task.fields[loss]}}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[rate]} it/s"),
        TimeRemainingColumn(),
    ]
    if s.validation is not None:
        columns.insert(4, TextColumn("val_loss {task.fields[val]}"))
    if s.step.preservation is not None:
        columns.insert(4, TextColumn("dop {task.fields[dop]}"))
    with Progress(*columns, console=s.console, disable=not s.is_main or s.console.quiet) as progress:
        task = progress.add_task(
            "train", total=total, completed=s.start_step, loss="-", lr="-", rate="-", val="-", dop="-"
        )
        yield _Bar(progress, task)


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def update(self, step: int, **fields: Any) -> None:
        self.progress.update(self.task, completed=step, **fields)


def _show(bar: _Bar, step: int, row: dict | None) -> None:
    if row is None:
        bar.update(step)
        return
    rate = 1.0 / row["sec_per_step"] if row["sec_per_step"] > 0 else 0.0
    val = {"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}
    dop = {"dop": f"{row['dop_loss']:.2e}"} if "dop_loss" in row else {}
    bar.update(step, loss=f"{row['loss_smooth']:.4f}", lr=f"{row['lr']:.2e}", rate=f"{rate:.2f}", **val, **dop)
