"""Latent and caption caches on builtin:tiny: parity with diffusers, reuse, invalidation, resume, corruption."""

import gc
import io
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from zturbo_train.config import validate_config
from zturbo_train.data import Encoders, encode_prompts, fit, prepare_dataset
from zturbo_train.data.cache import folder_fingerprint, read_entry
from zturbo_train.errors import DataError
from zturbo_train.models import build_pipeline


def config(data_dir: Path, **data):
    data = {"dir": str(data_dir), "resolution": [64], "trigger_word": "sks", **data}
    return validate_config(
        {
            "model": {"path": "builtin:tiny", "dtype": "fp32"},
            "data": data,
            "train": {"batch_size": 2, "seed": 7},
            "sample": {"prompts": ["a cube at dusk"]},
        }
    )


class Counting(Encoders):
    """The tiny model's encoders in fp32, counting VAE calls; optionally interrupted after `fail_after` calls."""

    def __init__(self, model_dir: Path, fail_after: int | None = None):
        super().__init__(model_dir, "cpu", vae_dtype="fp32", text_dtype="fp32")
        self.fail_after, self.vae_calls, self.vae_ref = fail_after, 0, None

    def load_vae(self):
        vae = super().load_vae()
        original = vae.encode

        def encode(pixels):
            if self.fail_after is not None and self.vae_calls >= self.fail_after:
                raise KeyboardInterrupt
            self.vae_calls += 1
            return original(pixels)

        vae.encode = encode
        self.vae_ref = weakref.ref(vae)
        return vae


def prepare(cfg, tiny_dir, cache, **kw):
    encoders = kw.pop("encoders", None) or Counting(tiny_dir)
    return prepare_dataset(cfg, "cpu", encoders=encoders, cache_dir=cache, **kw), encoders


# ----------------------------------------------------------------------------- parity with diffusers


def test_cached_captions_equal_pipeline_encode_prompt(example_data, tiny_dir, tiny_parts, tmp_path):
    dataset, _ = prepare(config(example_data, caption_dropout=0.5), tiny_dir, tmp_path)
    pipe = build_pipeline(tiny_parts)
    captions = list(dataset.text_paths)
    assert "" in captions and "a cube at dusk" in captions and len(captions) == 8
    with torch.no_grad():
        for caption in captions:
            expected, _ = pipe.encode_prompt([caption], device="cpu", do_classifier_free_guidance=False)
            cached = read_entry(dataset.text_paths[caption])["embedding"]
            assert cached.shape == expected[0].shape and torch.equal(cached, expected[0]), caption


def test_encode_prompts_is_encode_prompt_batched(tiny_parts):
    prompts = ["a red cube", "", "sks, a longer prompt about a green sphere in the sky with a dog and a house"]
    pipe = build_pipeline(tiny_parts)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    ours = encode_prompts(tiny_parts.tokenizer, tiny_parts.text_encoder, prompts, "cpu")
    assert prompts[1] == ""  # the input list is left alone (the pipeline rewrites its own in place)
    assert [t.shape for t in ours] == [t.shape for t in expected]
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    assert encode_prompts(tiny_parts.tokenizer, tiny_parts.text_encoder, [], "cpu") == []
    short = encode_prompts(tiny_parts.tokenizer, tiny_parts.text_encoder, prompts[2:], "cpu", max_length=8)
    assert short[0].shape[0] == 8  # truncated like the pipeline's max_sequence_length


def reference_pixels(path: Path, bucket, flip: bool) -> torch.Tensor:
    """The bucket crop built step by step with PIL and numpy, independent of the cache code."""
    img = Image.open(path).convert("RGB")
    plan = fit(img.width, img.height, bucket)
    array = np.asarray(img.resize(plan.resized, Image.Resampling.LANCZOS).crop(plan.crop), dtype=np.float32)
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None] / 127.5 - 1


