"""Watching a run: TensorBoard and W&B logs, loss.png, timelines, report.html, on builtin:tiny.

The logs are read back with each tool's own format: TensorBoard's EventAccumulator, and
W&B's offline run file (its record log of protobuf `Record`s, parsed with wandb's own
protobuf classes), and compared with metrics.jsonl row by row.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from zturbo_train.cli import app
from zturbo_train.config import load_config
from zturbo_train.errors import ConfigError, TrainingError
from zturbo_train.monitor import Monitor, MonitorWarning
from zturbo_train.monitor.loggers import TensorBoard
from zturbo_train.monitor.records import LAST_LOSS_LABEL, LOSS_LABEL, MetricsTail, scalars
from zturbo_train.train import loop as train_module
from zturbo_train.train.loop import run
from zturbo_train.train.state import RunLock
from zturbo_train.train.step import TrainStep

runner = CliRunner()
LOGGED = {"loss", "loss_smooth", "lr", "grad_norm", "sec_per_step", "epoch"}  # peak_mem_gib is None on CPU


def make_config(tmp_path: Path, example_data: Path, log: dict | None = None, **train) -> Path:
    settings = {
        "steps": 6,
        "lr": 2e-3,
        "batch_size": 2,
        "seed": 3,
        "save_every": 3,
        "sample_every": 3,
        "log_every": 2,
        "gradient_checkpointing": False,
        "output_dir": str(tmp_path / "run"),
        "name": "t",
    }
    settings.update(train)
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**settings}.items())
    logs = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (log or {}).items())
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.toml"
    path.write_text(
        f'[model]\npath = "builtin:tiny"\nadapter = "builtin:tiny-adapter"\ndtype = "fp32"\n'
        f'[data]\ndir = {json.dumps(str(example_data))}\nresolution = 64\ntrigger_word = "sks"\n'
        f"[lora]\nrank = 4\n[train]\n{table}\n[log]\n{logs}\n"
        f'[sample]\nprompts = ["sks a red square", "a blue circle"]\nwidth = 64\nheight = 64\nsteps = 2\n',
        encoding="utf-8",
    )
    return path


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_log(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = tensorboard_log(run_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header, then 32 KiB blocks of
    (crc32 4 bytes, length 2, type 1) chunks; FULL (1) or FIRST (2) .. LAST (4) make one record."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(wandb_dir: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of every offline run under WANDB_DIR, oldest first."""
    out = []
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        history = []
        for record in wandb_records(file):
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                history.append(row)
        out.append((file.stem.removeprefix("run-"), history))
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    import wandb

    folder = tmp_path / "wandb-home"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(folder / "config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B keeps its settings in a process-wide singleton
    yield folder
    wandb.teardown()


def _extra_keys(monkeypatch):
    """Rows gain keys other parts of zturbo add (validation loss every third step, drift on all)."""
    original = train_module.append_line

    def append_line(path, line):
        row = json.loads(line)
        row["turbo_drift"] = 0.01 * row["step"]
        if row["step"] % 3 == 0:
            row["val_loss"] = 1.0 + 0.1 * row["step"]
        original(path, json.dumps(row))

    monkeypatch.setattr(train_module, "append_line", append_line)


def test_tensorboard_and_wandb_record_every_metric_row(tmp_path, example_data, wandb_offline, monkeypatch, capfd):
    """Every numeric key of every metrics.jsonl row, including keys the monitor does not know, reaches both
    loggers at its step with its value; previews arrive as images per prompt; the config as hyper-parameters.
    `--quiet` silences W&B's banner too (checked to fail without the silent setting)."""
    _extra_keys(monkeypatch)
    monkeypatch.delenv("WANDB_SILENT")
    cfg = make_config(tmp_path, example_data, log={"tensorboard": True, "wandb": True, "project": "p"})
    result = runner.invoke(app, ["train", str(cfg), "-q"])
    assert result.exit_code == 0, result.output
    printed = result.output + "".join(capfd.readouterr())
    assert "wandb" not in printed.lower(), printed
    run_dir = tmp_path / "run"
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))

    logged = tb_scalars(run_dir)
    drift = {"turbo_drift_start", "turbo_drift_ratio"}  # the preview steps' real drift fields (3 and 6)
    assert set(logged) == LOGGED | {"turbo_drift", "val_loss"} | drift
    for key, points in logged.items():
        assert points == [(r["step"], float(np.float32(r[key]))) for r in rows if key in r], key
    acc = tensorboard_log(run_dir)
    assert {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]} == {
        "preview/0": [0, 3, 6],
        "preview/1": [0, 3, 6],
    }
    assert "config/text_summary" in acc.Tags()["tensors"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train.lr"].number_value == 2e-3 and hparams["model.path"].string_value == "builtin:tiny"
    assert json.loads(hparams["data"].string_value)[0]["trigger_word"] == "sks"

    ((run_id, history),) = wandb_runs(wandb_offline)
    assert json.loads((run_dir / "wandb.json").read_text()) == {"id": run_id, "project": "p", "step": 6}
    by_step: dict[int, dict] = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    for r in rows:
        assert {k: by_step[r["step"]][k] for k in scalars(r)} == scalars(r)  # JSON floats: exact
    assert set(scalars(rows[2])) == LOGGED | {"turbo_drift", "val_loss"} | drift
    assert [s for s in sorted(by_step) if "preview/1/_type" in by_step[s]] == [0, 3, 6]
    assert by_step[3]["preview/0/_type"] == "image-file"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, example_data):
    """A run that fails on a NaN loss at step 5 (state saved at 3, rows logged to 4), then is resumed with
    the command its report gives (`zturbo train RUN/run.toml --resume`) to step 8. Snapshots between."""
    import wandb

    tmp = tmp_path_factory.mktemp("resumed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_CONFIG_DIR", str(tmp / "config"))
        mp.setenv("WANDB_SILENT", "true")
        wandb.teardown()
        cfg = make_config(tmp, example_data, log={"tensorboard": True, "wandb": True}, steps=8, log_every=1)
        original, count = TrainStep.loss, {"n": 0}

        def loss(self, *args, **kwargs):
            count["n"] += 1
            value = original(self, *args, **kwargs)
            return value * float("nan") if count["n"] == 5 else value

        mp.setattr(TrainStep, "loss", loss)
        with pytest.raises(TrainingError, match="loss became nan at step 5"):
            run(load_config(cfg), quiet=True)
        mp.undo()
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_CONFIG_DIR", str(tmp / "config"))
        run_dir = tmp / "run"
        first = {
            "tb": tb_scalars(run_dir),
            "loss_png": (run_dir / "loss.png").read_bytes(),
            "timeline": Image.open(run_dir / "samples" / "timeline-0.png").size,
            "report": (run_dir / "report.html").read_text(),
        }
        result = runner.invoke(app, ["train", str(run_dir / "run.toml"), "--resume", "-q"])
        assert result.exit_code == 0, result.output
        wandb.teardown()
    return tmp, run_dir, cfg, first


