"""Flow matching: sampling distributions, noising, loss, and the convention against ZImagePipeline.

The convention tests run the real diffusers pipeline on builtin:tiny. Hooks on its
transformer record what the pipeline passes in, and optionally swap the output for the
exact target `x0 - noise`. So diffusers itself is the judge of the sign of the target,
the time the model is given, and the noising line.
"""

from __future__ import annotations

import copy
import math
from statistics import NormalDist

import pytest
import torch

from zturbo_train import flow
from zturbo_train.errors import ConfigError

N = 200_000  # draws per statistical check; the tolerances below are >= 4 standard errors
STEPS = 8  # Turbo's sampling steps
PROMPTS = ["a red cube", "a green sphere in the sky, a painting of a cat"]  # two caption lengths
LATENT = (2, 16, 4, 4)  # 32 x 32 pixels


def draws(method: str, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, n: int = N) -> torch.Tensor:
    return flow.sample_sigmas(n, torch.Generator().manual_seed(0), "cpu", method, mean, std, shift)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("method", flow.METHODS)
def test_sigmas_shape_dtype_range_and_seed(method):
    a = flow.sample_sigmas(7, torch.Generator().manual_seed(3), "cpu", method)
    b = flow.sample_sigmas(7, torch.Generator().manual_seed(3), torch.device("cpu"), method)
    assert a.shape == (7,) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert ((a > 0) & (a < 1)).all()


def test_sigmas_are_clamped_away_from_0_and_1():
    wide = draws("logit_normal", std=60.0, n=10_000)  # sigmoid saturates to exactly 0 and 1 in fp32
    assert wide.min() == pytest.approx(flow.SIGMA_EPS) and wide.max() == pytest.approx(1 - flow.SIGMA_EPS)
    assert ((wide > 0) & (wide < 1)).all()
    assert (draws("uniform", shift=50.0) < 1).all() and (draws("uniform", shift=0.02) > 0).all()


def test_uniform_mean_variance_and_quantiles():
    s = draws("uniform")
    assert s.mean().item() == pytest.approx(0.5, abs=3e-3)
    assert s.var().item() == pytest.approx(1 / 12, abs=1e-3)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(s, q), q, atol=5e-3, rtol=0)


def test_logit_normal_median_and_quantiles():
    mean, std = 0.5, 0.8
    s = draws("logit_normal", mean=mean, std=std)
    assert s.median().item() == pytest.approx(1 / (1 + math.exp(-mean)), abs=3e-3)
    q = [0.05, 0.25, 0.75, 0.95]
    expected = torch.sigmoid(torch.tensor([mean + std * NormalDist().inv_cdf(p) for p in q]))
    torch.testing.assert_close(torch.quantile(s, torch.tensor(q)), expected, atol=5e-3, rtol=0)


def test_shift_moves_sigmas_toward_noise():
    plain, shifted = draws("uniform"), draws("uniform", shift=3.0)
    assert shifted.mean() > plain.mean() + 0.1
    assert shifted.median().item() == pytest.approx(0.75, abs=3e-3)  # shift(0.5) = 3*0.5 / (1 + 2*0.5)
    # A static shift adds log(shift) to logit(sigma): the same draws as logit_normal(mean + log 3).
    torch.testing.assert_close(draws("logit_normal", shift=3.0), draws("logit_normal", mean=math.log(3.0)))
    assert draws("uniform", shift=0.5).mean() < plain.mean()


def test_weighted_draws_uniformly():
    assert torch.equal(draws("weighted"), draws("uniform"))


def test_weighted_weights_average_one_and_peak_mid_range():
    weights = flow.loss_weights(draws("weighted"), "weighted")
    assert weights.dtype == torch.float32 and weights.mean().item() == pytest.approx(1.0, abs=0.01)
    grid = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000  # midpoint rule
    on_grid = flow.loss_weights(grid, "weighted")
    assert on_grid.mean().item() == pytest.approx(1.0, abs=1e-6)  # the closed-form normalisation
    assert grid[on_grid.argmax()].item() == pytest.approx(0.5, abs=1e-3)  # flat top in fp32
    at = flow.loss_weights(torch.tensor([flow.SIGMA_EPS, 0.05, 0.25, 0.5, 0.75, 0.95]), "weighted")
    assert at[0] < 1e-3 and at[1] < at[2] < at[3] and at[3].item() == pytest.approx(1.579, abs=1e-3)
    torch.testing.assert_close(at[2], at[4])  # symmetric about 0.5
    torch.testing.assert_close(at[1], at[5])


@pytest.mark.parametrize("method", ["uniform", "logit_normal"])
def test_sampling_methods_have_unit_weights(method):
    s = draws(method, n=16)
    assert torch.equal(flow.loss_weights(s, method), torch.ones(16))


