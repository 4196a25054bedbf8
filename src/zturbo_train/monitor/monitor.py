"""The training loop's one handle on logging, plots and the report.

The loop calls four hooks, each of which only queues a note and returns:

    on_metrics()     metrics.jsonl has new lines (after each flush)
    on_preview(step) a preview step is on disk
    on_save(step)    a LoRA and state were saved
                     (after a save or a preview: loss.png, timelines and report.html are redrawn)
    on_end(status)   the run is over (finished, stopped or failed): last logs, plots, report

One background thread does the work, reading the run folder (new metric lines, complete
preview folders), so nothing here runs on the training step's thread and every numeric key
of a metrics row reaches the loggers, whatever wrote it. Only rank 0 runs a monitor. A
logger or a drawing that fails is one warning and is then left off; the run goes on.
"""

from __future__ import annotations

import queue
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

from ..config import Config
from ..fileio import write_text
from .loggers import Logger
from .next_commands import RUN_TOML, to_toml
from .records import MetricsTail, flat, previews, read_metrics, scalars


def clear_outputs(root: Path) -> None:
    """A new run in a folder (--overwrite) starts new logs: a new W&B run id, no old TensorBoard events."""
    from .loggers import TENSORBOARD_DIR, WANDB_FILE
    from .report import REPORT

    shutil.rmtree(root / TENSORBOARD_DIR, ignore_errors=True)
    for name in (WANDB_FILE, REPORT, "loss.png"):
        (root / name).unlink(missing_ok=True)


class MonitorWarning(UserWarning):
    """A logger or a plot failed; training goes on without it."""


class Monitor:
    """Hooks for the loop; `active=False` (ranks other than 0) makes every hook a no-op.

    `resume_step`: the step of the state a resumed run starts from (None: a new run), so the
    loggers continue their runs without logging a step twice.
    """

    def __init__(
        self, cfg: Config, root: Path, resume_step: int | None = None, active: bool = True, quiet: bool = False
    ):
        self.cfg, self.root, self.resume_step, self.quiet = cfg, Path(root), resume_step, quiet
        self.thread: threading.Thread | None = None
        if not active:
            return
        self.config = cfg.model_dump(mode="json")
        if resume_step is None:
            clear_outputs(self.root)
        write_text(self.root / RUN_TOML, to_toml(self.config))
        metrics = self.root / "metrics.jsonl"
        self.tail = MetricsTail(metrics, metrics.stat().st_size if resume_step is not None and metrics.is_file() else 0)
        self.sent_previews = resume_step if resume_step is not None else -1  # previews up to here are logged
        self.loggers: list[Logger] = []
        self.warned: set[str] = set()
        self.notes: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="zturbo-monitor", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- hooks (training thread)

    def on_metrics(self) -> None:
        self._note("metrics")

    def on_preview(self, step: int) -> None:
        self._note("preview", step)

    def on_save(self, step: int) -> None:
        self._note("save", step)

    def on_end(self, status: str | None = None, wait: float | None = None) -> None:
        """Last logs, plots and report; waits for them (and for the loggers to close) unless `wait` says less."""
        if self.thread is None:
            return
        self._note("end", status)
        self.thread.join(wait)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.on_end()
        elif issubclass(kind, Exception):
            self.on_end(f"stopped: {error}")
        else:  # a second Ctrl-C: write what is quick, do not wait for uploads
            self.on_end("interrupted", wait=10)

    def _note(self, kind: str, value: Any = None) -> None:
        if self.thread is not None:
            self.notes.put((kind, value))

    # ---------------------------------------------------------------- the background thread

    def _work(self) -> None:
        self._open_loggers()
        if self.cfg.log.report:  # imported now, while training runs, not when a run ends (and its process with it)
            try:
                import matplotlib.backends.backend_agg  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - a broken matplotlib costs the plots, never the run
                self._warn("the plots and report", exc, "the run goes on")
        while True:
            kinds = dict([self.notes.get()])
            while not self.notes.empty():  # a backlog is handled in one pass
                kinds.update([self.notes.get()])
            try:
                self._send()
            except Exception as exc:  # noqa: BLE001 - e.g. the run folder became unreadable
                self._warn("logging", exc, "the run goes on")
            if "end" in kinds:
                self._draw(kinds["end"], phase="ended")
                for logger in list(self.loggers):
                    self._call(logger, logger.close)
                return
            if "save" in kinds or "preview" in kinds:
                self._draw(None, phase="running")

    def _open_loggers(self) -> None:
        from .loggers import TensorBoard, WandB

        log, resumed = self.cfg.log, self.resume_step is not None
        makers = {
            "tensorboard": lambda: TensorBoard(self.root, self.config, flat(self.config), self.resume_step),
            "wandb": lambda: WandB(self.root, log, self.cfg.train.name, self.config, resumed, self.quiet),
        }
        for name, make in makers.items():
            if getattr(log, name):
                try:
                    self.loggers.append(make())
                except Exception as exc:  # noqa: BLE001 - no login, no network, a broken install ...
                    self._warn(name, exc, f"logging to {name} is off for this run")

    def _send(self) -> None:
        """New metric rows and the preview steps not sent yet, to every logger, in step order."""
        events = [(row["step"], "scalars", values) for row in self.tail.new_rows() if (values := scalars(row))]
        found = [p for p in previews(self.root / "samples") if p.step > self.sent_previews]
        if found:
            self.sent_previews = found[-1].step
        if self.cfg.log.images:
            prompts = self.cfg.sample.prompts
            events += [
                (
                    p.step,
                    "images",
                    [
                        (f"preview/{n}", path, prompts[n] if n < len(prompts) else path.stem)
                        for n, path in enumerate(p.images)
                    ],
                )
                for p in found
            ]
        events.sort(key=lambda event: event[0])  # W&B takes steps in order only
        for logger in list(self.loggers):
            for step, kind, payload in events:
                self._call(logger, getattr(logger, kind), step, payload)

    def _call(self, logger: Logger, method, *args) -> None:
        """A logger that fails once is dropped, with one warning; the others go on."""
        if logger not in self.loggers:
            return
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001 - a logger must never stop the run
            self.loggers.remove(logger)
            self._warn(logger.name, exc, f"logging to {logger.name} is off for the rest of this run")

    def _draw(self, status: str | None, phase: str) -> None:
        from .plots import plot_loss, timelines
        from .report import write_report

        if not self.cfg.log.report:
            return
        try:
            plot_loss(read_metrics(self.root / "metrics.jsonl"), self.root / "loss.png")
            timelines(previews(self.root / "samples"), self.root / "samples")
            write_report(self.root, status=status, phase=phase)
        except Exception as exc:  # noqa: BLE001 - a plot must never stop the run
            self._warn("the plots and report", exc, "the run goes on")

    def _warn(self, what: str, exc: Exception, outcome: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            warnings.warn(f"{what} failed ({type(exc).__name__}: {exc}); {outcome}", MonitorWarning, stacklevel=1)
