"""Scale-out of an evaluation over processes and GPUs, on :mod:`torch.distributed`.

Launch the same command under ``torchrun --nproc-per-node N``; torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` and :func:`init_distributed` joins the process group:

* one process per GPU, on ``cuda:LOCAL_RANK``, backend ``nccl``; on CPU, backend ``gloo``;
* each rank takes the videos ``rank::world_size`` (round-robin over the benchmark's videos,
  in file order) and appends its answers to its own shard file;
* at the end the ranks exchange their failure lists with ``all_gather_object`` (which is
  also the point where every rank has finished writing), and rank 0 merges the shards into
  the one results file and writes the summary.

Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and everything
runs in the one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hermes_policy import options
from hermes_policy.errors import HermesError

T = TypeVar("T")

# Ranks that finish early wait in a collective for the slowest one; with NCCL's default
# 10-minute timeout a long benchmark would be killed there. $HERMES_EVAL_DIST_TIMEOUT_S
# overrides it (hermes_policy.options.distributed_timeout_s).
DEFAULT_TIMEOUT_S = 24 * 3600


class DistributedError(HermesError):
    """The process group cannot be set up as asked."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: ``items[rank::world_size]``."""
        return list(items[self.rank :: self.world_size])


def _env_int(name: str, default: int) -> int:
    value = options.variable(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name} must be an integer, got {value!r}") from None


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local_rank


def resolve_device(device: str | None) -> torch.device:
    """The device of this process.

    Alone: ``device`` as given (default ``cuda`` when available, else ``cpu``). Under
    torchrun: any CUDA request (or no request, when CUDA is available) becomes
    ``cuda:LOCAL_RANK``, one GPU per process; ``cpu`` stays ``cpu``.
    """
    from hermes_policy.models.loading import resolve_device as check_device

    _, world, local_rank = env_world()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return check_device(device)  # an unknown device or a missing GPU is a one-line error
    wanted = check_device(device) if not str(device).startswith("cuda") else torch.device("cuda")
    if wanted.type != "cuda":
        return wanted
    if not torch.cuda.is_available():
        raise DistributedError("--device asks for CUDA but no GPU is visible")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
            "start at most one process per GPU"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout_s: float | None = None) -> DistContext:
    """Join torchrun's process group (nccl for CUDA devices, gloo otherwise).

    Returns the single-process context when ``WORLD_SIZE`` is unset or 1, and the existing
    group's context when one is already initialised.
    """
    rank, world, local_rank = env_world()
    if world == 1:
        return DistContext()
    if dist.is_initialized():
        return current()
    if timeout_s is None:
        timeout_s = options.distributed_timeout_s(DEFAULT_TIMEOUT_S)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local_rank, backend, owns_group=True)


def current() -> DistContext:
    """The context of an already initialised process group (single process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    _, _, local_rank = env_world()
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; a synchronisation point."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
