"""The training adapter: loading, checked states, and how exactly each mode undoes itself.

Errors are measured as the relative L2 distance of the tiny transformer's output. Two
yardsticks, computed in the tests rather than assumed: the adapter's own effect (~5 %,
what a broken inversion would leave behind) and the bf16 noise, the distance between a
bf16 and an fp32 forward of the same base model (~0.7 %).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from zturbo_train.config import ModelConfig
from zturbo_train.errors import AdapterError, DownloadError
from zturbo_train.lora.adapter import AdapterState, TrainingAdapter, is_hub_ref, resolve_adapter
from zturbo_train.lora.formats import read_lora_file
from zturbo_train.lora.network import create_lora, load_lora
from zturbo_train.models import load_parts
from zturbo_train.testing.tiny import TINY_VERSION

TINY_ADAPTER = "builtin:tiny-adapter"
# fp32: merging then removing only reorders fp32 sums (measured ~2e-7); 1e-5 leaves 50x
# room and is still 5000x below the adapter's effect.
FP32_TOL = 1e-5
# bf16: one rounding of the merged weights (<= 2^-9 each) moves the output ~0.5 %, below
# the bf16-vs-fp32 gap of the base itself; allow 1.5x that gap, and never a fifth of the
# adapter's effect, so a half-done or doubled inversion cannot pass.
BF16_NOISE_FACTOR = 1.5
EFFECT_FRACTION = 0.2


def forward(transformer: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """One denoising call on a fixed 16x16 latent and caption, output in fp32."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(transformer.parameters()).dtype
    x = [torch.randn(16, 1, 16, 16, generator=gen).to(dtype)]
    cap = [torch.randn(7, 32, generator=gen).to(dtype)]
    with torch.no_grad():
        return transformer(x, torch.tensor([0.3]), cap, return_dict=False)[0][0].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load_transformer(dtype: str) -> torch.nn.Module:
    return load_parts("builtin:tiny", parts=["transformer"], dtype=dtype).transformer


def has_hooks(transformer: torch.nn.Module) -> bool:
    return any(m._forward_hooks for m in transformer.modules())


@pytest.fixture(scope="module")
def yardsticks(tiny_adapter) -> dict[str, float]:
    """The adapter's effect (fp32) and the bf16 noise of the base, on the tiny model."""
    fp32 = load_transformer("fp32")
    base = forward(fp32)
    adapter = TrainingAdapter.load(TINY_ADAPTER, fp32, mode="live")
    adapter.apply()
    effect = rel(forward(fp32), base)
    return {"effect": effect, "bf16_noise": rel(forward(load_transformer("bf16")), base)}


def bf16_tolerance(yardsticks: dict[str, float]) -> float:
    return min(BF16_NOISE_FACTOR * yardsticks["bf16_noise"], EFFECT_FRACTION * yardsticks["effect"])


def trained_lora(transformer: torch.nn.Module):
    """A LoRA as if trained: create_lora's zero `up` replaced by seeded random values."""
    network = create_lora(transformer, rank=4, alpha=4, blocks=["layers"], targets=["to_q", "w2"], seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in network.layers:
            layer.up.copy_(torch.randn(layer.up.shape, generator=gen) * 0.05)
    return network


# ------------------------------------------------------------------------------ loading


def test_adapter_loads_with_rank_from_lora_a_and_changes_the_output(tiny_transformer, yardsticks):
    adapter = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer)
    summary = adapter.summary()
    assert summary["ranks"] == [4] and summary["alphas"] == [4.0]  # no alpha key: alpha = rank
    assert summary["modules"] == len(read_lora_file(resolve_adapter(TINY_ADAPTER))[0]) == 21
    assert all(l.scale == 1.0 for l in adapter.loras.values())
    assert adapter.state is AdapterState.OFF and summary["state"] == "off"
    assert yardsticks["effect"] > 0.02, "the tiny adapter must visibly change the output"
    assert 0.001 < yardsticks["bf16_noise"] < 0.02


