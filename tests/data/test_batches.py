"""Batches for the training loop: one bucket each, seeded order, fresh latents, dropout, resume, prefetch."""

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from zturbo_train.config import validate_config
from zturbo_train.data import Encoders, epoch_batches, prepare_dataset
from zturbo_train.data.cache import read_entry
from zturbo_train.errors import DataError


def build(tiny_dir: Path, cache: Path, data, **train):
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "data": data,
        "train": {"batch_size": 2, "seed": 3, **train},
        "sample": {"prompts": ["a cube at dusk"]},
    }
    return prepare_dataset(
        validate_config(raw), "cpu", encoders=Encoders(tiny_dir, "cpu", "fp32", "fp32"), cache_dir=cache
    )


@pytest.fixture(scope="module")
def dataset(tiny_dir, example_data, tmp_path_factory):
    """The example set at two resolutions with flips and dropout: 6 images x 2 x 2 = 24 samples."""
    data = {
        "dir": str(example_data),
        "resolution": [64, 96],
        "flip": True,
        "trigger_word": "sks",
        "caption_dropout": 0.3,
    }
    return build(tiny_dir, tmp_path_factory.mktemp("cache"), data)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return (
        (a.epoch, a.position, a.captions, a.bucket) == (b.epoch, b.position, b.captions, b.bucket)
        and torch.equal(a.latents, b.latents)
        and all(torch.equal(x, y) for x, y in zip(a.text, b.text))
    )


# ----------------------------------------------------------------------------- order


def test_epoch_batches_hold_one_bucket_and_every_repeat():
    buckets = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)]
    repeats = [2] * 9
    batches = epoch_batches(buckets, repeats, 2, seed=1, epoch=0)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 2 for batch in batches)
    assert Counter(i for batch in batches for i in batch) == {i: 2 for i in range(9)}
    assert len(batches) == 5 + 3 + 1  # 10, 6 and 2 samples in batches of 2


def test_order_is_seeded_and_changes_per_epoch():
    buckets = [(64, 64)] * 20 + [(48, 80)] * 20
    ones = [1] * 40
    assert epoch_batches(buckets, ones, 4, 5, 0) == epoch_batches(buckets, ones, 4, 5, 0)
    assert epoch_batches(buckets, ones, 4, 5, 0) != epoch_batches(buckets, ones, 4, 5, 1)
    assert epoch_batches(buckets, ones, 4, 5, 0) != epoch_batches(buckets, ones, 4, 6, 0)


