"""torchrun entry for tests/train/test_distributed.py: the `zturbo` CLI, plus what a test asks through the environment.

    python -m torch.distributed.run --nproc-per-node 2 tests/train/dist_entry.py train cfg.toml

ZTURBO_TEST_WRITES=<folder>: every path this rank opens for writing, creates, replaces,
renames or removes under <folder> is listed in <folder>/writes/rank<RANK>.txt. A Python
audit hook sees them, so no project code is patched to find out who wrote what.

ZTURBO_TEST_FAIL=<rank>:<call>: that rank's TrainStep.loss raises on its <call>-th call,
as a CUDA error in the forward would, while the other ranks wait in the all-reduce.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.rename": 1, "os.replace": 1, "os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "shutil.rmtree": 0}


def record_writes(root: Path, rank: str) -> None:
    """List every path under `root` this process changes (audit events: open for writing, rename, remove, mkdir)."""
    (root / "writes").mkdir(exist_ok=True)
    log = open(root / "writes" / f"rank{rank}.txt", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    prefix = str(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in mode for c in "wax+")) and not (mode is None and flags & _WRITE_FLAGS):
                return
        elif event in _EVENTS:
            path = args[_EVENTS[event]]
        else:
            return
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if path.startswith(prefix) and "/writes/" not in path:
            log.write(path + "\n")

    sys.addaudithook(hook)


def fail_on(rank: str, call: int) -> None:
    """Make TrainStep.loss raise on `rank` at its `call`-th call."""
    from zturbo_train.train.step import TrainStep

    original, count = TrainStep.loss, {"n": 0}

    def loss(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise RuntimeError(f"injected failure on rank {rank} at call {call}")
        return original(self, *args, **kwargs)

    if os.environ.get("RANK") == rank:
        TrainStep.loss = loss


if __name__ == "__main__":
    if os.environ.get("ZTURBO_TEST_WRITES"):
        record_writes(Path(os.environ["ZTURBO_TEST_WRITES"]), os.environ.get("RANK", "0"))
    if os.environ.get("ZTURBO_TEST_FAIL"):
        failing_rank, failing_call = os.environ["ZTURBO_TEST_FAIL"].split(":")
        fail_on(failing_rank, int(failing_call))
    from zturbo_train.cli import run

    sys.argv[0] = "zturbo"
    run()
