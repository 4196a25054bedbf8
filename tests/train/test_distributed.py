"""Data-parallel training under torchrun: 2 CPU processes on gloo against one process.

The 2-rank runs go through torchrun (`python -m torch.distributed.run`) as users start
them; tests/train/dist_entry.py is the CLI plus an audit hook that lists each rank's writes (and
an injected failure where a test asks for one).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from train.test_loop import make_config, metrics
from zturbo_train.config import load_config
from zturbo_train.data.batches import rank_share
from zturbo_train.errors import TrainingError
from zturbo_train.lora.formats import read_lora_file
from zturbo_train.train import distributed
from zturbo_train.train.loop import run

ENTRY = Path(__file__).resolve().parent / "dist_entry.py"
# Two ranks at batch 1 against one process at batch 2: the same samples, noise and sigmas,
# so the only difference is fp32 summation order (one batch of 2 against two batches of 1).
# Adam divides each gradient entry by its own running RMS, which turns those ~1e-7 relative
# differences into at most a small part of one step (lr = 2e-3) on entries whose gradient
# is near zero: measured 1.1e-5 at most, 99.9 % of entries within 1e-6.
LORA_ATOL = 1e-4  # 5 % of one step
LOSS_RTOL = 1e-5
SETTINGS = dict(steps=4, batch_size=1, grad_accum=2, save_every=2, sample_every=0, log_every=1)

pytestmark = pytest.mark.slow


def torchrun(args: list[str], env: dict[str, str], logs: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """2 processes on this machine through torchrun, each rank's stdout/stderr in its own file under `logs`."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        *args,
    ]
    return subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=timeout
    )


def rank_log(logs: Path, rank: int) -> str:
    (path,) = [p for p in logs.rglob("stderr.log") if p.parent.name == str(rank)]
    return path.read_text(encoding="utf-8", errors="replace")


def writes(root: Path, rank: int) -> set[Path]:
    path = root / "writes" / f"rank{rank}.txt"
    return {Path(line) for line in path.read_text().splitlines()} if path.exists() else set()


def lora_difference(a: Path, b: Path) -> tuple[float, float]:
    """(largest |a - b| over all LoRA entries, fraction of entries further apart than 1e-6)."""
    la, lb = read_lora_file(a)[0], read_lora_file(b)[0]
    diffs = torch.cat(
        [(la[k].down - lb[k].down).abs().flatten() for k in la] + [(la[k].up - lb[k].up).abs().flatten() for k in la]
    )
    return float(diffs.max()), float((diffs > 1e-6).float().mean())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, example_data, tiny_dir):
    """One 2-rank run (batch 1, grad_accum 2, 4 steps) with a cache of its own, so both ranks encode."""
    root = tmp_path_factory.mktemp("ddp")
    home = root / "home"
    home.mkdir()
    (home / "builtin").symlink_to(tiny_dir.parent)  # the session's builtin:tiny, not rebuilt
    cfg = make_config(root / "two", example_data, **SETTINGS)
    started = time.perf_counter()
    done = torchrun(
        [str(ENTRY), "train", str(cfg)], {"ZTURBO_HOME": str(home), "ZTURBO_TEST_WRITES": str(root)}, root / "logs"
    )
    assert done.returncode == 0, done.stderr[-3000:] + rank_log(root / "logs", 0)[-3000:]
    return {
        "root": root,
        "home": home,
        "cfg": cfg,
        "run": root / "two" / "run",
        "logs": root / "logs",
        "seconds": time.perf_counter() - started,
    }


def test_two_ranks_at_batch_1_equal_one_process_at_batch_2(two_ranks, tmp_path, example_data):
    one = run(load_config(make_config(tmp_path, example_data, **{**SETTINGS, "batch_size": 2})), quiet=True)
    two = two_ranks["run"]
    largest, spread = lora_difference(two / "t.safetensors", one.lora_path)
    assert largest <= LORA_ATOL and spread < 1e-3, (largest, spread)
    moved = max(float(w.up.abs().max()) for w in read_lora_file(one.lora_path)[0].values())
    assert moved > 20 * LORA_ATOL  # the LoRA trained (4 steps of lr): equal is not "both still zero"
    ours, theirs = metrics(two), metrics(one.run_dir)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=LOSS_RTOL)
    assert "data parallel: 2 ranks (gloo, cpu) x batch_size 1 x grad_accum 2 = 4 samples per step" in rank_log(
        two_ranks["logs"], 0
    )


