"""A failing rank never hangs the others: two gloo ranks (tests/properties/distributed_failures.py), one of
which fails partway through a sharded call, and every rank ends within a bounded time with an
error that names the failure; where the process group survives, the next call works."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.helpers import TL_MAJOR
from tests.properties import distributed_failures

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo"),
    pytest.mark.skipif(TL_MAJOR >= 4, reason="the ranks' failures are checked once, on TransformerLens 2"),
]

ROOT = Path(__file__).resolve().parents[2]
FAILING = distributed_failures.FAILING_RANK
QUICK = 5.0
"""Seconds within which a rank must end once another has failed early: well under the 10 s rank
timeout and the 16 s that the other rank's share would take."""
BOUND = 60.0
"""Seconds within which every rank must have ended its failing call (the rank timeout is 10 s)."""
LINGER = 30.0
"""Seconds a rank may run on once the other has exited; then it is killed (a hung rank at once)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_ranks(case: str, out: Path) -> dict[int, dict]:
    """Run `case` on two ranks started as torchrun starts them; each rank's report."""
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
        }
        command = [sys.executable, "-m", "tests.properties.distributed_failures", case, str(out)]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    began = time.time()
    first_exit = None
    while any(process.poll() is None for process in processes) and time.time() - began < 300:
        if first_exit is None and any(process.poll() is not None for process in processes):
            first_exit = time.time()
        if first_exit is not None and time.time() - first_exit > (0 if case == "hung" else LINGER):
            break
        time.sleep(0.2)
    for process in processes:
        if process.poll() is None:
            process.kill()
    logs = [process.communicate()[0].decode(errors="replace") for process in processes]
    reports = {}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        if path.exists():
            reports[rank] = json.loads(path.read_text())
    assert reports, "\n".join(log[-3000:] for log in logs)
    return reports


def assert_every_rank_told(reports: dict[int, dict], failure: str, within: float = BOUND) -> None:
    """The failing rank raised its own error, with a note naming the failure; the other raised a
    PatchingError naming the failing rank and its error; both within `within` seconds, leaving
    no hook; the next call works."""
    failing = reports[0]["failing_rank"]
    own, other = reports[failing], reports[1 - failing]
    assert failure in own["error"]["type"] + ": " + own["error"]["message"], own
    assert f"rank {failing}: {failure}" in own["error"]["notes"], own
    assert other["error"]["type"] == "PatchingError", other
    assert "1 of 2 ranks failed in their share of" in other["error"]["message"], other
    assert f"rank {failing}: {failure}" in other["error"]["message"], other
    for report in reports.values():
        assert report["seconds"] < within and not report["hooks_left"], report
        assert report["following_call_equal"] is True, report


@pytest.mark.parametrize("case", ["raise-first", "raise-later"])
def test_a_metric_raising_on_one_rank_stops_every_rank(case, tmp_path):
    reports = two_ranks(case, tmp_path)
    assert_every_rank_told(reports, "RuntimeError: metric failed on purpose")
    assert "act_patch" in reports[1 - FAILING]["error"]["message"]


def test_a_gradient_pass_failing_on_one_rank_stops_every_rank(tmp_path):
    reports = two_ranks("raise-gradient", tmp_path)
    assert_every_rank_told(reports, "RuntimeError: metric failed on purpose")


def test_an_early_failure_stops_the_others_shares(tmp_path):
    """Rank 0 fails at once while rank 1's share would take 16 s (longer than the 10 s rank
    timeout): rank 1 stops at its next block, and neither rank mistakes the other for lost."""
    reports = two_ranks("early-failure-long-share", tmp_path)
    assert_every_rank_told(reports, "RuntimeError: metric failed on purpose", within=QUICK)
    assert "was lost" not in reports[0]["error"]["notes"] + reports[1]["error"]["message"]


def test_a_rank_raising_while_planning_stops_every_rank(tmp_path):
    """A rank whose call fails before its plan exists (a head out of range on rank 1 only) meets
    the others at another point: every rank says where each was and what failed."""
    reports = two_ranks("raise-while-planning", tmp_path)
    own, other = reports[FAILING], reports[1 - FAILING]
    assert own["error"]["type"] == "PatchingError" and "out of range" in own["error"]["message"], own
    assert "met at different points" in own["error"]["notes"], own
    assert other["error"]["type"] == "PatchingError", other
    assert (
        "met at different points (rank 0 at the start of a plan; rank 1 at the end of act_patch"
        in other["error"]["message"]
        and "out of range" in other["error"]["message"]
    ), other
    for report in reports.values():
        assert report["seconds"] < BOUND and not report["hooks_left"] and report["following_call_equal"], report


def test_an_interrupted_rank_stops_every_rank(tmp_path):
    """Ctrl-C on one rank: it raises KeyboardInterrupt, the other is told, no hook is left."""
    reports = two_ranks("interrupted", tmp_path)
    assert_every_rank_told(reports, "KeyboardInterrupt")


def test_ranks_with_other_inputs_are_told_on_every_rank(tmp_path):
    """A rank whose new input differs in content only (same shape) is found before any pass."""
    reports = two_ranks("other-inputs", tmp_path)
    for report in reports.values():
        assert report["error"]["type"] == "PatchingError", report
        assert (
            "every rank must make the same call, but rank 1 of 2 built a different plan" in report["error"]["message"]
        )
        assert report["seconds"] < BOUND and not report["hooks_left"] and report["following_call_equal"], report


@pytest.mark.parametrize("case", ["killed", "hung"])
def test_a_lost_rank_makes_the_others_fail_within_the_timeout(case, tmp_path):
    """A rank killed mid-sweep (its connection closes) or hung (it never arrives): the other
    says a rank was lost, names it, and ends within the rank timeout (10 s) plus its own work."""
    reports = two_ranks(case, tmp_path)
    assert FAILING not in reports
    survivor = reports[1 - FAILING]
    assert survivor["error"]["type"] == "PatchingError", survivor
    assert "A rank was lost under torch.distributed" in survivor["error"]["message"], survivor
    assert f"and rank {FAILING} did not arrive" in survivor["error"]["message"], survivor
    assert survivor["seconds"] < BOUND and not survivor["hooks_left"], survivor
