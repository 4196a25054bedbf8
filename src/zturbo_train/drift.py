"""`turbo_drift`: how far a LoRA has pushed Turbo off its few-step paths, read from preview sampling.

A distilled (Turbo) model walks nearly straight paths: its prediction of the clean latent
at the first sampler step is already close to the image it ends on. A LoRA that undoes
the distillation bends the paths back: early predictions become blurry averages that the
later steps have to correct, and at few steps the image stays blurry. So

    turbo_drift = mean over images and over the first half of the sampler's steps of
                  ||x0_i - x_final|| / ||x_final||

where x0_i = x_t - sigma_i * velocity is step i's prediction of the clean latent and
x_final the sample (equal to the last step's prediction, since the last Euler step ends at
sigma 0). It is scale-free (a ratio of latent norms), needs no reference images, and is
computed from the latents the preview draws anyway, with the training adapter removed:
a handful of extra tensor ops per preview, nothing in the training step.

Why a ratio to the run's own step-0 value as well: the raw value differs by prompt, size,
step count and model (the lab, TURBO.md: its distilled student 0.28, its teacher 0.45), so
only the change against the run's start is about the LoRA. `DriftMonitor` reports both and
warns when the ratio passes WARN_RATIO. The lab separated distilled from undistilled
models with it, but did not separate direct from over-the-adapter LoRAs (its adapter did
not de-distill), so the threshold is a judgement, not a measured boundary.

Each value is one preview's, never smoothed (unlike the bar's "loss (smoothed)"): the
progress line is labelled by its preview step, the end-of-run summary by DRIFT_LABEL.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Ratio to the step-0 value above which the run is warned: a judgement (no lab run passed 1.4x; TURBO.md).
WARN_RATIO = 2.0
DRIFT_LABEL = "turbo_drift (last preview)"  # the end-of-run summary's row, beside "loss (smoothed)"
ADVICE = (
    "few-step quality is likely breaking: use an earlier checkpoint, lower train.lr, or train fewer steps "
    "(over the training adapter if you are not)"
)


class DriftProbe:
    """Collects a sampler's per-step x0 predictions (pass `probe.observe` to `generate_latents`)."""

    def __init__(self) -> None:
        self.predictions: list[Tensor] = []

    def observe(self, step: int, x0: Tensor) -> None:
        self.predictions.append(x0.detach().float())

    def per_image(self) -> list[float]:
        """turbo_drift of each image of the batch (0 for a 1-step sampler: nothing to compare)."""
        if not self.predictions:
            raise ValueError("no predictions observed; pass probe.observe to generate_latents as observe=")
        final = self.predictions[-1].flatten(1)
        early = torch.stack(self.predictions[: max(1, len(self.predictions) // 2)]).flatten(2)
        norm = final.norm(dim=1).clamp_min(1e-12)
        return ((early - final).norm(dim=2) / norm).mean(0).tolist()

    def value(self) -> float:
        values = self.per_image()
        return sum(values) / len(values)


class DriftMonitor:
    """Keeps a run's step-0 drift and turns each preview's drift into metrics fields and a warning.

    `start` is saved with the training state, so a resumed run compares against its own step 0.
    """

    def __init__(self, start: float | None = None, warn_ratio: float = WARN_RATIO):
        self.start, self.warn_ratio = start, warn_ratio
        self.last: dict[str, float] | None = None  # the latest preview's fields, for the summary

    def update(self, step: int, drift: float) -> tuple[dict[str, float], str | None]:
        """(fields for the metrics row, a one-line warning or None)."""
        if self.start is None:
            self.start = drift
        ratio = drift / self.start if self.start > 0 else float("inf") if drift > 0 else 1.0
        fields = {"turbo_drift": drift, "turbo_drift_start": self.start, "turbo_drift_ratio": ratio}
        self.last = fields
        warning = None
        if step > 0 and ratio > self.warn_ratio:
            warning = (
                f"turbo_drift {drift:.3f} at step {step} is {ratio:.1f}x its step-0 value {self.start:.3f}; {ADVICE}"
            )
        return fields, warning

    def line(self, step: int, fields: dict[str, float]) -> str:
        """The progress output's line for one preview (its own value: nothing is averaged)."""
        return f"preview step {step}: turbo_drift {summary(fields)}"


def summary(fields: dict[str, float]) -> str:
    """`0.312 (1.10x step 0)`: a preview's value and its ratio to the run's start."""
    return f"{fields['turbo_drift']:.3f} ({fields['turbo_drift_ratio']:.2f}x step 0)"
