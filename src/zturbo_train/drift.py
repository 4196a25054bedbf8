"""`turbo_drift`: how far a LoRA has pushed Turbo off its few-step paths, read from preview sampling.

A distilled (Turbo) model walks nearly straight paths: its prediction of the clean latent
at the first sampler step is already close to the image it ends on. A LoRA that undoes
the distillation bends the paths back: the first prediction becomes a blurry average that
the later steps have to correct, and at few steps the image stays blurry. So

    turbo_drift = mean over images of ||x0_first - x_final|| / ||x_final||

where x0_first = x_t - sigma * velocity at the sampler's first step (what a 1-step sampler
would return) and x_final the sample (the preview's last step). It is scale-free (a ratio
of latent norms), needs no reference images, and is computed from the latents the preview
draws anyway, with the training adapter removed: a few tensor ops per preview, nothing in
the training step. Why the first step alone, not an average over the first half of the
steps (this module's first version): on the Turbo lab (TURBO.md) both separate the
distilled student from its teacher, but the first step separates LoRAs trained directly on
the student from LoRAs trained over the adapter more clearly (later steps sit close to the
final image for every model and dilute the difference).

Why a ratio to the run's own step-0 value as well: the raw value differs by prompt, size,
step count and model, so only the change against the run's start is about the LoRA.
`DriftMonitor` reports both and warns when the ratio passes WARN_RATIO, a judgement
informed by the lab (TURBO.md, "Reading turbo_drift"), not a boundary measured on the 6 B model.

Each value is one preview's, never smoothed (unlike the bar's "loss (smoothed)"): the
progress line is labelled by its preview step, the end-of-run summary by DRIFT_LABEL.
"""

from __future__ import annotations

from torch import Tensor

# Ratio to the step-0 value above which the run is warned. From the lab (TURBO.md): every LoRA trained directly
# on its Turbo student passed it (1.34-1.53x after 240 steps, ~2x after 720); over the adapter, none in 240 steps
# (<= 1.24x) and one preview in 720 (1.37x).
WARN_RATIO = 1.3
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
        first = self.predictions[0].flatten(1)
        return ((first - final).norm(dim=1) / final.norm(dim=1).clamp_min(1e-12)).tolist()

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