def test_only_rank_0_writes_the_run_and_the_ranks_share_the_caching(two_ranks):
    run_dir, cache = two_ranks["run"], two_ranks["home"] / "cache"
    rank0, rank1 = writes(two_ranks["root"], 0), writes(two_ranks["root"], 1)
    assert not [p for p in rank1 if p.is_relative_to(run_dir)]
    written = {p.relative_to(run_dir).as_posix() for p in rank0 if p.is_relative_to(run_dir)}
    assert {
        "metrics.jsonl",
        "config.json",
        "t.safetensors",
        "checkpoints/t-step000002.safetensors",
        "samples/step-000004/00.png",
    } <= written
    assert any(name.startswith("state/") for name in written)
    entries = {p for p in cache.rglob("*.safetensors")}
    share0, share1 = rank0 & entries, rank1 & entries
    assert share0 and share1 and not share0 & share1 and share0 | share1 == entries
    log0, log1 = rank_log(two_ranks["logs"], 0), rank_log(two_ranks["logs"], 1)
    assert "training done" in log0 and "data: 6 images" in log0
    assert "training done" not in log1 and "data:" not in log1 and "caching" not in log1


def test_two_rank_state_resumes_on_one_rank(two_ranks, tmp_path, example_data):
    """From the 2-rank state at step 2: one process at batch 2 (same global batch) ends where the 2 ranks
    ended; at batch 1 (another global batch) it continues the epoch at the same fraction and says so."""
    for batch_size in (2, 1):
        cfg = make_config(tmp_path / f"b{batch_size}", example_data, **{**SETTINGS, "batch_size": batch_size})
        run_dir = tmp_path / f"b{batch_size}" / "run"
        shutil.copytree(two_ranks["run"], run_dir)
        shutil.rmtree(run_dir / "state" / "step-000004")
        (run_dir / "t.safetensors").unlink()
        said = io.StringIO()
        result = run(load_config(cfg), resume=True, console=Console(file=said, width=400))
        regrouped = "warning: the global batch (batch_size x ranks) is now 1, not the one" in said.getvalue()
        assert regrouped == (batch_size == 1), said.getvalue()
        assert result.steps_done == 4 and result.lora_path == run_dir / "t.safetensors"
        assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    largest, _ = lora_difference(two_ranks["run"] / "t.safetensors", tmp_path / "b2" / "run" / "t.safetensors")
    assert largest <= LORA_ATOL
    state = json.loads((two_ranks["run"] / "state" / "step-000002" / "state.json").read_text())
    assert state["data"]["epoch"] == 1 and state["data"]["epoch_batches"] == 4  # 4 global batches of 2 per epoch


def test_a_failing_rank_stops_the_other_with_its_message(two_ranks, tmp_path, example_data):
    """Rank 1 fails in its 3rd forward while rank 0 waits in the gradient all-reduce: both end, quickly."""
    cfg = make_config(tmp_path, example_data, **{**SETTINGS, "steps": 50})
    started = time.perf_counter()
    done = torchrun(
        [str(ENTRY), "train", str(cfg)],
        {"ZTURBO_HOME": str(two_ranks["home"]), "ZTURBO_TEST_FAIL": "1:3"},
        tmp_path / "logs",
    )
    assert done.returncode != 0
    # a rank left waiting would hang until gloo's 30-minute timeout; 120 s leaves room for a loaded 2-core CI
    assert time.perf_counter() - started < 120
    root_cause = done.stderr[done.stderr.index("Root Cause") :]  # torchrun's summary ends with it
    assert "rank      : 1 (local_rank: 1)" in root_cause
    assert "RuntimeError: injected failure on rank 1 at call 3" in root_cause
    assert "injected failure on rank 1 at call 3" in rank_log(tmp_path / "logs", 1)
    assert not (tmp_path / "run" / "t.safetensors").exists()


def test_a_setup_failure_on_rank_0_stops_rank_1_with_its_message(two_ranks):
    """The 2-rank run's folder holds a run: rank 0 refuses it, and rank 1 (started with `-m zturbo_train`,
    as users do) says why instead of waiting for rank 0."""
    logs = two_ranks["root"] / "logs-refused"
    done = torchrun(
        ["-m", "zturbo_train", "train", str(two_ranks["cfg"])], {"ZTURBO_HOME": str(two_ranks["home"])}, logs
    )
    assert done.returncode != 0
    assert "error: rank 0: output folder" in rank_log(logs, 0)
    assert "holds another run; pass --resume" in rank_log(logs, 0)
    log1 = " ".join(rank_log(logs, 1).split())
    assert "error: rank 1 stopped while opening the output folder: rank 0 failed: output folder" in log1


