"""turbo_drift (drift.py): the formula by hand, the monitor's ratio and warning, the metrics notes,
and the sampler's observer (off: nothing changes; on: each step's x0 prediction)."""

from __future__ import annotations

import json

import pytest
import torch

from zturbo_train.drift import DriftMonitor, DriftProbe


def test_drift_of_a_straight_path_is_zero_and_of_a_bent_one_is_hand_computed():
    """x0 predictions equal to the final sample give 0; a hand-made bent path gives the formula's value.

    Mutation checked: averaging over the first half of the steps (the first version) makes the second assert fail.
    """
    final = torch.ones(1, 16, 2, 2)
    straight = DriftProbe()
    for i in range(4):
        straight.observe(i, final.clone())
    assert straight.value() == pytest.approx(0.0)
    bent = DriftProbe()
    for i, x0 in enumerate([final * 0.0, final * 0.5, final, final]):  # the first step's distance: 1.0 (relative)
        bent.observe(i, x0)
    assert bent.value() == pytest.approx(1.0)


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
    fields, warning = monitor.update(50, 0.125)
    assert fields["turbo_drift_ratio"] == pytest.approx(1.25) and warning is None
    fields, warning = monitor.update(100, 0.3)
    assert fields["turbo_drift_ratio"] == pytest.approx(3.0)
    assert "earlier checkpoint" in warning and "lower train.lr" in warning and "\n" not in warning


def test_metrics_note_reaches_pending_and_held_rows_and_the_file_is_only_appended(tmp_path):
    """A note merges into a pending row (at flush) or the row flush(hold=) kept back (at release); a written row is
    never rewritten (monitor/ tails the file by offset): a late note gets a row of its own.

    Mutation checked: writing the held row at flush (ignoring hold) leaves step 4 without turbo_drift."""
    from zturbo_train.train.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, 2, True)
    for step in (1, 2):
        log.add(step, torch.tensor(1.0), torch.tensor(0.5), 1e-3, 0)
    log.note(2, {"turbo_drift": 0.2})  # still pending: merged at flush
    log.flush(torch.device("cpu"))
    written = path.read_bytes()
    for step in (3, 4):
        log.add(step, torch.tensor(1.0), torch.tensor(0.5), 1e-3, 0)
    row = log.flush(torch.device("cpu"), hold=4)
    assert row["step"] == 4 and path.read_bytes().startswith(written)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]  # 4 waits
    log.note(4, {"turbo_drift": 0.4})
    log.release()
    log.note(1, {"turbo_drift": 0.1})  # already written: appended as its own row
    assert path.read_bytes().startswith(written)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 1]
    assert "turbo_drift" not in rows[0] and rows[1]["turbo_drift"] == 0.2 and rows[3]["turbo_drift"] == 0.4
    assert all("loss" in r for r in rows[:4]) and rows[4] == {"step": 1, "turbo_drift": 0.1}


def test_monitor_keeps_a_resumed_start_and_labels_one_preview():
    """A resumed run passes its saved step-0 value: the first preview after resuming is judged against it."""
    monitor = DriftMonitor(start=0.2)
    fields, warning = monitor.update(300, 0.5)
    assert fields == {"turbo_drift": 0.5, "turbo_drift_start": 0.2, "turbo_drift_ratio": pytest.approx(2.5)}
    assert warning is not None and monitor.last == fields
    assert monitor.line(300, fields) == "preview step 300: turbo_drift 0.500 (2.50x step 0)"


def test_observer_sees_each_steps_x0_and_changes_nothing(tiny_parts):
    """Off and on give bit-identical latents; on, one x0 per step, the last equal to the sample (sigma ends at 0)
    and the first equal to noise - sigma_0 * velocity (checked by hand from the first model call).

    Mutation checked: observing `latents` instead of the x0 prediction fails the last two asserts."""
    from zturbo_train.flow import predict
    from zturbo_train.sampling import encode_texts, generate_latents, initial_latents, set_schedule

    embeds = encode_texts(tiny_parts.tokenizer, tiny_parts.text_encoder, ["a red cube"], torch.device("cpu"))
    args = dict(seeds=[4], steps=3, width=64, height=64)
    plain = generate_latents(tiny_parts.transformer, tiny_parts.scheduler, embeds, **args)
    seen: list[tuple[int, torch.Tensor]] = []
    observed = generate_latents(
        tiny_parts.transformer, tiny_parts.scheduler, embeds, observe=lambda i, x0: seen.append((i, x0)), **args
    )
    assert torch.equal(plain, observed)
    assert [i for i, _ in seen] == [0, 1, 2]
    torch.testing.assert_close(seen[-1][1], observed, rtol=0, atol=1e-6)
    schedule = type(tiny_parts.scheduler).from_config(tiny_parts.scheduler.config)
    noise = initial_latents([4], 64, 64, torch.device("cpu"))
    t0 = set_schedule(schedule, 3, noise.shape[2], noise.shape[3], torch.device("cpu"))[0]
    with torch.no_grad():
        velocity = -predict(tiny_parts.transformer, noise, ((1000 - t0) / 1000).expand(1), embeds).float()
    torch.testing.assert_close(seen[0][1], noise - schedule.sigmas[0] * velocity, rtol=0, atol=1e-6)
