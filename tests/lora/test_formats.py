"""LoRA files as other tools write them, built at the tiny shapes from each tool's key conventions.

Builders here are our own, written from the conventions (ComfyUI `comfy/utils.py`
z_image_to_diffusers and `comfy/weight_adapter/`, musubi-tuner's fused-qkv converter,
LyCORIS' key names); the LoKr / LoHa maths is pinned against the `lycoris-lora` library.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save, save_file
from typer.testing import CliRunner

from lora.test_formats_network import _forward, random_lora  # noqa: E402 - the shared helpers
from zturbo_train.cli import app
from zturbo_train.commands.merge import merge_into_model, merge_to_lora
from zturbo_train.commands.sample import SampleSettings, sample
from zturbo_train.errors import LoraError
from zturbo_train.lora import deltas
from zturbo_train.lora import formats as keys
from zturbo_train.lora.deltas import DeltaWeights
from zturbo_train.lora.files import LoraSpec
from zturbo_train.lora.formats import LoraWeights, read_lora_file, write_lora_file
from zturbo_train.lora.network import load_lora, merge_into_weights

runner = CliRunner()
BLOCKS = ("layers", "noise_refiner", "context_refiner")


# ------------------------------------------------------------------ builders (other tools' conventions)


def comfy_fused(loras: dict, prefix: str = "diffusion_model.", alpha_keys: bool = True) -> dict[str, torch.Tensor]:
    """A ComfyUI-native file from unfused LoRAs: q, k, v fused into `attention.qkv` (down stacked, up block
    diagonal: rank 3r, alpha 3a, as musubi's converter to ComfyUI does), `to_out.0` named `attention.out`,
    lora_up/lora_down names. Without alpha keys, the scale is folded into up (scale 1 then)."""
    out: dict[str, torch.Tensor] = {}
    done = set()

    def put(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        base = prefix + (name.replace(".", "_") if prefix == "lora_unet_" else name)
        rank = down.shape[0]
        out[f"{base}.lora_down.weight"] = down
        out[f"{base}.lora_up.weight"] = up if alpha_keys else up * (alpha / rank)
        if alpha_keys:
            out[f"{base}.alpha"] = torch.tensor(alpha)

    for module, lora in sorted(loras.items()):
        block, _, leaf = module.rpartition(".attention.")
        if leaf in ("to_q", "to_k", "to_v") and block not in done:
            parts = [loras[f"{block}.attention.{x}"] for x in ("to_q", "to_k", "to_v")]
            put(
                f"{block}.attention.qkv",
                torch.cat([p.down for p in parts]),
                torch.block_diag(*[p.up for p in parts]),
                3 * float(parts[0].alpha if parts[0].alpha is not None else parts[0].rank),
            )
            done.add(block)
        elif leaf == "to_out.0":
            put(f"{block}.attention.out", lora.down, lora.up, float(lora.alpha or lora.rank))
        elif leaf not in ("to_q", "to_k", "to_v"):
            put(module, lora.down, lora.up, float(lora.alpha or lora.rank))
    return out


def lokr_factors(out_f: int, in_f: int, layout: str, gen: torch.Generator, rank: int = 2) -> dict[str, torch.Tensor]:
    """LoKr tensors for an (out_f, in_f) linear: w1 (a, c) small, w2 (out/a, in/c) whole, factored or Tucker."""
    a, c = 2, 4
    o2, i2 = out_f // a, in_f // c
    t = {}
    if layout == "w1_factored":
        t["lokr_w1_a"], t["lokr_w1_b"] = torch.randn(a, rank, generator=gen), torch.randn(rank, c, generator=gen)
    else:
        t["lokr_w1"] = torch.randn(a, c, generator=gen)
    if layout in ("w2_factored", "w1_factored"):
        t["lokr_w2_a"], t["lokr_w2_b"] = torch.randn(o2, rank, generator=gen), torch.randn(rank, i2, generator=gen)
        if layout == "w1_factored":
            t["lokr_w2"] = t.pop("lokr_w2_a") @ t.pop("lokr_w2_b")
    elif layout == "tucker":
        t["lokr_t2"] = torch.randn(rank, rank, 1, 1, generator=gen)
        t["lokr_w2_a"], t["lokr_w2_b"] = torch.randn(rank, o2, generator=gen), torch.randn(rank, i2, generator=gen)
    else:
        t["lokr_w2"] = torch.randn(o2, i2, generator=gen)
    return {k: v * 0.1 for k, v in t.items()}


def loha_factors(out_f: int, in_f: int, gen: torch.Generator, rank: int = 3) -> dict[str, torch.Tensor]:
    def pair() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(out_f, rank, generator=gen) * 0.3, torch.randn(rank, in_f, generator=gen)

    (w1_a, w1_b), (w2_a, w2_b) = pair(), pair()
    return {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b}


# ------------------------------------------------------------------ LyCORIS maths against the library


@pytest.mark.parametrize("layout", ["w2_factored", "w1_factored", "whole", "tucker"])
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_lokr_delta_equals_lycoris(layout, alpha):
    """kron / Tucker maths against lycoris' own `kron_weight`; the scale as ComfyUI applies it: alpha / rank of the
    factored side, 1 without alpha or without a factored side. Where lycoris' `diff_weight` derives the scale
    itself (a factored side, no Tucker core), it agrees too."""
    from lycoris.functional import lokr

    t = lokr_factors(64, 64, layout, torch.Generator().manual_seed(1))
    args = [t.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
    rank = deltas.lokr_rank(t)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    expected = lokr.kron_weight(*args, scale=scale).reshape(64, 64)
    ours = DeltaWeights("lokr", t, alpha).delta()
    assert ours.shape == (64, 64) and DeltaWeights("lokr", t, alpha).shape == (64, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    if layout in ("w2_factored", "w1_factored"):
        gamma = alpha if alpha is not None else float(rank)
        torch.testing.assert_close(ours, lokr.diff_weight(*args, gamma=gamma).reshape(64, 64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 1.5])
def test_loha_delta_equals_lycoris(alpha):
    from lycoris.functional import loha

    t = loha_factors(170, 64, torch.Generator().manual_seed(2))
    gamma = alpha / 3 if alpha is not None else 1.0
    expected = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None, gamma=gamma)
    torch.testing.assert_close(DeltaWeights("loha", t, alpha).delta(), expected, rtol=1e-5, atol=1e-6)


def test_lokr_and_loha_files_apply_the_library_delta(tmp_path, tiny_transformer):
    """Files with LyCORIS keys (under ComfyUI's fused qkv too) hook on and merge in as the library's delta."""
    from lycoris.functional import loha, lokr

    gen = torch.Generator().manual_seed(3)
    qkv = lokr_factors(192, 64, "w2_factored", gen)
    ff = loha_factors(170, 64, gen)
    state = {f"diffusion_model.layers.0.attention.qkv.{k}": v for k, v in qkv.items()}
    state.update({f"lycoris_layers_1_feed_forward_w1.{k}": v for k, v in ff.items()})
    state["diffusion_model.layers.0.attention.qkv.alpha"] = torch.tensor(4.0)
    save_file(state, str(tmp_path / "lyco.safetensors"))
    loras, _ = read_lora_file(tmp_path / "lyco.safetensors")
    assert sorted(loras) == [
        "layers.0.attention.to_k",
        "layers.0.attention.to_q",
        "layers.0.attention.to_v",
        "layers.1.feed_forward.w1",
    ]
    fused = lokr.diff_weight(qkv["lokr_w1"], None, None, None, qkv["lokr_w2_a"], qkv["lokr_w2_b"], None, gamma=4.0)
    expected = {
        "layers.0.attention.to_q": fused[:64],
        "layers.0.attention.to_k": fused[64:128],
        "layers.0.attention.to_v": fused[128:],
        "layers.1.feed_forward.w1": loha.diff_weight(
            ff["hada_w1_b"], ff["hada_w1_a"], ff["hada_w2_b"], ff["hada_w2_a"], None, None, gamma=1.0
        ),
    }
    network = load_lora(tiny_transformer, loras, multiplier=0.5)
    hooked = _forward(tiny_transformer)
    network.detach()
    base = _forward(tiny_transformer)
    with torch.no_grad():
        modules = dict(tiny_transformer.named_modules())
        for name, delta in expected.items():
            modules[name].weight += 0.5 * delta
    torch.testing.assert_close(hooked, _forward(tiny_transformer), rtol=1e-4, atol=1e-5)
    assert (hooked - base).abs().max() > 1e-3, "the update must change the output"


# ------------------------------------------------------------------ ComfyUI-native files


def test_fused_qkv_splits_exactly(tiny_transformer):
    """ComfyUI's extract node: one rank-r pair on the fused qkv; q, k, v get up rows 0:d, d:2d, 2d:3d, shared down."""
    gen = torch.Generator().manual_seed(4)
    down, up = torch.randn(5, 64, generator=gen), torch.randn(192, 5, generator=gen)
    state = {
        "diffusion_model.layers.1.attention.qkv.lora_down.weight": down,
        "diffusion_model.layers.1.attention.qkv.lora_up.weight": up,
        "diffusion_model.layers.1.attention.qkv.alpha": torch.tensor(2.5),
        "lora_unet_noise_refiner_0_attention_out.lora_down.weight": down,  # ComfyUI's own names under lora_unet_
        "lora_unet_noise_refiner_0_attention_out.lora_up.weight": up[:64],
    }
    loras = keys.parse_state_dict(state)
    for index, leaf in enumerate(("to_q", "to_k", "to_v")):
        part = loras[f"layers.1.attention.{leaf}"]
        assert part.down is down and torch.equal(part.up, up[64 * index : 64 * (index + 1)]) and part.alpha == 2.5
    assert loras["noise_refiner.0.attention.to_out.0"].scale == 1.0  # no .alpha key: scale 1, as ComfyUI
    names = {
        "model.diffusion_model.final_layer.linear": "all_final_layer.2-1.linear",
        "lora_unet_x_embedder": "all_x_embedder.2-1",
        "lycoris_layers_0_feed_forward_w2": "layers.0.feed_forward.w2",
        "transformer.context_refiner.0.attention.to_out.0": "context_refiner.0.attention.to_out.0",
        "lora_unet_final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    }
    assert {raw: keys.module_name(raw) for raw in names} == names
    assert set(names.values()) <= set(keys.linear_shapes(tiny_transformer))
    keys.require_fit(loras, keys.linear_shapes(tiny_transformer), "fused")


@pytest.mark.parametrize("prefix, alpha_keys", [("diffusion_model.", True), ("lora_unet_", False)])
def test_fused_file_equals_the_unfused_lora(tmp_path, tiny_transformer, prefix, alpha_keys):
    loras = random_lora(tiny_transformer, rank=3, alpha=2.0, blocks=BLOCKS)
    save_file(comfy_fused(loras, prefix, alpha_keys), str(tmp_path / "fused.safetensors"))
    back, _ = read_lora_file(tmp_path / "fused.safetensors")
    assert back.keys() == loras.keys()
    for name, lora in loras.items():
        torch.testing.assert_close(back[name].delta(), lora.delta(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def fused_pair(tmp_path_factory, tiny_dir):
    """A known unfused LoRA (our default style) and the ComfyUI-native fused file made from it."""
    from zturbo_train.models import load_parts

    transformer = load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer
    loras = random_lora(transformer, rank=4, alpha=2.0, seed=9, blocks=BLOCKS, scale=0.3)
    folder = tmp_path_factory.mktemp("fused")
    save_file(comfy_fused(loras), str(folder / "fused.safetensors"))
    return write_lora_file(folder / "unfused.safetensors", loras), folder / "fused.safetensors"


def _sample(tmp_path, name, **kw):
    options = dict(
        prompts=["a red cube"],
        model="builtin:tiny",
        steps=3,
        seed=5,
        out_dir=tmp_path / name,
        device="cpu",
        dtype="fp32",
        width=64,
        height=64,
    )
    settings = SampleSettings(**{**options, **kw})
    return np.asarray(Image.open(sample(settings)[0]), dtype=np.int16)


def test_fused_file_gives_the_same_image_through_sample_and_merge(tmp_path, fused_pair):
    unfused, fused = fused_pair
    base = _sample(tmp_path, "base")
    with_unfused = _sample(tmp_path, "unfused", loras=[LoraSpec(unfused, 0.8)])
    with_fused = _sample(tmp_path, "fused", loras=[LoraSpec(fused, 0.8)])
    assert np.abs(with_unfused - base).max() > 8, "the LoRA must visibly change the image"
    assert np.abs(with_fused - with_unfused).max() <= 1
    merged = merge_into_model([LoraSpec(fused, 0.8)], tmp_path / "merged", model="builtin:tiny", dtype="fp32")
    assert np.abs(_sample(tmp_path, "merged", model=str(merged)) - with_unfused).max() <= 1


def test_fused_file_merges_into_one_lora(tmp_path, fused_pair, tiny_transformer):
    unfused, fused = fused_pair
    out = merge_to_lora([LoraSpec(fused, 0.7)], tmp_path / "converted.safetensors", model="builtin:tiny")
    converted, _ = read_lora_file(out)
    original, _ = read_lora_file(unfused)
    assert converted.keys() == original.keys()
    for name, lora in original.items():
        torch.testing.assert_close(converted[name].delta(), 0.7 * lora.delta(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ full patches (.diff / .diff_b)


def test_diff_patches_hook_merge_and_convert(tmp_path, tiny_transformer, tiny_dir):
    gen = torch.Generator().manual_seed(6)
    w_diff = torch.randn(170, 64, generator=gen) * 0.05
    b_diff = torch.randn(256, generator=gen) * 0.05
    path = tmp_path / "diff.safetensors"
    save_file(
        {
            "diffusion_model.layers.0.feed_forward.w1.diff": w_diff,
            "diffusion_model.layers.0.adaLN_modulation.0.diff_b": b_diff,
        },
        str(path),
    )
    loras, _ = read_lora_file(path)
    network = load_lora(tiny_transformer, loras, multiplier=0.5)
    hooked = _forward(tiny_transformer)
    network.detach()
    merge_into_weights(tiny_transformer, loras, weight=0.5)
    merged = _forward(tiny_transformer)
    with torch.no_grad():
        modules = dict(tiny_transformer.named_modules())
        modules["layers.0.feed_forward.w1"].weight -= 0.5 * w_diff
        modules["layers.0.adaLN_modulation.0"].bias -= 0.5 * b_diff
    base = _forward(tiny_transformer)
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    assert (merged - base).abs().max() > 1e-4
    # merge --out writes the bias delta into the shard's `.bias`
    out = merge_into_model([LoraSpec(path, 0.5)], tmp_path / "m", model="builtin:tiny", dtype="fp32")
    shard = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    source = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(
        shard["layers.0.adaLN_modulation.0.bias"], source["layers.0.adaLN_modulation.0.bias"] + 0.5 * b_diff
    )
    torch.testing.assert_close(
        shard["layers.0.feed_forward.w1.weight"], source["layers.0.feed_forward.w1.weight"] + 0.5 * w_diff
    )
    # --to-lora keeps them as .diff / .diff_b (ComfyUI's keys); diffusers cannot hold them
    written = merge_to_lora([LoraSpec(path)], tmp_path / "d.safetensors", model="builtin:tiny")
    back, _ = read_lora_file(written)
    assert torch.equal(back["layers.0.feed_forward.w1"].delta(), w_diff)
    assert torch.equal(back["layers.0.adaLN_modulation.0"].bias, b_diff)
    with pytest.raises(LoraError, match="diffusers style holds plain LoRA pairs only.*write --format comfyui"):
        merge_to_lora([LoraSpec(path)], tmp_path / "x.safetensors", style="diffusers", model="builtin:tiny")


def test_bias_patch_on_a_layer_without_bias_is_refused(tmp_path, tiny_transformer):
    loras = keys.parse_state_dict({"diffusion_model.layers.0.attention.to_q.diff_b": torch.zeros(64)})
    with pytest.raises(LoraError, match="to_q: a bias delta .*has no bias"):
        load_lora(tiny_transformer, loras)


def test_broken_lycoris_and_mixed_modules_are_errors():
    with pytest.raises(LoraError, match="lokr module m lacks lokr_w2"):
        keys.parse_state_dict({"m.lokr_w1": torch.zeros(2, 2)})
    with pytest.raises(LoraError, match="m mixes LoRA and diff weights"):
        keys.parse_state_dict(
            {
                "m.lora_down.weight": torch.zeros(1, 2),
                "m.lora_up.weight": torch.zeros(2, 1),
                "m.diff": torch.zeros(2, 2),
            }
        )


# ------------------------------------------------------------------ metadata


def kohya_hashes(path) -> tuple[str, str]:
    """sd-scripts' definition, computed here from the written file alone."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    model_hash = hashlib.sha256(data[8 + n :]).hexdigest()
    ss_only = save(load_file(path), {k: v for k, v in header["__metadata__"].items() if k.startswith("ss_")})
    return model_hash, hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_metadata_managers_read_and_kohya_hashes(tmp_path):
    gen = torch.Generator().manual_seed(8)
    big = {
        f"layers.{i}.feed_forward.w1": LoraWeights(
            torch.randn(64, 1024, generator=gen), torch.randn(1024, 64, generator=gen), 32.0
        )
        for i in range(3)
    }
    path = write_lora_file(
        tmp_path / "mine.safetensors",
        big,
        metadata={
            "trigger_word": "sks",
            "steps": 1500,
            "epochs": 3,
            "resolution": [512, 768],
            "started_at": 1764633600,
            "base_model": "Tongyi-MAI/Z-Image-Turbo",
        },
    )
    assert path.stat().st_size > 0x110000, "big enough for the legacy hash to read real bytes"
    _, meta = read_lora_file(path)
    assert meta["ss_base_model_version"] == "zimage" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "64" and meta["ss_network_alpha"] == "32"
    assert meta["ss_output_name"] == "mine" and json.loads(meta["ss_tag_frequency"]) == {"mine": {"sks": 1}}
    assert meta["ss_training_started_at"] == "1764633600" and meta["ss_steps"] == "1500" and meta["ss_epoch"] == "3"
    assert meta["ss_resolution"] == "(768, 768)" and meta["modelspec.resolution"] == "768x768"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"] == "Z-Image/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
    assert meta["modelspec.title"] == "mine" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.date"].startswith("2025-12-0")
    assert meta["zturbo.trigger_word"] == "sks" and meta["zturbo.base_model"] == "Tongyi-MAI/Z-Image-Turbo"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(path)
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_merge_to_lora_carries_trigger_and_recomputes_layout_keys(tmp_path, tiny_transformer):
    loras = random_lora(tiny_transformer, rank=4, alpha=2.0)
    source = write_lora_file(tmp_path / "src.safetensors", loras, metadata={"trigger_word": "ohwx", "steps": 10})
    out = merge_to_lora([LoraSpec(source)], tmp_path / "out.safetensors", style="diffusers", model="builtin:tiny")
    _, meta = read_lora_file(out)
    assert meta["modelspec.trigger_phrase"] == "ohwx" and meta["ss_steps"] == "10"
    assert meta["modelspec.title"] == "out" and meta["ss_network_alpha"] == "4"  # alpha baked: alpha = rank
    assert meta["zturbo.style"] == "diffusers"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(out)


def test_cli_help_names_the_formats_and_tools():
    result = runner.invoke(app, ["merge", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "musubi (alias kohya)" in text and "ComfyUI v0.3.76+" in text and "--allow-partial" in text


def test_loha_tucker_equals_lycoris():
    from lycoris.functional import loha

    gen = torch.Generator().manual_seed(11)
    t = {
        "hada_t1": torch.randn(3, 3, 1, 1, generator=gen),
        "hada_t2": torch.randn(3, 3, 1, 1, generator=gen),
        "hada_w1_a": torch.randn(3, 64, generator=gen),
        "hada_w1_b": torch.randn(3, 170, generator=gen),
        "hada_w2_a": torch.randn(3, 64, generator=gen),
        "hada_w2_b": torch.randn(3, 170, generator=gen),
    }
    expected = loha.diff_weight(
        t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"], t["hada_t2"], gamma=2.0 / 3
    ).reshape(64, 170)
    update = DeltaWeights("loha", t, 2.0)
    assert update.shape == (64, 170)
    torch.testing.assert_close(update.delta(), expected, rtol=1e-5, atol=1e-5)


def test_adapter_must_be_plain_lora_pairs(tmp_path):
    from zturbo_train.errors import AdapterError
    from zturbo_train.lora.adapter import read_adapter

    save_file({"diffusion_model.layers.0.feed_forward.w1.diff": torch.zeros(170, 64)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(AdapterError, match="not plain LoRA pairs"):
        read_adapter(tmp_path / "a.safetensors")