def test_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match="timestep_sampling.*'cosine'"):
        flow.sample_sigmas(2, None, "cpu", "cosine")


# ---------------------------------------------------------------- noising, target, loss


def test_noisy_latents_time_and_target():
    x0, noise = torch.full((2, 16, 2, 2), 2.0), torch.full((2, 16, 2, 2), -1.0)
    sigmas = torch.tensor([0.25, 0.75])
    xt = flow.noisy_latents(x0, noise, sigmas)
    assert xt.shape == x0.shape
    assert torch.equal(xt[0], torch.full((16, 2, 2), 1.25)) and torch.equal(xt[1], torch.full((16, 2, 2), -0.25))
    assert torch.equal(flow.model_time(sigmas), torch.tensor([0.75, 0.25]))
    assert torch.equal(flow.flow_target(x0, noise), torch.full((2, 16, 2, 2), 3.0))
    # bf16 latents mix in fp32 (the sigmas' dtype); the caller casts once for the model.
    assert flow.noisy_latents(x0.bfloat16(), noise.bfloat16(), sigmas).dtype == torch.float32


def test_flow_loss_golden_values():
    pred = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    # per sample: (0+1+4+9)/4 = 3.5 and (16+25+36+49)/4 = 31.5
    assert flow.flow_loss(pred, target).item() == 17.5
    assert flow.flow_loss(pred, target, torch.tensor([1.0, 0.5])).item() == 9.625  # (3.5 + 15.75) / 2
    low = flow.flow_loss(pred.bfloat16(), target.bfloat16(), torch.tensor([1.0, 0.5], dtype=torch.bfloat16))
    assert low.dtype == torch.float32 and low.item() == 9.625
    # Weights are not renormalised per batch: at batch 1 that would cancel them.
    assert flow.flow_loss(pred[:1], target[:1], torch.tensor([2.0])).item() == 7.0


def test_flow_loss_matches_torch_mse_and_has_gradient():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 16, 4, 4, generator=gen, requires_grad=True)
    target = torch.randn(3, 16, 4, 4, generator=gen)
    loss = flow.flow_loss(pred, target)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - target) / pred.numel())


def test_flow_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differs from target"):
        flow.flow_loss(torch.zeros(2, 16, 1, 4, 4), torch.zeros(2, 16, 4, 4))


