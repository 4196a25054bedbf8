"""The loader: builtin:tiny is a real diffusers folder; our parts equal diffusers' own."""

import json
from pathlib import Path

import pytest
import torch

from zturbo_train.errors import ModelError
from zturbo_train.models import build_pipeline, load_parts, resolve_model_dir
from zturbo_train.paths import download_dir


def test_tiny_folder_runs_in_diffusers_and_matches_our_loader(tiny_dir):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    image = pipe(
        "a red cube",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0

    ours = load_parts("builtin:tiny", dtype="fp32")
    for name in ("transformer", "text_encoder", "vae"):
        mine, theirs = getattr(ours, name).state_dict(), getattr(pipe, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.transformer.config) == public(pipe.transformer.config)
    assert public(ours.scheduler.config) == public(pipe.scheduler.config)
    assert ours.tokenizer("a red cube").input_ids == pipe.tokenizer("a red cube").input_ids

    rebuilt = build_pipeline(ours)(
        "a red cube",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert (rebuilt == image).all()


def test_tiny_has_real_conventions(tiny_dir):
    config = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "ZImageTransformer2DModel" and config["axes_lens"] == [1536, 512, 512]
    vae = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (0.3611, 0.1159, 16)
    scheduler = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0 and scheduler["use_dynamic_shifting"] is False
    assert not list(tiny_dir.rglob("*.bin")), "safetensors only"


def test_parts_load_alone_with_dtype(tiny_dir):
    parts = load_parts("builtin:tiny", parts=["transformer"], dtype="bf16")
    assert parts.text_encoder is None and parts.loaded == ["transformer"]
    assert parts.transformer.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in parts.transformer.parameters())


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist; set \\[model\\] path"):
        resolve_model_dir(tmp_path / "nothing")


def test_folder_of_another_model(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError, match="holds a FluxPipeline model, not Z-Image"):
        resolve_model_dir(tmp_path)
    with pytest.raises(ModelError, match="has no model_index.json"):
        resolve_model_dir(tmp_path.parent)


def test_missing_part(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    with pytest.raises(ModelError, match="has no vae/ folder; the download is incomplete"):
        load_parts(tmp_path, parts=["vae"])


def test_repo_not_downloaded_says_which_command_fetches_it():
    with pytest.raises(ModelError, match=r"not downloaded yet; run `zturbo download --model Tongyi-MAI/Z-Image-Turbo`"):
        resolve_model_dir("Tongyi-MAI/Z-Image-Turbo")


def test_downloaded_repo_is_found_in_our_folder(tiny_dir):
    import shutil

    target = download_dir("someone/tiny-copy")
    shutil.copytree(tiny_dir, target)
    try:
        assert resolve_model_dir("someone/tiny-copy") == target
    finally:
        shutil.rmtree(target)


def test_repo_in_the_hugging_face_cache_is_found(tiny_dir):
    """A model fetched with `hf download` (the HF cache layout) is found by its repo id."""
    import shutil

    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--someone--cached"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    try:
        assert resolve_model_dir("someone/cached") == snapshot
        assert load_parts("someone/cached", parts=["scheduler"]).scheduler.config.shift == 3.0
    finally:
        shutil.rmtree(repo)