def test_from_config_reads_mode_and_weight(tiny_transformer):
    cfg = ModelConfig(path="builtin:tiny", adapter=TINY_ADAPTER, adapter_mode="live", adapter_weight=0.5)
    adapter = TrainingAdapter.from_config(cfg, tiny_transformer)
    assert (adapter.mode, adapter.weight, adapter.state) == ("live", 0.5, AdapterState.OFF)
    assert adapter.summary()["ref"] == TINY_ADAPTER
    assert adapter.summary()["file"].endswith(f"tiny-adapter-v{TINY_VERSION}.safetensors")


def test_none_adapter_tracks_state_and_changes_nothing(tiny_transformer):
    base = forward(tiny_transformer)
    adapter = TrainingAdapter.load("none", tiny_transformer)
    assert adapter.is_none and adapter.summary()["modules"] == 0
    adapter.apply()
    adapter.invert()
    assert torch.equal(forward(tiny_transformer), base)
    with pytest.raises(AdapterError, match="cannot invert"):
        adapter.invert()
    adapter.restore()
    assert torch.equal(forward(tiny_transformer), base) and not has_hooks(tiny_transformer)


def test_hub_references_go_through_the_download_cache(monkeypatch, tiny_adapter):
    asked = []

    def fake_resolve(ref: str):
        asked.append(ref)
        if ref == "v1":
            raise DownloadError("adapter v1 is not downloaded yet; run `zturbo download --adapter v1`")
        return tiny_adapter

    try:
        import zturbo_train.hub.download as download

        monkeypatch.setattr(download, "resolve_adapter_file", fake_resolve)
    except ImportError:  # the download module is being written; the contract is its function
        monkeypatch.setitem(
            sys.modules, "zturbo_train.hub.download", types.SimpleNamespace(resolve_adapter_file=fake_resolve)
        )
    assert resolve_adapter("v2") == tiny_adapter
    assert resolve_adapter("ostris/zimage_turbo_training_adapter/x.safetensors") == tiny_adapter
    with pytest.raises(DownloadError, match=r"zturbo download --adapter v1"):
        resolve_adapter("v1")
    assert asked == ["v2", "ostris/zimage_turbo_training_adapter/x.safetensors", "v1"]
    assert is_hub_ref("owner/repo/file.safetensors") and not is_hub_ref("./a/b.safetensors")


# ------------------------------------------------------------------------------ refusing


