"""From config to a ready TrainDataset: scan, plan buckets, fill the caches, free the encoders.

Call `prepare_dataset` before loading the transformer: the VAE and the text encoder are
loaded one after the other, only when their cache is incomplete, and released before it
returns, so the peak memory of caching is one encoder, not the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import Config, DataConfig
from ..errors import DataError
from ..models import resolve_model_dir
from ..paths import default_cache_dir
from .batches import RegMix, Sample, TrainDataset, derive_seed, reg_counts
from .buckets import Fit, closest_bucket, fit
from .cache import (
    CacheStats,
    Encoders,
    LatentJob,
    entry_path,
    fill_latents,
    fill_texts,
    latent_key,
    text_key,
)
from .dataset import ImageItem, Problem, Scan, class_caption, scan_datasets

MAX_CROPPED = 0.5  # an image losing more than this share of its area to the bucket's crop gets a warning


def plan_samples(scan: Scan, datasets: Sequence[DataConfig]) -> tuple[list[Sample], list[Problem]]:
    """Every (image, resolution, flip) view with its bucket; warns where an image is upscaled a lot or
    loses more than half of itself to the crop."""
    samples: list[Sample] = []
    problems: list[Problem] = []
    for index, item in enumerate(scan.items):
        cfg = datasets[item.dataset]
        for resolution in cfg.resolution:
            bucket = closest_bucket(item.width, item.height, resolution)
            plan = fit(item.width, item.height, bucket)
            if plan.upscaled_much:
                problems.append(
                    _small_image(item.path, item.width, item.height, plan.scale, bucket, resolution, cfg.strict)
                )
            if plan.cropped > MAX_CROPPED:
                problems.append(_cropped(item, plan, resolution, cfg.strict))
            samples += [Sample(index, resolution, bucket, flip) for flip in ((False, True) if cfg.flip else (False,))]
    return samples, problems


def _cropped(item: ImageItem, plan: Fit, resolution: int, strict: bool) -> Problem:
    bucket = f"{plan.bucket[0]}x{plan.bucket[1]}"
    reason = (
        f"is {item.width}x{item.height} px, centre-cropped to the {bucket} bucket of resolution {resolution}, "
        f"which cuts off {plan.cropped:.0%} of the picture; crop it yourself to what matters"
    )
    if strict:
        return Problem(item.path, "error", reason + " (an error because data.strict = true)", "cropped")
    return Problem(item.path, "warn", reason, "cropped")


def _small_image(
    path: Path, width: int, height: int, scale: float, bucket: tuple[int, int], resolution: int, strict: bool
) -> Problem:
    reason = (
        f"is {width}x{height} px, upscaled {scale:.1f}x to the {bucket[0]}x{bucket[1]} bucket of resolution "
        f"{resolution}, so it trains soft; use a larger image or a smaller data.resolution"
    )
    if strict:
        return Problem(path, "error", reason + " (an error because data.strict = true)", "upscaled")
    return Problem(path, "warn", reason, "upscaled")


def scan_and_plan(
    datasets: Sequence[DataConfig], console=None, exclude: Sequence[Path] = ()
) -> tuple[Scan, list[Sample]]:
    """Scan and bucket every dataset, all problems collected; raises DataError listing every problem.
    `exclude`: folders never read (the run's output folder)."""
    scan = scan_datasets(datasets, console, exclude)
    samples, problems = plan_samples(scan, datasets)
    scan.problems += problems
    scan.raise_errors()
    return scan, samples


def all_datasets(cfg: Config) -> list[DataConfig]:
    """cfg.data, then train.val_dir read as a dataset (its items have dataset index len(cfg.data))."""
    return [*cfg.data, *([cfg.val_data] if cfg.val_data is not None else [])]


def heldout_items(scan: Scan, cfg: Config) -> set[int]:
    """The images held out for validation: train.val_dir's, and train.val_fraction of the [data] images
    (at least one), picked by a hash of (seed, content), so the choice does not depend on file order."""
    held = {i for i, item in enumerate(scan.items) if item.dataset >= len(cfg.data)}
    if cfg.train.val_fraction > 0:  # from the training images: a regularisation set is not what the LoRA learns
        pool = [
            i
            for i, item in enumerate(scan.items)
            if item.dataset < len(cfg.data) and not cfg.data[item.dataset].regularisation
        ]
        count = max(1, round(cfg.train.val_fraction * len(pool)))
        if count >= len(pool):
            raise DataError(
                f"train.val_fraction = {cfg.train.val_fraction:g} holds out {count} of the {len(pool)} "
                f"images, leaving none to train on; lower it or set train.val_dir to a separate folder"
            )
        held |= set(
            sorted(pool, key=lambda i: (derive_seed("heldout", cfg.train.seed, scan.items[i].content_hash), i))[:count]
        )
    return held


def scan_dataset(cfg: Config, console=None) -> tuple[Scan, list[Sample]]:
    """Every image and caption of cfg.data (and train.val_dir) checked, all problems reported at once (a DataError
    if any stops the run)."""
    scan, samples = scan_and_plan(all_datasets(cfg), console, exclude=[cfg.train.output_dir])
    report_problems(scan.problems, console)
    return scan, samples


def class_captions(scan: Scan, cfg: Config, held: set[int]) -> list[str | None] | None:
    """train.preservation = "dop": per item, its caption with its [data] table's trigger word replaced by
    train.preservation_class (None for held-out items, train.val_dir's among them, and captions without the
    trigger); None when DOP is off.
    Cached as captions are, by their text, so another class word is encoded anew."""
    if cfg.train.preservation != "dop":
        return None
    return [
        None
        if index in held
        else class_caption(item.caption, cfg.data[item.dataset].trigger_word, cfg.train.preservation_class)
        for index, item in enumerate(scan.items)
    ]


def default_encoders(cfg: Config, device: Any) -> Encoders:
    """The model's own VAE (fp32: the latents are computed once, so take the accurate ones) and text encoder."""
    return Encoders(resolve_model_dir(cfg.model.path), device, vae_dtype="fp32", text_dtype=cfg.model.dtype)


def sample_prompts(cfg: Config) -> list[str]:
    """The preview prompts (and the negative one when CFG is on): cached too, so sampling needs no text encoder."""
    return [*cfg.sample.prompts, *([cfg.sample.negative] if cfg.sample.guidance > 0 else [])]


def prepare_dataset(
    cfg: Config,
    device: Any = "cpu",
    *,
    encoders: Encoders | None = None,
    cache_dir: Path | None = None,
    extra_prompts: Sequence[str] | None = None,
    console=None,
    vae_batch_size: int = 4,
    text_batch_size: int = 8,
    share: tuple[int, int] = (0, 1),
    wait: Callable[[], None] | None = None,
    rank: tuple[int, int] = (0, 1),
    scanned: tuple[Scan, list[Sample]] | None = None,
) -> TrainDataset:
    """Scan cfg.data, fill the latent and caption caches (only what is missing), and return the dataset.

    `encoders` says where the VAE / text encoder come from (default: cfg.model.path, VAE
    fp32, text encoder in cfg.model.dtype, on `device`). `extra_prompts` (default: the
    [sample] prompts) are cached beside the captions. Warnings are printed to `console`
    (a rich Console) with the progress bars; None keeps it silent.

    `share` = (i, n) encodes only every n-th missing entry from the i-th: one process's part
    when n processes fill the cache together. `wait` is then called (a barrier across them)
    before the rest is checked, and anything still missing is encoded here. `rank` = (r, world)
    makes the dataset that of rank r in data-parallel training (`TrainDataset.for_rank`).
    `scanned` is `scan_dataset`'s result when the caller checked the data already.
    """
    scan, samples = scanned or scan_dataset(cfg, console)
    encoders = encoders or default_encoders(cfg, device)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    latent_root, text_root = root / "latents" / encoders.vae_id, root / "text" / encoders.text_id
    jobs = [_latent_job(scan, sample, latent_root) for sample in samples]
    datasets = all_datasets(cfg)
    held = heldout_items(scan, cfg)  # cached like the rest, never in the training order
    classes = class_captions(scan, cfg, held)
    extra = sample_prompts(cfg) if extra_prompts is None else extra_prompts
    captions = _captions(scan, datasets, [*extra, *(c for c in classes or () if c is not None)])
    text_paths = {caption: entry_path(text_root, text_key(caption)) for caption in captions}
    stats = CacheStats()
    index, count = share
    fill_latents(list({job.path: job for job in jobs}.values())[index::count], encoders, stats, console, vae_batch_size)
    fill_texts(dict(list(text_paths.items())[index::count]), encoders, stats, console, text_batch_size)
    if wait is not None:
        wait()
    if count > 1:
        _fill_rest(jobs, text_paths, encoders, stats, console, vae_batch_size, text_batch_size)
    train = [i for i, s in enumerate(samples) if s.item not in held]
    tables = [scan.items[samples[i].item].dataset for i in train]
    per_sample = [datasets[table] for table in tables]
    repeats = [0 if d.regularisation else d.repeats for d in per_sample]  # regularisation samples come by `mixes`
    dataset = TrainDataset(
        items=scan.items,
        samples=[samples[i] for i in train],
        latent_paths=[jobs[i].path for i in train],
        text_paths=text_paths,
        repeats=repeats,
        dropout=[d.caption_dropout for d in per_sample],
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        problems=scan.problems,
        stats=stats,
        heldout=[(s, job.path) for s, job in zip(samples, jobs) if s.item in held],
        mixes=regularisation_mixes(cfg.data, tables, sum(repeats)),
        loss_weights=[d.loss_weight for d in per_sample] if any(d.loss_weight != 1.0 for d in per_sample) else [],
        class_captions=classes,
    ).for_rank(*rank)
    report_summary(dataset, console, cfg.data)
    return dataset


def regularisation_mixes(tables: Sequence[DataConfig], sample_tables: Sequence[int], train: int) -> list[RegMix]:
    """Each regularisation set's mix: its samples (by their [[data]] table, `sample_tables`) and its count per
    epoch for `train` training samples per epoch."""
    regs = [i for i, table in enumerate(tables) if table.regularisation]
    counts = reg_counts(train, [tables[i].share for i in regs])
    pools = {i: tuple(n for n, table in enumerate(sample_tables) if table == i) for i in regs}
    return [RegMix(i, pools[i], count) for i, count in zip(regs, counts) if pools[i]]


def _fill_rest(
    jobs: Sequence[LatentJob],
    text_paths: dict[str, Path],
    encoders: Encoders,
    stats: CacheStats,
    console,
    vae_batch_size: int,
    text_batch_size: int,
) -> None:
    """After the other processes filled their shares: encode what is still missing (nothing, when they
    share this cache folder), and count their entries as reused."""
    rest = CacheStats()
    fill_latents(jobs, encoders, rest, console, vae_batch_size)
    fill_texts(text_paths, encoders, rest, console, text_batch_size)
    stats.latents_reused = rest.latents_reused - stats.latents_encoded
    stats.texts_reused = rest.texts_reused - stats.texts_encoded
    stats.latents_encoded += rest.latents_encoded
    stats.texts_encoded += rest.texts_encoded
    stats.corrupt += [path for path in rest.corrupt if path not in stats.corrupt]


def _latent_job(scan: Scan, sample: Sample, root: Path) -> LatentJob:
    item = scan.items[sample.item]
    path = entry_path(root, latent_key(item.content_hash, sample.bucket, sample.flip))
    return LatentJob(item.path, item.content_hash, sample.bucket, sample.flip, path)


def _captions(scan: Scan, datasets: Sequence[DataConfig], extra: Sequence[str]) -> list[str]:
    """Distinct captions to cache: the dataset's, the empty one if dropout is on, and the extra prompts."""
    captions = [item.caption for item in scan.items]
    if any(d.caption_dropout > 0 for d in datasets):
        captions.append("")
    return list(dict.fromkeys([*captions, *extra]))


def report_problems(problems: Sequence[Problem], console) -> None:
    """Print skipped files and warnings up front, before any encoding starts."""
    if console is None:
        return
    for problem in problems:
        style = {"warn": "yellow", "note": "cyan"}.get(problem.level, "red")
        label = "skipped" if problem.level == "skip" else problem.level
        from rich.markup import escape  # file names and captions are not markup

        console.print(f"[{style}]{label}:[/] {escape(problem.line())}", highlight=False, soft_wrap=True)


def report_summary(dataset: TrainDataset, console, tables: Sequence[DataConfig]) -> None:
    """One line on what the data is and what caching did (encoded vs reused, corrupt entries replaced)."""
    if console is None:
        return
    st = dataset.stats
    corrupt = f", {len(st.corrupt)} corrupt cache files re-encoded" if st.corrupt else ""
    held = len({sample.item for sample, _ in dataset.heldout})
    held = f" ({held} held out for validation)" if held else ""
    dop = ""
    if dataset.class_captions is not None:
        reg = {dataset.samples[i].item for mix in dataset.mixes for i in mix.pool}  # no trigger by design
        trained = {sample.item for sample in dataset.samples} - reg
        count = sum(dataset.class_captions[i] is not None for i in trained)
        dop = f"; DOP: {count} of the {len(trained)} training images have the trigger word to replace"
    console.print(
        f"data: {len(dataset.items)} images{held}, {dataset.samples_per_epoch} samples{_reg_part(dataset, tables)} in "
        f"{len(dataset.bucket_counts)} buckets, {dataset.batches_per_epoch} batches per epoch; cache: "
        f"{st.latents_encoded} latents encoded, {st.latents_reused} reused, {st.texts_encoded} captions "
        f"encoded, {st.texts_reused} reused{corrupt}{dop}",
        highlight=False,
        soft_wrap=True,
    )


def _reg_part(dataset: TrainDataset, tables: Sequence[DataConfig]) -> str:
    """` (4 of them from the regularisation set /reg: ...)`, or '' without one."""
    parts = []
    for mix in dataset.mixes:
        table = tables[mix.dataset]
        images = len({dataset.samples[i].item for i in mix.pool})
        parts.append(
            f"{mix.count} of them from the regularisation set {table.dir}: {images} images, "
            f"{mix.count / dataset.samples_per_epoch:.0%} of each epoch, loss weight {table.loss_weight:g}"
        )
    return f" ({'; '.join(parts)})" if parts else ""
