"""lab/ideal.py: the exact flow-matching field of a set of modes, sampled with the real sampler.

TURBO.md's verdict leans on it (a perfect teacher on the lab's modes is sharp from 2 steps), so the
closed form is pinned by hand and its one consequence checked: how far apart the modes are in noise
units decides whether a perfect teacher is blurry at 2 steps. Flipping `(1.0 - s)` to `s` in the
logits, or the softmax's sign, fails both tests.
"""

from __future__ import annotations

import pytest
import torch


def _two_modes(separation: float) -> torch.Tensor:
    """Two modes of the lab's latent size `separation` apart (L2, noise units), around a fixed centre."""
    from zturbo_train.lab.concepts import SIZE

    gen = torch.Generator().manual_seed(0)
    shape = (16, SIZE // 8, SIZE // 8)
    centre = torch.randn(shape, generator=gen) * 0.5
    direction = torch.randn(shape, generator=gen)
    direction /= direction.norm()
    return torch.stack([centre - direction * separation / 2, centre + direction * separation / 2])


def test_exact_field_by_hand():
    """At s = 1 the best guess of x0 is the modes' mean; near s = 0 it is the nearest mode."""
    from zturbo_train.lab.ideal import IdealField

    modes = _two_modes(4.0)
    caption = torch.ones(3, 32)
    field = IdealField([(caption, modes)])
    x = torch.randn(*modes.shape[1:2], 1, *modes.shape[2:], generator=torch.Generator().manual_seed(1))
    (out,) = field([x], torch.tensor([0.0]), [caption])[0]  # t = 1 - s = 0: pure noise
    assert torch.allclose(out, modes.mean(0)[:, None] - x, atol=1e-5)  # (x0 - x_t) / s with s = 1
    s = 0.01
    x_t = (1 - s) * modes[1][:, None] + s * x
    (out,) = field([x_t], torch.tensor([1 - s]), [caption])[0]
    assert torch.allclose(x_t + s * out, modes[1][:, None], atol=1e-4)  # x_t + s * out = x0: mode 1
    with pytest.raises(ValueError, match="not given modes"):
        field([x], torch.tensor([0.5]), [torch.zeros(3, 32)])


def test_perfect_teacher_is_blurry_at_two_steps_only_when_modes_are_close():
    """1 step lands on the modes' midpoint (blur 0.5) whatever the separation; at 2 steps modes 40 noise
    units apart are already told apart, modes 2 apart are not; 30 steps reach the modes either way."""
    from zturbo_train.lab.ideal import ideal_curve

    caption = torch.ones(3, 32)
    curves = {sep: ideal_curve({"c": caption}, {"c": _two_modes(sep)}, ["c"], (1, 2, 30), 32) for sep in (40.0, 2.0)}
    for curve in curves.values():
        assert curve["1"]["blur"] == pytest.approx(0.5, abs=1e-4)
        assert curve["30"]["precision"] == 1.0
    assert curves[40.0]["2"]["precision"] > 0.9 and curves[40.0]["2"]["blur"] < 0.1
    assert curves[2.0]["2"]["precision"] < 0.3 and curves[2.0]["2"]["blur"] > 0.3
