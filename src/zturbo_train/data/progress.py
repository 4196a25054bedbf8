"""Progress bars for the dataset's slow parts (scanning, encoding): count, rate and ETA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress(console, description: str, total: int, transient: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with count, rate and ETA on `console`; silent when console is None.

    `transient` bars vanish when done. Where the console is not a terminal they are not drawn
    at all: rich would still end them with an empty line (a stray blank line in logs).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _rate_column(),
        TimeRemainingColumn(),
    )
    hidden = console is None or (transient and not console.is_terminal)
    with Progress(*columns, console=console, disable=hidden, transient=transient) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} it/s" if task.speed else "- it/s", style="progress.data.speed")

    return Rate()
