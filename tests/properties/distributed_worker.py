"""The calls that tests/properties/test_distributed.py makes under `torchrun` and in one process.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.properties.distributed_worker OUT

Each rank joins the gloo group, makes every call of `calls(model)` on both random models
and saves its results to OUT/rank<r>.pt; a call that raises is saved as its message.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers import early_logit_diff, make_inputs, plans_of_each_kind
from tests.oracles import models
from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    IterNode,
    PatchingError,
    act_patch,
    attr_edges,
    attr_patch,
    evaluate_circuit,
    faithfulness_curve,
)

ONE_PROMPT_A_CHUNK = 1
"""max_memory of one byte: attribution runs one prompt per chunk, in one process as across ranks."""


def calls(model) -> dict:
    """Name -> zero-argument call, for every engine that shards: plans of each kind,
    circuits, and attribution (whose ranks share the chunks of prompts)."""
    orig, new = make_inputs(model)
    metric = early_logit_diff()
    graph = EdgeGraph.of(model)
    masks = torch.rand(4, len(graph), generator=torch.Generator().manual_seed(3)) < 0.5
    circuits = [Circuit.from_mask(graph, mask) for mask in masks]
    made = {f"plan: {name}": plan.compute for name, plan in plans_of_each_kind(model).items()}
    return {
        **made,
        "act_patch z": lambda: act_patch(model, orig, IterNode("z"), metric, new_input=new),
        "evaluate_circuit": lambda: evaluate_circuit(model, circuits, orig, metric, new_input=new, batch_size=1),
        "faithfulness_curve": lambda: (
            faithfulness_curve(
                model, attr_edges(model, orig, metric, new_input=new), orig, metric, new_input=new, sizes=[0.1, 0.5]
            ).values
        ),
        "attr_patch chunked": lambda: attr_patch(
            model, orig, IterNode(["z", "mlp_out"]), metric, new_input=new, max_memory=ONE_PROMPT_A_CHUNK
        ),
        "attr_edges ig chunked": lambda: attr_edges(
            model, orig, metric, new_input=new, method="ig", steps=2, max_memory=ONE_PROMPT_A_CHUNK
        ),
        "attr_patch": lambda: attr_patch(model, orig, IterNode("z"), metric, new_input=new),
    }


def plain(result) -> object:
    """A result as plain tensors: PatchResults and EdgeScores as their tensors, dicts by key."""
    if isinstance(result, dict):
        return {key: plain(value) for key, value in result.items()}
    if hasattr(result, "scores"):
        return result.scores
    if hasattr(result, "as_tensor"):
        return result.as_tensor()
    return torch.as_tensor(result)


def results() -> dict:
    """Every call on the GPT-2-like and the grouped-query model."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, model in (("gpt2", models.gpt2_like()), ("gqa", models.llama_gqa())):
            for name, call in calls(model).items():
                out[f"{label} {name}"] = plain(call())
    return out


def passes_per_rank() -> dict[str, int]:
    """Forward passes of the prompts this rank runs: for 4 circuits evaluated one per pass (4 in one
    process), and for attribution over 3 prompts one per chunk (3 passes for the logits and 3 with
    gradients in one process). The probes of what the model's architecture calls (once per model,
    one or two tokens) are not passes of the prompts."""
    model = models.gpt2_like(n_layers=2)
    orig, new = make_inputs(model)
    graph, metric = EdgeGraph.of(model), early_logit_diff()
    counted = {
        "circuits": lambda: evaluate_circuit(
            model, [Circuit.full(graph)] * 4, orig, metric, new_input=new, batch_size=1
        ),
        "attribution": lambda: attr_patch(
            model, orig, IterNode("z"), metric, new_input=new, max_memory=ONE_PROMPT_A_CHUNK
        ),
    }
    passes = {}
    for name, call in counted.items():
        seen = []
        with model.hooks(
            fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook, seen=seen: seen.append(act.shape[1]))]
        ):
            call()
        passes[name] = seen.count(orig.shape[1])
    return passes


def mismatched(rank: int) -> str:
    """The error when ranks make different calls (rank 1 patches other layers)."""
    model = models.gpt2_like(n_layers=2)
    orig, new = make_inputs(model)
    try:
        act_patch(model, orig, IterNode("z", layers=[rank % 2]), early_logit_diff(), new_input=new)
    except PatchingError as error:
        return str(error)
    return "no error"


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    saved = {
        "world_size": dist.get_world_size(),
        "results": results(),
        "mismatched": mismatched(rank),
        "passes": passes_per_rank(),
    }
    torch.save(saved, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