def test_resume_continues_tensorboard_without_duplicate_steps(resumed):
    """The failed session logged step 4 past its state (3); the resumed one purges and relogs it.
    Checked to fail: without purge_step, step 4 is read back twice."""
    _, run_dir, _, first = resumed
    assert [s for s, _ in first["tb"]["loss"]] == [1, 2, 3, 4]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    logged = tb_scalars(run_dir)
    assert logged["loss"] == [(r["step"], float(np.float32(r["loss"]))) for r in rows]
    assert all(len({s for s, _ in points}) == len(points) for points in logged.values())
    acc = tensorboard_log(run_dir)
    assert [e.step for e in acc.Images("preview/0")] == [0, 3, 6, 8]


def test_resume_continues_the_same_wandb_run_without_duplicate_steps(resumed):
    tmp, run_dir, _, _ = resumed
    runs = wandb_runs(tmp)
    assert len(runs) == 2 and runs[0][0] == runs[1][0] == json.loads((run_dir / "wandb.json").read_text())["id"]
    steps = [row["_step"] for _, history in runs for row in history if "loss" in row]
    assert steps == list(range(1, 9))
    rows = {r["step"]: r for r in metric_rows(run_dir)}
    assert all(row["loss"] == rows[row["_step"]]["loss"] for _, history in runs for row in history if "loss" in row)