def test_cached_latent_is_the_vae_distribution(example_data, tiny_dir, tiny_parts, tmp_path):
    """The tiny VAE is random, so "decodes to the image" cannot be checked; instead the cache must hold
    exactly what a fresh encode of the resized crop gives, and decoding a sample drawn from it must match
    decoding the same draw from the fresh distribution more closely than bf16 rounding of the latent
    (what the transformer sees anyway) would."""
    dataset, _ = prepare(config(example_data, resolution=[64, 96], flip=True), tiny_dir, tmp_path, vae_batch_size=1)
    vae, cfg = tiny_parts.vae, tiny_parts.vae.config
    checked = 0
    for sample, path in zip(dataset.samples, dataset.latent_paths):
        item = dataset.items[sample.item]
        if item.path.name not in ("img_02.png", "img_05.png"):
            continue
        entry = read_entry(path)
        with torch.no_grad():
            fresh = vae.encode(reference_pixels(item.path, sample.bucket, sample.flip)).latent_dist
        mean = (fresh.mean[0] - cfg.shift_factor) * cfg.scaling_factor
        std = fresh.std[0] * cfg.scaling_factor
        assert entry["mean"].dtype == torch.float16
        assert torch.equal(entry["mean"], mean.half()) and torch.equal(entry["std"], std.half())
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(checked))
        z_fresh = (fresh.mean[0] + fresh.std[0] * eps - cfg.shift_factor) * cfg.scaling_factor
        z_cache = entry["mean"].float() + entry["std"].float() * eps
        with torch.no_grad():

            def decode(z):
                return vae.decode(z[None] / cfg.scaling_factor + cfg.shift_factor).sample

            ref = decode(z_fresh)
            cache_error = (decode(z_cache) - ref).abs().max()
            bf16_error = (decode(z_fresh.bfloat16().float()) - ref).abs().max()
        assert cache_error <= bf16_error, (cache_error, bf16_error)
        checked += 1
    assert checked == 2 * 2 * 2  # two images, two resolutions, plain and flipped


# ----------------------------------------------------------------------------- reuse and invalidation


def test_second_run_encodes_nothing_and_loads_no_model(example_data, tiny_dir, tmp_path):
    cfg = config(example_data, resolution=[64, 96], flip=True)
    first, enc1 = prepare(cfg, tiny_dir, tmp_path)
    assert first.stats.latents_encoded == 6 * 2 * 2 and first.stats.texts_encoded == 6 + 1
    assert enc1.loads == ["vae", "text_encoder"]
    second, enc2 = prepare(cfg, tiny_dir, tmp_path)
    assert (second.stats.latents_encoded, second.stats.texts_encoded) == (0, 0)
    assert (second.stats.latents_reused, second.stats.texts_reused) == (24, 7)
    assert enc2.loads == [] and enc2.vae_calls == 0
    assert second.latent_paths == first.latent_paths


def test_encoders_are_freed_after_caching(example_data, tiny_dir, tmp_path):
    _, encoders = prepare(config(example_data), tiny_dir, tmp_path)
    gc.collect()
    assert encoders.vae_ref is not None and encoders.vae_ref() is None


def test_changed_image_reencodes_only_that_image(data_copy, tiny_dir, tmp_path):
    cfg = config(data_copy, resolution=[64, 96], flip=True)
    prepare(cfg, tiny_dir, tmp_path / "cache")
    img = Image.open(data_copy / "img_03.png").convert("RGB")
    img.putpixel((5, 5), (0, 255, 0))
    img.save(data_copy / "img_03.png")
    dataset, encoders = prepare(cfg, tiny_dir, tmp_path / "cache")
    assert dataset.stats.latents_encoded == 2 * 2  # its two buckets, plain and flipped
    assert dataset.stats.latents_reused == 20 and dataset.stats.texts_encoded == 0
    assert encoders.loads == ["vae"]  # the text encoder stays on disk


def test_changed_caption_reencodes_only_that_caption(data_copy, tiny_dir, tmp_path):
    cfg = config(data_copy)
    prepare(cfg, tiny_dir, tmp_path / "cache")
    (data_copy / "img_01.txt").write_text("[trigger] something else entirely")
    dataset, encoders = prepare(cfg, tiny_dir, tmp_path / "cache")
    assert (dataset.stats.texts_encoded, dataset.stats.latents_encoded) == (1, 0)
    assert encoders.loads == ["text_encoder"]


def test_new_resolution_encodes_only_the_new_buckets(example_data, tiny_dir, tmp_path):
    prepare(config(example_data, resolution=[64]), tiny_dir, tmp_path)
    dataset, _ = prepare(config(example_data, resolution=[64, 96]), tiny_dir, tmp_path)
    assert (dataset.stats.latents_encoded, dataset.stats.latents_reused) == (6, 6)


def test_encoder_identity_follows_weights_and_dtype(tiny_dir, tmp_path):
    base = Encoders(tiny_dir, vae_dtype="fp32", text_dtype="fp32")
    assert base.vae_id == Encoders(tiny_dir, vae_dtype="fp32").vae_id
    assert base.vae_id != Encoders(tiny_dir, vae_dtype="bf16").vae_id
    assert base.text_id != Encoders(tiny_dir, text_dtype="bf16").text_id
    assert base.text_id != Encoders(tiny_dir, text_dtype="fp32", max_length=256).text_id
    big = tmp_path / "weights.bin"
    big.write_bytes(bytes(8 << 20))
    before = folder_fingerprint(tmp_path)
    with open(big, "r+b") as handle:  # one changed byte in a sampled chunk of a large file
        handle.seek((8 << 20) - 10)
        handle.write(b"\x01")
    assert folder_fingerprint(tmp_path) != before