def write_adapter(path, shapes: dict[str, tuple[int, int]], rank: int = 4):
    save_file(
        {
            t: torch.zeros(*(rank, in_f) if t.endswith("lora_A.weight") else (out_f, rank))
            for m, (out_f, in_f) in shapes.items()
            for t in (f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight")
        },
        str(path),
    )
    return path


def test_adapter_of_another_shape_is_refused(tmp_path, tiny_transformer):
    path = write_adapter(
        tmp_path / "big.safetensors", {"layers.0.attention.to_q": (3840, 3840), "layers.0.attention.to_k": (64, 64)}
    )
    with pytest.raises(
        AdapterError,
        match=r"training adapter .*big.safetensors does not fit this model "
        r"\(1 shape mismatches, e.g. layers.0.attention.to_q: LoRA \(3840, 3840\) "
        r"vs model \(64, 64\)\); it was made for another model; set \[model\] adapter",
    ):
        TrainingAdapter.load(str(path), tiny_transformer)


def test_adapter_with_foreign_keys_is_refused_not_skipped(tmp_path, tiny_transformer):
    path = write_adapter(
        tmp_path / "flux.safetensors",
        {
            "layers.0.attention.to_q": (64, 64),
            "double_blocks.0.img_attn.qkv": (64, 64),
            "double_blocks.1.img_attn.qkv": (64, 64),
        },
    )
    with pytest.raises(
        AdapterError,
        match=r"has 2 of 3 modules this model lacks \(keys it could not place: "
        r"diffusion_model.double_blocks.0.img_attn.qkv.\*, "
        r"diffusion_model.double_blocks.1.img_attn.qkv.\*\); "
        r"it was made for another model",
    ):
        TrainingAdapter.load(str(path), tiny_transformer)
    save_file({"model.diffusion.conv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(AdapterError, match="training adapter: key 'model.diffusion.conv.weight' is not a LoRA"):
        TrainingAdapter.load(str(path), tiny_transformer)


def test_non_safetensors_missing_and_unknown_adapters_are_refused(tmp_path, tiny_transformer):
    pickle = tmp_path / "adapter.pt"
    pickle.write_bytes(b"PK\x03\x04 a torch zip")
    with pytest.raises(
        AdapterError,
        match=r"adapter.pt is not a safetensors file \(it looks like a PyTorch "
        r"zip/pickle checkpoint\).*convert it to safetensors",
    ):
        TrainingAdapter.load(str(pickle), tiny_transformer)
    with pytest.raises(
        AdapterError,
        match=r"adapter file .*missing.safetensors does not exist; check the path or "
        r"set \[model\] adapter to v2",
    ):
        TrainingAdapter.load(str(tmp_path / "missing.safetensors"), tiny_transformer)
    with pytest.raises(AdapterError, match="is a folder"):
        TrainingAdapter.load(str(tmp_path), tiny_transformer)
    with pytest.raises(AdapterError, match="unknown builtin adapter 'builtin:huge'"):
        TrainingAdapter.load("builtin:huge", tiny_transformer)
    with pytest.raises(AdapterError, match="adapter weight nan is not a finite number"):
        TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, weight=float("nan"))


def test_merge_refuses_a_quantized_base_and_points_at_live(tiny_transformer):
    linear = tiny_transformer.layers[0].attention.to_q
    linear.weight = torch.nn.Parameter(torch.zeros(linear.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(
        AdapterError,
        match=r"layers.0.attention.to_q holds Tensor weights of dtype torch.int8 "
        r"\(a quantized base\?\).*adapter_mode = \"live\"",
    ):
        TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="merge")
    TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="live").apply()  # live never writes the weights


# ------------------------------------------------------------------------------ states


def test_states_are_checked(tiny_transformer):
    adapter = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="merge")
    with pytest.raises(AdapterError, match=r"cannot invert .* while it is 'off'.*call apply\(\) first"):
        adapter.invert()
    adapter.merge()
    with pytest.raises(AdapterError, match=r"cannot apply .* while it is 'training'.*deactivate\(\) first"):
        adapter.apply()
    with pytest.raises(AdapterError, match=r"cannot restore .* while it is 'training'.*only follows invert"):
        adapter.restore()
    adapter.invert()
    with pytest.raises(AdapterError, match=r"cannot invert .* while it is 'inverted'.*restore\(\) before inverting"):
        adapter.invert()
    adapter.restore()
    with pytest.raises(RuntimeError, match="sampler broke"):
        with adapter.inverted():
            assert adapter.state is AdapterState.INVERTED
            raise RuntimeError("sampler broke")
    assert adapter.state is AdapterState.TRAINING
    adapter.deactivate()
    adapter.deactivate()  # a no-op when off, so cleanup code may call it
    assert adapter.state is AdapterState.OFF and not has_hooks(tiny_transformer)
    live = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="live")
    with pytest.raises(AdapterError, match=r"merge\(\) needs adapter_mode \"merge\".*call apply\(\)"):
        live.merge()


def test_inverting_twice_does_not_subtract_twice(tiny_transformer):
    base = forward(tiny_transformer)
    adapter = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="merge", inversion="subtract")
    adapter.apply()
    adapter.invert()
    inverted = forward(tiny_transformer)
    with pytest.raises(AdapterError):
        adapter.invert()
    assert torch.equal(forward(tiny_transformer), inverted)
    assert rel(inverted, base) < FP32_TOL


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_live_mode_switches_exactly(dtype):
    transformer = load_transformer(dtype)
    base = forward(transformer)
    adapter = TrainingAdapter.load(TINY_ADAPTER, transformer, mode="live")
    adapter.apply()
    training = forward(transformer)
    assert not torch.equal(training, base)
    adapter.invert()
    assert torch.equal(forward(transformer), base)
    adapter.restore()
    assert torch.equal(forward(transformer), training)
    adapter.deactivate()
    assert torch.equal(forward(transformer), base) and not has_hooks(transformer)