def test_loss_plot_and_timelines_grow_with_the_run(resumed):
    _, run_dir, _, first = resumed
    with Image.open(run_dir / "loss.png") as image:
        image.verify()
    assert (run_dir / "loss.png").read_bytes() != first["loss_png"]
    for n in (0, 1):
        with Image.open(run_dir / "samples" / f"timeline-{n}.png") as image:
            image.load()
            # 2 frames (steps 0, 3) after the failed session, 4 (0, 3, 6, 8) after the resumed one
            assert first["timeline"][0] < image.size[0] and image.size[1] == first["timeline"][1]
            assert image.size[0] == 4 * 64 + 5 * 4


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.headers, self.images, self.text = [], [], 0, []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if key in attrs:
                self.links.append(attrs[key])
        self.images += tag == "img" and attrs.get("src", "").startswith("data:image/")
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        self._in_th = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_th:
            self.headers.append(data)


def _parse_report(run_dir: Path) -> _Links:
    page = _Links()
    page.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    page.close()
    return page


def test_report_links_only_existing_files_and_shows_every_preview_step(resumed):
    _, run_dir, _, first = resumed
    assert "stopped: the loss became nan at step 5" in first["report"]
    page = _parse_report(run_dir)
    assert page.links and all(
        link.startswith("data:image/") or (run_dir / unquote(link)).is_file() for link in page.links
    )
    assert not any(link.startswith(("http:", "https:", "//")) for link in page.links)  # opens offline
    assert [h for h in page.headers if h.startswith("step ")] == ["step 0", "step 3", "step 6", "step 8"]
    assert page.images == 2 * 4  # prompts x steps thumbnails, embedded
    text = " ".join(page.text)
    assert f"zturbo train {run_dir / 'run.toml'} --resume</pre>" in first["report"]  # the command the fixture ran
    for expected in (
        "finished: 8 steps",
        "builtin:tiny-adapter (merge",
        "rank 4",
        "sks a red square",
        "t.safetensors",
        f"zturbo train {run_dir / 'run.toml'} --resume --set train.steps=16",
        "zturbo merge --model",
    ):
        assert expected in text, expected
    # `zturbo report` rewrites it from the folder alone
    (run_dir / "report.html").unlink()
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0 and "report.html" in result.output
    assert [h for h in _parse_report(run_dir).headers if h.startswith("step ")] == [
        "step 0",
        "step 3",
        "step 6",
        "step 8",
    ]


def test_run_toml_is_the_config_of_the_run(resumed):
    _, run_dir, cfg, _ = resumed
    assert load_config(run_dir / "run.toml").model_dump() == load_config(cfg).model_dump()


def test_a_broken_logger_warns_once_and_the_run_finishes(tmp_path, example_data, monkeypatch):
    """TensorBoard failing on write and W&B without a login (not offline) are one warning each."""
    import wandb

    def broken(self, step, values):
        raise OSError("disk gone")

    monkeypatch.setattr(TensorBoard, "scalars", broken)
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    wandb.teardown()
    cfg = load_config(make_config(tmp_path, example_data, log={"tensorboard": True, "wandb": True}))
    with pytest.warns(MonitorWarning) as caught:
        result = run(cfg, quiet=True)
    wandb.teardown()
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, MonitorWarning))
    assert len(messages) == 2, messages
    assert messages[0].startswith("tensorboard failed (OSError: disk gone); logging to tensorboard is off")
    assert messages[1].startswith("wandb failed (RuntimeError: no W&B login found; run `wandb login`")
    assert result.steps_done == 6 and (result.run_dir / "t.safetensors").is_file()
    assert (result.run_dir / "report.html").is_file() and (result.run_dir / "loss.png").is_file()


