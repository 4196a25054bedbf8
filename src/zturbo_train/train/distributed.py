"""Data-parallel training under torchrun: the process group, DDP over the LoRA, rank agreement.

    torchrun --nproc-per-node 4 -m zturbo_train train config.toml

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `launched()` reads them, joins the process
group (NCCL on CUDA, gloo on CPU), pins the GPU of LOCAL_RANK and leaves the group at the
end. Without those variables everything here is a no-op and training is one process.

What is split and what is shared:
- data: every batch of the order is a global batch (batch_size x ranks); each rank trains on
  its slice (`TrainDataset.for_rank`), so the ranks together see what one process with the
  global batch sees. Noise and sigmas are keyed by the sample's slot in the global batch,
  not by the rank, so they do not depend on the rank count either.
- gradients: DDP over the LoRA parameters only; the frozen transformer is neither
  broadcast nor reduced. Micro-batches of gradient accumulation skip the all-reduce but
  the last.
- caching: the ranks of a node encode one share each, then wait for each other.
- files, logs, previews, the progress bar: rank 0 only.

Failures: a phase that fails on one rank (opening the output folder, caching) stops every
rank with that rank's message; a failure inside the training loop ends that process, which
torchrun notices and ends the others (their collectives fail at once on gloo; NCCL ranks are
stopped by torchrun). The failing rank's message is written where torchrun's summary reads it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..data.batches import TrainDataset, derive_seed
from ..data.prepare import prepare_dataset as prepare
from ..errors import TrainingError, ZTurboError
from ..models import resolve_model_dir

_control: Any = None  # a gloo group for host-side agreement when the training group is NCCL


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Ranks":
        """The ranks torchrun (or any launcher using its variables) gave this process."""
        env = os.environ if env is None else env
        world = _env_int(env, "WORLD_SIZE", 1)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
        ranks = cls(_env_int(env, "RANK", 0), world, _env_int(env, "LOCAL_RANK", 0), local_world)
        if not (0 <= ranks.rank < world and 0 <= ranks.local_rank < local_world):
            raise TrainingError(
                f"RANK={ranks.rank} / LOCAL_RANK={ranks.local_rank} do not fit WORLD_SIZE={world} / "
                f"LOCAL_WORLD_SIZE={local_world}; start the run with torchrun, which sets them"
            )
        return ranks


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise TrainingError(f"{name}={value!r} is not a number; start the run with torchrun, which sets it") from None


# ------------------------------------------------------------------------------ the process group


@contextmanager
def launched() -> Iterator[Ranks]:
    """Join the process group for the run when torchrun started several processes, and leave it after.

    A failure is labelled with the rank and written to torchrun's error file, so its summary
    names the rank that failed and why; the group is then left to the exiting process.
    """
    ranks = Ranks.from_env()
    if not ranks.parallel:
        yield ranks
        return
    owned = not torch.distributed.is_initialized()  # a caller's own group is used, and left to it
    _join(ranks, owned)
    try:
        yield ranks
    except Exception as exc:
        failure = _labelled(exc, ranks)
        _record_for_torchrun(failure)
        if failure is exc:
            raise
        raise failure from None
    _leave(owned)


def _join(ranks: Ranks, init: bool) -> None:
    global _control
    dist = torch.distributed
    if init and torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"LOCAL_RANK {ranks.local_rank} has no GPU: {torch.cuda.device_count()} are visible; "
                f"start torchrun with --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", ranks.local_rank))
    elif init:
        dist.init_process_group("gloo")
    _control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _leave(owned: bool) -> None:
    global _control
    if _control is not None:
        torch.distributed.destroy_process_group(_control)
    _control = None
    if owned:
        torch.distributed.destroy_process_group()


def _labelled(exc: Exception, ranks: Ranks) -> Exception:
    """Our errors carry `rank N:`; a backend error (NCCL's, when a peer left) says what it means. gloo reports
    a peer that left as a RuntimeError that already says so ("Connection closed by peer")."""
    if isinstance(exc, ZTurboError):
        if not str(exc).startswith("rank "):
            exc.args = (f"rank {ranks.rank}: {exc}",)
        return exc
    if isinstance(exc, torch.distributed.DistError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return TrainingError(
            f"rank {ranks.rank} stopped: another rank failed or left ({first}); its own message "
            f"is above and in torchrun's summary"
        )
    return exc


def _record_for_torchrun(exc: BaseException) -> None:
    """torchrun's summary shows this message for the rank instead of 'error_file: <N/A>'."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


# ------------------------------------------------------------------------------ agreement


def _gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value, group=_control)
    return out


