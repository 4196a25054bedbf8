"""Key converter and LoRA layers, judged by diffusers' own `load_lora_weights`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from zturbo_train.errors import LoraError
from zturbo_train.lora import formats as keys
from zturbo_train.lora.formats import LoraWeights, read_lora_file, write_lora_file
from zturbo_train.lora.network import create_lora, load_lora, merge_into_weights, target_modules


def random_lora(transformer, rank=4, alpha=None, seed=0, blocks=("layers",), scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    shapes = keys.linear_shapes(transformer)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0"]
    return {
        name: LoraWeights(
            down=torch.randn(rank, shapes[name][1], generator=gen) * scale,
            up=torch.randn(shapes[name][0], rank, generator=gen) * scale,
            alpha=alpha,
        )
        for name in target_modules(transformer, blocks, targets)
    }


def test_kohya_names_map_back_to_modules():
    assert keys.kohya_to_module("layers_12_attention_to_out_0") == "layers.12.attention.to_out.0"
    assert keys.kohya_to_module("context_refiner_1_feed_forward_w3") == "context_refiner.1.feed_forward.w3"
    assert keys.kohya_to_module("noise_refiner_0_adaLN_modulation_0") == "noise_refiner.0.adaLN_modulation.0"


@pytest.mark.parametrize("style", keys.STYLES)
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_round_trip_each_style(tmp_path, tiny_transformer, style, alpha):
    loras = random_lora(tiny_transformer, alpha=alpha)
    path = write_lora_file(tmp_path / "x.safetensors", loras, style, {"trigger_word": "sks", "steps": 10})
    back, meta = read_lora_file(path)
    assert back.keys() == loras.keys()
    for name, lora in loras.items():
        # diffusers bakes alpha/rank into lora_B (scale 1 after); the others keep the tensors and alpha as they are.
        baked = style == "diffusers"
        assert torch.equal(back[name].down, lora.down)
        assert torch.equal(back[name].up, lora.up * lora.scale if baked else lora.up)
        assert back[name].scale == (1.0 if baked else lora.scale)
        assert torch.equal(back[name].delta(), lora.delta())
    assert meta["zturbo.trigger_word"] == "sks" and meta["zturbo.steps"] == "10"
    assert meta["zturbo.format_version"] == keys.FORMAT_VERSION


def test_key_names_per_style(tiny_transformer):
    loras = random_lora(tiny_transformer)
    comfy = keys.to_state_dict(loras, "comfyui")
    assert "diffusion_model.layers.0.attention.to_out.0.lora_A.weight" in comfy
    assert "diffusion_model.layers.0.attention.to_out.0.alpha" in comfy
    assert "transformer.layers.1.feed_forward.w2.lora_B.weight" in keys.to_state_dict(loras, "diffusers")
    assert "lora_unet_layers_0_attention_to_out_0.lora_up.weight" in keys.to_state_dict(loras, "musubi")
    assert keys.to_state_dict(loras, "kohya").keys() == keys.to_state_dict(loras, "musubi").keys()  # the old name


def test_adapter_format_without_alpha_reads_as_scale_one(tiny_adapter):
    loras, _ = read_lora_file(tiny_adapter)
    assert all(l.alpha is None and l.scale == 1.0 for l in loras.values())
    assert "layers.0.attention.to_q" in loras


def test_non_safetensors_and_pickle_are_refused(tmp_path):
    fake = tmp_path / "lora.safetensors"
    fake.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(LoraError, match="is not a safetensors file .*PyTorch zip/pickle.*convert it to safetensors"):
        read_lora_file(fake)
    with pytest.raises(LoraError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")


def test_foreign_keys_and_broken_pairs(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"model.diffusion.conv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraError, match="is not a LoRA weight"):
        read_lora_file(path)
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(LoraError, match="no lora_B/lora_up weight for diffusion_model.layers.0.attention.to_q"):
        read_lora_file(path)


def test_lora_of_another_model_is_refused(tiny_transformer):
    other = {"double_blocks.0.img_attn.qkv": LoraWeights(torch.zeros(2, 8), torch.zeros(8, 2))}
    with pytest.raises(LoraError, match="1 of 1 modules this model lacks .*made for another model"):
        load_lora(tiny_transformer, other)
    wrong_shape = {"layers.0.attention.to_q": LoraWeights(torch.zeros(2, 3840), torch.zeros(3840, 2))}
    with pytest.raises(LoraError, match="shape mismatches.*made for another model"):
        load_lora(tiny_transformer, wrong_shape)


def test_partial_match_is_refused_unless_allowed(tiny_transformer):
    loras = random_lora(tiny_transformer)
    loras["double_blocks.0.img_attn.qkv"] = LoraWeights(
        torch.zeros(2, 8), torch.zeros(8, 2), source="lora_unet_double_blocks_0_img_attn_qkv"
    )
    with pytest.raises(
        LoraError,
        match=r"1 of \d+ modules this model lacks \(keys it could not place: "
        r"lora_unet_double_blocks_0_img_attn_qkv\.\*\); pass --allow-partial",
    ):
        load_lora(tiny_transformer, loras)
    network = load_lora(tiny_transformer, loras, partial_ok=True)
    assert network.unmatched == ["double_blocks.0.img_attn.qkv"] and len(network.names) == len(loras) - 1


def _forward(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, 8, 8, generator=gen)]
    cap = [torch.randn(7, 32, generator=gen)]
    return transformer(x, torch.tensor([0.3]), cap, return_dict=False)[0][0]


def test_new_lora_starts_as_identity_and_detaches_cleanly(tiny_transformer):
    base = _forward(tiny_transformer)
    network = create_lora(tiny_transformer, rank=4, alpha=4, blocks=["layers"], targets=["to_q", "w1"], seed=1)
    assert torch.equal(_forward(tiny_transformer), base)
    assert len(network.names) == 4 and all(p.dtype == torch.float32 for p in network.parameters())
    with torch.no_grad():
        for layer in network.layers:
            layer.up.normal_()
    changed = _forward(tiny_transformer)
    assert not torch.allclose(changed, base)
    network.enabled = False
    assert torch.equal(_forward(tiny_transformer), base)
    network.enabled = True
    network.detach()
    assert torch.equal(_forward(tiny_transformer), base)
    assert sorted(tiny_transformer.state_dict()) == sorted(
        type(tiny_transformer)(**tiny_transformer.config).state_dict()
    )


def test_hooked_lora_equals_merged_weights(tiny_transformer):
    loras = random_lora(tiny_transformer, alpha=2.0)
    network = load_lora(tiny_transformer, loras, multiplier=0.7)
    hooked = _forward(tiny_transformer)
    network.detach()
    merge_into_weights(tiny_transformer, loras, weight=0.7)
    # fp32 everywhere: the only difference is summation order, ~1e-6 relative.
    torch.testing.assert_close(_forward(tiny_transformer), hooked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", keys.STYLES)
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_written_lora_loads_in_diffusers_with_identical_image(tmp_path, tiny_dir, style, alpha):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    loras = random_lora(pipe.transformer, alpha=alpha, blocks=("layers", "noise_refiner"), scale=0.3)
    path = write_lora_file(tmp_path / f"{style}.safetensors", loras, style)
    args = dict(prompt="a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=0.0, output_type="np")
    base = pipe(**args, generator=torch.Generator().manual_seed(3)).images[0]

    network = load_lora(pipe.transformer, read_lora_file(path)[0])
    ours = pipe(**args, generator=torch.Generator().manual_seed(3)).images[0]
    network.detach()

    pipe.load_lora_weights(str(path), adapter_name="x")
    theirs = pipe(**args, generator=torch.Generator().manual_seed(3)).images[0]
    # Same fp32 math in another order (peft adds the branch inside its layer, we add it in a hook): 1e-5.
    assert abs(ours - base).max() > 1e-3, "the LoRA must visibly change the image"
    assert abs(ours - theirs).max() < 1e-5


def test_diffusers_metadata_carries_per_module_rank_with_alpha_baked(tiny_transformer, tmp_path):
    """alpha/rank lives in the lora_B tensors, so the header says alpha = rank per module (scale 1 everywhere)."""
    loras = random_lora(tiny_transformer, alpha=2.0)
    first = sorted(loras)[0]
    loras[first] = LoraWeights(
        torch.randn(8, loras[first].down.shape[1]), torch.randn(loras[first].up.shape[0], 8), 5.0
    )
    meta = json.loads(keys.diffusers_metadata(loras)[keys.DIFFUSERS_METADATA_KEY])
    assert meta["transformer.r"] == 4 and meta["transformer.rank_pattern"] == {first: 8}
    assert meta["transformer.lora_alpha"] == 4 and meta["transformer.alpha_pattern"] == {first: 8.0}
    # A reader that ignores the header (ComfyUI) gets the same update as one that reads it.
    path = write_lora_file(tmp_path / "d.safetensors", loras, "diffusers")
    plain = keys.parse_state_dict(load_file(path))
    for name, lora in loras.items():
        torch.testing.assert_close(plain[name].delta(), lora.delta(), rtol=1e-5, atol=1e-6)  # fp32 order
