"""The training step against computations by hand: loss, gradient accumulation, clipping, decay.

Each test here was checked against a mutation of the line it guards (named in its
docstring): the test fails with the mutation and passes without it.
"""

from __future__ import annotations

import math

import pytest
import torch

from zturbo_train.config import TrainConfig
from zturbo_train.lora.network import create_lora
from zturbo_train.models import load_parts, torch_dtype
from zturbo_train.train.optimizers import build_optimizer
from zturbo_train.train.step import StepSettings, TrainStep

CPU = torch.device("cpu")
SIGMAS = torch.tensor([0.02, 0.45, 0.9])  # 0.02: where a bf16 t is off most (t*1000 = 980 rounds to 984)


def inputs(dtype: torch.dtype, batch: int = 3, seed: int = 0):
    """Fixed clean latents, noise and equal-length captions (no attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(batch, 16, 4, 4, generator=gen), torch.randn(batch, 16, 4, 4, generator=gen)
    caps = [torch.randn(6, 32, generator=gen).to(dtype) for _ in range(batch)]
    return x0, noise, caps


def step_for(transformer, params=(), optimizer=None, **train) -> TrainStep:
    dtype = next(transformer.parameters()).dtype
    settings = StepSettings.from_config(TrainConfig(**train), dtype, CPU)
    return TrainStep(transformer, list(params), optimizer, settings, torch.Generator().manual_seed(0))


def bell(sigmas: torch.Tensor) -> torch.Tensor:
    """ai-toolkit's `weighted` bell written out: exp(-2 (s - 1/2)^2) - e^-1/2, normalised to mean 1 on (0, 1)."""
    floor = math.exp(-0.5)
    return (torch.exp(-2 * (sigmas - 0.5) ** 2) - floor) / (math.sqrt(math.pi / 2) * math.erf(math.sqrt(0.5)) - floor)


def pipeline_call(transformer, xt: torch.Tensor, sigmas: torch.Tensor, caps) -> torch.Tensor:
    """The transformer called as ZImagePipeline calls it: latents in the model dtype with a frame axis,
    t = 1 - sigma in fp32, unpadded captions; output back to (B, 16, H, W) fp32."""
    dtype = next(transformer.parameters()).dtype
    x = list(xt.to(dtype).unsqueeze(2).unbind(0))
    out = transformer(x, 1.0 - sigmas, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2).float()


# ------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_loss_equals_the_pipelines_convention_by_hand(dtype_name):
    """Target x0 - noise, x_t = (1 - s) x0 + s noise, fp32 t = 1 - s, bell weights: the step's loss is
    exactly the hand computation. Fails if step.py calls `flow_target(noise, x0)` (checked), or casts
    t to the model dtype (the bf16 case, checked: 0.04 % off, the output at sigma 0.02 17 % off)."""
    dtype = torch_dtype(dtype_name)
    transformer = load_parts("builtin:tiny", parts=["transformer"], dtype=dtype_name).transformer
    x0, noise, caps = inputs(dtype)
    s = SIGMAS.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        loss = step_for(transformer).loss(x0, caps, noise=noise, sigmas=SIGMAS)
        pred = pipeline_call(transformer, (1 - s) * x0 + s * noise, SIGMAS, caps)
    by_hand = (bell(SIGMAS) * ((pred - (x0 - noise)) ** 2).flatten(1).mean(1)).mean()
    assert loss.dtype == torch.float32 and loss.item() > 0.1
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)


