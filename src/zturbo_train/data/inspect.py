"""`zturbo data inspect`: what training would see, without loading a model.

Scans like training does (same checks, same buckets) and shows the images with their
buckets and captions, the samples per bucket, and every skipped file or warning with
its reason. Errors are shown in full, then raised, so scripts get a non-zero exit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import DataConfig, apply_override, load_config, validate_config
from ..errors import ConfigError
from .batches import Sample, reg_counts
from .dataset import Scan, scan_datasets
from .prepare import plan_samples

_CAPTION_WIDTH = 60


@dataclass
class Inspection:
    """A scan and its bucket plan, problems included (nothing raised for them yet)."""

    datasets: list[DataConfig]
    scan: Scan
    samples: list[Sample]

    def bucket_rows(self) -> list[tuple[int, str, int, int]]:
        """(resolution, bucket, images, training samples per epoch) for every bucket in use."""
        images: Counter = Counter()
        per_epoch: Counter = Counter()
        for sample in self.samples:
            table = self.datasets[self.scan.items[sample.item].dataset]
            key = (sample.resolution, sample.bucket)
            images[key] += 0 if sample.flip else 1
            per_epoch[key] += 0 if table.regularisation else table.repeats
        return [(res, f"{b[0]}x{b[1]}", images[(res, b)], per_epoch[(res, b)]) for res, b in sorted(images)]

    def regularisation_rows(self) -> list[tuple[Path, int, int, float, float]]:
        """(folder, images, samples per epoch, ratio, loss weight) of each regularisation set, counted as training
        counts them (before any images are held out for validation)."""
        regs = [i for i, table in enumerate(self.datasets) if table.regularisation]
        counts = reg_counts(sum(row[3] for row in self.bucket_rows()), [self.datasets[i].share for i in regs])
        images = Counter(item.dataset for item in self.scan.items)
        return [
            (self.datasets[i].dir, images[i], count, self.datasets[i].share, self.datasets[i].loss_weight)
            for i, count in zip(regs, counts)
            if images[i]
        ]

    def counts(self) -> dict[str, int]:
        levels = Counter(p.level for p in self.scan.problems)
        kinds = Counter(p.kind for p in self.scan.problems)
        regs = self.regularisation_rows()
        reg = {"regularisation_images": sum(r[1] for r in regs), "regularisation_samples": sum(r[2] for r in regs)}
        return {
            "images": len(self.scan.items),
            "samples_per_epoch": sum(r[3] for r in self.bucket_rows()) + reg["regularisation_samples"],
            **(reg if regs else {}),
            "skipped": levels["skip"],
            "warnings": levels["warn"],
            "errors": levels["error"],
            "captions_missing": kinds["missing_caption"] + kinds["empty_caption"],
            "default_captions": sum(item.caption_source == "default" for item in self.scan.items),
        }

    def item_buckets(self) -> dict[int, list[tuple[int, tuple[int, int]]]]:
        """Image index -> its (resolution, bucket) pairs."""
        out: dict[int, list[tuple[int, tuple[int, int]]]] = {}
        for sample in self.samples:
            if not sample.flip:
                out.setdefault(sample.item, []).append((sample.resolution, sample.bucket))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything shown, as plain JSON types (for `--json`)."""
        buckets = self.item_buckets()
        return {
            "counts": self.counts(),
            "images": [
                {
                    "path": str(item.path),
                    "width": item.width,
                    "height": item.height,
                    "caption": item.caption,
                    "caption_source": item.caption_source,
                    "regularisation": self.datasets[item.dataset].regularisation,
                    "buckets": [f"{res}:{w}x{h}" for res, (w, h) in buckets.get(i, [])],
                }
                for i, item in enumerate(self.scan.items)
            ],
            "regularisation": [
                dict(zip(("dir", "images", "samples_per_epoch", "ratio", "loss_weight"), (str(row[0]), *row[1:])))
                for row in self.regularisation_rows()
            ],
            "buckets": [
                dict(zip(("resolution", "bucket", "images", "samples_per_epoch"), row)) for row in self.bucket_rows()
            ],
            "problems": [
                {"path": str(p.path), "level": p.level, "kind": p.kind, "reason": p.reason} for p in self.scan.problems
            ],
        }


