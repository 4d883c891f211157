"""What many test files share: the TransformerLens generation, inputs, a sensitive metric,
tolerances, error checks, model state, work counts and one plan of each kind.

The package is imported inside the functions, not at the top: conftest imports this module
before typeguard instruments the package."""

from __future__ import annotations

import importlib.metadata
from contextlib import contextmanager

import pytest
import torch
import typeguard

TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])
"""The major version of the installed TransformerLens: 2 (HookedTransformer) or 4 (TransformerBridge)."""


def make_inputs(model, batch: int = 3, seq_len: int = 7, seed: int = 0):
    """Two random token batches of the same shape (orig and new)."""
    generator = torch.Generator().manual_seed(seed)
    orig = torch.randint(100, 2000, (batch, seq_len), generator=generator)
    new = torch.randint(100, 2000, (batch, seq_len), generator=generator)
    return orig, new


def logit_diff_metric(per_prompt: bool = False):
    """A sensitive metric: logit of token 5 minus token 6 at the last position."""

    def metric(logits):
        diff = logits[:, -1, 5] - logits[:, -1, 6]
        return diff if per_prompt else diff.mean()

    return metric


def linear_metric(logits):
    """Linear in the logits: a fixed random weighting of every logit, summed."""
    weights = torch.randn(logits.shape[1:], generator=torch.Generator().manual_seed(1))
    return (logits * weights).sum()


def assert_close(actual, expected) -> None:
    """Equal to 1e-5, absolute and relative."""
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), rtol=1e-5, atol=1e-5)


def assert_close_at_scale(actual, expected) -> None:
    """Equal to 1e-5 of the values' scale (their largest magnitude, at least 1): two float32
    computations that sum in another order (a naive reference, a product over fewer columns)
    differ by about 1e-6 of the largest value after SmolLM2's 30 layers, on some processors
    by more than 1e-5 of a small one."""
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@contextmanager
def raises(match: str):
    """pytest.raises(PatchingError, match=match), with the suite's run-time type checks off, so that
    wrongly typed input meets the library's own validation, as it does for users."""
    from transformer_lens_patching import PatchingError

    with typeguard.suppress_type_checks(), pytest.raises(PatchingError, match=match):
        yield


def model_state(model) -> tuple:
    """Everything a patching call must leave untouched: hooks, flags, mode, gradients, block and attention methods."""
    hooks = tuple((name, len(hp.fwd_hooks), len(hp.bwd_hooks)) for name, hp in sorted(model.hook_dict.items()))
    flags = tuple(
        getattr(model.cfg, flag, None)
        for flag in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "use_attn_in")
    )
    grads = tuple(p.grad is None for p in model.parameters())
    overridden = tuple("forward" in module.__dict__ for block in model.blocks for module in (block, block.attn))
    return hooks, flags, model.training, grads, torch.is_grad_enabled(), overridden


def sender_node(graph, node):
    """The path_patch sender of an edge-graph sender."""
    from transformer_lens_patching import Node

    if node.kind == "embed":
        return Node("resid_pre", 0)
    return Node("z", node.layer, head=node.head) if node.kind == "head" else Node("mlp_out", node.layer)


def receiver_node(graph, node):
    """The path_patch receiver of an edge-graph receiver (an MLP: every neuron's `pre`)."""
    from transformer_lens_patching import Node

    if node.kind == "logits":
        return Node("resid_post", graph.n_layers - 1)
    if node.kind == "mlp":
        return Node("pre", node.layer)  # every neuron: the whole input of a non-gated MLP
    return Node(node.input, node.layer, head=node.head)


def n_kv(model) -> int:
    """Key/value heads per layer (the heads, without grouped-query attention)."""
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def input_hook(model, receiver) -> str:
    """The hook holding a receiver's own input, named as TransformerLens names it."""
    if receiver.kind == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if receiver.kind == "mlp":
        return f"blocks.{receiver.layer}.hook_mlp_in"
    return f"blocks.{receiver.layer}.hook_{receiver.input}_input"


@contextmanager
def counted(model, batch: int):
    """Count attention and MLP evaluations in the block, per copy of a batch of `batch` prompts:
    an attention evaluation is one firing of `hook_pattern`, an MLP evaluation one of `mlp.hook_post`."""
    counts = {"attention": 0.0, "mlp": 0.0}

    def counter(kind):
        def hook(act, hook):
            counts[kind] += act.shape[0] / batch

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_pattern", counter("attention")) for layer in range(model.cfg.n_layers)]
    hooks += [(f"blocks.{layer}.mlp.hook_post", counter("mlp")) for layer in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=hooks):
        yield counts


def early_logit_diff():
    """A logit difference of make_inputs' three prompts, read at positions 4, 3 and 5: patches at
    position 6 cannot reach it."""
    from transformer_lens_patching import LogitDiff

    return LogitDiff(torch.tensor([[5, 6], [17, 3], [6, 5]]), positions=torch.tensor([4, 3, 5]))


def plans_of_each_kind(model) -> dict:
    """One PatchPlan of each kind, on make_inputs' prompts: sweeps, nodes patched together, both
    path algorithms, skipped cells."""
    from transformer_lens_patching import IterNode, Node, plan_act_patch, plan_path_patch

    orig, new = make_inputs(model)
    last = model.cfg.n_layers - 1
    ld = early_logit_diff()
    ends = [0, 1, last]
    return {
        "act sweep": plan_act_patch(
            model, orig, IterNode(["z", "resid_pre"], seq_pos="each", layers=ends), ld, new_input=new
        ),
        "act nodes": plan_act_patch(
            model, orig, [Node("z", 1, head=0), Node("mlp_out", 2)], logit_diff_metric(), new_input=new
        ),
        "act plain metric": plan_act_patch(
            model, orig, IterNode("v", layers=ends), logit_diff_metric(per_prompt=True), new_input=new
        ),
        "path two passes": plan_path_patch(model, orig, new, IterNode("z", layers=ends), Node("resid_post", last), ld),
        "path to queries": plan_path_patch(model, orig, new, IterNode("z", layers=ends), [Node("q", last, head=1)], ld),
        "path one pass": plan_path_patch(
            model,
            orig,
            new,
            IterNode("z", seq_pos="each", layers=ends),
            Node("v", last, head=0),
            ld,
            direct_includes_mlps=False,
        ),
        "path receivers": plan_path_patch(
            model, orig, new, Node("z", 0, head=1), IterNode(["q", "k", "pre"], layers=ends), ld
        ),
    }


def spearman_and_top10(estimate: torch.Tensor, exact: torch.Tensor) -> tuple[float, int]:
    """The rank correlation of `estimate` with `exact`, and how many of the 10 strongest by size they share."""
    ranks = torch.stack([exact.argsort().argsort(), estimate.argsort().argsort()]).float()
    strongest = [set(values.abs().argsort(descending=True)[:10].tolist()) for values in (exact, estimate)]
    return float(torch.corrcoef(ranks)[0, 1]), len(strongest[0] & strongest[1])