def test_bf16_step_gives_the_transformer_the_pipelines_fp32_time(tiny_dir):
    """ZImagePipeline passes an fp32 t to a bf16 transformer; the training step must too (issue 12.1)."""
    from diffusers import ZImagePipeline

    seen: dict[str, list[torch.Tensor]] = {"pipeline": [], "step": []}

    def recorder(key):
        return lambda module, args: seen[key].append(args[1].clone())

    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    handle = pipe.transformer.register_forward_pre_hook(recorder("pipeline"))
    pipe(
        "a red cube",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=0.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    handle.remove()
    pipe.transformer.register_forward_pre_hook(recorder("step"))
    x0, noise, caps = inputs(torch.bfloat16)
    with torch.no_grad():
        step_for(pipe.transformer).loss(x0, caps, noise=noise, sigmas=SIGMAS)
    assert {t.dtype for t in seen["pipeline"]} == {torch.float32}
    (t,) = seen["step"]
    assert t.dtype == torch.float32 and torch.equal(t, 1.0 - SIGMAS)


# ------------------------------------------------------------------------------ gradients and the update


def lora_step(grad_accum: int = 1, max_grad_norm: float = 0.0, lr: float = 1.0):
    """A LoRA on the fp32 tiny model with a nonzero `up` (so every parameter gets a gradient), under plain SGD:
    the update is exactly -lr * gradient, so nothing normalises a scale error away."""
    transformer = load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer
    network = create_lora(transformer, rank=4, alpha=4, blocks=["layers"], targets=["to_q", "w2"], seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in network.layers:
            layer.up.copy_(torch.randn(layer.up.shape, generator=gen) * 0.1)
    params = network.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=lr)
    return step_for(transformer, params, optimizer, grad_accum=grad_accum, max_grad_norm=max_grad_norm), params


def grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def test_batch_two_equals_batch_one_with_grad_accum_two():
    """Raw gradients of one batch of 2 equal those of 2 accumulated micro-batches of 1, and SGD moves the
    weights the same. Fails if the loss is not divided by grad_accum (checked: twice the gradient)."""
    x0, noise, caps = inputs(torch.float32, batch=2)
    sigmas = SIGMAS[1:]
    whole, params = lora_step(grad_accum=1, lr=0.1)
    whole.backward(x0, caps, noise=noise, sigmas=sigmas)
    expected = grads(params)
    accumulated, params = lora_step(grad_accum=2, lr=0.1)
    for i in range(2):
        accumulated.backward(x0[i : i + 1], caps[i : i + 1], noise=noise[i : i + 1], sigmas=sigmas[i : i + 1])
    assert all(g.abs().max() > 0 for g in expected)
    for got, want in zip(grads(params), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    before = [p.detach().clone() for p in params]
    accumulated.update(0.1)
    for p, old, g in zip(params, before, expected):
        torch.testing.assert_close(p.detach(), old - 0.1 * g, rtol=1e-4, atol=1e-7)


def total_norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).item()


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3, 1e3])
def test_max_grad_norm_clips_the_update_to_that_norm(max_grad_norm):
    """With SGD at lr 1 the update is the (clipped) gradient: its norm is exactly max_grad_norm when the
    gradient is larger, and the gradient itself when smaller or when clipping is off. The step reports
    the norm before clipping."""
    step, params = lora_step(max_grad_norm=max_grad_norm)
    x0, noise, caps = inputs(torch.float32, batch=2)
    step.backward(x0, caps, noise=noise, sigmas=SIGMAS[1:])
    gradient = grads(params)
    raw = total_norm(gradient)
    assert 1e-3 < raw < 1e3, raw  # the two settings straddle the gradient norm
    before = [p.detach().clone() for p in params]
    reported = step.update(1.0)
    assert reported.item() == pytest.approx(raw, rel=1e-5)
    applied = [old - p.detach() for p, old in zip(params, before)]
    if 0 < max_grad_norm < raw:
        assert total_norm(applied) == pytest.approx(max_grad_norm, rel=1e-4)
        for a, g in zip(applied, gradient):  # same direction, scaled down
            torch.testing.assert_close(a, g * (max_grad_norm / raw), rtol=1e-4, atol=2e-8)  # fp32 ulp of w ~ 0.1
    else:
        for a, g in zip(applied, gradient):
            torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_shrinks_the_weights_by_lr_times_decay(weight_decay):
    """AdamW from the config on a zero gradient: Adam's own update is 0, so the only change is the
    decoupled decay, w <- w * (1 - lr * wd); with wd = 0 nothing moves."""
    transformer = load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer
    network = create_lora(transformer, rank=4, alpha=4, blocks=["layers"], targets=["to_q"], seed=1)
    params = network.trainable_parameters()
    lr = 0.1
    optimizer = build_optimizer(params, TrainConfig(lr=lr, weight_decay=weight_decay), CPU)
    step = step_for(transformer, params, optimizer, weight_decay=weight_decay)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    step.update(lr)
    for p, old in zip(params, before):
        torch.testing.assert_close(p.detach(), old * (1 - lr * weight_decay), rtol=1e-6, atol=0)
    assert any(old.abs().max() > 0 for old in before)
