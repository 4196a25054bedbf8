"""`zturbo merge`: merged folders judged by ZImagePipeline.from_pretrained, merged LoRAs by forward outputs."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora.test_formats_network import _forward, random_lora  # noqa: E402 - the shared helpers
from zturbo_train.cli import app
from zturbo_train.commands.merge import (
    PROVENANCE_NAME,
    combine_loras,
    linear_shapes_from_files,
    merge_into_model,
    merge_to_lora,
)
from zturbo_train.commands.sample import SampleSettings, sample
from zturbo_train.errors import AdapterError, ConfigError, LoraError
from zturbo_train.lora.files import LoraSpec
from zturbo_train.lora.formats import read_lora_file, write_lora_file
from zturbo_train.lora.network import load_lora, merge_into_weights
from zturbo_train.models import INDEX_NAME, transformer_files

runner = CliRunner()
ARGS = dict(prompt="a red cube", height=64, width=64, num_inference_steps=3, guidance_scale=0.0, output_type="np")


def image(pipe, seed=3):
    return pipe(**ARGS, generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory, tiny_dir):
    """Two LoRAs of different rank, alpha and style, on overlapping modules."""
    from zturbo_train.models import load_parts

    transformer = load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer
    folder = tmp_path_factory.mktemp("loras")
    a = random_lora(transformer, rank=4, alpha=2.0, seed=1, blocks=("layers", "noise_refiner"), scale=0.3)
    b = random_lora(transformer, rank=2, alpha=None, seed=2, blocks=("layers",), scale=0.3)
    return write_lora_file(folder / "a.safetensors", a, "comfyui"), write_lora_file(
        folder / "b.safetensors", b, "kohya"
    )


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, tiny_dir):
    """builtin:tiny with its transformer split into several shards and an index, as the real model is."""
    from diffusers import ZImageTransformer2DModel

    target = tmp_path_factory.mktemp("sharded") / "model"
    shutil.copytree(tiny_dir, target)
    shutil.rmtree(target / "transformer")
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_dir / "transformer")
    transformer.save_pretrained(target / "transformer", max_shard_size="150KB", safe_serialization=True)
    assert (target / "transformer" / INDEX_NAME).is_file()
    return target


# ------------------------------------------------------------------ into the model


def test_merged_folder_loads_in_diffusers_and_equals_base_plus_loras(tmp_path, tiny_dir, two_loras):
    from diffusers import ZImagePipeline

    a, b = two_loras
    out = merge_into_model(
        [LoraSpec(a, 0.8), LoraSpec(b, -0.5)], tmp_path / "merged", model="builtin:tiny", dtype="fp32"
    )
    merged = image(ZImagePipeline.from_pretrained(out, dtype=torch.float32))

    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    base = image(pipe)
    for path, strength in ((a, 0.8), (b, -0.5)):
        load_lora(pipe.transformer, read_lora_file(path)[0], multiplier=strength)
    hooked = image(pipe)
    assert np.abs(base - hooked).max() > 0.05, "the LoRAs must visibly change the image"
    # fp32 merge vs fp32 hook branches: the same sums in another order, ~1e-6 on [0, 1] pixels.
    assert np.abs(merged - hooked).max() < 1e-4
    # Saved in bf16 (the default): one rounding per weight; measured 5e-3 (about one 8-bit level).
    merged_bf16 = merge_into_model([LoraSpec(a, 0.8), LoraSpec(b, -0.5)], tmp_path / "bf16", model="builtin:tiny")
    assert np.abs(image(ZImagePipeline.from_pretrained(merged_bf16, dtype=torch.float32)) - hooked).max() < 2e-2
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    assert [l["strength"] for l in provenance["loras"]] == [0.8, -0.5] and provenance["dtype"] == "fp32"


def test_sharded_source_is_merged_shard_by_shard(tmp_path, sharded_model, two_loras, monkeypatch):
    from zturbo_train.commands import merge as fileio

    written, save = [], fileio.save_safetensors
    monkeypatch.setattr(
        fileio,
        "save_safetensors",
        lambda path, tensors, meta=None: (written.append(sorted(tensors)), save(path, tensors, meta))[1],
    )
    a, _ = two_loras
    out = merge_into_model([LoraSpec(a, 0.6)], tmp_path / "merged", model=str(sharded_model), dtype="fp32")
    sources, results = transformer_files(sharded_model), transformer_files(out)
    assert len(sources) > 2 and [p.name for p in results] == [p.name for p in sources]
    # Bounded memory: each write holds exactly one source shard's tensors, never the whole model.
    assert written == [sorted(load_file(p)) for p in sources]
    index = json.loads((out / "transformer" / INDEX_NAME).read_text())
    assert index["weight_map"] == json.loads((sharded_model / "transformer" / INDEX_NAME).read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for p in results for t in load_file(p).values())

    from zturbo_train.models import load_parts

    expected = load_parts(str(sharded_model), parts=["transformer"], dtype="fp32").transformer
    merge_into_weights(expected, read_lora_file(a)[0], weight=0.6)
    got = load_parts(str(out), parts=["transformer"], dtype="fp32").transformer.state_dict()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)


def test_bf16_merge_halves_the_weights_and_samples_through_the_cli(tmp_path, two_loras):
    a, _ = two_loras
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", "--lora", f"{a}:0.5", "--out", str(out), "--model", "builtin:tiny"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    tensors = load_file(transformer_files(out)[0])
    assert tensors["layers.0.attention.to_q.weight"].dtype == torch.bfloat16
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "model_index.json").is_file()
    samples = sample(
        SampleSettings(
            prompts=["x"],
            model=str(out),
            steps=2,
            seed=1,
            width=64,
            height=64,
            out_dir=tmp_path / "img",
            device="cpu",
            dtype="bf16",
        )
    )
    assert Image.open(samples[0]).size == (64, 64)


def test_adapter_folds_in(tmp_path, tiny_adapter):
    from zturbo_train.models import load_parts

    out = merge_into_model(
        [], tmp_path / "dedistilled", model="builtin:tiny", adapter="builtin:tiny-adapter", dtype="fp32"
    )
    expected = load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer
    merge_into_weights(expected, read_lora_file(tiny_adapter)[0])
    got = load_parts(str(out), parts=["transformer"], dtype="fp32").transformer.state_dict()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
    assert json.loads((out / PROVENANCE_NAME).read_text())["adapter"]["weight"] == 1.0


def test_overwrite_is_refused_then_allowed(tmp_path, two_loras):
    a, _ = two_loras
    out = merge_into_model([LoraSpec(a)], tmp_path / "m", model="builtin:tiny", dtype="fp32")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        merge_into_model([LoraSpec(a)], out, model="builtin:tiny")
    merge_into_model([LoraSpec(a, 0.5)], out, model="builtin:tiny", dtype="fp32", overwrite=True)
    assert json.loads((out / PROVENANCE_NAME).read_text())["loras"][0]["strength"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old folders left behind


def test_conflicting_outputs(tmp_path, tiny_dir, two_loras):
    a, _ = two_loras
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file; a merged model is a folder"):
        merge_into_model([LoraSpec(a)], tmp_path / "file", model="builtin:tiny", overwrite=True)
    with pytest.raises(ConfigError, match="overlaps the input"):
        merge_into_model([LoraSpec(a)], tiny_dir, model="builtin:tiny", overwrite=True)
    with pytest.raises(ConfigError, match="overlaps the input"):
        merge_into_model([LoraSpec(a)], tiny_dir / "merged", model="builtin:tiny")
    with pytest.raises(ConfigError, match="nothing to merge"):
        merge_into_model([], tmp_path / "m", model="builtin:tiny")


def test_bad_lora_inputs_to_merge(tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        merge_into_model([LoraSpec(tmp_path / "no.safetensors")], tmp_path / "m", model="builtin:tiny")
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"PK\x03\x04 zip")
    with pytest.raises(LoraError, match="not a safetensors file"):
        merge_into_model([LoraSpec(pickle)], tmp_path / "m", model="builtin:tiny")
    flux = tmp_path / "flux.safetensors"
    save_file(
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9216, 4),
        },
        str(flux),
    )
    with pytest.raises(LoraError, match="modules this model lacks .*double_blocks.0.img_attn.qkv.*another model"):
        merge_into_model([LoraSpec(flux)], tmp_path / "m", model="builtin:tiny")
    with pytest.raises(AdapterError, match="another model"):
        merge_into_model([], tmp_path / "m", model="builtin:tiny", adapter=str(flux))
    assert not (tmp_path / "m").exists()


def test_shapes_from_headers_equal_the_loaded_model(tiny_transformer, tiny_dir):
    from zturbo_train.lora.formats import linear_shapes

    from_files = linear_shapes_from_files(transformer_files(tiny_dir))
    loaded = linear_shapes(tiny_transformer)
    assert all(from_files[name] == shape for name, shape in loaded.items())


# ------------------------------------------------------------------ into one LoRA


def test_to_lora_equals_applying_both(tmp_path, tiny_transformer, two_loras):
    a, b = two_loras
    out = merge_to_lora([LoraSpec(a, 0.8), LoraSpec(b, -0.5)], tmp_path / "ab.safetensors", model="builtin:tiny")
    merged, meta = read_lora_file(out)
    assert merged["layers.0.attention.to_q"].rank == 6  # 4 + 2 concatenated
    assert merged["noise_refiner.0.attention.to_q"].rank == 4  # only in a: kept as it was
    assert [m["strength"] for m in json.loads(meta["zturbo.merged_from"])] == [0.8, -0.5]

    networks = [
        load_lora(tiny_transformer, read_lora_file(a)[0], 0.8),
        load_lora(tiny_transformer, read_lora_file(b)[0], -0.5),
    ]
    both = _forward(tiny_transformer)
    for network in networks:
        network.detach()
    base = _forward(tiny_transformer)
    load_lora(tiny_transformer, merged)
    one = _forward(tiny_transformer)
    assert (both - base).abs().max() > 1e-2
    torch.testing.assert_close(one, both, rtol=1e-5, atol=1e-5)  # fp32, summation order only


def test_merged_lora_loads_in_diffusers_with_the_same_image(tmp_path, tiny_dir, two_loras):
    from diffusers import ZImagePipeline

    a, b = two_loras
    out = merge_to_lora([LoraSpec(a, 0.8), LoraSpec(b, -0.5)], tmp_path / "ab.safetensors", style="diffusers")
    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    networks = [
        load_lora(pipe.transformer, read_lora_file(a)[0], 0.8),
        load_lora(pipe.transformer, read_lora_file(b)[0], -0.5),
    ]
    ours = image(pipe)
    for network in networks:
        network.detach()
    pipe.load_lora_weights(str(out), adapter_name="ab")
    theirs = image(pipe)
    assert np.abs(ours - theirs).max() < 1e-4  # fp32 peft layers vs hooks: summation order


def test_combine_is_exact_on_hand_placed_weights():
    from zturbo_train.lora.formats import LoraWeights

    one = {"m": LoraWeights(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]]), alpha=2.0)}  # scale 2
    two = {"m": LoraWeights(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [3.0]]), alpha=None)}  # scale 1
    combined, rescaled = combine_loras([(one, 0.5), (two, 2.0)])
    assert rescaled and combined["m"].rank == 2 and combined["m"].scale == 1.0
    assert torch.equal(combined["m"].delta(), torch.tensor([[2.0, 0.0], [0.0, 6.0]]))
    untouched, rescaled = combine_loras([(one, 1.0)])
    assert not rescaled and untouched["m"] is one["m"]


def test_format_round_trip_is_lossless(tmp_path, two_loras):
    a, _ = two_loras
    original, meta = read_lora_file(a)
    path = a
    for style, written in (
        ("kohya", "musubi"),
        ("musubi", "musubi"),
        ("diffusers", "diffusers"),
        ("comfyui", "comfyui"),
    ):
        target = tmp_path / f"{style}.safetensors"
        result = runner.invoke(
            app, ["merge", "--lora", str(path), "--to-lora", str(target), "--format", style, "--model", "builtin:tiny"]
        )
        assert result.exit_code == 0, result.output
        _, target_meta = read_lora_file(target)
        assert target_meta["zturbo.style"] == written
        path = target
    back, _ = read_lora_file(path)
    assert back.keys() == original.keys()
    for name, lora in original.items():
        # Through diffusers, alpha/rank (here 2/4, exact in fp32) moved into up: the update is bit-identical.
        assert torch.equal(back[name].down, lora.down) and torch.equal(back[name].up, lora.up * lora.scale)
        assert back[name].scale == 1.0 and torch.equal(back[name].delta(), lora.delta())
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in load_file(tmp_path / "kohya.safetensors")


def test_to_lora_bad_inputs(tmp_path, two_loras):
    a, b = two_loras
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        merge_to_lora([LoraSpec(a)], tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="overlaps the input"):
        merge_to_lora([LoraSpec(a)], a, overwrite=True)
    existing = tmp_path / "e.safetensors"
    existing.write_bytes(b"")
    with pytest.raises(ConfigError, match="was not written by `zturbo merge`.*with or without --overwrite"):
        merge_to_lora([LoraSpec(a)], existing, overwrite=True)
    merge_to_lora([LoraSpec(a)], tmp_path / "ours.safetensors")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        merge_to_lora([LoraSpec(a)], tmp_path / "ours.safetensors")
    with pytest.raises(ConfigError, match="--format 'safetensors' is not one of"):
        merge_to_lora([LoraSpec(a)], tmp_path / "y.safetensors", style="safetensors")


# ------------------------------------------------------------------ the CLI


def test_cli_merge_help():
    result = runner.invoke(app, ["merge", "--help"])
    assert result.exit_code == 0 and "--to-lora" in result.output and "zturbo merge --lora" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora", "x.safetensors:abc", "--out", "o"], "strength 'abc' is not a number"),
        (["--lora", "x.safetensors"], "pass exactly one of --out DIR"),
        (["--lora", "x.safetensors", "--out", "o", "--to-lora", "o.safetensors"], "pass exactly one of --out DIR"),
        (["--lora", "x.safetensors", "--out", "o", "--format", "kohya"], "--format sets the style of a --to-lora file"),
        (["--lora", "x.safetensors", "--to-lora", "o.safetensors", "--adapter", "v2"], "--adapter folds into a model"),
        (
            ["--lora", "missing.safetensors", "--out", "o", "--model", "builtin:tiny"],
            "missing.safetensors does not exist",
        ),
    ],
)
def test_cli_merge_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["merge", *args])
    assert result.exit_code != 0 and "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
