"""LoKr and LoHa training layers (lora/factored.py) against the `lycoris-lora` library.

The library is the judge: for the same settings its own modules (`LokrModule`, `LohaModule`) must
make tensors of the shapes ours make, its scale and zero start must be ours, and its functional
API, fed the tensors a trained network saves, must give the delta our hook adds (measured by
running the hooked linear with and without the branch). Mutations checked (each flipped once,
the tests below failed, restored): the kron order in LokrLayer.forward (w1 and w2 swapped: the
hook delta test fails), `lokr_scale` returning 1 always (alpha/rank dropped: the delta and scale
tests fail), the row-wise Kronecker in LohaLayer (`up` built as w2_a x w1_a: fails only with
different pairs, which the seeded test has), and factorization's `candidate > bound` test (the
shapes test fails for factor 4 and 8).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zturbo_train.lora.deltas import DeltaWeights
from zturbo_train.lora.factored import factorization, lokr_shapes, new_loha, new_lokr
from zturbo_train.lora.formats import parse_state_dict, to_state_dict
from zturbo_train.lora.network import LoraNetwork

SIZES = [(64, 64), (170, 64), (64, 170), (3840, 3840), (10240, 3840), (256, 64)]
LOKR_CASES = [  # rank, factor, full_matrix, decompose_both
    (4, -1, False, False),
    (8, -1, False, False),
    (2, 4, False, False),
    (2, 8, False, True),
    (4, -1, True, False),
    (16, 16, False, True),
]


@pytest.mark.parametrize("dimension", [64, 170, 256, 360, 3840, 10240, 127])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16, 60])
def test_factorization_is_lycoris(dimension, factor):
    from lycoris.functional.general import factorization as theirs

    assert factorization(dimension, factor) == theirs(dimension, factor)


@pytest.mark.parametrize("rank,factor,full_matrix,decompose_both", LOKR_CASES)
@pytest.mark.parametrize("size", SIZES)
def test_lokr_shapes_and_scale_are_lycoris(size, rank, factor, full_matrix, decompose_both):
    """LyCORIS' LokrModule on a meta-device linear of the tiny and real shapes: same tensors, same scale."""
    from lycoris.modules.lokr import LokrModule

    linear = nn.Linear(size[1], size[0], bias=False, device="meta")  # the base weight is never read
    module = LokrModule(
        "m", linear, lora_dim=rank, alpha=3.0, factor=factor, full_matrix=full_matrix, decompose_both=decompose_both
    )
    theirs = {k: tuple(p.shape) for k, p in module.named_parameters() if k.startswith("lokr_")}
    assert lokr_shapes(*size, rank, factor, full_matrix, decompose_both) == theirs
    layer = new_lokr(*size, rank, 3.0, torch.Generator().manual_seed(0), factor, full_matrix, decompose_both)
    assert layer.scale == pytest.approx(module.scale) and float(layer.alpha) == float(module.alpha)


@pytest.mark.parametrize("rank,factor,full_matrix,decompose_both", LOKR_CASES[:5])
def test_lokr_starts_at_zero_and_its_hook_adds_the_library_delta(rank, factor, full_matrix, decompose_both):
    """Zero at step 0 (LyCORIS' init); then, with every factor set, the hooked linear minus the plain one equals
    x @ lycoris.functional.lokr.diff_weight(saved tensors, gamma=alpha)^T."""
    from lycoris.functional import lokr

    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 170)
    layer = new_lokr(170, 64, rank, 3.0, gen, factor, full_matrix, decompose_both)
    network = LoraNetwork({"lin": layer}, {"lin": layer.alpha}).attach(nn.ModuleDict({"lin": linear}))
    x = torch.randn(3, 5, 64, generator=gen)
    assert torch.equal(linear(x), _plain(linear, x))
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    saved = _saved(network)["lin"]
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    delta = lokr.diff_weight(*[saved.tensors.get(k) for k in names], gamma=saved.alpha, backend="torch")
    torch.testing.assert_close(linear(x) - _plain(linear, x), x @ delta.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved.delta(), delta, rtol=1e-5, atol=1e-5)  # and the reader agrees