def _check(ranks: Ranks, error: BaseException | None, what: str) -> None:
    """Tell every rank whether this one failed; a rank that did not fail raises the first failure's message."""
    messages = _gather(
        None if error is None else str(error) if isinstance(error, ZTurboError) else f"{type(error).__name__}: {error}"
    )
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed and error is None:
        rank, message = failed[0]
        raise TrainingError(f"rank {ranks.rank} stopped while {what}: rank {rank} failed: {message}")


@contextmanager
def phase(ranks: Ranks, what: str) -> Iterator[None]:
    """A setup phase every rank runs; if it fails on any rank, all ranks stop with that rank's message."""
    if not ranks.parallel:
        yield
        return
    try:
        yield
    except Exception as exc:
        _check(ranks, exc, what)
        raise
    _check(ranks, None, what)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a stop request), so all ranks stop at the same step."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=_control)
    return bool(value.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (logged losses: every rank logs, and checks for NaN, the same value)."""
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


# ------------------------------------------------------------------------------ data and caches


def prepare_dataset(cfg: Config, device: torch.device, ranks: Ranks, console, scanned: Any = None) -> TrainDataset:
    """The dataset for this rank: the ranks of a node fill the caches in shares, wait, then read them all."""
    if not ranks.parallel:
        return prepare(cfg, device, console=console, scanned=scanned)
    with phase(ranks, "finding the model"):
        if ranks.local_rank == 0:  # builds builtin:tiny once per node instead of once per rank
            resolve_model_dir(cfg.model.path)
    waited = False

    def wait() -> None:
        nonlocal waited
        waited = True
        _check(ranks, None, "caching")

    try:
        return prepare(
            cfg,
            device,
            console=console,
            share=(ranks.local_rank, ranks.local_world),
            wait=wait,
            rank=(ranks.rank, ranks.world),
            scanned=scanned,
        )
    except Exception as exc:
        if not waited:
            _check(ranks, exc, "caching")
        raise


def batch_line(train: TrainConfig, ranks: Ranks, device: torch.device) -> str:
    """The effective batch, said once at the start: batch_size stays per rank."""
    return (
        f"data parallel: {ranks.world} ranks ({torch.distributed.get_backend()}, {device.type}) x batch_size "
        f"{train.batch_size} x "
        f"grad_accum {train.grad_accum} = {ranks.world * train.batch_size * train.grad_accum} samples per step"
    )


# ------------------------------------------------------------------------------ DDP


class LoraModel(nn.Module):
    """The frozen transformer and the LoRA hooked onto it, as one module DDP can wrap.

    The LoRA's parameters live in `network`, not in the transformer, and reach the output
    through forward hooks; DDP is told to ignore everything under `transformer`, so only
    the LoRA is broadcast at the start and all-reduced in backward.
    """

    def __init__(self, transformer: nn.Module, network: nn.Module, forward: Callable):
        super().__init__()
        self.transformer = transformer
        self.network = network
        object.__setattr__(self, "run", forward)  # the step's forward (flow.predict or a compiled one), unregistered

    def forward(self, latents: torch.Tensor, t: torch.Tensor, embeds: list) -> torch.Tensor:
        return self.run(self.transformer, latents, t, embeds)

    def frozen_names(self) -> list[str]:
        names = [name for name, _ in self.named_parameters()] + [name for name, _ in self.named_buffers()]
        return [name for name in names if not name.startswith("network.")]


class SyncedForward:
    """TrainStep's model_forward under DDP: the all-reduce runs on the last micro-batch of each step only.

    `grad_accum` counts forwards with gradient per step: micro-batches x TrainStep.grad_forwards (DOP: 2).

    DDP decides in forward whether backward reduces, so the k-th forward with gradients of
    each `grad_accum` group runs normally and the ones before it under `no_sync()`.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, grad_accum: int):
        self.ddp, self.grad_accum, self.calls = ddp, grad_accum, 0

    def __call__(self, transformer: nn.Module, latents: torch.Tensor, t: torch.Tensor, embeds: list) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.ddp.module(latents, t, embeds)
        self.calls += 1
        if self.calls % self.grad_accum == 0:
            return self.ddp(latents, t, embeds)
        with self.ddp.no_sync():
            return self.ddp(latents, t, embeds)


def data_parallel(session: Any, ranks: Ranks) -> None:
    """Wrap the session's step in DDP over the LoRA (after resume: rank 0's LoRA is broadcast), and give
    ranks > 0 their own global RNG stream (used only by lora.dropout)."""
    if not ranks.parallel:
        return

    step = session.step
    model = LoraModel(session.transformer, session.network, step.forward)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, model.frozen_names())
    device_ids = [session.device.index] if session.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)  # no buffers left to sync
    step.forward = SyncedForward(ddp, session.cfg.train.grad_accum * step.grad_forwards)
    if not ranks.is_main:
        torch.manual_seed(derive_seed("rank", session.cfg.train.seed, ranks.rank, session.start_step))