@pytest.mark.parametrize("inversion", ["branch", "subtract"])
def test_merge_then_invert_gives_the_base_in_fp32(tiny_transformer, yardsticks, inversion):
    base = forward(tiny_transformer)
    adapter = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="merge", inversion=inversion)
    adapter.merge(1.0)
    training = forward(tiny_transformer)
    assert rel(training, base) > 0.5 * yardsticks["effect"]
    adapter.invert()
    assert rel(forward(tiny_transformer), base) < FP32_TOL
    adapter.restore()
    assert rel(forward(tiny_transformer), training) < FP32_TOL
    adapter.deactivate()
    assert rel(forward(tiny_transformer), base) < FP32_TOL and not has_hooks(tiny_transformer)


@pytest.mark.parametrize("inversion", ["branch", "subtract"])
def test_merge_then_invert_gives_the_base_in_bf16(yardsticks, inversion):
    transformer = load_transformer("bf16")
    base = forward(transformer)
    adapter = TrainingAdapter.load(TINY_ADAPTER, transformer, mode="merge", inversion=inversion)
    adapter.apply()
    training = forward(transformer)
    merged = {k: v.clone() for k, v in transformer.state_dict().items()}
    adapter.invert()
    error = rel(forward(transformer), base)
    assert error < bf16_tolerance(yardsticks), (error, yardsticks)
    assert error < 0.01  # the ~0.5 % the module docstring states
    adapter.restore()
    if inversion == "branch":  # the weights were never written: bit-exact
        assert torch.equal(forward(transformer), training)
    for _ in range(10):  # subtract re-rounds on every switch; it must not drift
        adapter.invert()
        adapter.restore()
    assert_within_one_bf16_step(transformer.state_dict(), merged, max_fraction=1e-3)
    adapter.deactivate()
    assert rel(forward(transformer), base) < bf16_tolerance(yardsticks)


def assert_within_one_bf16_step(now: dict, before: dict, max_fraction: float) -> None:
    """No weight moved by more than one bf16 step (2^-7 of its magnitude), and few moved at all."""
    moved = total = 0
    for key, old in before.items():
        diff = (now[key].float() - old.float()).abs()
        assert bool((diff <= old.float().abs() * 2**-7 + 1e-30).all()), key
        moved += int((diff > 0).sum())
        total += old.numel()
    assert moved <= max_fraction * total, f"{moved} of {total} weights moved"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_and_live_train_on_the_same_model(yardsticks, dtype):
    merged, live = load_transformer(dtype), load_transformer(dtype)
    TrainingAdapter.load(TINY_ADAPTER, merged, mode="merge", weight=0.7).apply()
    TrainingAdapter.load(TINY_ADAPTER, live, mode="live", weight=0.7).apply()
    error = rel(forward(merged), forward(live))
    # fp32: summation order only. bf16: merge trains on round_bf16(W0 + dA), live on W0 + dA
    # exactly; the gap (~0.5 %, documented in adapter.py) must stay inside bf16 noise.
    assert error < (FP32_TOL if dtype == "fp32" else bf16_tolerance(yardsticks)), error


@pytest.mark.parametrize("mode,inversion", [("live", "branch"), ("merge", "branch"), ("merge", "subtract")])
def test_inverted_with_trained_lora_equals_base_plus_lora(tiny_transformer, mode, inversion):
    network = trained_lora(tiny_transformer)
    base_plus_lora = forward(tiny_transformer)
    network.enabled = False
    assert rel(forward(tiny_transformer), base_plus_lora) > 1e-3, "the trained LoRA must change the output"
    network.enabled = True
    adapter = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode=mode, inversion=inversion)
    adapter.apply()
    assert rel(forward(tiny_transformer), base_plus_lora) > 1e-2
    with adapter.inverted():
        inverted = forward(tiny_transformer)
    if mode == "live":  # the adapter's hook adds nothing when off, the LoRA's hook the same as before
        assert torch.equal(inverted, base_plus_lora)
    else:
        assert rel(inverted, base_plus_lora) < FP32_TOL
    # the same LoRA loaded fresh onto a base without any adapter agrees
    clean = load_transformer("fp32")
    load_lora(clean, network.to_lora_dict())
    assert rel(forward(clean), inverted) < FP32_TOL


