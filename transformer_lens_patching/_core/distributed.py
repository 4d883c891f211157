"""Sharding work over the processes of a `torch.distributed` process group.

Under `torchrun --nproc-per-node N` (or once the caller has run
`torch.distributed.init_process_group`), each call splits its work across the ranks: a
plan's blocks (`PatchPlan.shard`), attribution's chunks of prompts. Each rank runs its
part, the parts are gathered with `all_gather_object` (gloo on CPUs, NCCL on GPUs: the
group's own backend), and every rank assembles the same result. Without a group, or
with a group of one process, nothing changes.

Ranks meet only in `exchange`, within a bounded time (`set_rank_timeout`): the check that
they make the same call (`check_same`) and the agreement after each rank's share of the work
(`agreed`), which every rank reaches whether its share succeeded or raised. Results move only
once every rank has said its share succeeded; otherwise every rank raises an error that names
the failing ranks. A rank that never arrives (killed, out of memory, hung) makes the others
fail within the timeout with an error that says a rank was lost.
"""

import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .. import _tl
from ..errors import PatchingError

T = TypeVar("T")

DEFAULT_RANK_TIMEOUT = 300.0
"""Seconds a rank waits at a meeting point for the others (5 minutes): work is dealt out in turn,
so healthy ranks arrive within about one block of each other."""
_settings = {"timeout": DEFAULT_RANK_TIMEOUT}
_meetings = {"world": None, "groups": {}, "held": 0, "sharing": 0}
"""The process group the meeting state belongs to, its gloo meeting groups by timeout, how many
meetings this rank has held in it (the same count on every rank: they meet in step), and how
deeply this rank is inside shares of work."""
_ON_EVERY_RANK = "_tlp_raised_on_every_rank"
"""Set on an exception that every rank has raised together: the meetings above it are skipped."""


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


def set_rank_timeout(seconds: float) -> float:
    """Set how long a rank waits for the others where ranks meet under torch.distributed (the
    default is 300 s), and return the previous setting.

    Ranks meet at the start of each sharded call (to check they make the same call) and after
    each rank's share of the work (to agree that every share succeeded). A rank that has not
    arrived within `seconds` (killed, out of memory, hung) makes every other rank raise a
    `PatchingError` saying a rank was lost, instead of waiting for the backend's own timeout
    (30 minutes). Every rank must set the same value, before the call; raise it where ranks
    can fall further behind each other than that (very uneven devices).

    >>> previous = set_rank_timeout(60)
    >>> set_rank_timeout(previous)
    60.0
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise PatchingError(f"The rank timeout must be a positive number of seconds, got {seconds!r}.")
    previous, _settings["timeout"] = _settings["timeout"], float(seconds)
    return previous


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


def digest(*values: object) -> str:
    """A digest of the inputs every rank must share (token tensors, text, None): tensors by
    shape, dtype and bytes, text and numbers by their repr, anything else by its type."""
    hashed = hashlib.sha256()
    for value in values:
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            hashed.update(repr((tuple(value.shape), str(value.dtype))).encode())
            hashed.update(flat.view(torch.uint8).numpy().tobytes())
        elif value is None or isinstance(value, (str, int, float, list, tuple)):
            hashed.update(repr(value).encode())
        else:
            hashed.update(type(value).__name__.encode())
    return hashed.hexdigest()


def check_same(what: str, fingerprint: object, ranks: Ranks) -> None:
    """Raise a PatchingError unless every rank gives the same `fingerprint` of `what`: ranks
    must make the same call for their parts to assemble."""
    fingerprints = exchange(fingerprint, ranks, f"the start of a {what}")
    differing = [rank for rank, theirs in enumerate(fingerprints) if theirs != fingerprints[0]]
    if differing:
        raise _on_every_rank(
            PatchingError(
                f"Under torch.distributed every rank must make the same call, but rank {differing[0]} of "
                f"{ranks.world_size} built a different {what} than rank 0 (e.g. other inputs, nodes or settings). "
                "Give every rank the same arguments, or shard by hand with plan.shard(index, count)."
            )
        )


def shared_by_ranks(function: Callable[..., T]) -> Callable[..., T]:
    """`function` made to end the same way on every rank under torch.distributed: whatever it
    raises on one rank (its front half, a metric, an assembly) is told to the others at its
    end (`agreed`), so no rank is left waiting at a later meeting."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        with agreed(current_ranks(), function.__name__):
            return function(*args, **kwargs)

    return call


@contextmanager
def agreed(ranks: Ranks | None, what: str) -> Iterator[None]:
    """Within: this rank's share of `what`. On leaving, whether the share succeeded or raised,
    every rank tells every other its outcome; if any rank failed, the ranks that succeeded raise
    a PatchingError naming the failing ranks and their errors, and each failing rank re-raises
    its own exception with that note added. A failing rank also announces its failure at once
    (in the process group's store), so that the others stop their shares at their next block
    (`stop_if_another_failed`) instead of finishing them. Without ranks, nothing is exchanged."""
    if ranks is None:
        yield
        return
    _meetings["sharing"] += 1
    try:
        yield
    except _StoppedForOthers:
        failures = _failures(exchange(None, ranks, f"the end of {what}"), ranks, what)
        raise _on_every_rank(PatchingError(_stopped_message(failures, ranks))) from None
    except BaseException as error:
        if not getattr(error, _ON_EVERY_RANK, False):
            _announce(ranks, error)
            _add_note(error, _told_the_others(error, ranks, what))
            _on_every_rank(error)
        raise
    finally:
        _meetings["sharing"] -= 1
    failures = _failures(exchange(None, ranks, f"the end of {what}"), ranks, what)
    if failures:
        raise _on_every_rank(PatchingError(_stopped_message(failures, ranks)))


