"""The plain diffusers + peft reference step, run in the same call as `zturbo bench`.

Imports the unmodified ../shared/bench/plain_step.py from the carried .devbench/ folder
(scripts/prepare_devbench.sh copies it there) and runs the part of its main() that the
targets are ratios of: the matmul ceiling, 8 sampling steps at 1024 px, and the LoRA step
at 512 and 1024 px with checkpointing (plus 1024 px without, and compiled when
PLAIN_COMPILE=1). Its VAE and text-encoder timings are left out to save device time.

    OUT=/some/dir python3 scripts/plain_ref.py     # appends to $OUT/results.jsonl
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".devbench"))

import plain_step as B  # noqa: E402  (needs the path above)


def main() -> int:
    started = time.perf_counter()
    if B.DEV == "cuda":
        B.record(what="device", name=B.torch.cuda.get_device_name(), torch=B.torch.__version__)
    import diffusers
    import peft

    B.record(what="versions", diffusers=diffusers.__version__, peft=peft.__version__)
    B.matmul_rate()
    model = B.build_transformer()
    res, small = (64, 32) if B.TINY else (1024, 512)
    B.sample_bench(model, res)
    params = B.add_lora(model, rank=4 if B.TINY else 32)
    B.record(what="lora", trainable_m=round(sum(p.numel() for p in params) / 1e6, 2))
    for size, checkpointing in [(small, True), (res, True), (res, False)]:
        B.train_bench(model, params, size, checkpointing)
    if os.environ.get("PLAIN_COMPILE") == "1":
        model.compile_repeated_blocks(fullgraph=False, dynamic=False)
        B.train_bench(model, params, res, True, steps=6, warm=3, tag="compiled_blocks")
    B.record(what="total", seconds=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
