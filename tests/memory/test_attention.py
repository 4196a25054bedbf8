"""The attention backend: config names match diffusers' table; the probe keeps the fastest exact backend."""

from __future__ import annotations

import pytest
import torch

from memory.steps import CPU, CUDA
from zturbo_train.config import TrainConfig
from zturbo_train.memory.attention import ATTENTION_BACKENDS, fastest_exact, probe_attention
from zturbo_train.memory.estimate import Workload
from zturbo_train.models import load_parts


def test_attention_names_in_config_match_the_backend_table():
    choices = TrainConfig.model_fields["attention_backend"].annotation.__args__
    assert set(choices) == {"auto", *ATTENTION_BACKENDS}


def test_attention_probe_keeps_the_fastest_exact_backend():
    results = probe_attention(
        ("native", "sdpa-math", "flash-attn-3"),
        batch=2,
        seq=64,
        heads=2,
        head_dim=16,
        device=CPU,
        dtype=torch.float32,
        repeats=2,
    )
    assert results["flash-attn-3"] is None  # not installed here: dropped, not an error
    for name in ("native", "sdpa-math"):
        seconds, error = results[name]
        assert seconds > 0 and error < 1e-5
    assert fastest_exact(results) in ("native", "sdpa-math")
    assert fastest_exact({"a": (1.0, 1e-3), "b": (0.5, 0.3), "c": None}) == "a"  # b is fast but wrong
    assert fastest_exact({"b": (0.5, 0.3)}) == "native"


@pytest.mark.cuda
def test_cuda_attention_auto_picks_an_exact_backend():
    model = load_parts("builtin:tiny", parts=["transformer"], dtype="bf16", device="cuda").transformer
    from zturbo_train.memory.attention import pick_attention

    name = pick_attention(model, CUDA, torch.bfloat16, Workload(1024))
    assert name in ATTENTION_BACKENDS and name != "sage"
    model.reset_attention_backend()