class _StoppedForOthers(Exception):
    """Raised within a rank's share when another rank has announced that its share failed."""


def stop_if_another_failed() -> None:
    """Between two blocks of a rank's share: stop (raise) if another rank has announced that its
    share failed since the ranks last met; the failure is then agreed on at the share's end."""
    if not _meetings["sharing"] or current_ranks() is None:
        return
    store = _store()
    try:
        announced = store is not None and store.check([_announcement_key()])
    except RuntimeError:
        return  # the store is gone with its rank: the next meeting says so
    if announced:
        raise _StoppedForOthers()


def _announce(ranks: Ranks, error: BaseException) -> None:
    """Tell the other ranks, through the store, that this rank's share failed."""
    store = _store()
    if store is not None:
        with suppress(RuntimeError):  # the store is gone with its rank: the meeting says so
            store.set(_announcement_key(), f"rank {ranks.rank}: {_described(error)}")


def _store():
    """The default process group's key-value store (where torchrun's rendezvous keeps its keys),
    or None where this torch has no such accessor."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    return None if getter is None else getter()


def _announcement_key() -> str:
    _check_world()
    return f"transformer_lens_patching/failed_before_meeting_{_meetings['held']}"


def _stopped_message(failures: str, ranks: Ranks) -> str:
    return f"{failures} This rank (rank {ranks.rank}) stopped too. The failing rank's own traceback is in its log."


def _told_the_others(error: BaseException, ranks: Ranks, what: str) -> str:
    """Tell the other ranks of this rank's `error` at the end of `what`; the note that says what
    came of it."""
    try:
        outcomes = exchange(_described(error), ranks, f"the end of {what}")
    except PatchingError as lost:
        return str(lost)
    return f"{_failures(outcomes, ranks, what)} Every rank was told and stopped."


def exchange(mine: object, ranks: Ranks, where: str) -> list:
    """Every rank's `mine` (small and picklable), in rank order, within the rank timeout: a
    monitored barrier first (which names a rank that does not arrive), then the values, on a
    gloo group of its own whose operations all end within the timeout. `where` names the
    meeting point: ranks that meet at different points raise a PatchingError saying where each
    was, and a lost rank's error says where it was awaited."""
    timeout = _settings["timeout"]
    try:
        group = _meeting_group(timeout)
        dist.monitored_barrier(group, timeout=timedelta(seconds=timeout))
        everyones: list = [None] * ranks.world_size
        dist.all_gather_object(everyones, (where, mine), group=group)
    except RuntimeError as error:
        raise _on_every_rank(PatchingError(_lost_message(error, ranks, where, timeout))) from error
    _meetings["held"] += 1
    places = [place for place, _ in everyones]
    if len(set(places)) > 1:
        seen = "; ".join(
            f"rank {rank} at {place}" + (f" ({value})" if isinstance(value, str) else "")
            for rank, (place, value) in enumerate(everyones)
        )
        raise _on_every_rank(
            PatchingError(
                f"Under torch.distributed the ranks met at different points ({seen}): a rank raised before a meeting "
                "the others reached, or the ranks made different calls. Every rank stopped; the failing rank's own "
                "traceback is in its log."
            )
        )
    return [value for _, value in everyones]


def _on_every_rank(error: BaseException) -> BaseException:
    """Mark `error` as raised on every rank alike (so no rank meets the others about it again)."""
    setattr(error, _ON_EVERY_RANK, True)
    return error


def _meeting_group(timeout: float):
    """A gloo group of every rank for the meetings, made (by every rank at the same meeting) with
    `timeout` for all of its operations, once per default process group and timeout."""
    _check_world()
    groups = _meetings["groups"]
    if timeout not in groups:
        groups[timeout] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return groups[timeout]


def _check_world() -> None:
    """Start the meeting state afresh when the default process group is a new one."""
    if _meetings["world"] is not dist.group.WORLD:
        _meetings.update(world=dist.group.WORLD, groups={}, held=0)


def _lost_message(error: RuntimeError, ranks: Ranks, where: str, timeout: float) -> str:
    missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
    others = [str(rank) for rank in range(ranks.world_size) if rank != ranks.rank]
    lost = missing.group(1).strip().split(", ") if missing else others if len(others) == 1 else []
    who = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(lost)}" if lost else "another rank"
    return (
        f"A rank was lost under torch.distributed: rank {ranks.rank} of {ranks.world_size} waited for the others "
        f"at {where}, and {who} did not arrive within {timeout:g} s or closed its connection (it died, "
        f"was killed, ran out of memory or hangs). Its own log says why; this process group cannot be used "
        f"again. (The backend said: {_first_line(error)})"
    )


def _failures(outcomes: list, ranks: Ranks, what: str) -> str:
    """The sentence naming each failing rank and its error, or "" when none failed."""
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return ""
    listed = "; ".join(f"rank {rank}: {outcome}" for rank, outcome in failed)
    count = f"{len(failed)} of {ranks.world_size} ranks"
    return f"Under torch.distributed, {count} failed in their share of {what} ({listed})."


def _described(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    line = _first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def _add_note(error: BaseException, note: str) -> None:
    """Add `note` to the exception's report (Python 3.11+; older Pythons show the exception alone)."""
    add_note: Callable[[str], None] | None = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(note)
