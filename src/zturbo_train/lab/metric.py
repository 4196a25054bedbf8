"""How well sampled latents decide between a concept's modes: blur, precision, coverage, off.

Measured in latent space against the exact latents of the concept's images (the VAE
encoder's mean, the same latents `zturbo train` caches), so it is cheap, exact and
independent of how well the tiny VAE decodes. Each sample is split into its part inside the
span of the lab's modes (the flat that best fits every concept's modes: the colour plane, where
a few-step sampler's average of modes it cannot yet tell apart lies, and where a sample of the
wrong concept lands) and the rest. Distances are RMS over the latent's elements, divided by
the smallest distance between two modes of the concept (in the span), so 0 is a mode and the
average of two modes scores 0.5:
- blur: the mean distance of the in-span part to the nearest mode (lower is better): the
  decision between modes, which is what few-step sampling gets wrong and distillation fixes;
- precision: the share of samples whose in-span part is within HIT of a mode;
- coverage: the share of modes that at least one such sample lands on;
- off: the mean size of the rest (the model's error on everything the modes share), reported
  apart so a general fitting error does not hide the decision or pass for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

HIT = 0.25  # a quarter of the way to the nearest other mode: unmistakably that mode


def mode_scale(modes: Tensor) -> float:
    """Smallest RMS distance between two modes of a concept (it needs two at least)."""
    if len(modes) < 2:
        raise ValueError("a concept needs at least two modes to measure a decision between them")
    flat = modes.flatten(1).double()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d[~torch.eye(len(flat), dtype=torch.bool)].min())


SPAN_TOLERANCE = 0.1  # directions whose spread is under this share of the largest are not part of the span


def span_of(points: Tensor) -> tuple[Tensor, Tensor]:
    """(centre, orthonormal directions (D, r)) of the flat that best fits `points` (M, D), leaving out directions
    along which they barely differ: the lab's modes lie on a plane up to small leftovers of the VAE fit
    (singular values 15 and 8 noise units, then under 1), and a leftover kept would count off-plane error
    as blur."""
    centre = points.mean(0)
    _, values, vt = torch.linalg.svd(points - centre, full_matrices=False)
    return centre, vt[values > SPAN_TOLERANCE * values[0]].T


def _project(flat: Tensor, span: tuple[Tensor, Tensor]) -> Tensor:
    centre, basis = span
    return centre + (flat - centre) @ basis @ basis.T


def split_by_span(latents: Tensor, modes: Tensor) -> tuple[Tensor, Tensor]:
    """(the samples' projections onto the flat of `modes`, RMS size of what is left), flattened."""
    flat = latents.flatten(1).double()
    inside = _project(flat, span_of(modes.flatten(1).double()))
    return inside, (flat - inside).norm(dim=1) / flat.shape[1] ** 0.5


def relative_distances(latents: Tensor, modes: Tensor, span: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(in-span distance to the nearest mode relative to the mode spacing, index of that mode), one per sample.

    `span`: the points whose flat the samples and the modes are projected onto (all the lab's modes);
    default `modes`.
    """
    flat = modes.flatten(1).double()
    fitted = span_of((flat if span is None else span.flatten(1)).double())
    inside, placed = _project(latents.flatten(1).double(), fitted), _project(flat, fitted)
    nearest, index = (torch.cdist(inside, placed) / flat.shape[1] ** 0.5).min(1)
    return nearest / mode_scale(placed), index  # the spacing in the plane too: a midpoint scores 0.5 exactly


def score(latents: Tensor, modes: Tensor, span: Tensor | None = None) -> dict[str, float]:
    """blur, precision, coverage and off of samples `latents` (N, 16, h, w) against `modes` (K, 16, h, w),
    in the affine span of `span` (every concept's modes, (M, 16, h, w); default: `modes` alone)."""
    scale = mode_scale(modes)  # first: it refuses a concept with one mode
    rel, index = relative_distances(latents, modes, span)
    off = split_by_span(latents, modes if span is None else span)[1] / scale
    hits = rel < HIT
    covered = len(set(index[hits].tolist()))
    return {
        "blur": float(rel.mean()),
        "precision": float(hits.float().mean()),
        "coverage": covered / len(modes),
        "off": float(off.mean()),
    }


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The average of several concepts' scores, key by key."""
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
