"""Nothing lost, nothing silent (issue 12, items 3-6 and 12): merge never replaces what it did not write,
one live run per folder, resume past a damaged state, NaN/inf LoRAs refused, written files follow the umask.

Each test feeds the bad case through the real entry point and asserts the one-line error, or that
every file that was there is still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from train.test_loop import make_config  # noqa: E402 - the shared quick-start config
from zturbo_train.cli import app
from zturbo_train.config import load_config
from zturbo_train.errors import AdapterError
from zturbo_train.train.loop import run

runner = CliRunner()
SRC = str(Path(__file__).resolve().parent.parent / "src")


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: equal snapshots mean nothing was lost."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(result, message: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and message in result.output, result.output
    return result.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, example_data) -> Path:
    """A real 2-step run folder (config, metrics, final LoRA, a checkpoint, state) shared read-only."""
    tmp = tmp_path_factory.mktemp("safety")
    cfg = load_config(make_config(tmp, example_data, steps=2, save_every=1, sample_every=0))
    return run(cfg, quiet=True).run_dir


# ------------------------------------------------------------------ 3. merge replaces only its own output


def test_merge_never_replaces_a_run_a_dataset_or_a_model(tmp_path, trained_run, data_copy, tiny_dir):
    lora = shutil.copy(trained_run / "t.safetensors", tmp_path / "other.safetensors")
    model_copy = shutil.copytree(tiny_dir, tmp_path / "model-copy")
    before = {folder: snapshot(folder) for folder in (trained_run, data_copy, model_copy)}
    merge = ["merge", "--model", "builtin:tiny", "--dtype", "fp32"]
    for args, reason in [
        (["--lora", str(trained_run / "t.safetensors"), "--out", str(trained_run)], "overlaps the input"),
        (["--lora", lora, "--out", str(trained_run)], "holds a training run"),
        (["--lora", lora, "--out", str(trained_run / "checkpoints")], "lies inside the training run"),
        (["--lora", lora, "--out", str(data_copy)], "holds images (6, e.g. img_00.png): a dataset"),
        (["--lora", lora, "--out", str(model_copy)], "is a model folder without zturbo_merge.json"),
        (["--lora", lora, "--to-lora", str(trained_run / "t.safetensors")], "is a file of the training run"),
        (
            ["--lora", lora, "--to-lora", str(trained_run / "checkpoints" / "t-step000001.safetensors")],
            "is a file of the training run",
        ),
    ]:
        for flag in ([], ["--overwrite"]):
            output = one_line_error(runner.invoke(app, [*merge, *args, *flag]), reason)
            assert "pass --overwrite" not in output, "never suggest a flag that would be refused"
    assert {folder: snapshot(folder) for folder in before} == before


def test_merge_overwrites_its_own_output_and_keeps_the_umask(tmp_path, trained_run):
    lora = str(trained_run / "t.safetensors")
    out = tmp_path / "merged"
    merge = ["merge", "--model", "builtin:tiny", "--dtype", "fp32", "--lora", lora, "--out", str(out)]
    assert runner.invoke(app, merge).exit_code == 0
    one_line_error(runner.invoke(app, merge), "already exists; pass --overwrite to replace it")
    assert runner.invoke(app, [*merge[:-4], "--lora", f"{lora}:0.5", "--out", str(out), "--overwrite"]).exit_code == 0
    assert json.loads((out / "zturbo_merge.json").read_text())["loras"][0]["strength"] == 0.5
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask, "a mkdtemp folder renamed into place keeps 0700"
    shard = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert stat.S_IMODE(shard.stat().st_mode) == 0o666 & ~mask
    # --to-lora: an input reached through a hard link is an input too
    link = tmp_path / "link.safetensors"
    os.link(lora, link)
    one_line_error(
        runner.invoke(app, ["merge", "--lora", lora, "--to-lora", str(link), "--overwrite"]), "overlaps the input"
    )


# ------------------------------------------------------------------ 4. one live run per folder


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run lock on `folder` until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from zturbo_train.train.state import RunLock
        lock = RunLock()
        lock.acquire(Path({str(folder)!r}))
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC}
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_run_folder_is_refused_and_a_killed_holder_does_not_block(tmp_path, example_data):
    """Mutation checked: with `lock.acquire` removed from open_run_folder this test fails (the run starts)."""
    cfg_path = make_config(tmp_path, example_data, steps=1, save_every=0, sample_every=0)
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _hold_lock(folder)
    try:
        before = snapshot(folder)
        for flags in ([], ["--overwrite"], ["--resume"]):
            output = one_line_error(
                runner.invoke(app, ["train", str(cfg_path), "-q", *flags]),
                f"is in use by another `zturbo train` (pid {holder.pid} on host",
            )
            assert "wait for it to finish or stop it" in output
        assert snapshot(folder) == before and not (folder / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead process's lock: the folder is free at once
    result = runner.invoke(app, ["train", str(cfg_path), "-q"])
    assert result.exit_code == 0, result.output
    assert (folder / "t.safetensors").is_file()
    from zturbo_train.train.state import RunLock

    with RunLock() as lock:  # and the finished run released it
        lock.acquire(folder)


# ------------------------------------------------------------------ 5. resume past a damaged state


def test_resume_falls_back_past_a_torn_or_empty_state_and_removes_temp_files(tmp_path, example_data, capsys):
    settings = dict(steps=4, save_every=1, sample_every=0, log_every=1, keep_last=4)
    cfg_path = make_config(tmp_path, example_data, **settings)
    result = run(load_config(cfg_path), quiet=True)
    states = result.run_dir / "state"
    # a save killed mid-write: its temp folder and an atomic-write temp file
    (states / ".tmp-step-000005").mkdir()
    (states / ".tmp-step-000005" / "state.json").write_text("{")
    (result.run_dir / ".t.safetensors.x1y2.tmp").write_bytes(b"half")
    # the newest state torn (half its bytes), the one before it with an empty state.json
    tensors = states / "step-000004" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    (states / "step-000003" / "state.json").write_text("")
    resumed = run(load_config(cfg_path, ["train.steps=5"]), resume=True, console=None)
    out = capsys.readouterr().err
    assert "step-000004 is damaged (state.safetensors is unreadable" in out
    assert "step-000003 is damaged (state.json is unreadable" in out
    assert "resuming from" in out and "step-000002 (step 2), the newest intact state" in out
    assert resumed.steps_done == 5
    assert [r["step"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
        5,
    ]
    names = sorted(p.name for p in states.iterdir())
    assert "damaged-step-000004" in names and "damaged-step-000003" in names, "damaged states are kept aside"
    assert ".tmp-step-000005" not in names and not (result.run_dir / ".t.safetensors.x1y2.tmp").exists()


def test_resume_with_no_intact_state_is_one_clear_error(tmp_path, example_data):
    cfg_path = make_config(tmp_path, example_data, steps=1, save_every=0, sample_every=0)
    result = run(load_config(cfg_path), quiet=True)
    state = result.run_dir / "state" / "step-000001"
    nan = load_file(state / "state.safetensors")
    key = next(k for k in nan if k.startswith("lora."))
    nan[key][0, 0] = float("nan")
    save_file(nan, str(state / "state.safetensors"))
    output = one_line_error(
        runner.invoke(app, ["train", str(cfg_path), "-q", "--resume", "--set", "train.steps=2"]),
        "no intact training state",
    )
    assert f"tensor {key} holds 1 NaN/inf values" in output and "--overwrite" in output


# ------------------------------------------------------------------ 6. NaN/inf LoRAs


@pytest.fixture
def nan_lora(tmp_path, trained_run) -> tuple[Path, str]:
    tensors = load_file(trained_run / "t.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][1, 0] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    return path, key


def test_a_lora_with_nan_or_inf_is_refused_by_name_everywhere(tmp_path, nan_lora, example_data):
    """Mutation checked: with require_finite's call removed from read_lora_file, sample exits 0 (black image)."""
    path, key = nan_lora
    message = f"tensor {key} holds 1 NaN/inf values"
    for args in (
        [
            "sample",
            "--model",
            "builtin:tiny",
            "--lora",
            str(path),
            "-p",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "s"),
        ],
        ["merge", "--model", "builtin:tiny", "--lora", str(path), "--out", str(tmp_path / "m")],
        ["merge", "--lora", str(path), "--to-lora", str(tmp_path / "c.safetensors")],
        ["merge", "--model", "builtin:tiny", "--adapter", str(path), "--out", str(tmp_path / "m")],
    ):
        one_line_error(runner.invoke(app, args), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"], "nothing written"
    from zturbo_train.lora.adapter import read_adapter

    with pytest.raises(AdapterError, match=f"training adapter: .*{message}"):
        read_adapter(path)
    with pytest.raises(AdapterError, match=message):
        run(
            load_config(make_config(tmp_path / "t", example_data, steps=1), [f"model.adapter={json.dumps(str(path))}"]),
            quiet=True,
        )


# ------------------------------------------------------------------ 12. the umask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, mask):
    """Mutation checked: without `as_created(tmp)` in atomic_path, files are 0600 under umask 022."""
    code = textwrap.dedent(f"""
        import os, stat, torch
        from pathlib import Path
        os.umask({mask})
        from zturbo_train import fileio
        root = Path({str(tmp_path)!r})
        fileio.write_json(root / "a.json", {{"x": 1}})
        fileio.save_safetensors(root / "b.safetensors", {{"w": torch.zeros(2)}})
        folder = fileio.temp_dir(".t-", root / "sub")
        print(fileio.umask(), *(stat.S_IMODE(p.stat().st_mode) for p in
                                 (root / "a.json", root / "b.safetensors", folder, root / "sub")))
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, check=True
    )
    read, json_mode, tensors_mode, temp_mode, parent_mode = map(int, done.stdout.split())
    assert read == mask
    assert json_mode == tensors_mode == 0o666 & ~mask
    assert temp_mode == parent_mode == 0o777 & ~mask


def test_umask_is_read_without_changing_it():
    from zturbo_train.fileio import umask

    mask = os.umask(0o027)
    try:
        umask.cache_clear()
        assert umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(mask)
        umask.cache_clear()
