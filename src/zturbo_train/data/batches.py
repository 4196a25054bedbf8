"""Batches for the training loop, read from the caches ahead of time on a background thread.

The order is a pure function of (seed, epoch): shuffle each bucket's samples (repeats
included), cut them into batches of one bucket, shuffle the batches. Caption dropout, the
latent noise and the seed of the training noise of each sample are drawn from generators
seeded by (seed, epoch, position, slot in the batch). So a run resumed from `{"epoch",
"position"}` sees exactly the batches, the dropped captions and the sampled latents it
would have seen without the interruption.

Data-parallel runs cut each batch across the ranks (`TrainDataset.for_rank`): the order is
made with the global batch (`batch_size` x ranks) and rank r trains on its slice of every
batch, so the ranks together see what one process with the global batch would see, sample
for sample and draw for draw.

A thread (not worker processes) does the reading: the work is file I/O and memcpy, which
release the GIL, so it runs beside the step without forking a process that holds CUDA.
Batches are pinned there and moved with `non_blocking=True`, so the copy overlaps compute.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DataError
from .buckets import Bucket
from .cache import CacheStats, read_entry
from .dataset import ImageItem, Problem, drop_caption


@dataclass(frozen=True)
class Sample:
    """One trainable view of an image: at one resolution's bucket, mirrored or not."""

    item: int
    resolution: int
    bucket: Bucket
    flip: bool


@dataclass
class Batch:
    """One step's data, all from one bucket.

    `latents` is (B, 16, H/8, W/8) in the transformer's normalised space, sampled fresh
    from the cached distribution; the transformer wants `list(batch.latents.unsqueeze(2))`.
    `text` holds B unpadded (L_i, D) caption embeddings, as `encode_prompt` gives them.
    """

    latents: Any
    text: list
    captions: list[str]
    images: list[Path]
    bucket: Bucket
    epoch: int
    position: int
    noise_seeds: list[int] = field(default_factory=list)
    weights: list[float] | None = None
    # Flow-matching noise (B, 16, H/8, W/8) and sigmas (B,), fp32, drawn on the reader thread when
    # the loader is given a `draw` function, so the training step does no per-sample drawing.
    noise: Any = None
    sigmas: Any = None
    # train.preservation = "dop": each sample's class caption embedding (trigger -> class word), and
    # 0/1 per sample where a caption has no trigger to replace (None: every sample has one)
    class_text: list | None = None
    preserve: list[float] | None = None

    def pin(self) -> "Batch":
        return replace(
            self,
            latents=self.latents.pin_memory(),
            text=[t.pin_memory() for t in self.text],
            noise=_maybe(self.noise, lambda t: t.pin_memory()),
            sigmas=_maybe(self.sigmas, lambda t: t.pin_memory()),
            class_text=_maybe(self.class_text, lambda texts: [t.pin_memory() for t in texts]),
        )

    def to(self, device, dtype=None, non_blocking: bool = True) -> "Batch":
        def move(t):
            return t.to(device=device, dtype=dtype or t.dtype, non_blocking=non_blocking)

        def move_fp32(t):
            return t.to(device=device, non_blocking=non_blocking)

        return replace(
            self,
            latents=move(self.latents),
            text=[move(t) for t in self.text],
            noise=_maybe(self.noise, move_fp32),
            sigmas=_maybe(self.sigmas, move_fp32),
            class_text=_maybe(self.class_text, lambda texts: [move(t) for t in texts]),
        )