# ----------------------------------------------------------------------------- pieces


def test_rank_share_cuts_batches_so_the_ranks_average_is_the_batch_mean():
    assert [rank_share(4, r, 2) for r in range(2)] == [([0, 1], 1.0), ([2, 3], 1.0)]
    assert rank_share(2, 0, 1) == ([0, 1], 1.0)
    # A batch of 1 on 2 ranks: rank 1 repeats it at weight 0 (it must still run the step).
    assert rank_share(1, 0, 2) == ([0], 2.0) and rank_share(1, 1, 2) == ([0], 0.0)
    losses = torch.rand(7, generator=torch.Generator().manual_seed(0)).tolist()
    for size in range(1, 8):
        for world in (2, 3, 4):
            shares = [rank_share(size, r, world) for r in range(world)]
            assert sorted(s for slots, w in shares if w > 0 for s in slots) == list(range(size))
            # DDP averages the ranks' weighted mean losses; that must be the mean over the batch.
            ranks_mean = sum(w * sum(losses[s] for s in slots) / len(slots) for slots, w in shares) / world
            assert ranks_mean == pytest.approx(sum(losses[:size]) / size)


def test_ranks_from_the_environment():
    assert distributed.Ranks.from_env({}) == distributed.Ranks(0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ranks = distributed.Ranks.from_env(env)
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.local_world) == (3, 4, 1, 2)
    assert ranks.parallel and not ranks.is_main
    with pytest.raises(TrainingError, match="RANK=4 / LOCAL_RANK=0 do not fit WORLD_SIZE=4"):
        distributed.Ranks.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(TrainingError, match="WORLD_SIZE='two' is not a number"):
        distributed.Ranks.from_env({"WORLD_SIZE": "two"})


def test_micro_batches_before_the_last_skip_the_all_reduce(tiny_transformer, tmp_path):
    """DDP over the LoRA only (the transformer is ignored), and with grad_accum 2 one all-reduce per step."""
    import torch.distributed as dist

    from zturbo_train.lora.network import create_lora

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        network = create_lora(tiny_transformer, 4, 4.0, ["layers"], ["to_q", "to_v"])
        model = distributed.LoraModel(tiny_transformer, network, _predict)
        assert model.frozen_names() and not [n for n in model.frozen_names() if n.startswith("network.")]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, model.frozen_names()
        )
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert {id(p) for p in ddp.parameters() if p.requires_grad} == {id(p) for p in network.parameters()}
        reduced = []

        def count(state, bucket):
            reduced.append(bucket.buffer().numel())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, count)
        forward = distributed.SyncedForward(ddp, grad_accum=2)
        for micro in range(4):
            forward(tiny_transformer, *_inputs(tiny_transformer, micro)).square().mean().backward()
            assert sum(reduced) == (micro + 1) // 2 * sum(p.numel() for p in network.parameters())
    finally:
        dist.destroy_process_group()


def test_with_dop_one_all_reduce_per_step(tiny_transformer, tmp_path):
    """DOP runs two forwards with gradient per micro-batch: `data_parallel` counts them, so grad_accum 2 still
    all-reduces once per step, after the last backward. Checked to fail with the count per micro-batch (an
    all-reduce after each micro-batch's DOP backward: the same sums, twice the traffic)."""
    import types

    import torch.distributed as dist

    from zturbo_train.lora.network import create_lora
    from zturbo_train.train.preservation import Preservation
    from zturbo_train.train.step import StepSettings, TrainStep

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        network = create_lora(tiny_transformer, 4, 4.0, ["layers"], ["to_q", "to_v"])
        cfg = load_config(make_config(tmp_path, tmp_path, grad_accum=2))
        settings = StepSettings.from_config(cfg.train, torch.float32, torch.device("cpu"))
        step = TrainStep(
            tiny_transformer,
            network.trainable_parameters(),
            None,
            settings,
            torch.Generator(),
            None,
            Preservation(network, 1.0),
        )
        session = types.SimpleNamespace(
            step=step, transformer=tiny_transformer, network=network, device=torch.device("cpu"), cfg=cfg
        )
        distributed.data_parallel(session, distributed.Ranks(0, 2))
        reduced = []

        def count(state, bucket):
            reduced.append(bucket.buffer().numel())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        step.forward.ddp.register_comm_hook(None, count)
        for micro in range(4):
            latents, _, embeds = _inputs(tiny_transformer, micro)
            step.backward_preserving(latents, embeds, _inputs(tiny_transformer, micro + 9)[2])
            assert sum(reduced) == (micro + 1) // 2 * sum(p.numel() for p in network.parameters())
    finally:
        dist.destroy_process_group()


