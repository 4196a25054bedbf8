"""Watching a run: TensorBoard / W&B logging, loss.png, preview timelines and report.html.

`Monitor` is the training loop's one handle (hooks, a background thread); `write_report`
makes report.html from any run folder (also for `zturbo report RUN_DIR`, commands/report.py).
"""

from .monitor import Monitor, MonitorWarning
from .report import write_report

__all__ = ["Monitor", "MonitorWarning", "write_report"]