def test_a_missing_extra_is_a_config_error(tmp_path, example_data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = make_config(tmp_path, example_data)
    needs = r'`log.wandb` = True: needs the wandb package.*pip install "zturbo-train\[wandb\]"'
    with pytest.raises(ConfigError, match=needs):
        load_config(cfg, ["log.wandb=true"])
    result = runner.invoke(app, ["train", str(cfg), "--set", "log.wandb=true"])
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


def test_hooks_return_at_once_while_the_plots_are_drawn(tmp_path, example_data, monkeypatch):
    """Drawing runs on the monitor's thread: a slow plot does not hold the training thread."""
    from zturbo_train.monitor import plots, report

    cfg = load_config(make_config(tmp_path, example_data))
    root = tmp_path / "run"
    root.mkdir()
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "loss_smooth": 0.5, "lr": 1e-3}) + "\n")
    original, pages = plots.plot_loss, []
    monkeypatch.setattr(plots, "plot_loss", lambda rows, path: (time.sleep(1.0), original(rows, path))[1])
    write = report.write_report
    monkeypatch.setattr(report, "write_report", lambda *a, **k: pages.append(write(*a, **k).read_text()))
    with Monitor(cfg, root) as monitor:
        started = time.perf_counter()
        monitor.on_metrics()
        monitor.on_save(1)
        monitor.on_preview(1)
        assert time.perf_counter() - started < 0.1
        while not pages and time.perf_counter() - started < 60:  # the page of the run in progress
            time.sleep(0.05)
    assert (root / "loss.png").is_file() and (root / "report.html").is_file()
    # a run in progress, then the end of one that stopped early
    assert "training: step 1 of 6" in pages[0] and "stopped at step 1 of 6" in pages[-1]
    off = tmp_path / "off"
    off.mkdir()
    with Monitor(cfg, off, active=False) as monitor:  # ranks other than 0
        monitor.on_save(1)
    assert monitor.thread is None and not any(off.iterdir())


def test_metric_rows_are_read_whole_and_only_numbers_are_logged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    tail = MetricsTail(path)
    assert tail.new_rows() == [{"step": 1, "loss": 0.5}]
    with open(path, "a") as handle:
        handle.write('ss": 0.25}\n')
    assert tail.new_rows() == [{"step": 2, "loss": 0.25}]
    assert scalars(
        {
            "step": 3,
            "time": 1e9,
            "loss": 1,
            "peak_mem_gib": None,
            "nan": float("nan"),
            "ok": True,
            "name": "x",
            "val_loss": 0.5,
        }
    ) == {"loss": 1.0, "val_loss": 0.5}


def test_report_help_shows_a_runnable_example():
    assert "zturbo report output/quickstart" in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "zturbo report output/quickstart" in result.output


