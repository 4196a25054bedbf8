"""Images and captions: scan a folder, read captions by the config's rules, load pixels as RGB.

A scan checks every file before anything is encoded, so a bad file is reported up front
with the whole list of problems, never half way through caching or training. Problems
have three levels: `error` (the run cannot start: a caption we cannot read or do not
have), `skip` (the image is left out: corrupt, not an image, too small), `warn` (the
image is used, but the user should know) and `note` (information, such as a run folder
inside the dataset that is not read). A dataset's `strict = true` makes skips and
warnings errors. When a scan stops the run, its one report lists every problem found,
errors first, so nothing has to be fixed one rerun at a time.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from ..config import DataConfig
from ..errors import DataError
from .progress import progress

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_SIDE = 64  # smaller images are left out, unless the config trains below it (the Turbo lab's 32 px)
TRIGGER = "[trigger]"
Level = Literal["error", "skip", "warn", "note"]
# What every zturbo run folder holds beside config.json (checkpoint.RunFolder): such a folder
# inside data.dir is a run's output (previews, LoRAs), never training data.
RUN_FOLDER_MARKERS = ("metrics.jsonl", "state")
_MAX_LISTED = 20
_SCAN_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file: what, at which level, and what to do about it."""

    path: Path
    level: Level
    reason: str
    kind: str = ""  # short tag for counting: bad_image, small_image, missing_caption, ...

    def line(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ImageItem:
    """An image that passed the scan, with its final caption (trigger applied, before dropout)."""

    path: Path
    width: int
    height: int
    caption: str
    caption_source: Literal["file", "default"]
    content_hash: str
    dataset: int


@dataclass
class Scan:
    """The result of scanning every [[data]] table: usable images and every problem found."""

    items: list[ImageItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)

    def at(self, *levels: Level) -> list[Problem]:
        return [p for p in self.problems if p.level in levels]

    def raise_errors(self) -> None:
        """Raise one DataError that lists every error, then every skipped file and warning, so all of
        them can be fixed in one go."""
        errors = self.at("error")
        if errors:
            raise DataError(problem_report(errors) + also_found(self.at("skip", "warn")))


def problem_report(errors: Sequence[Problem]) -> str:
    noun, them = ("problem", "it") if len(errors) == 1 else ("problems", "them")
    return (
        f"{len(errors)} dataset {noun} found before training (nothing was encoded); fix {them} and run again:"
        + _listed(errors)
    )


def also_found(problems: Sequence[Problem]) -> str:
    """The skipped files and warnings that go with an error report ('' when there are none)."""
    if not problems:
        return ""
    return (
        f"\nalso found ({len(problems)}; not errors: skipped files are left out, warnings are worth a look):"
        + _listed(problems, labelled=True)
    )


def _listed(problems: Sequence[Problem], labelled: bool = False) -> str:
    labels = {"skip": "skipped: ", "warn": "warning: ", "note": "note: ", "error": "error: "}
    lines = [(labels[p.level] if labelled else "") + p.line() for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"... and {len(problems) - _MAX_LISTED} more (`zturbo data inspect` lists all)")
    return "\n  " + "\n  ".join(lines)


# ------------------------------------------------------------------------------ scanning


def scan_datasets(datasets: Sequence[DataConfig], console=None, exclude: Sequence[Path] = ()) -> Scan:
    """Scan every dataset (progress on `console`); raises DataError only for a missing or empty folder, or
    one with no usable image (listing every problem of every dataset). `exclude`: folders never read
    (the run's own output folder)."""
    scan = Scan()
    empty: list[tuple[DataConfig, int]] = []
    for index, cfg in enumerate(datasets):
        scan.roots.append(cfg.dir)
        before, count = len(scan.items), _scan_one(cfg, index, scan, console, exclude)
        if len(scan.items) == before:
            empty.append((cfg, count))
    if empty and not scan.at("error"):
        cfg, count = empty[0]
        last = [p for p in scan.at("skip") if p.path.is_relative_to(cfg.dir)][-1]
        raise DataError(
            f"no usable image in `data.dir` {cfg.dir}: all {count} were skipped "
            f"({last.reason}, ...); fix or replace them and run again:"
            + _listed(scan.at("skip", "warn"), labelled=True)
        )
    return scan


def _scan_one(cfg: DataConfig, index: int, scan: Scan, console, exclude: Sequence[Path]) -> int:
    """Scan one [[data]] table into `scan`; returns how many images it has."""
    found = walk_dataset(cfg.dir, cfg.caption_ext, exclude)
    with (
        progress(console, f"checking {cfg.dir.name}", len(found.images), transient=True) as advance,
        ThreadPoolExecutor(max_workers=_SCAN_THREADS) as pool,
    ):  # decoding releases the GIL
        for item, problems in pool.map(lambda path: scan_image(path, cfg, index), found.images):
            advance(1)
            problems = _strict(problems) if cfg.strict else problems
            scan.problems.extend(problems)
            if item is not None and not any(p.level in ("error", "skip") for p in problems):
                scan.items.append(item)
    orphans = [
        Problem(
            path,
            "warn",
            "caption file with no image of the same name beside it, not used; add its image or delete it",
            "orphan_caption",
        )
        for path in found.orphans
    ]
    scan.problems += _strict(orphans) if cfg.strict else orphans
    scan.problems += [
        Problem(
            run,
            "note",
            "is a zturbo run folder inside data.dir: its files (previews, LoRAs) are never read as training data",
            "run_folder",
        )
        for run in found.runs
    ]
    return len(found.images)


def _strict(problems: Sequence[Problem]) -> list[Problem]:
    return [
        Problem(p.path, "error", p.reason + " (an error because data.strict = true)", p.kind)
        if p.level in ("skip", "warn")
        else p
        for p in problems
    ]


@dataclass(frozen=True)
class DatasetFiles:
    """What a dataset folder holds: images, caption files without an image, run folders left out."""

    images: list[Path]
    orphans: list[Path]
    runs: list[Path]


def list_images(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Image files under `root`, recursively, in a stable order; hidden folders and run folders are ignored."""
    return walk_dataset(root, "txt", exclude).images


def walk_dataset(root: Path, caption_ext: str = "txt", exclude: Sequence[Path] = ()) -> DatasetFiles:
    """Walk `root` once (symlinked folders not followed, as rglob): images, orphan captions, run folders."""
    if not root.exists():
        raise DataError(f"`data.dir` {root} does not exist; set it to a folder of images with .txt captions")
    if not root.is_dir():
        raise DataError(f"`data.dir` {root} is a file, not a folder; set it to the folder that holds the images")
    skip = {Path(p).resolve() for p in exclude}
    images, captions, runs = [], [], []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        visible = [d for d in subfolders if not d.startswith(".")]
        found = [d for d in visible if _is_run(here / d, skip)]
        runs += [here / d for d in found]
        subfolders[:] = [d for d in visible if d not in found]
        images += [here / n for n in names if Path(n).suffix.lower() in IMAGE_EXTS and (here / n).is_file()]
        captions += [here / n for n in names if n.endswith("." + caption_ext) and not n.startswith(".")]
    if not images:
        raise DataError(
            f"`data.dir` {root} holds no images ({', '.join(IMAGE_EXTS)}); "
            f"put your training images there, each with a same-name .txt caption"
        )
    used = {caption_path(image, caption_ext) for image in images}
    return DatasetFiles(sorted(images), sorted(set(captions) - used), sorted(runs))


def _is_run(folder: Path, exclude: set[Path]) -> bool:
    """The configured output folder, or any folder a zturbo run wrote (config.json plus metrics or state)."""
    if folder.resolve() in exclude:
        return True
    return (folder / "config.json").is_file() and any((folder / m).exists() for m in RUN_FOLDER_MARKERS)


def scan_image(path: Path, cfg: DataConfig, index: int) -> tuple[ImageItem | None, list[Problem]]:
    """Check one image and its caption; returns the item (None when unusable) and its problems."""
    if path.name.startswith("."):
        return None, [Problem(path, "skip", "hidden file (such as macOS ._ metadata), left out; delete it", "hidden")]
    try:
        data = path.read_bytes()
        width, height = probe_image(data)
    except DataError as exc:
        return None, [Problem(path, "skip", str(exc), "bad_image")]
    except OSError as exc:
        return None, [
            Problem(path, "skip", f"cannot be read ({exc.strerror or exc}); check its permissions", "bad_image")
        ]
    problems: list[Problem] = []
    smallest = min(MIN_SIDE, *cfg.resolution)
    if min(width, height) < smallest:
        problems.append(
            Problem(
                path,
                "skip",
                f"is {width}x{height} px, smaller than the {smallest} px minimum, left out; use a larger image",
                "small_image",
            )
        )
    caption, source, caption_problems = read_caption(path, cfg)
    problems += caption_problems
    if caption is None:
        return None, problems
    item = ImageItem(path, width, height, caption, source, hashlib.sha256(data).hexdigest(), index)
    return item, problems


# ------------------------------------------------------------------------------ captions


def caption_path(image: Path, caption_ext: str) -> Path:
    return image.with_suffix("." + caption_ext)


def read_caption(image: Path, cfg: DataConfig) -> tuple[str | None, Literal["file", "default"], list[Problem]]:
    """The final caption of an image by the config's rules, where it came from, and any problems."""
    path = caption_path(image, cfg.caption_ext)
    try:
        raw = path.read_bytes() if path.is_file() else None
    except OSError as exc:
        reason = f"caption cannot be read ({exc.strerror or exc}); check its permissions"
        return None, "file", [Problem(path, "error", reason, "bad_caption")]
    if raw is not None:
        try:
            text = normalise(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            return (
                None,
                "file",
                [
                    Problem(
                        path,
                        "error",
                        f"caption is not UTF-8 (byte 0x{raw[exc.start]:02x} at "
                        f"position {exc.start}); re-save it as UTF-8",
                        "bad_caption",
                    )
                ],
            )
        if text:
            return _with_trigger(text, path, cfg)
        missing, kind = f"caption file {path.name} is empty", "empty_caption"
    else:
        missing, kind = f"has no caption file {path.name}", "missing_caption"
    if cfg.default_caption is None:
        return (
            None,
            "file",
            [Problem(image, "error", f"{missing}; write a caption there or set data.default_caption", kind)],
        )
    caption, _, problems = _with_trigger(normalise(cfg.default_caption), path, cfg)
    problems.append(Problem(image, "warn", f"{missing}; using data.default_caption {cfg.default_caption!r}", kind))
    return caption, "default", problems


def normalise(text: str) -> str:
    """Collapse runs of whitespace (newlines, tabs, doubled spaces) to one space and trim."""
    return " ".join(text.split())


def apply_trigger(caption: str, trigger: str) -> str:
    """`[trigger]` becomes the trigger word; without a placeholder the word is prepended."""
    if TRIGGER in caption:
        return normalise(caption.replace(TRIGGER, trigger))
    if not trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def class_caption(caption: str, trigger: str, class_word: str) -> str | None:
    """DOP's caption: every whole-word `trigger` replaced by `class_word`; None when the caption has none.

    Whole words only (not glued to letters, digits or _), so trigger "sks" leaves "asks" alone, where
    a plain str.replace would write "aperson". Case-sensitive, as the tokenizer is.
    """
    if not trigger:
        return None
    pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")
    replaced, count = pattern.subn(lambda _: class_word, caption)
    return normalise(replaced) if count else None


def _with_trigger(text: str, path: Path, cfg: DataConfig) -> tuple[str, Literal["file"], list[Problem]]:
    """The caption with the table's trigger word applied; a regularisation set's captions never get one (its
    table refuses a trigger_word), so a `[trigger]` in them is removed with a warning that says so."""
    problems = []
    if TRIGGER in text and not cfg.trigger_word:
        fix = (
            "a regularisation set shows the class without the trigger word; write the class there instead"
            if cfg.regularisation
            else "set data.trigger_word"
        )
        reason = f"caption has {TRIGGER} but data.trigger_word is not set, so it is removed; {fix}"
        problems.append(Problem(path, "warn", reason, "trigger"))
    return apply_trigger(text, cfg.trigger_word), "file", problems


def drop_caption(caption: str, rate: float, rng: random.Random) -> str:
    """Caption dropout: the empty caption at `rate`, else the caption (one draw from `rng` always)."""
    return "" if rng.random() < rate else caption


# ------------------------------------------------------------------------------ pixels


def probe_image(data: bytes) -> tuple[int, int]:
    """Fully decode an image (so truncation shows now, not mid-run); returns its upright size."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = load_rgb(data)
    except UnidentifiedImageError:
        raise DataError(
            "is not an image Pillow can read (wrong extension or not an image), left out; "
            "delete it or convert it to PNG/JPEG"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"is too large to decode safely ({exc}), left out; downscale it") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"is truncated or corrupt ({exc}), left out; re-export or replace it") from None
    return image.size


def load_rgb(data: bytes):
    """Decode to an upright 8-bit RGB PIL image: EXIF orientation, alpha on white, any mode to RGB."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image):
    """Any Pillow mode to RGB: transparency composited on white, 16-bit scaled (not clipped) to 8-bit."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _deep_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _deep_to_l(image):
    """16/32-bit grayscale to 8-bit: scale the 16-bit range down, since Pillow's convert clips at 255."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" and array.max(initial=0) <= 1.0 else 65535.0
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
