"""`zturbo report RUN_DIR`: redraw a run folder's plots and write its report.html.

The page itself is monitor/report.py, which the training loop's monitor also writes; this is
only the command: check the folder is a run, redraw, write. It reads nothing but the folder (and
probes the run's lock to tell "still training" from "stopped"), so it works on a finished run, a
stopped one and one still training (every write is atomic).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TrainingError
from ..monitor.plots import plot_loss, timelines
from ..monitor.records import previews, read_metrics
from ..monitor.report import write_report
from ..train.state import RunLock


def report_run(root: Path, plots: bool = True) -> Path:
    """Redraw loss.png and the timelines (unless `plots` is False) and write <root>/report.html; returns its path."""
    root = Path(root).resolve()  # the page's commands then work from any folder
    if not (root / "metrics.jsonl").is_file() and not (root / "config.json").is_file():
        raise TrainingError(
            f"{root} is not a zturbo run folder (no metrics.jsonl or config.json); pass the train.output_dir of a run"
        )
    if plots:
        plot_loss(read_metrics(root / "metrics.jsonl"), root / "loss.png")
        timelines(previews(root / "samples"), root / "samples")
    return write_report(root, phase="running" if RunLock.is_held(root) else "ended")
