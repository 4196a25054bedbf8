"""`zturbo inspect`: each key style, the fit against a model, bad files, and the README table."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora.test_formats import comfy_fused, loha_factors, lokr_factors  # noqa: E402 - the shared builders
from lora.test_formats_network import random_lora  # noqa: E402
from zturbo_train.cli import app
from zturbo_train.commands.inspect import inspect_file
from zturbo_train.errors import LoraError
from zturbo_train.lora.formats import LoraWeights, write_lora_file
from zturbo_train.lora.inspect import SUPPORT, support_table_markdown

runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    """One file per key style, all on the tiny model's shapes."""
    from zturbo_train.models import load_parts

    transformer = load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer
    folder = tmp_path_factory.mktemp("styles")
    loras = random_lora(transformer, rank=4, alpha=2.0, blocks=("layers", "noise_refiner"))
    out = {
        style: write_lora_file(
            folder / f"{style}.safetensors", loras, style, {"trigger_word": "sks", "steps": 20, "resolution": [512]}
        )
        for style in ("comfyui", "diffusers", "musubi")
    }
    save_file(comfy_fused(loras), str(folder / "native.safetensors"))
    gen = torch.Generator().manual_seed(0)
    state = {f"diffusion_model.layers.0.feed_forward.w1.{k}": v for k, v in loha_factors(170, 64, gen).items()}
    state.update(
        {f"diffusion_model.layers.0.attention.to_q.{k}": v for k, v in lokr_factors(64, 64, "w2_factored", gen).items()}
    )
    save_file(state, str(folder / "lycoris.safetensors"))
    save_file({"diffusion_model.layers.0.feed_forward.w1.diff": torch.zeros(170, 64)}, str(folder / "diff.safetensors"))
    out.update(
        native=folder / "native.safetensors", lycoris=folder / "lycoris.safetensors", diff=folder / "diff.safetensors"
    )
    return out


@pytest.mark.parametrize(
    "name, style",
    [
        ("comfyui", "comfyui"),
        ("diffusers", "diffusers"),
        ("musubi", "musubi"),
        ("native", "comfyui-native"),
        ("lycoris", "lycoris"),
        ("diff", "diff"),
    ],
)
def test_each_style_is_recognised(files, name, style):
    report = inspect_file(files[name])
    assert report["style"]["name"] == style and report["tools"] == SUPPORT[style]
    if name in ("comfyui", "diffusers", "musubi", "native"):
        assert report["modules"] == 24 and report["by_block"] == {"layers": 16, "noise_refiner": 8}
        # the fused qkv pair is rank 3r (q, k, v stacked, as musubi's converter writes it)
        assert report["by_target"]["attention.to_q"] == 3 and report["ranks"] == ([4, 12] if name == "native" else [4])
    if name in ("comfyui", "musubi", "native"):
        assert report["alphas"] == ([2.0, 6.0] if name == "native" else [2.0]) and report["scales"] == [0.5]
    if name == "diffusers":  # alpha baked in: scale 1
        assert report["alphas"] == [4.0] and report["scales"] == [1.0]


def test_metadata_and_kinds(files):
    report = inspect_file(files["comfyui"])
    meta = report["metadata"]
    assert meta["trigger"] == "sks" and meta["steps"] == 20 and meta["resolution"] == "512x512"
    assert meta["base"] == "zimage" and meta["title"] == "comfyui" and len(meta["hash"]) == 64
    assert report["dtypes"] == ["float32"] and report["size_bytes"] == files["comfyui"].stat().st_size
    assert inspect_file(files["lycoris"])["kinds"] == {"loha": 1, "lokr": 1}
    assert inspect_file(files["native"])["style"]["comfyui_names"] is True


def test_fit_against_a_model(tmp_path, files, tiny_transformer):
    assert inspect_file(files["musubi"], model="builtin:tiny")["fit"] == {
        "model": "builtin:tiny",
        "fits": True,
        "skipped_keys": [],
        "misfit": [],
    }
    loras = random_lora(tiny_transformer, rank=2)
    loras["double_blocks.0.img_attn.qkv"] = LoraWeights(torch.zeros(2, 8), torch.zeros(8, 2))
    partial = write_lora_file(tmp_path / "partial.safetensors", loras)
    fit = inspect_file(partial, model="builtin:tiny")["fit"]
    assert not fit["fits"] and fit["skipped_keys"] == ["diffusion_model.double_blocks.0.img_attn.qkv.*"]


def test_cli_text_and_json(files):
    result = runner.invoke(app, ["inspect", str(files["comfyui"]), str(files["native"]), "--model", "builtin:tiny"])
    assert result.exit_code == 0, result.output
    assert "key style: comfyui (prefix diffusion_model.; lora_A/lora_B; alpha keys yes)" in result.output
    assert "key style: comfyui-native" in result.output and "fits builtin:tiny: yes" in result.output
    assert "ComfyUI: fully (v0.3.76+)" in result.output and "trigger sks" in result.output
    as_json = runner.invoke(app, ["inspect", str(files["musubi"]), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["style"]["name"] == "musubi"


def test_bad_files_are_one_line_errors(tmp_path, files):
    """Mutation checked: with require_finite's call removed from describe_file, the NaN file is described."""
    nan = tmp_path / "nan.safetensors"
    save_file({"diffusion_model.layers.0.feed_forward.w1.diff": torch.full((170, 64), float("nan"))}, str(nan))
    pickle = tmp_path / "pickle.safetensors"
    pickle.write_bytes(b"\x80\x04\x95 not safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(files["comfyui"].read_bytes()[:-100])
    foreign = tmp_path / "model.safetensors"
    save_file({"model.diffusion.conv.weight": torch.zeros(2, 2)}, str(foreign))
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    for path, message in (
        (pickle, "is not a safetensors file (it looks like a pickle)"),
        (truncated, "is not a safetensors file (it is truncated"),
        (foreign, "is not a LoRA weight"),
        (empty, "holds no tensors; it is not a LoRA"),
        (tmp_path / "none.safetensors", "does not exist"),
        (nan, "tensor diffusion_model.layers.0.feed_forward.w1.diff holds 10880 NaN/inf values"),
    ):
        with pytest.raises(LoraError, match=re.escape(message)):
            inspect_file(path)
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output


def test_readme_table_is_the_support_table():
    assert support_table_markdown() in README.read_text(encoding="utf-8")


def test_inspect_help_shows_examples(tiny_adapter):
    result = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "zturbo inspect my_lora.safetensors --model builtin:tiny --json" in result.output
    assert "inspect" in runner.invoke(app, ["--help"]).output
    adapter = json.loads(runner.invoke(app, ["inspect", str(tiny_adapter), "--json"]).output)
    assert adapter["style"]["name"] == "comfyui" and adapter["scales"] == [1.0]  # no alpha keys: scale 1
