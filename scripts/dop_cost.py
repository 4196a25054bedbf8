"""DOP's cost per training step on builtin:tiny, on the CPU: `train_once` of `zturbo bench` with and without
train.preservation = "dop", alternating step by step so both see the same machine load, timed in CPU time
(process_time, one thread), which shared cores disturb far less than wall time. Median of N steps. Eager,
no gradient checkpointing (the levers are not applied here).

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/dop_cost.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from zturbo_train.commands.bench import BenchSettings, _training_step, preset_configs, random_inputs, train_once
from zturbo_train.models import load_parts

SHAPES = ((64, 1), (64, 4), (256, 1), (256, 4))  # (px, batch)


def main(steps: int) -> None:
    torch.set_num_threads(1)
    transformer = load_parts("builtin:tiny", ["transformer"], dtype="fp32").transformer
    cap_dim = int(transformer.config.cap_feat_dim)
    for resolution, batch in SHAPES:
        runs = {}
        for mode in ("none", "dop"):
            settings = BenchSettings(model="builtin:tiny", overrides=[f"train.preservation={mode}"])
            _, train, lora = preset_configs(settings, "high", 32)
            network, step = _training_step(transformer, train, lora, torch.float32, torch.device("cpu"))
            network.detach()
            runs[mode] = (network, step, [])
        latents, embeds = random_inputs(batch, resolution, 128, cap_dim, torch.device("cpu"), torch.float32)
        class_embeds = [e.roll(1, 0) for e in embeds]
        for index in range(steps + 3):  # 3 warm-up rounds
            for network, step, times in runs.values():
                network.attach(transformer)
                start = time.process_time()
                train_once(step, latents, embeds, class_embeds)
                if index >= 3:
                    times.append(time.process_time() - start)
                network.detach()
        plain, dop = (statistics.median(runs[m][2]) for m in ("none", "dop"))
        print(f"{resolution} px, batch {batch}: {plain * 1e3:.1f} ms plain, {dop * 1e3:.1f} ms DOP, x{dop / plain:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