def _maybe(value: Any, fn: Callable[[Any], Any]) -> Any:
    return None if value is None else fn(value)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def epoch_batches(
    buckets: Sequence[Bucket],
    repeats: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    extra: Sequence[int] = (),
) -> list[list[int]]:
    """Sample indices in batches for one epoch: one bucket per batch, order fixed by (seed, epoch).

    A bucket's last batch may be smaller than batch_size: every sample is seen once per
    repeat each epoch, none is dropped. `extra`: more sample indices in this epoch (the
    regularisation draws), batched with the others of their bucket.
    """
    rng = random.Random(derive_seed("order", seed, epoch))
    groups: dict[Bucket, list[int]] = {}
    for index, (bucket, times) in enumerate(zip(buckets, repeats)):
        groups.setdefault(bucket, []).extend([index] * times)
    for index in extra:
        groups.setdefault(buckets[index], []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class RegMix:
    """A regularisation set's part of every epoch: `count` of its samples (`pool`, indices into the dataset's
    samples), drawn in turn from seeded shuffles of the pool, so over the epochs each is used as often as the
    others, and the epoch's draws are a function of (seed, epoch) alone, as the rest of the order is."""

    dataset: int  # the [[data]] table's index: keys its shuffles
    pool: tuple[int, ...]
    count: int

    def draws(self, seed: int, epoch: int) -> list[int]:
        """This epoch's samples: places epoch*count .. (epoch+1)*count of the endless run of shuffled pools."""
        size, start = len(self.pool), epoch * self.count
        out: list[int] = []
        for cycle in range(start // size, (start + self.count - 1) // size + 1):
            order = list(self.pool)
            random.Random(derive_seed("regularisation", seed, self.dataset, cycle)).shuffle(order)
            first, last = max(start, cycle * size), min(start + self.count, (cycle + 1) * size)
            out += order[first - cycle * size : last - cycle * size]
        return out


def reg_counts(train_samples: int, ratios: Sequence[float]) -> list[int]:
    """Samples per epoch of each regularisation set, so each has its `ratio` of the epoch's samples: with T
    training samples and the ratios adding up to s, set i gets round(T * r_i / (1 - s)), at least one."""
    rest = 1.0 - sum(ratios)
    return [max(1, round(train_samples * ratio / rest)) for ratio in ratios]


def rank_share(size: int, rank: int, world: int) -> tuple[list[int], float]:
    """The slots of a global batch of `size` samples that rank `rank` of `world` trains on, and their loss weight.

    Contiguous balanced slices, the first ranks one sample larger: with a full batch, rank r of W
    at batch b gets slots r*b .. r*b+b-1, so the union over ranks is the batch in its order.
    The weight W * len(slice) / size makes the ranks' gradient average (DDP) the mean over
    the whole batch when slices differ in size (a bucket's last batch). A rank left without
    a sample still runs the step (the all-reduce needs every rank): it repeats one at weight 0.
    """
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    end = start + base + (rank < extra)
    if end > start:
        return list(range(start, end)), world * (end - start) / size
    return [rank % size], 0.0


@dataclass
class TrainDataset:
    """Everything the training loop needs from the data: the samples, their cache entries, the order.

    Build it with `prepare_dataset`; then `loader(device)` yields batches forever and
    `loader.state_dict()` / `loader(device, state=...)` save and restore the position.
    """

    items: list[ImageItem]
    samples: list[Sample]
    latent_paths: list[Path]
    text_paths: dict[str, Path]
    repeats: list[int]
    dropout: list[float]
    batch_size: int
    seed: int
    problems: list[Problem] = field(default_factory=list)
    stats: CacheStats = field(default_factory=CacheStats)
    rank: int = 0
    world: int = 1
    heldout: list[tuple[Sample, Path]] = field(default_factory=list)  # validation views and their latent entries
    mixes: list[RegMix] = field(default_factory=list)  # the regularisation sets (their samples have repeats 0)
    loss_weights: list[float] = field(default_factory=list)  # per sample (data.loss_weight); empty: all 1
    class_captions: list[str | None] | None = None  # per item: DOP's class caption (None: no trigger in it)
    _order: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` (memoised for the few epochs in use; safe to call from two threads)."""
        order = self._order.get(epoch)
        if order is None:
            extra = [index for mix in self.mixes for index in mix.draws(self.seed, epoch)]
            buckets = [s.bucket for s in self.samples]
            order = epoch_batches(buckets, self.repeats, self.global_batch, self.seed, epoch, extra)
            if len(self._order) >= 4:
                self._order.clear()
            self._order[epoch] = order
        return order

    @property
    def global_batch(self) -> int:
        """Samples per batch over all ranks: what the order is cut into."""
        return self.batch_size * self.world

    def for_rank(self, rank: int, world: int) -> "TrainDataset":
        """This dataset as rank `rank` of `world` reads it: the order of the global batch, this rank's slice of each."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} ranks")
        return replace(self, rank=rank, world=world, _order={})

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_order(0))

    @property
    def bucket_counts(self) -> dict[Bucket, int]:
        """Training samples per epoch in each bucket; a regularisation set's buckets count 0 (its draws vary by
        epoch)."""
        counts: dict[Bucket, int] = {}
        for sample, times in zip(self.samples, self.repeats):
            counts[sample.bucket] = counts.get(sample.bucket, 0) + times
        return dict(sorted(counts.items()))

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.repeats) + sum(mix.count for mix in self.mixes)

    @property
    def fingerprint(self) -> str:
        """Changes when what a saved position points at changes (samples, repeats, regularisation mix, batch
        size, seed); edited pixels or captions keep it, since the order stays valid."""
        return hashlib.sha256(repr((*self._order_inputs(), self.global_batch, self.seed)).encode()).hexdigest()[:16]

    @property
    def data_fingerprint(self) -> str:
        """The fingerprint without the batch size: same samples, repeats and seed, maybe grouped otherwise."""
        return hashlib.sha256(repr((*self._order_inputs(), self.seed)).encode()).hexdigest()[:16]

    def _order_inputs(self) -> tuple:
        """What the order is made of; the mix only when there is one, so runs without it keep their fingerprints."""
        return (self._views(), self.repeats, *((self.mixes,) if self.mixes else ()))

    def _views(self) -> list:
        return [(self.items[s.item].path, s.resolution, s.bucket, s.flip) for s in self.samples]

    def load_batch(self, epoch: int, position: int) -> Batch:
        """This rank's slice of batch `position` of `epoch` on the CPU: latents sampled, captions dropped,
        embeddings read. Every draw is keyed by the sample's slot in the global batch, not by the rank."""
        import torch

        order = self.epoch_order(epoch)[position]
        slots, weight = rank_share(len(order), self.rank, self.world)
        indices = [order[slot] for slot in slots]
        weights = [weight * (self.loss_weights[i] if self.loss_weights else 1.0) for i in indices]
        latents, captions = [], []
        for slot, index in zip(slots, indices):
            entry = read_entry(self.latent_paths[index])
            mean, std = entry["mean"].float(), entry["std"].float()
            noise = torch.Generator().manual_seed(derive_seed("noise", self.seed, epoch, position, slot))
            latents.append(mean + std * torch.randn(mean.shape, generator=noise))
            drops = random.Random(derive_seed("dropout", self.seed, epoch, position, slot))
            captions.append(drop_caption(self.items[self.samples[index].item].caption, self.dropout[index], drops))
        batch = Batch(
            torch.stack(latents),
            self._embeddings(captions),
            captions,
            [self.items[self.samples[i].item].path for i in indices],
            self.samples[indices[0]].bucket,
            epoch,
            position,
            [derive_seed("step", self.seed, epoch, position, slot) for slot in slots],
            None if all(w == 1.0 for w in weights) else weights,
        )
        return batch if self.class_captions is None else self._with_class_captions(batch, indices)

    def _with_class_captions(self, batch: Batch, indices: Sequence[int]) -> Batch:
        """DOP's side of a batch: each sample's class caption, from its full caption (caption dropout is the
        training loss's business, not preservation's); a caption without the trigger is left out (weight 0)."""
        items = [self.items[self.samples[i].item] for i in indices]
        classes = [self.class_captions[self.samples[i].item] for i in indices]
        preserve = [0.0 if c is None else 1.0 for c in classes]
        return replace(
            batch,
            class_text=self._embeddings([item.caption if c is None else c for item, c in zip(items, classes)]),
            preserve=None if all(preserve) else preserve,
        )

    def heldout_views(self) -> list[tuple[Any, Any, str]]:
        """(latent mean (1, C, H, W), caption embedding, key) of each held-out view: the validation set, read
        once. The key (content, bucket, flip) seeds the view's fixed noise and sigma."""
        views = []
        for sample, path in self.heldout:
            item = self.items[sample.item]
            views.append(
                (
                    read_entry(path)["mean"].float().unsqueeze(0),
                    self._embeddings([item.caption])[0],
                    f"{item.content_hash}|{sample.bucket}|{sample.flip}",
                )
            )
        return views

    def prompt_embeddings(self, prompts: Sequence[str]) -> list:
        """Cached embeddings of preview prompts (passed to prepare_dataset as extra_prompts)."""
        return self._embeddings(list(prompts))

    def _embeddings(self, captions: Sequence[str]) -> list:
        missing = [c for c in captions if c not in self.text_paths]
        if missing:
            raise DataError(
                f"prompt {missing[0]!r} has no cached embedding; pass it to "
                f"prepare_dataset(extra_prompts=...) or add it to [sample] prompts"
            )
        return [read_entry(self.text_paths[c])["embedding"] for c in captions]

    def loader(
        self,
        device: Any = "cpu",
        state: dict | None = None,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        dtype: Any = None,
        draw: Callable[[Batch], Batch] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> "BatchLoader":
        return BatchLoader(self, device, state, prefetch, pin_memory, dtype, draw, warn)


def _python_warning(message: str) -> None:
    """The default for library callers: a UserWarning."""
    warnings.warn(message, stacklevel=4)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchLoader:
    """An endless iterator of batches on `device`, read `prefetch` batches ahead on a thread.

    `state_dict()` is the position after the last batch handed out: save it with the
    training state and pass it back as `state` to continue exactly there.
    """

    def __init__(
        self,
        dataset: TrainDataset,
        device: Any = "cpu",
        state: dict | None = None,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        dtype: Any = None,
        draw: Callable[[Batch], Batch] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        import torch

        self.dataset, self.device, self.dtype, self.prefetch = dataset, torch.device(device), dtype, prefetch
        self.draw = draw
        self.warn = warn or _python_warning  # `zturbo train` passes its console: one plain `warning:` line
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.epoch, self.position = self._restore(state)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _restore(self, state: dict | None) -> tuple[int, int]:
        if not state:
            return 0, 0
        epoch, position = int(state.get("epoch", 0)), int(state.get("position", 0))
        if state.get("fingerprint") in (None, self.dataset.fingerprint):
            return self._normalise(epoch, position)
        if state.get("data_fingerprint") == self.dataset.data_fingerprint and state.get("epoch_batches"):
            return epoch, self._regrouped(epoch, position, int(state["epoch_batches"]))
        self.warn(f"the dataset changed since this state was saved; continuing at the start of epoch {epoch}")
        return epoch, 0

    def _regrouped(self, epoch: int, position: int, saved_batches: int) -> int:
        """Same data, other global batch (batch_size x ranks): the same fraction of the epoch, in its new order.

        The epochs before are complete either way; within this one the regrouped order holds
        other batches, so the rest of the epoch is about as much data, not the same samples.
        """
        batches = len(self.dataset.epoch_order(epoch))
        moved = position * batches // max(1, saved_batches)
        self.warn(
            f"the global batch (batch_size x ranks) is now {self.dataset.global_batch}, not the one this "
            f"state was saved with; continuing epoch {epoch} at the same fraction of it (batch {moved} of "
            f"{batches}, was {position} of {saved_batches})"
        )
        return moved

    def _normalise(self, epoch: int, position: int) -> tuple[int, int]:
        while position >= len(self.dataset.epoch_order(epoch)):
            position -= len(self.dataset.epoch_order(epoch))
            epoch += 1
        return epoch, position

    def state_dict(self) -> dict:
        epoch, position = self._normalise(self.epoch, self.position)
        return {
            "epoch": epoch,
            "position": position,
            "fingerprint": self.dataset.fingerprint,
            "data_fingerprint": self.dataset.data_fingerprint,
            "epoch_batches": len(self.dataset.epoch_order(epoch)),
        }

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise StopIteration
        batch = self._produce_inline() if self.prefetch == 0 else self._take()
        self.epoch, self.position = batch.epoch, batch.position + 1
        return batch.to(self.device, self.dtype, non_blocking=self.pin_memory)

    def _produce_inline(self) -> Batch:
        epoch, position = self._normalise(self.epoch, self.position)
        return self._load(epoch, position)

    def _load(self, epoch: int, position: int) -> Batch:
        batch = self.dataset.load_batch(epoch, position)
        return self.draw(batch) if self.draw is not None else batch

    def _take(self) -> Batch:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._produce, args=self._normalise(self.epoch, self.position), name="zturbo-data", daemon=True
            )
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def _produce(self, epoch: int, position: int) -> None:
        try:
            while not self._stop.is_set():
                batch = self._load(epoch, position)
                self._put(batch.pin() if self.pin_memory else batch)
                epoch, position = self._normalise(epoch, position + 1)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(exc))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop the reader thread (the loader can not be iterated after this)."""
        self._stop.set()
        if self._thread is not None:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._thread.join(timeout=5)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
