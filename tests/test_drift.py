"""turbo_drift (drift.py): the formula by hand, the monitor's ratio and warning, the metrics notes,
and the sampler's observer (off: nothing changes; on: each step's x0 prediction)."""

from __future__ import annotations

import json

import pytest
import torch

from zturbo_train.drift import DriftMonitor, DriftProbe


def test_drift_of_a_straight_path_is_zero_and_of_a_bent_one_is_hand_computed():
    """x0 predictions equal to the final sample give 0; a hand-made bent path gives the formula's value.

    Mutation checked: averaging over all steps instead of the first half makes the second assert fail.
    """
    final = torch.ones(1, 16, 2, 2)
    straight = DriftProbe()
    for i in range(4):
        straight.observe(i, final.clone())
    assert straight.value() == pytest.approx(0.0)
    bent = DriftProbe()
    for i, x0 in enumerate([final * 0.0, final * 0.5, final, final]):  # first half: distances 1.0 and 0.5 (relative)
        bent.observe(i, x0)
    assert bent.value() == pytest.approx(0.75)


def test_drift_per_image_is_relative_to_each_images_norm():
    probe = DriftProbe()
    final = torch.stack([torch.full((16, 2, 2), 1.0), torch.full((16, 2, 2), 10.0)])
    probe.observe(0, final + 1.0)
    probe.observe(1, final)
    assert probe.per_image() == pytest.approx([1.0, 0.1])


def test_monitor_ratio_and_warning():
    monitor = DriftMonitor()
    fields, warning = monitor.update(0, 0.1)
    assert fields["turbo_drift_ratio"] == 1.0 and warning is None
    fields, warning = monitor.update(50, 0.15)
    assert fields["turbo_drift_ratio"] == pytest.approx(1.5) and warning is None
    fields, warning = monitor.update(100, 0.3)
    assert fields["turbo_drift_ratio"] == pytest.approx(3.0)
    assert "earlier checkpoint" in warning and "lower train.lr" in warning and "\n" not in warning


def test_metrics_note_merges_into_pending_rows_and_rewrites_written_ones(tmp_path):
    from zturbo_train.train.loop import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", 2, True)
    for step in (1, 2):
        log.add(step, torch.tensor(1.0), torch.tensor(0.5), 1e-3, 0)
    log.note(2, {"turbo_drift": 0.2})  # still pending: merged at flush
    log.flush(torch.device("cpu"))
    log.add(3, torch.tensor(1.0), torch.tensor(0.5), 1e-3, 0)
    log.flush(torch.device("cpu"))
    log.note(3, {"turbo_drift": 0.3})  # already written: the row is rewritten in place
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "turbo_drift" not in rows[0] and rows[1]["turbo_drift"] == 0.2 and rows[2]["turbo_drift"] == 0.3
    assert all("loss" in r for r in rows)