def test_step_functions_trace_without_host_syncs():
    """fullgraph compile fails on any graph break, and .item() / bool(tensor) would break it."""

    def step(x0: torch.Tensor, noise: torch.Tensor, pred_scale: torch.Tensor) -> torch.Tensor:
        sigmas = flow.sample_sigmas(x0.shape[0], None, x0.device, "weighted", 0.0, 1.0, 3.0)
        xt = flow.noisy_latents(x0, noise, sigmas)
        pred = xt * pred_scale + flow.model_time(sigmas).reshape(-1, 1, 1, 1)
        return flow.flow_loss(pred, flow.flow_target(x0, noise), flow.loss_weights(sigmas, "weighted"))

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    loss = compiled(torch.randn(LATENT), torch.randn(LATENT), torch.tensor(0.5))
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.cuda
def test_no_device_syncs_on_cuda():
    gen = torch.Generator("cuda").manual_seed(0)
    x0, noise = torch.randn(LATENT, device="cuda"), torch.randn(LATENT, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in flow.METHODS:
            sigmas = flow.sample_sigmas(2, gen, "cuda", method, 0.0, 1.0, 3.0)
            xt = flow.noisy_latents(x0, noise, sigmas)
            loss = flow.flow_loss(xt, flow.flow_target(x0, noise), flow.loss_weights(sigmas, method))
            flow.model_time(sigmas)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# ---------------------------------------------------------------- the convention, judged by diffusers


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run_pipeline(pipe, latents: torch.Tensor, replace_output: torch.Tensor | None = None) -> dict:
    """One 8-step Turbo call (guidance 0). Records each transformer call, the scheduler as
    it stood before the first step, and the final latents. `replace_output` (B, 16, H, W)
    swaps the transformer's raw output."""
    record: dict = {"x": [], "t": [], "cap_feats": [], "out": []}

    def before(module, args, kwargs):
        if not record["x"]:
            record["scheduler"] = copy.deepcopy(pipe.scheduler)
        x, t, cap_feats = args[:3]
        record["x"].append(torch.stack(x).squeeze(2).clone())
        record["t"].append(t.clone())
        record["cap_feats"].append([c.clone() for c in cap_feats])
        record["kwargs"] = kwargs

    def after(module, args, kwargs, output):
        record["out"].append(torch.stack(output[0]).squeeze(2).clone())
        if replace_output is not None:
            return (list(replace_output.unsqueeze(2).unbind(0)),)
        return None

    handles = [
        pipe.transformer.register_forward_pre_hook(before, with_kwargs=True),
        pipe.transformer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        record["final"] = pipe(
            PROMPTS,
            height=32,
            width=32,
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            latents=latents.clone(),
            output_type="latent",
        ).images
    finally:
        for handle in handles:
            handle.remove()
    record["sigmas"] = pipe.scheduler.sigmas.clone()
    return record


@pytest.fixture(scope="module")
def perfect_run(pipe) -> dict:
    """The pipeline with a transformer whose raw output is exactly our target x0 - noise."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(LATENT, generator=gen), torch.randn(LATENT, generator=gen)
    record = run_pipeline(pipe, noise, replace_output=flow.flow_target(x0, noise))
    return {**record, "x0": x0, "noise": noise}


def test_pipeline_uses_turbos_shift_3_schedule(perfect_run):
    sigmas = perfect_run["sigmas"]
    expected = flow.shift_sigmas(torch.linspace(1.0, 1 / STEPS, STEPS), 3.0)  # our shift = the scheduler's
    torch.testing.assert_close(sigmas[:-1], expected)
    assert sigmas[-1] == 0 and len(perfect_run["t"]) == STEPS
    assert (sigmas[:-1] >= 0.64).sum() == 6  # the flow.py docstring's claim


def test_pipeline_gives_the_transformer_t_equal_one_minus_sigma(perfect_run):
    for i, t in enumerate(perfect_run["t"]):
        sigma = perfect_run["sigmas"][i]
        assert t.shape == (2,)
        torch.testing.assert_close(t, flow.model_time(sigma.expand(2)), atol=1e-6, rtol=0)


def test_one_euler_step_with_the_target_lands_on_the_next_noisy_latent(perfect_run):
    """ZImagePipeline's step: negate the raw output, then scheduler.step. Starting each step
    on our noising line at sigma_i, the target x0 - noise lands on it at sigma_{i+1}."""
    scheduler, sigmas = perfect_run["scheduler"], perfect_run["sigmas"]
    x0, noise = perfect_run["x0"], perfect_run["noise"]
    raw = flow.flow_target(x0, noise)
    for i, timestep in enumerate(scheduler.timesteps):
        xt = flow.noisy_latents(x0, noise, sigmas[i].expand(2))
        stepped = scheduler.step(-raw, timestep, xt, return_dict=False)[0]
        torch.testing.assert_close(stepped, flow.noisy_latents(x0, noise, sigmas[i + 1].expand(2)), atol=1e-6, rtol=0)


def test_pipeline_with_perfect_output_walks_our_noising_line(perfect_run):
    """End to end: each latent the pipeline feeds the transformer is x_t at that step's sigma,
    and 8 steps land on x0."""
    x0, noise = perfect_run["x0"], perfect_run["noise"]
    for i, x in enumerate(perfect_run["x"]):
        expected = flow.noisy_latents(x0, noise, perfect_run["sigmas"][i].expand(2))
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(perfect_run["final"], x0, atol=1e-5, rtol=0)


def test_predict_equals_the_pipelines_transformer_call(pipe):
    gen = torch.Generator().manual_seed(2)
    record = run_pipeline(pipe, torch.randn(LATENT, generator=gen))
    assert record["kwargs"].keys() <= {"return_dict", "joint_attention_kwargs"}
    assert len({c.shape[0] for c in record["cap_feats"][0]}) == 2  # unequal captions: the masked path
    for x, t, cap_feats, out in zip(record["x"][:2], record["t"], record["cap_feats"], record["out"]):
        with torch.no_grad():
            mine = flow.predict(pipe.transformer, x, t, cap_feats)
        assert mine.shape == LATENT and mine.dtype == torch.float32
        torch.testing.assert_close(mine, out, atol=0, rtol=0)


def test_predict_on_a_fresh_transformer_batch(tiny_transformer):
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(3, 16, 4, 6, generator=gen)
    cap_feats = [torch.randn(n, 32, generator=gen) for n in (5, 9, 5)]
    sigmas = flow.sample_sigmas(3, gen, "cpu")
    with torch.no_grad():
        batched = flow.predict(tiny_transformer, latents, flow.model_time(sigmas), cap_feats)
        alone = flow.predict(tiny_transformer, latents[1:2], flow.model_time(sigmas[1:2]), cap_feats[1:2])
    assert batched.shape == (3, 16, 4, 6) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-4)  # padding and masks do not leak