@pytest.mark.parametrize("mode", ["merge", "live"])
def test_adapter_weight_scales_the_effect(tiny_transformer, mode):
    base = forward(tiny_transformer)
    zero = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode=mode, weight=0.0)
    zero.apply()
    assert torch.equal(forward(tiny_transformer), base)  # x + 0 is exact in fp32, the hook skips at 0
    zero.deactivate()
    name = "layers.1.feed_forward.w2"
    linear = dict(tiny_transformer.named_modules())[name]
    w0 = linear.weight.detach().clone()
    half = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="merge", weight=0.5)
    half.apply()
    torch.testing.assert_close(linear.weight - w0, 0.5 * half.loras[name].delta(), rtol=0, atol=1e-6)
    half_effect = rel(forward(tiny_transformer), base)
    half.deactivate()
    full = TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode=mode, weight=1.0)
    full.apply()
    full_effect = rel(forward(tiny_transformer), base)
    assert 0.35 < half_effect / full_effect < 0.65  # close to linear for a small adapter


def test_live_adapter_at_a_fractional_weight_equals_w0_plus_w_times_delta(tiny_transformer, yardsticks):
    """Live mode at weight 0.3 against a copy of the base with W0 + 0.3 * up @ down folded in by hand.
    Fails if the hook ignores its multiplier (checked: the full adapter's effect)."""
    weight = 0.3
    base = forward(tiny_transformer)
    by_hand = load_transformer("fp32")
    modules = dict(by_hand.named_modules())
    loras = read_lora_file(resolve_adapter(TINY_ADAPTER))[0]
    with torch.no_grad():
        for name, lora in loras.items():  # no alpha key: scale 1
            modules[name].weight += weight * (lora.up.float() @ lora.down.float())
    TrainingAdapter.load(TINY_ADAPTER, tiny_transformer, mode="live", weight=weight).apply()
    live = forward(tiny_transformer)
    assert rel(live, forward(by_hand)) < FP32_TOL
    assert 0.15 * yardsticks["effect"] < rel(live, base) < 0.45 * yardsticks["effect"]


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_inversion_over_a_baked_quantized_base_gives_the_base(kind):
    """Merge, quantize (bitsandbytes nf4 runs on CPU; fp8 storage) and bake, as apply_levers does, then
    invert for a preview: the output is the plain bf16 base up to the quantization noise the base itself
    gets from the same quantization (measured: nf4 1.19x, fp8 1.05x), far from the adapter's effect.
    A stronger adapter than builtin:tiny-adapter (effect ~20 %, above nf4's ~7 % noise) so a missing or
    partial inversion cannot hide in the noise (checked: with no -w branch the test fails)."""
    from zturbo_train.lora.formats import parse_state_dict
    from zturbo_train.memory.quantize import apply_quantization
    from zturbo_train.testing.tiny import build_tiny_adapter

    cpu = torch.device("cpu")
    plain = forward(load_transformer("bf16"))
    quantized_base = load_transformer("bf16")
    apply_quantization(quantized_base, kind, cpu, torch.bfloat16)
    noise = rel(forward(quantized_base), plain)
    transformer = load_transformer("bf16")
    adapter = TrainingAdapter(transformer, parse_state_dict(build_tiny_adapter(seed=5, scale=0.1)), mode="merge")
    adapter.apply()
    assert apply_quantization(transformer, kind, cpu, torch.bfloat16) > 0
    adapter.bake()
    training = forward(transformer)
    effect = rel(training, plain)
    with adapter.inverted():
        inverted = forward(transformer)
    error = rel(inverted, plain)
    assert effect > 2.5 * noise, (effect, noise)
    assert error < 1.5 * noise and error < 0.5 * effect, (error, noise, effect)
    assert torch.equal(forward(transformer), training)  # restored exactly: the weights were never written
    adapter.deactivate()  # baked: the adapter stays in the stored weights, only the hooks go
    assert torch.equal(forward(transformer), training) and not has_hooks(transformer)