def inspect_datasets(datasets: Sequence[DataConfig], console=None, exclude: Sequence[Path] = ()) -> Inspection:
    """Scan (progress on `console`) and plan; raises DataError only for a missing or empty folder.
    `exclude`: folders never read (the run's output folder)."""
    scan = scan_datasets(datasets, console, exclude)
    samples, problems = plan_samples(scan, datasets)
    scan.problems += problems
    return Inspection(list(datasets), scan, samples)


def datasets_from_options(
    directory: Path | None, config: Path | None, overrides: Sequence[str] = (), **options: Any
) -> list[DataConfig]:
    """The [[data]] tables of `config`, or one table built from DIR and the command-line options."""
    if (directory is None) == (config is None):
        raise ConfigError("give either a folder (zturbo data inspect DIR) or --config CONFIG.toml, not both or neither")
    if config is not None:
        return load_config(config, overrides).data
    table = {key: value for key, value in options.items() if value is not None}
    raw: dict[str, Any] = {"data": {"dir": str(directory), **table}}
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, base_dir=Path.cwd()).data


def render(inspection: Inspection, console, rows: int = 50) -> None:
    """Print the image, bucket and problem tables and a one-line summary."""
    from rich.table import Table

    _image_table(inspection, console, rows, Table)
    buckets = Table(title="Buckets", title_justify="left")
    for name, justify in (
        ("resolution", "right"),
        ("bucket (WxH)", "left"),
        ("images", "right"),
        ("samples / epoch", "right"),
    ):
        buckets.add_column(name, justify=justify)
    for row in inspection.bucket_rows():
        buckets.add_row(*map(str, row))
    console.print(buckets)
    _regularisation_table(inspection, console, Table)
    if inspection.scan.problems:
        problems = Table(title="Skipped files and warnings", title_justify="left")
        for name in ("file", "level", "why"):
            problems.add_column(name, overflow="fold")
        for p in inspection.scan.problems:
            style = {"error": "red", "skip": "magenta", "warn": "yellow", "note": "cyan"}[p.level]
            problems.add_row(_rel(p.path, inspection), f"[{style}]{p.level}[/]", _escape(p.reason))
        console.print(problems)
    counts = inspection.counts()
    console.print(
        ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items()), highlight=False, soft_wrap=True
    )


def _regularisation_table(inspection: Inspection, console, table_cls) -> None:
    """The regularisation sets (none: nothing printed): their images' share of each epoch and their loss weight."""
    rows = inspection.regularisation_rows()
    if not rows:
        return
    table = table_cls(title="Regularisation sets (no trigger word; mixed into every epoch)", title_justify="left")
    for name, justify in (("folder", "left"), ("images", "right"), ("samples / epoch", "right"), ("ratio", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    table.add_column("loss weight", justify="right")
    for folder, images, count, ratio, weight in rows:
        table.add_row(_escape(str(folder)), str(images), str(count), f"{ratio:g}", f"{weight:g}")
    console.print(table)


def _image_table(inspection: Inspection, console, rows: int, table_cls) -> None:
    table = table_cls(title="Images", title_justify="left")
    for name in ("image", "size", "buckets", "caption"):
        table.add_column(name, overflow="fold")
    buckets = inspection.item_buckets()
    items = inspection.scan.items
    shown = items if rows <= 0 else items[:rows]
    for index, item in enumerate(shown):
        caption = item.caption if len(item.caption) <= _CAPTION_WIDTH else item.caption[: _CAPTION_WIDTH - 1] + "…"
        source = " [dim](default)[/]" if item.caption_source == "default" else ""
        source += " [cyan](regularisation)[/]" if inspection.datasets[item.dataset].regularisation else ""
        sizes = " ".join(f"{w}x{h}" for _, (w, h) in buckets.get(index, []))
        table.add_row(_rel(item.path, inspection), f"{item.width}x{item.height}", sizes, _escape(caption) + source)
    if len(shown) < len(items):
        table.add_row(f"... and {len(items) - len(shown)} more (--rows 0 shows all)", "", "", "")
    console.print(table)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _rel(path: Path, inspection: Inspection) -> str:
    for root in inspection.scan.roots:
        if path.is_relative_to(root):
            return _escape(str(path.relative_to(root)) if len(inspection.scan.roots) == 1 else str(path))
    return _escape(str(path))


def check_errors(inspection: Inspection) -> None:
    """Raise one DataError listing every error found (after the tables were shown)."""
    inspection.scan.raise_errors()
