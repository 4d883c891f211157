"""Ranks that fail, for tests/properties/test_distributed_failures.py: two processes started as torchrun
starts them (MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set), each running

    python -m tests.properties.distributed_failures CASE OUT

Every rank joins the gloo group and makes the same calls; in CASE one rank fails partway (its
metric raises, it is killed, it hangs, it is interrupted, it passes other inputs, it raises while
planning, or it fails early while the other rank has a long share). Each rank writes
OUT/rank<r>.json as soon as its failing call has ended: the error it raised (type and message),
the seconds from the call's start, and whether any hook was left on its model. Where the group
survives, both ranks then make one more call, whose result must equal the one made before the
failure, and the file gets it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers import make_inputs, model_state
from tests.oracles import models
from transformer_lens_patching import IterNode, LogitDiff, act_patch, attr_patch, plan_act_patch, set_rank_timeout

FAILING_RANK = 1
STAYS_ALIVE = 3.0
"""Seconds the failing rank lives on after its error, as a caller that catches it would."""
RANK_TIMEOUT = 10.0
"""The rank timeout the workers set: a hung rank is given up on after this long."""


SLOW = 1.0
"""Seconds each metric call takes on the other rank in "early-failure-long-share": its share
(16 blocks) would outlast the rank timeout were it not stopped."""


class FailingMetric:
    """A logit difference that, on `rank`, raises at its `at`-th call once armed (or kills,
    hangs or interrupts its process there); with `slow`, the other ranks take SLOW seconds a call."""

    def __init__(self, rank: int, at: int, how: str = "raise", slow: bool = False):
        self.metric = LogitDiff(torch.tensor([[5, 6], [17, 3], [6, 5]]))
        self.rank, self.at, self.how, self.slow, self.calls, self.armed = rank, at, how, slow, 0, False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.armed and dist.get_rank() == self.rank:
            self.calls += 1
            if self.calls == self.at:
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.how == "hang":
                    time.sleep(3600)
                if self.how == "interrupt":
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1.0)
                raise RuntimeError(f"metric failed on purpose at call {self.at}")
        time.sleep(SLOW if self.armed and self.slow and dist.get_rank() != self.rank else 0.05)
        return self.metric(logits)


def sweep(model, metric, orig, new, nodes=None, batch_size=2):
    """act_patch of every head's z (or `nodes`), two variants a pass: several blocks, dealt out to the ranks."""
    plan = plan_act_patch(model, orig, nodes or IterNode("z"), metric, new_input=new, batch_size=batch_size)
    metric.armed = True
    return plan.compute()


def failing_rank(case: str) -> int:
    """The rank that fails in `case`."""
    return 0 if case == "early-failure-long-share" else FAILING_RANK


def failing_call(case: str, model, orig, new):
    """The call in which a rank fails, for `case`."""
    failing = failing_rank(case)
    if case == "raise-gradient":
        metric = FailingMetric(failing, at=1)
        metric.armed = True
        return attr_patch(model, orig, IterNode("z"), metric, new_input=new, max_memory=1)
    if case == "other-inputs":
        other = new.flip(0) if dist.get_rank() == failing else new
        return sweep(model, FailingMetric(failing, at=0), orig, other)
    if case == "raise-while-planning":
        heads = [0, 1, 2, 99] if dist.get_rank() == failing else None
        return act_patch(model, orig, IterNode("z", heads=heads), LogitDiff(torch.tensor([[5, 6]] * 3)), new_input=new)
    if case == "early-failure-long-share":
        nodes = IterNode(["z", "q", "k", "v"])
        return sweep(model, FailingMetric(failing, at=1, slow=True), orig, new, nodes, batch_size=1)
    at = {"raise-first": 1, "raise-later": 3, "killed": 3, "hung": 3, "interrupted": 3}[case]
    how = {"killed": "kill", "hung": "hang", "interrupted": "interrupt"}.get(case, "raise")
    return sweep(model, FailingMetric(failing, at=at, how=how), orig, new)


def main(case: str, out: str) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
    dist.init_process_group("gloo")
    set_rank_timeout(RANK_TIMEOUT)
    rank = dist.get_rank()
    model = models.gpt2_like(n_layers=2)
    orig, new = make_inputs(model)
    before_state = model_state(model)
    good = sweep(model, FailingMetric(FAILING_RANK, at=0), orig, new)["z"].as_tensor()
    began = time.time()
    report: dict = {"rank": rank, "failing_rank": failing_rank(case)}
    try:
        failing_call(case, model, orig, new)
        report["error"] = None
    except BaseException as error:  # noqa: BLE001 - KeyboardInterrupt too: it is what the case checks
        notes = "\n".join(getattr(error, "__notes__", []))
        report["error"] = {"type": type(error).__name__, "message": str(error), "notes": notes}
    report["seconds"] = time.time() - began
    report["hooks_left"] = model_state(model) != before_state
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    if case in ("killed", "hung"):
        return
    if rank == failing_rank(case):
        time.sleep(STAYS_ALIVE)
    again = sweep(model, FailingMetric(FAILING_RANK, at=0), orig, new)["z"].as_tensor()
    report["following_call_equal"] = bool(torch.equal(again, good))
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