def test_dataset_batches(dataset):
    assert len(dataset.samples) == 24 and dataset.batches_per_epoch == 12
    assert sum(dataset.bucket_counts.values()) == 24
    with dataset.loader("cpu") as loader:
        batches = take(loader, dataset.batches_per_epoch + 1)
    seen = Counter()
    for batch in batches[:-1]:
        assert batch.latents.shape == (len(batch.captions), 16, batch.bucket[1] // 8, batch.bucket[0] // 8)
        assert batch.latents.dtype == torch.float32
        assert [t.shape[1] for t in batch.text] == [32] * len(batch.captions)
        seen.update(str(p) for p in batch.images)
    assert set(seen.values()) == {4}  # each image: 2 resolutions x plain and flipped
    assert (batches[-1].epoch, batches[-1].position) == (1, 0)


# ----------------------------------------------------------------------------- content


def test_latents_are_fresh_samples_of_the_cached_distribution(dataset):
    first = dataset.load_batch(0, 0)
    index = dataset.epoch_order(0)[0][0]
    entry = read_entry(dataset.latent_paths[index])
    again = next(dataset.load_batch(1, p) for p, batch in enumerate(dataset.epoch_order(1)) if batch[0] == index)
    assert not torch.equal(first.latents[0], again.latents[0])
    for z in (first.latents[0], again.latents[0]):
        noise = (z - entry["mean"].float()) / entry["std"].float()
        assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # mean + std * N(0, 1)


def test_caption_dropout_uses_the_empty_embedding(dataset):
    captions = [
        c for e in range(4) for p in range(dataset.batches_per_epoch) for c in dataset.load_batch(e, p).captions
    ]
    dropped = captions.count("") / len(captions)
    assert 0.1 < dropped < 0.5 and all(c == "" or c.startswith("sks") for c in captions)
    batch = next(b for b in (dataset.load_batch(0, p) for p in range(12)) if "" in b.captions)
    empty = batch.text[batch.captions.index("")]
    assert torch.equal(empty, read_entry(dataset.text_paths[""])["embedding"])


def test_preview_prompts_are_cached(dataset):
    (embedding,) = dataset.prompt_embeddings(["a cube at dusk"])
    assert embedding.ndim == 2
    with pytest.raises(DataError, match="prompt 'never cached' has no cached embedding; pass it to prepare_dataset"):
        dataset.prompt_embeddings(["never cached"])


# ----------------------------------------------------------------------------- resume and prefetch


def test_resume_continues_exactly(dataset):
    with dataset.loader("cpu") as loader:
        take(loader, 15)  # into the second epoch
        state = loader.state_dict()
        rest = take(loader, 5)
    assert state["epoch"] == 1 and state["position"] == 3
    with dataset.loader("cpu", state=state) as resumed:
        again = take(resumed, 5)
    assert all(same(a, b) for a, b in zip(rest, again))


def test_state_at_an_epoch_end_points_at_the_next_epoch(dataset):
    with dataset.loader("cpu", prefetch=0) as loader:
        take(loader, dataset.batches_per_epoch)
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_prefetch_thread_matches_inline_loading(dataset):
    with dataset.loader("cpu", prefetch=3) as threaded, dataset.loader("cpu", prefetch=0) as inline:
        assert all(same(a, b) for a, b in zip(take(threaded, 14), take(inline, 14)))


def test_loader_casts_and_stops(dataset):
    loader = dataset.loader("cpu", dtype=torch.bfloat16)
    batch = next(loader)
    assert batch.latents.dtype == torch.bfloat16 and batch.text[0].dtype == torch.bfloat16
    loader.close()
    with pytest.raises(StopIteration):
        next(loader)


def test_changed_dataset_restarts_the_saved_epoch(dataset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dataset.loader("cpu", state={"epoch": 2, "position": 5, "fingerprint": "something-else"})
    assert "the dataset changed since this state was saved" in str(caught[0].message)
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 0


def test_corrupt_entry_in_the_thread_reaches_the_training_loop(tiny_dir, example_data, tmp_path):
    dataset = build(tiny_dir, tmp_path, {"dir": str(example_data), "resolution": [64]})
    for path in dataset.latent_paths:
        path.write_bytes(b"broken")
    with dataset.loader("cpu") as loader, pytest.raises(DataError, match="is corrupt .* run again to re-encode it"):
        next(loader)


# ----------------------------------------------------------------------------- several datasets


def test_several_datasets_keep_their_own_settings(tiny_dir, example_data, tmp_path):
    (tmp_path / "other").mkdir()
    for name in ("img_02", "img_03"):
        (tmp_path / "other" / f"{name}.png").write_bytes((example_data / f"{name}.png").read_bytes())
        (tmp_path / "other" / f"{name}.txt").write_text("a plain caption")
    data = [
        {"dir": str(example_data), "resolution": [64], "trigger_word": "sks"},
        {"dir": str(tmp_path / "other"), "resolution": [96], "repeats": 3, "trigger_word": "zzt"},
    ]
    dataset = build(tiny_dir, tmp_path / "cache", data, batch_size=1)
    assert len(dataset.samples) == 8
    per_epoch = Counter(c for p in range(dataset.batches_per_epoch) for c in dataset.load_batch(0, p).captions)
    assert per_epoch["zzt, a plain caption"] == 6 and sum(per_epoch.values()) == 6 + 6
    assert {s.resolution for s in dataset.samples} == {64, 96} and (112, 80) in dataset.bucket_counts


def test_fingerprint_follows_the_order_not_the_pixels(tiny_dir, data_copy, tmp_path):
    data = {"dir": str(data_copy), "resolution": [64]}
    first = build(tiny_dir, tmp_path, data)
    (data_copy / "img_01.txt").write_text("an edited caption")
    assert build(tiny_dir, tmp_path, data).fingerprint == first.fingerprint
    assert build(tiny_dir, tmp_path, data, batch_size=3).fingerprint != first.fingerprint
    (data_copy / "img_05.png").unlink()
    assert build(tiny_dir, tmp_path, data).fingerprint != first.fingerprint


@pytest.mark.cuda
def test_gpu_caching_frees_the_encoders_and_batches_arrive_on_the_device(tiny_dir, example_data, tmp_path):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "data": {"dir": str(example_data), "resolution": [64]},
        "train": {"batch_size": 2},
    }
    dataset = prepare_dataset(
        validate_config(raw), "cuda", encoders=Encoders(tiny_dir, "cuda", "fp32", "fp32"), cache_dir=tmp_path
    )
    assert dataset.stats.latents_encoded == 6
    assert torch.cuda.memory_allocated() <= before  # VAE and text encoder left the GPU
    with dataset.loader("cuda") as loader:
        assert loader.pin_memory
        batch = next(loader)
    assert batch.latents.is_cuda and all(t.is_cuda for t in batch.text)
    reference = dataset.load_batch(0, 0)
    assert torch.equal(batch.latents.cpu(), reference.latents)