# ----------------------------------------------------------------------------- interruption and corruption


def test_interrupted_caching_resumes(example_data, tiny_dir, tmp_path):
    cfg = config(example_data)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tiny_dir, tmp_path, encoders=Counting(tiny_dir, fail_after=2), vae_batch_size=1)
    written = list(tmp_path.rglob("*.safetensors"))
    assert len(written) == 2 and not list(tmp_path.rglob("*.tmp"))
    dataset, encoders = prepare(cfg, tiny_dir, tmp_path, vae_batch_size=1)
    assert (dataset.stats.latents_encoded, dataset.stats.latents_reused) == (4, 2)
    assert encoders.vae_calls == 4 and dataset.stats.corrupt == []


def test_corrupt_cache_files_are_reencoded(example_data, tiny_dir, tmp_path):
    cfg = config(example_data)
    first, _ = prepare(cfg, tiny_dir, tmp_path)
    latent, text = first.latent_paths[0], first.text_paths[first.items[2].caption]
    latent.write_bytes(b"\x00garbage")
    text.write_bytes(text.read_bytes()[:100])
    before = read_entry(first.latent_paths[1])["mean"]
    dataset, encoders = prepare(cfg, tiny_dir, tmp_path)
    assert sorted(dataset.stats.corrupt) == sorted([latent, text])
    assert (dataset.stats.latents_encoded, dataset.stats.texts_encoded) == (1, 1)
    assert read_entry(latent)["mean"].shape == before.shape
    assert read_entry(text)["embedding"].ndim == 2


def test_wrong_shape_entry_counts_as_corrupt(example_data, tiny_dir, tmp_path):
    from safetensors.torch import save_file

    first, _ = prepare(config(example_data), tiny_dir, tmp_path)
    save_file({"mean": torch.zeros(16, 3, 3), "std": torch.zeros(16, 3, 3)}, str(first.latent_paths[0]))
    dataset, _ = prepare(config(example_data), tiny_dir, tmp_path)
    assert dataset.stats.corrupt == [first.latent_paths[0]] and dataset.stats.latents_encoded == 1


def test_corrupt_entry_while_training_is_removed_with_a_clear_error(example_data, tiny_dir, tmp_path):
    dataset, _ = prepare(config(example_data), tiny_dir, tmp_path)
    path = dataset.latent_paths[0]
    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"cache file .* is corrupt \(.*\); it was removed, run again to re-encode it"):
        read_entry(path)
    assert not path.exists()


def test_bad_files_stop_nothing_half_way(data_copy, tiny_dir, tmp_path):
    (data_copy / "img_01.png").write_bytes(b"broken")
    (data_copy / "zz.png").write_bytes((data_copy / "img_00.png").read_bytes()[:300])
    (data_copy / "zz.txt").write_text("x")
    out = io.StringIO()
    dataset, _ = prepare(config(data_copy), tiny_dir, tmp_path, console=Console(file=out, width=300))
    assert len(dataset.items) == 5 and dataset.stats.latents_encoded == 5
    assert sorted(p.path.name for p in dataset.problems if p.level == "skip") == ["img_01.png", "zz.png"]
    printed = out.getvalue()
    assert "skipped: " + str(data_copy / "img_01.png") + ": is not an image Pillow can read" in printed
    assert printed.index("zz.png: is truncated or corrupt") < printed.index("caching latents")  # listed up front
    assert "caching latents" in printed and "5/5" in printed and "caching captions" in printed
    assert (
        "data: 5 images, 5 samples in 3 buckets, 4 batches per epoch; cache: 5 latents encoded, 0 reused, "
        "6 captions encoded, 0 reused"
    ) in printed


def test_errors_stop_before_any_encoding(data_copy, tiny_dir, tmp_path):
    (data_copy / "img_04.txt").unlink()
    encoders = Counting(tiny_dir)
    with pytest.raises(DataError, match="img_04.png: has no caption file img_04.txt"):
        prepare(config(data_copy), tiny_dir, tmp_path, encoders=encoders)
    assert encoders.loads == [] and not list(tmp_path.rglob("*.safetensors"))


def test_default_encoders_come_from_the_config(example_data, tmp_path):
    dataset = prepare_dataset(config(example_data), "cpu", cache_dir=tmp_path)
    assert dataset.stats.latents_encoded == 6
    assert (tmp_path / "latents").is_dir() and (tmp_path / "text").is_dir()