def test_report_command_tells_a_run_still_training_from_a_stopped_one(tmp_path, example_data):
    """`zturbo report` probes the run lock: held -> "training", free (or never made) -> "stopped".
    Checked to fail: with is_held always False."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"train": {"steps": 6, "name": "lora"}}))
    (root / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 0.5, "loss_smooth": 0.5}) + "\n")
    assert not RunLock.is_held(root) and not (root / RunLock.NAME).exists()  # the probe makes no file
    with RunLock() as lock:
        lock.acquire(root)
        assert RunLock.is_held(root)
        assert runner.invoke(app, ["report", str(root), "--no-plots"]).exit_code == 0
        assert "training: step 2 of 6" in (root / "report.html").read_text()
    assert not RunLock.is_held(root)
    assert runner.invoke(app, ["report", str(root), "--no-plots"]).exit_code == 0
    assert "stopped at step 2 of 6" in (root / "report.html").read_text()


def test_report_command_on_a_folder_that_is_no_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "is not a zturbo run folder" in result.output
    assert not os.listdir(tmp_path)


def test_a_new_run_in_the_folder_starts_new_logs_and_a_resume_keeps_them(tmp_path, example_data):
    cfg = load_config(make_config(tmp_path, example_data))
    root = tmp_path / "run"
    for resume_step, kept in ((3, True), (None, False)):
        (root / "tensorboard").mkdir(parents=True, exist_ok=True)
        (root / "tensorboard" / "events.out.tfevents.old").write_bytes(b"")
        (root / "wandb.json").write_text('{"id": "old"}')
        with Monitor(cfg, root, resume_step):
            pass
        old_events = root / "tensorboard" / "events.out.tfevents.old"
        assert (root / "wandb.json").exists() == kept and old_events.exists() == kept


def test_report_shows_what_a_resume_changed_and_labels_losses_as_the_summary_does(tmp_path, example_data):
    """A resume with changed settings (issue 12's config-history.jsonl) shows them in the report, which lists
    that file but not the run lock; its losses carry the end-of-run summary's labels and values.
    Checked to fail: without the history rows in _settings; with the report's own 'loss' label."""
    cfg = make_config(tmp_path, example_data, steps=2, save_every=2, sample_every=2, log_every=1)
    assert runner.invoke(app, ["train", str(cfg), "-q"]).exit_code == 0
    result = runner.invoke(
        app,
        ["train", str(cfg), "--resume", "--set", "train.steps=3", "--set", "train.lr=0.001"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<tr><th>changed at step 2</th><td>" in page
    assert "train.steps 2 -&gt; 3" in page and "train.lr 0.002 -&gt; 0.001" in page
    links = _parse_report(run_dir).links
    assert "config-history.jsonl" in links and (run_dir / "config-history.jsonl").is_file()
    assert (run_dir / ".zturbo-train.lock").exists() and not any("lock" in link for link in links)
    last = metric_rows(run_dir)[-1]
    for label, key in ((LOSS_LABEL, "loss_smooth"), (LAST_LOSS_LABEL, "loss")):
        shown = f"{last[key]:.4f}"
        assert f"<tr><th>{label}</th><td>{shown}</td></tr>" in page, label
        assert re.search(rf"{re.escape(label)}\W+{shown}", result.output), (label, result.output)


def test_drift_curve_starts_at_the_step_0_preview():
    """Step 0's preview has no metrics row; its drift travels as turbo_drift_start and opens the plotted curve."""
    from zturbo_train.monitor.plots import drift_series

    rows = [
        {"step": 1, "loss": 1.0},
        {"step": 30, "turbo_drift": 0.27, "turbo_drift_start": 0.25},
        {"step": 60, "turbo_drift": 0.30, "turbo_drift_start": 0.25},
    ]
    assert drift_series(rows) == ([0, 30, 60], [0.25, 0.27, 0.30])
    assert drift_series([{"step": 1, "loss": 1.0}]) == ([], [])


def test_loss_png_draws_each_logged_loss_it_has():
    """val_loss gets its line beside the loss when the rows have it; DOP's dop_loss (far below the training
    loss) a panel of its own, at its steps and values; a run without them draws neither."""
    from zturbo_train.monitor.plots import loss_figure

    rows = [{"step": s, "loss": 1.0 / s, "loss_smooth": 1.0, "lr": 1e-3, "grad_norm": 0.5} for s in (1, 2, 3)]
    plain = loss_figure(rows)
    assert len(plain.axes) == 3 and {line.get_label() for line in plain.axes[0].get_lines()} == {"loss", LOSS_LABEL}
    rows[2]["val_loss"] = 0.7
    for row in rows:
        row["dop_loss"] = 0.1 * row["step"]
    fig = loss_figure(rows)  # axes: loss, grad norm, DOP, then the lr twin
    assert {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()}["validation loss"] == [3]
    (dop,) = fig.axes[2].get_lines()
    assert dop.get_label() == "preservation loss (DOP)" and list(dop.get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