def _predict(transformer, latents, t, embeds):
    from zturbo_train import flow

    return flow.predict(transformer, latents, t, embeds)


def _inputs(transformer, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    dim = transformer.config.cap_feat_dim
    return (torch.randn(1, 16, 8, 8, generator=gen), torch.rand(1, generator=gen), [torch.randn(7, dim, generator=gen)])


def _two_ranks_and_one(tmp_path: Path, example_data: Path, tiny_dir: Path, extra: list[str]):
    """The same run with `--set` overrides `extra`: two ranks under torchrun (run folder tmp_path/two/run)
    and one process at batch 2 (the returned result)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "builtin").symlink_to(tiny_dir.parent)
    cfg = make_config(tmp_path / "two", example_data, **SETTINGS)
    done = torchrun(
        [str(ENTRY), "train", str(cfg), *[a for e in extra for a in ("--set", e)]],
        {"ZTURBO_HOME": str(home)},
        tmp_path / "logs",
    )
    assert done.returncode == 0, done.stderr[-3000:] + rank_log(tmp_path / "logs", 0)[-3000:]
    return run(
        load_config(make_config(tmp_path / "one", example_data, **{**SETTINGS, "batch_size": 2}), extra), quiet=True
    )


def test_two_ranks_log_val_loss_keep_an_ema_and_preserve(tmp_path, example_data, tiny_dir):
    """Validation (rank 0 evaluates, every rank flushes the log at its steps: no rank waits alone in the
    all-reduce), the EMA and DOP under torchrun: the run finishes and logs what one process at batch 2 logs.
    DOP's dop_loss is every rank's, averaged as the loss is."""
    extra = [
        "train.val_fraction=0.34",
        "train.val_every=2",
        "train.log_every=3",
        "train.ema=true",
        "train.ema_decay=0.5",
        "train.preservation=dop",
    ]
    one = _two_ranks_and_one(tmp_path, example_data, tiny_dir, extra)
    ours, theirs = metrics(tmp_path / "two" / "run"), metrics(one.run_dir)
    assert [r["step"] for r in ours if "val_loss" in r] == [2, 4] == [r["step"] for r in theirs if "val_loss" in r]
    assert [r["val_loss"] for r in ours if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in theirs if "val_loss" in r], rel=1e-4
    )
    largest, _ = lora_difference(tmp_path / "two" / "run" / "t.safetensors", one.lora_path)
    assert largest <= LORA_ATOL
    assert (tmp_path / "two" / "run" / "t-raw.safetensors").is_file()
    assert [r["dop_loss"] for r in ours] == pytest.approx([r["dop_loss"] for r in theirs], rel=1e-4)
    assert ours[-1]["dop_loss"] > 0


def test_two_ranks_train_a_lokr_as_one_process_at_batch_2(tmp_path, example_data, tiny_dir):
    """`lora.type = "lokr"` under torchrun: DDP over the LoKr factors, the same run as one process at batch 2."""
    extra = ["lora.type='lokr'", "lora.rank=2", "lora.alpha=1", "lora.factor=4"]
    one = _two_ranks_and_one(tmp_path, example_data, tiny_dir, extra)
    two, ref = read_lora_file(tmp_path / "two" / "run" / "t.safetensors")[0], read_lora_file(one.lora_path)[0]
    assert {u.kind for u in two.values()} == {"lokr"} and two.keys() == ref.keys()
    largest = max(float((two[m].tensors[k] - ref[m].tensors[k]).abs().max()) for m in ref for k in ref[m].tensors)
    moved = max(float(ref[m].tensors["lokr_w2_b"].abs().max()) for m in ref)
    assert largest <= LORA_ATOL and moved > 20 * LORA_ATOL, (largest, moved)
    ours, theirs = metrics(tmp_path / "two" / "run"), metrics(one.run_dir)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=LOSS_RTOL)
