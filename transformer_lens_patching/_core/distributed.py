"""Sharding work over the processes of a `torch.distributed` process group.

Under `torchrun --nproc-per-node N` (or once the caller has run
`torch.distributed.init_process_group`), each call splits its work across the ranks: a
plan's blocks (`PatchPlan.shard`), attribution's chunks of prompts. Each rank runs its
part, the parts are gathered with `all_gather_object` (gloo on CPUs, NCCL on GPUs: the
group's own backend), and every rank assembles the same result. Without a group, or
with a group of one process, nothing changes.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .. import _tl
from ..errors import PatchingError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group."""

    rank: int
    world_size: int

    def mine(self, items: Sequence[T]) -> list[T]:
        """The items this rank takes when `items` are dealt out in turn."""
        return list(items[self.rank :: self.world_size])


def current_ranks() -> Ranks | None:
    """The default process group's rank and size, or None without one (or with one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size()
    return None if world_size < 2 else Ranks(dist.get_rank(), world_size)


@contextmanager
def launched_group(device: str) -> Iterator[tuple[Ranks | None, str]]:
    """Within: the process group `torchrun` launched this process into (its environment names
    a world of several processes), joined with gloo on the CPU or NCCL on CUDA, and the
    device this rank uses (`cuda` becomes `cuda:<LOCAL_RANK>`); left when done. Without a
    launcher, (None, device). A group the caller already started is used as it is.

    >>> with launched_group("cpu") as (ranks, device):  # doctest: +SKIP
    ...     result = act_patch(model.to(device), ...)
    """
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not dist.is_available() or dist.is_initialized():
        yield current_ranks(), device
        return
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        yield current_ranks(), device
    finally:
        dist.destroy_process_group()


def gather(local: object, ranks: Ranks, device: torch.device | None = None) -> list:
    """Every rank's `local`, in rank order, on every rank. Tensors travel on the CPU and
    come back on `device` (default: the CPU)."""
    parts: list = [None] * ranks.world_size
    dist.all_gather_object(parts, _tl.moved_all(local, torch.device("cpu"), detach=True))
    return parts if device is None or device.type == "cpu" else [_tl.moved_all(part, device) for part in parts]


def check_same(what: str, fingerprint: object, ranks: Ranks) -> None:
    """Raise a PatchingError unless every rank gives the same `fingerprint` of `what`: ranks
    must make the same call for their parts to assemble."""
    fingerprints = gather(fingerprint, ranks)
    differing = [rank for rank, theirs in enumerate(fingerprints) if theirs != fingerprints[0]]
    if differing:
        raise PatchingError(
            f"Under torch.distributed every rank must make the same call, but rank {differing[0]} of "
            f"{ranks.world_size} built a different {what} than rank 0 (e.g. other inputs, nodes or settings). "
            "Give every rank the same arguments, or shard by hand with plan.shard(index, count)."
        )