def test_loha_starts_at_zero_and_its_hook_adds_the_library_delta():
    from lycoris.functional import loha
    from lycoris.modules.loha import LohaModule

    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 170)
    layer = new_loha(170, 64, 4, 3.0, gen)
    theirs = LohaModule("m", nn.Linear(64, 170), lora_dim=4, alpha=3.0)
    assert {k: p.shape for k, p in layer.named_parameters()} == {
        k: p.shape for k, p in theirs.named_parameters() if k.startswith("hada_")
    }
    assert layer.scale == pytest.approx(theirs.scale) and not layer.hada_w2_a.any() and layer.hada_w1_a.any()
    network = LoraNetwork({"lin": layer}, {"lin": layer.alpha}).attach(nn.ModuleDict({"lin": linear}))
    x = torch.randn(3, 5, 64, generator=gen)
    assert torch.equal(linear(x), _plain(linear, x))
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    t = _saved(network)["lin"].tensors
    gamma = torch.tensor(3.0 / 4)  # LyCORIS' HadaWeight saves the scale for backward: it must be a tensor
    delta = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None, gamma=gamma)
    torch.testing.assert_close(linear(x) - _plain(linear, x), x @ delta.T, rtol=1e-4, atol=1e-4)


def test_saved_keys_are_lycoris_keys_comfyui_reads():
    """What a trained network writes: LyCORIS' key names after ComfyUI's `diffusion_model.` + diffusers module name,
    alpha as LyCORIS stores it (= rank when both LoKr sides are whole), read back unchanged; diffusers-style
    and musubi files cannot hold them (one line naming the style that can)."""
    gen = torch.Generator().manual_seed(3)
    layers = {
        "layers.0.attention.to_q": new_lokr(64, 64, 2, 1.0, gen, factor=4),
        "layers.0.feed_forward.w1": new_lokr(170, 64, 9, 1.0, gen),  # both sides whole at rank 9
        "layers.0.feed_forward.w2": new_loha(64, 170, 4, 2.0, gen),
    }
    network = LoraNetwork(layers, {k: v.alpha for k, v in layers.items()})
    state = to_state_dict(network.to_lora_dict(), "comfyui")
    assert sorted(k for k in state if "to_q" in k) == [
        f"diffusion_model.layers.0.attention.to_q.{k}" for k in ("alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b")
    ]
    assert float(state["diffusion_model.layers.0.feed_forward.w1.alpha"]) == 9.0
    assert {k.rsplit(".", 1)[1] for k in state if ".w2." in k} == {
        "alpha",
        *(f"hada_w{i}_{s}" for i in (1, 2) for s in "ab"),
    }
    back = parse_state_dict(state)
    for name, update in network.to_lora_dict().items():
        assert isinstance(back[name], DeltaWeights) and torch.equal(back[name].delta(), update.delta())
    for style in ("diffusers", "musubi"):
        with pytest.raises(Exception, match=f"the {style} style holds plain LoRA pairs only.*write --format comfyui"):
            to_state_dict(network.to_lora_dict(), style)


@pytest.mark.parametrize("kind", ["lokr", "loha", "lokr-factored"])
def test_estimate_counts_what_autograd_keeps(kind):
    """memory/estimate.py's per-layer figures against the tensors autograd saves for the branch's backward
    (saved_tensors_hooks; the input, shared with the base linear, and the parameters excluded)."""
    from zturbo_train.memory.estimate import Workload, _branch

    rank = 2 if kind == "lokr-factored" else 4
    network = kind.split("-")[0]
    gen = torch.Generator().manual_seed(4)
    layer = new_lokr(384, 384, rank, 1.0, gen) if network == "lokr" else new_loha(384, 384, rank, 1.0, gen)
    x = torch.randn(2, 100, 384, requires_grad=True)
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    params, per_token, per_layer = _branch(Workload(512, rank=rank, network=network, dtype_bytes=4), 384, 384)
    assert params == sum(p.numel() for p in layer.parameters())
    assert sum(kept) == (200 * per_token + per_layer) * 4


def _plain(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, linear.weight, linear.bias)


def _saved(network: LoraNetwork) -> dict[str, DeltaWeights]:
    """The network as a file holds it: written and parsed back."""
    return parse_state_dict(to_state_dict(network.to_lora_dict(), "comfyui"))
