"""The support matrix's cells: what `tests/properties/test_support_matrix.py` runs on every family,
under TransformerLens 4 (TransformerBridge rows) and TransformerLens 2 (HookedTransformer rows).

Each cell takes a `Context` and returns nothing when its invariant holds; an AssertionError is a
wrong number, a `PatchingError` a refusal. Each calls the library before it computes its
reference, so that a refusal is recorded as one. Every reference is written here literally, with
hooks set by hand and gradients from autograd, never from the code under test.

A head's write to the residual stream is, everywhere below, the change of its layer's
`hook_attn_out` when only that head's `z` changes: `z` times the head's rows of W_O on pre-norm
blocks, and on post-norm blocks (Gemma-2, Gemma-3, OLMo-2), where a norm sits between the heads
and `hook_attn_out`, what that norm makes of it.
"""

from __future__ import annotations

import re
import traceback

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close_at_scale
from transformer_lens_patching import (
    Accuracy,
    AnswerLogProb,
    Circuit,
    Edge,
    EdgeGraph,
    EdgeScores,
    GraphNode,
    IterNode,
    KLDivergence,
    LogitDiff,
    LogitsAt,
    Node,
    PatchingError,
    TokenLogit,
    TokenProbability,
    _tl,
    act_patch,
    attr_edges,
    attr_patch,
    attr_path_patch,
    confirm,
    confirm_edges,
    confirm_paths,
    denoising_metric,
    evaluate_circuit,
    faithfulness_curve,
    learn_edge_masks,
    mib_faithfulness,
    path_patch,
    plan_act_patch,
    plan_circuit_evaluation,
)
from transformer_lens_patching._core.wiring import Wiring
from transformer_lens_patching._methods.common import patched_in_source, prepare_runs
from transformer_lens_patching._methods.learned_masks import MaskedCircuits

ANSWERS = torch.tensor([[5, 6], [17, 3], [6, 5]])
ORIG = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
NEW = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(1))
IG_STEPS = 3
"""The integrated-gradients points of the IG and EAP-IG cells (the rule does not depend on it; from the
model's own cache, or with new_input = orig, 2 points: every point is the orig run)."""
IOI_PROMPTS = 4
"""The IOI dry run's prompts (the circuit step needs at least 2)."""


class Context:
    """What the cells share: inputs, the metric, the model's own runs (computed once) and the
    references several cells compare with (computed once, on first use)."""

    def __init__(self, model):
        self.model, self.orig, self.new = model, ORIG, NEW
        self.last = model.cfg.n_layers - 1
        self.metric = LogitDiff(ANSWERS)
        self.memo: dict = {}
        with torch.no_grad():
            _, self.cache = model.run_with_cache(ORIG)
            _, self.new_cache = model.run_with_cache(NEW)
            self.logits = model(ORIG)
            self.own = plain_logit_diff(self.logits)
            self.own_new = plain_logit_diff(model(NEW))

    def remembered(self, key, compute):
        """`compute()`, computed once per key."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


def plain_logit_diff(logits):
    """The logit difference of ANSWERS at the last position, mean over prompts, by hand."""
    return per_prompt_logit_diff(logits).mean()


def per_prompt_logit_diff(logits):
    """Each prompt's logit difference of ANSWERS at the last position, by hand."""
    rows = torch.arange(len(ANSWERS))
    return logits[rows, -1, ANSWERS[:, 0]] - logits[rows, -1, ANSWERS[:, 1]]


# References: runs with hooks set by hand.


def hooked_metric(ctx, hooks):
    """The logit difference of the orig run with `hooks` ((name, function) pairs), by hand."""
    with torch.no_grad():
        return plain_logit_diff(ctx.model.run_with_hooks(ctx.orig, fwd_hooks=list(hooks)))


def replacing(value, index=None):
    """A hook that replaces its activation by `value` (where `index` is given: only
    `activation[index]`, as a tuple of slices)."""

    def hook(activation, hook):
        if index is None:
            return value.clone()
        activation = activation.clone()
        activation[index] = value[index]
        return activation

    return hook


def replaced(ctx, name, index=None):
    """The metric of the orig run with activation `name` (its `index` only, if given) set to
    the new run's, by hand."""
    return hooked_metric(ctx, [(name, replacing(ctx.new_cache[name], index))])


def gradient(ctx, name, hooks=()):
    """The orig run's logit difference (with `hooks` applied first) and its gradient with respect
    to activation `name`, by autograd: a zero offset added at `name` is differentiated."""
    model = ctx.model
    offset = torch.zeros_like(ctx.cache[name], requires_grad=True)
    with torch.enable_grad():
        value = plain_logit_diff(model.run_with_hooks(ctx.orig, fwd_hooks=[*hooks, (name, lambda x, hook: x + offset)]))
        (grad,) = torch.autograd.grad(value, offset)
    return value.detach(), grad


def interpolated_gradient(ctx, name, at, steps):
    """The mean over k = 0 .. steps - 1 of the gradient of the logit difference with respect to
    activation `name`, in runs whose activation `at` is `a + (k / steps)(a' - a)` (a: the orig
    run's, a': the new run's)."""
    a, a_new = ctx.cache[at], ctx.new_cache[at]
    grads = []
    for k in range(steps):
        point = a + (k / steps) * (a_new - a)
        grads.append(gradient(ctx, name, [(at, replacing(point))])[1])
    return torch.stack(grads).mean(0)


def head_write(ctx, layer, head):
    """The change of head (layer, head)'s write to the residual stream when its `z` is the new
    run's, all else the orig run's: the change of `hook_attn_out` (see the module docstring)."""

    def compute():
        z_name, out_name = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
        outputs = []

        def record(out, hook):
            outputs.append(out.detach().clone())

        with torch.no_grad():
            ctx.model.run_with_hooks(ctx.orig, fwd_hooks=[(out_name, record)])
            ctx.model.run_with_hooks(
                ctx.orig,
                fwd_hooks=[
                    (z_name, replacing(ctx.new_cache[z_name], (slice(None), slice(None), head))),
                    (out_name, record),
                ],
            )
        return outputs[1] - outputs[0]

    return ctx.remembered(("write", layer, head), compute)


def write_derivative(ctx, layer, head, grad, hooks=()):
    """The first-order change of head (layer, head)'s write dotted with `grad`: d/d eps, at 0, of
    the sum of `hook_attn_out` times `grad` in the orig run (with `hooks` applied first) whose head
    z moves by eps (z_new - z_orig), by autograd. Where a norm follows attention (Gemma-2, OLMo-2)
    this is the write through the norm's Jacobian in that run; elsewhere the write change itself."""
    model = ctx.model
    z_name, out_name = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
    eps = torch.zeros((), requires_grad=True)
    change = torch.zeros_like(ctx.cache[z_name])
    change[:, :, head] = ctx.new_cache[z_name][:, :, head] - ctx.cache[z_name][:, :, head]
    outputs = []
    with torch.enable_grad():
        model.run_with_hooks(
            ctx.orig,
            fwd_hooks=[
                *hooks,
                (z_name, lambda z, hook: z + eps * change),
                (out_name, lambda o, hook: outputs.append(o)),
            ],
        )
        (derivative,) = torch.autograd.grad((outputs[0] * grad).sum(), eps)
    return derivative


def interpolation_hooks(ctx, k: int, steps: int) -> list:
    """The hooks of the k-th EAP-IG run: the residual stream entering layer 0 is x + (k / steps)(x' - x)."""
    at = "blocks.0.hook_resid_pre"
    a, a_new = ctx.cache[at], ctx.new_cache[at]
    return [(at, replacing(a + (k / steps) * (a_new - a)))]


def write_replaced(ctx, layer, head):
    """The metric of the orig run with the write of head (layer, head) to the residual stream
    replaced by its write in the new run, in the final residual stream only (the logits' input)."""

    def compute():
        delta = head_write(ctx, layer, head)
        final = f"blocks.{ctx.last}.hook_resid_post"
        return hooked_metric(ctx, [(final, lambda r, hook: r + delta)])

    return ctx.remembered(("write replaced", layer, head), compute)


def head_replaced(ctx, head):
    """The metric of the orig run with head (L-1, head)'s `z` set to the new run's, by hand."""
    name = f"blocks.{ctx.last}.attn.hook_z"
    return ctx.remembered(("head", head), lambda: replaced(ctx, name, (slice(None), slice(None), head)))


def mlps(ctx) -> list[str]:
    """["mlp_out"], or none on an attention-only model."""
    return [] if getattr(ctx.model.cfg, "attn_only", False) else ["mlp_out"]


def unchanged(ctx, node: IterNode, from_cache: bool = True) -> None:
    """Patching every cell of `node` from the model's own cache (or, for activations a plain cache
    lacks, from a run of the same prompts) gives the unpatched metric."""
    source = dict(new_cache=ctx.cache) if from_cache else dict(new_input=ctx.orig)
    results = act_patch(ctx.model, ctx.orig, node, ctx.metric, **source)
    for name in node.names:
        values = results[name].as_tensor()
        assert_close_at_scale(values, ctx.own.expand(values.shape))


# The cells.


def metric_objects(ctx) -> None:
    """Each metric object, patched from the model's own cache at the last `resid_post` (an
    unembedding-only pass; `LogitDiff` also at head 0.0, a pass through every layer), equals the
    same metric of the model's own logits computed by hand: `LogitDiff` (mean and per prompt),
    `TokenLogit` (one token per prompt), `TokenProbability` (log-probabilities: the whole
    vocabulary normalised), `LogitsAt` (two positions per prompt), and `denoising_metric` of a
    `LogitDiff`."""
    model, logits = ctx.model, ctx.logits.float()
    rows = torch.arange(len(ANSWERS))
    at = torch.tensor([[1, 6], [0, 6], [3, 5]])
    per_prompt = logits[rows, -1, ANSWERS[:, 0]] - logits[rows, -1, ANSWERS[:, 1]]
    clean, corrupted = 2.0, -1.0
    metrics = [
        (ctx.metric, per_prompt.mean()),
        (LogitDiff(ANSWERS, per_prompt=True), per_prompt),
        (TokenLogit(ANSWERS[:, 0], positions=torch.tensor([2, 6, 4])), logits[rows, [2, 6, 4], ANSWERS[:, 0]].mean()),
        (
            TokenProbability(ANSWERS[:, 1], log=True, per_prompt=True),
            logits[:, -1].log_softmax(-1)[rows, ANSWERS[:, 1]],
        ),
        (
            LogitsAt([3, 17], positions=at, reduce=lambda x: (x[..., 0] * x[..., 1]).sum()),
            (logits[rows[:, None], at][..., 3] * logits[rows[:, None], at][..., 17]).sum(),
        ),
        (denoising_metric(ctx.metric, clean, corrupted), (per_prompt.mean() - corrupted) / (clean - corrupted)),
    ]
    own = act_patch(model, ctx.orig, Node("z", 0, head=0), ctx.metric, new_cache=ctx.cache)
    assert_close_at_scale(own, per_prompt.mean())
    for metric, expected in metrics:
        own = act_patch(model, ctx.orig, Node("resid_post", ctx.last), metric, new_cache=ctx.cache)
        assert_close_at_scale(own, expected)


def task_metrics(ctx) -> None:
    """Each task metric, patched from the new run at the last `resid_post` (an unembedding-only pass,
    so the logits are the new run's), equals its formula on the new run's logits by hand: the KL
    divergence from the orig run's next-token distribution at two positions, the log-probability of
    two-token answers by teacher forcing, and accuracy among the answers; patched from the orig run's
    own cache, the KL divergence is 0."""
    model = ctx.model
    with torch.no_grad():
        new_logits = model(ctx.new).float()
    rows = torch.arange(len(ANSWERS))
    at = torch.tensor([[2, 6], [4, 6], [5, 6]])
    p = ctx.logits.float()[rows[:, None], at].softmax(-1)
    q = new_logits[rows[:, None], at].log_softmax(-1)
    kl = (p * (p.log() - q)).sum(-1).mean(-1).mean()
    answers, starts = torch.stack([ctx.new[:, 4], ctx.new[:, 5]], dim=1), torch.tensor([4, 4, 4])
    log_probs = new_logits.log_softmax(-1)
    teacher_forced = (log_probs[rows, 3, answers[:, 0]] + log_probs[rows, 4, answers[:, 1]]).mean()
    last = new_logits[:, -1]
    accuracy = (last[rows, ANSWERS[:, 0]] > last[rows, ANSWERS[:, 1]]).float().mean()
    node = Node("resid_post", ctx.last)
    metrics = [
        (KLDivergence.of(model, ctx.orig, positions=at), kl),
        (AnswerLogProb(answers, starts), teacher_forced),
        (Accuracy(ANSWERS), accuracy),
    ]
    for metric, expected in metrics:
        assert_close_at_scale(act_patch(model, ctx.orig, node, metric, new_input=ctx.new), expected)
    own = act_patch(model, ctx.orig, node, KLDivergence.of(model, ctx.orig), new_cache=ctx.cache)
    assert float(own) == pytest.approx(0.0, abs=1e-4)


def uncertainty(ctx) -> None:
    """With `uncertainty=True`, each head of the last layer patched from the new prompts keeps each
    prompt's value: the run with that head's `z` replaced by hand, prompt by prompt; the value is
    their mean, its standard error that of those values (unbiased std / sqrt n), and the sign-flip
    test's p-value of a head is exact over the 2^3 sign patterns of each prompt's change from the
    unpatched run."""
    model, name = ctx.model, f"blocks.{ctx.last}.attn.hook_z"
    patched = act_patch(
        model, ctx.orig, IterNode("z", layers=[ctx.last]), ctx.metric, new_input=ctx.new, uncertainty=True
    )["z"]
    own = per_prompt_logit_diff(ctx.logits.float())
    tested = 0
    for head in range(model.cfg.n_heads):
        index = (slice(None), slice(None), head)
        with torch.no_grad():
            logits = model.run_with_hooks(ctx.orig, fwd_hooks=[(name, replacing(ctx.new_cache[name], index))])
        expected = per_prompt_logit_diff(logits.float())
        cell = patched.sel(layer=ctx.last, head=head)
        assert_close_at_scale(cell.per_prompt.as_tensor(), expected)
        assert_close_at_scale(cell, expected.mean())
        assert_close_at_scale(cell.stderr, expected.std() / len(expected) ** 0.5)
        changes = (expected - own).double()
        flips = torch.tensor([[1 - 2 * ((k >> i) & 1) for i in range(3)] for k in range(8)], dtype=torch.float64)
        observed = changes.mean().abs()
        p_value = ((flips * changes).mean(-1).abs() >= observed - 1e-12).double().mean()
        if observed > 1e-4 * own.abs().max():
            assert float(cell.p_values()) == pytest.approx(float(p_value))
            tested += 1
    assert tested, "no head of the last layer changes the metric: the sign-flip test went unchecked"


def act_heads(ctx) -> None:
    """Every head (`IterNode("z")`) patched from the model's own cache changes nothing; each head
    of the last layer patched from the new prompts is the run with that head's `z` (one of the
    model's `n_heads` slices of `hook_z`) replaced by hand."""
    unchanged(ctx, IterNode("z"))
    model, name = ctx.model, f"blocks.{ctx.last}.attn.hook_z"
    patched = act_patch(model, ctx.orig, IterNode("z", layers=[ctx.last]), ctx.metric, new_input=ctx.new)["z"]
    z_new = ctx.new_cache[name]
    assert z_new.shape[2] == model.cfg.n_heads, f"{name} has {z_new.shape[2]} heads, the model {model.cfg.n_heads}"
    expected = [head_replaced(ctx, head) for head in range(model.cfg.n_heads)]
    assert_close_at_scale(patched.as_tensor().reshape(-1), torch.stack(expected))


def act_attention(ctx) -> None:
    """Every layer's `attn_out` and every head's `q`, `k`, `v` and `pattern` patched from the
    model's own cache change nothing; patched from the new prompts, the last layer's `attn_out`,
    head 0's `q` and `pattern` and key/value head 0's `k` and `v` are each the run with that
    slice of its hook (`hook_attn_out`; `hook_q`, `hook_k`, `hook_v` at index 0 of their head
    axis; `hook_pattern` at index 0 of its) set to the new run's by hand."""
    names = ["attn_out", "q", "k", "v", "pattern"]
    unchanged(ctx, IterNode(names))
    last, every = ctx.last, slice(None)
    patched = act_patch(ctx.model, ctx.orig, IterNode(names, layers=[last], heads=[0]), ctx.metric, new_input=ctx.new)
    hooks = {
        "attn_out": (f"blocks.{last}.hook_attn_out", None),
        "q": (f"blocks.{last}.attn.hook_q", (every, every, 0)),
        "k": (f"blocks.{last}.attn.hook_k", (every, every, 0)),
        "v": (f"blocks.{last}.attn.hook_v", (every, every, 0)),
        "pattern": (f"blocks.{last}.attn.hook_pattern", (every, 0)),
    }
    for name, (hook, index) in hooks.items():
        assert_close_at_scale(patched[name].as_tensor().reshape(-1), replaced(ctx, hook, index).reshape(1))


def act_residual(ctx) -> None:
    """Every layer's `resid_pre`, `resid_post` and, where the blocks have one, `resid_mid` patched
    from the model's own cache changes nothing. Layer 0's `resid_post` patched from the new
    prompts is the run with that hook set to the new run's by hand; where the blocks have a
    `resid_mid` (attention, then the MLP), layer 0's patched from the new prompts is the run whose
    residual stream after layer 0's attention is the new run's: the MLP reads it, and the stream
    leaving the layer is it plus the MLP's output (set by hand there)."""
    model = ctx.model
    mid, mlp_out, post = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"
    has_mid = mid in model.hook_dict and not getattr(model.cfg, "parallel_attn_mlp", False)
    names = ["resid_post", *(["resid_mid"] if has_mid else [])]
    for layer in range(model.cfg.n_layers):  # layer by layer: a refusal names the first missing hook
        unchanged(ctx, IterNode(["resid_pre", *names], layers=[layer]))
    patched = act_patch(model, ctx.orig, IterNode(names, layers=[0]), ctx.metric, new_input=ctx.new)
    assert_close_at_scale(patched["resid_post"].as_tensor().reshape(-1), replaced(ctx, post).reshape(1))
    if not has_mid:
        return
    written = {}
    hooks = [
        (mid, lambda x, hook: ctx.new_cache[mid].clone()),
        (mlp_out, lambda x, hook: written.setdefault("mlp", x.clone())),
        (post, lambda x, hook: ctx.new_cache[mid] + written["mlp"]),
    ]
    assert_close_at_scale(patched["resid_mid"].as_tensor().reshape(-1), hooked_metric(ctx, hooks).reshape(1))


def act_mlp_out(ctx) -> None:
    """Every layer's `mlp_out` patched from the model's own cache changes nothing; the last
    layer's patched from the new prompts is the run with `hook_mlp_out` set to the new run's."""
    unchanged(ctx, IterNode("mlp_out"))
    patched = act_patch(ctx.model, ctx.orig, Node("mlp_out", ctx.last), ctx.metric, new_input=ctx.new)
    assert_close_at_scale(patched, replaced(ctx, f"blocks.{ctx.last}.hook_mlp_out"))


def act_neurons(ctx) -> None:
    """Neurons 0 and 5 of layer 0 (`pre` and `post`) patched from the model's own cache change
    nothing; neuron 5's `post` patched from the new prompts is the run with that slice of
    `mlp.hook_post` set to the new run's by hand."""
    unchanged(ctx, IterNode(["pre", "post"], layers=[0], neurons=[0, 5]))
    patched = act_patch(ctx.model, ctx.orig, Node("post", 0, neuron=5), ctx.metric, new_input=ctx.new)
    assert_close_at_scale(patched, replaced(ctx, "blocks.0.mlp.hook_post", (slice(None), slice(None), 5)))


def act_embed(ctx) -> None:
    """`IterNode("embed")` (and `IterNode("pos_embed")` where the model has learned positions)
    patched from the model's own cache changes nothing; `Node("embed")` patched from the new
    prompts is the run with `hook_embed` set to the new run's by hand."""
    unchanged(ctx, IterNode("embed"))
    if "hook_pos_embed" in ctx.cache:
        unchanged(ctx, IterNode("pos_embed"))
    patched = act_patch(ctx.model, ctx.orig, Node("embed"), ctx.metric, new_input=ctx.new)
    assert_close_at_scale(patched, replaced(ctx, "hook_embed"))


def act_scores(ctx) -> None:
    """Every head's `attn_scores` and `result` patched from a run of the same prompts (a plain
    cache has no `result`) change nothing; from the new prompts, head 0's `attn_scores` in the last
    layer is the run with that slice of `attn.hook_attn_scores` set to the new run's by hand, and
    its `result` (its output times its rows of W_O, before any norm) is the run with its `z` set to
    the new run's by hand (as in "act: heads")."""
    names = ["attn_scores", "result"]
    unchanged(ctx, IterNode(names), from_cache=False)
    patched = act_patch(ctx.model, ctx.orig, IterNode(names, layers=[ctx.last], heads=[0]), ctx.metric, ctx.new)
    name = f"blocks.{ctx.last}.attn.hook_attn_scores"
    assert_close_at_scale(
        patched["attn_scores"].as_tensor().reshape(-1), replaced(ctx, name, (slice(None), 0)).reshape(1)
    )
    assert_close_at_scale(patched["result"].as_tensor().reshape(-1), head_replaced(ctx, 0).reshape(1))


def act_stacked(ctx) -> None:
    """Every head's `z`, every layer's `resid_pre` (and `mlp_out`) patched from the new prompts,
    stacked as many per pass as fit (the default), equals the same sweep one variant per pass
    (`batch_size=1`)."""
    node = IterNode(["z", "resid_pre", *mlps(ctx)])
    together = act_patch(ctx.model, ctx.orig, node, ctx.metric, new_input=ctx.new)
    alone = act_patch(ctx.model, ctx.orig, node, ctx.metric, new_input=ctx.new, batch_size=1)
    for name in node.names:
        assert_close_at_scale(together[name].as_tensor(), alone[name].as_tensor())


def act_inputs(ctx) -> None:
    """Every head's `q_input`, `k_input`, `v_input` and every layer's `mlp_in` (where the model has
    MLPs) patched from a run of the same prompts (a plain cache has none of them) change nothing;
    from the new prompts, head 0's `q_input` and key/value head 0's `k_input` and `v_input` in the
    last layer are the runs with that head's slice of `hook_q`, `hook_k`, `hook_v` set to the new
    run's by hand (the head computes them from that input alone), and the last layer's `mlp_in` is
    the run with `hook_mlp_out` set to the new run's (the MLP computes it from its input alone)."""
    inputs = ["q_input", "k_input", "v_input"]
    unchanged(ctx, IterNode([*inputs, *(["mlp_in"] if mlps(ctx) else [])]), from_cache=False)
    last, every = ctx.last, slice(None)
    patched = act_patch(ctx.model, ctx.orig, IterNode(inputs, layers=[last], heads=[0]), ctx.metric, ctx.new)
    for name, hook in (("q_input", "hook_q"), ("k_input", "hook_k"), ("v_input", "hook_v")):
        expected = replaced(ctx, f"blocks.{last}.attn.{hook}", (every, every, 0))
        assert_close_at_scale(patched[name].as_tensor().reshape(-1), expected.reshape(1))
    if mlps(ctx):
        patched = act_patch(ctx.model, ctx.orig, Node("mlp_in", last), ctx.metric, new_input=ctx.new)
        assert_close_at_scale(patched, replaced(ctx, f"blocks.{last}.hook_mlp_out"))


def path_mlps_direct(ctx) -> None:
    """Path patching the last layer's heads to the logits (MLPs direct) equals patching them:
    in the last layer, the residual stream and that layer's MLP are all a head writes to
    (the values of "act: heads", by hand)."""
    model, last = ctx.model, ctx.last
    paths = path_patch(model, ctx.orig, ctx.new, IterNode("z", layers=[last]), Node("resid_post", last), ctx.metric)
    expected = torch.stack([head_replaced(ctx, head) for head in range(model.cfg.n_heads)])
    assert_close_at_scale(paths["z"].as_tensor().reshape(-1), expected)


def path_residual_only(ctx) -> None:
    """Path patching head (L-1, 0) to the logits through the residual stream only
    (`direct_includes_mlps=False`) equals the orig run with that head's write to the final
    residual stream replaced by its write in the new run."""
    patched = path_patch(
        ctx.model,
        ctx.orig,
        ctx.new,
        Node("z", ctx.last, head=0),
        Node("resid_post", ctx.last),
        ctx.metric,
        direct_includes_mlps=False,
    )
    assert_close_at_scale(patched, write_replaced(ctx, ctx.last, 0))


def logits_edge(ctx, head: int) -> Edge:
    return Edge(GraphNode("head", ctx.last, head=head), GraphNode("logits"))


def circuits(ctx) -> None:
    """The full circuit is the orig run, the empty one the new run, and the circuit of every edge
    but head (L-1, 0) -> logits is that head's write replaced in the logits' input (as path
    patching it through the residual stream only)."""
    model = ctx.model
    graph = EdgeGraph.of(model)
    removed = logits_edge(ctx, 0)
    kept = Circuit(graph, [edge for edge in graph if edge != removed])
    full, empty, without = (
        evaluate_circuit(model, circuit, ctx.orig, ctx.metric, new_input=ctx.new)
        for circuit in (Circuit.full(graph), Circuit.empty(graph), kept)
    )
    assert_close_at_scale(full, ctx.own)
    assert_close_at_scale(empty, ctx.own_new)
    assert_close_at_scale(without, write_replaced(ctx, ctx.last, 0))


def learned_masks(ctx) -> None:
    """`learn_edge_masks` (one step, so that a refusal is recorded as one): its soft removal at
    masks of 0 and 1 gives `evaluate_circuit`'s value per prompt (a random circuit, the full and
    the empty one), and at every mask 1 the gradient of the summed metric with respect to the masks
    is minus EAP's per-prompt scores summed."""
    model = ctx.model
    per_prompt = LogitDiff(ANSWERS, per_prompt=True)
    eap = attr_edges(model, ctx.orig, per_prompt, new_input=ctx.new)
    learn_edge_masks(model, eap, ctx.orig, per_prompt, new_input=ctx.new, steps=1)
    graph = EdgeGraph.of(model)
    runs = prepare_runs(model, ctx.orig, per_prompt, uncertainty=True)
    wiring = Wiring.of(model, graph, "learn_edge_masks")
    source, _ = patched_in_source(runs, ctx.new, None, wiring.sender_hooks)
    random = torch.rand(len(graph), generator=torch.Generator().manual_seed(0)) < 0.5
    kept = [random, torch.ones_like(random), torch.zeros_like(random)]
    mask = torch.ones(len(graph), requires_grad=True)
    with _tl.model_flags(model, _tl.flags_for(wiring.receiver_hooks)):
        circuits = MaskedCircuits(runs, wiring, source(), None)
        soft = [circuits.values(keep.float()).detach() for keep in kept]
        with torch.enable_grad():
            circuits.values(mask).sum().backward(inputs=[mask])
    for keep, values in zip(kept, soft):
        exact = evaluate_circuit(model, Circuit.from_mask(graph, keep), ctx.orig, per_prompt, new_input=ctx.new)
        assert_close_at_scale(values, exact)
    assert_close_at_scale(mask.grad, -eap.scores.sum(-1))


def atp_own_cache(ctx) -> None:
    """Attribution patching every head and every `mlp_out` (where the model has MLPs) from the
    model's own cache: every estimate is the unpatched metric."""
    for name in ("z", *mlps(ctx)):
        values = attr_patch(ctx.model, ctx.orig, IterNode(name), ctx.metric, new_cache=ctx.cache)[name].as_tensor()
        assert_close_at_scale(values, ctx.own.expand(values.shape))


def atp_star_own_cache(ctx) -> None:
    """AtP* (`method="atp*"`: the queries' and keys' effect through the attention pattern
    recomputed, not linearised) of every head's z, q and k from the model's own cache: every
    estimate is the unpatched metric."""
    node = IterNode(["z", "q", "k"])
    estimates = attr_patch(ctx.model, ctx.orig, node, ctx.metric, new_cache=ctx.cache, method="atp*")
    for values in estimates.values():
        assert_close_at_scale(values.as_tensor(), ctx.own.expand(values.shape))


def atp_first_order(ctx) -> None:
    """Attribution patching the last layer's heads equals the first-order estimate computed here
    with autograd: metric + sum over the head's slice of (z_new - z_orig) * d metric / d z."""
    model, name = ctx.model, f"blocks.{ctx.last}.attn.hook_z"
    estimates = attr_patch(model, ctx.orig, IterNode("z", layers=[ctx.last]), ctx.metric, new_input=ctx.new)["z"]
    value, grad = gradient(ctx, name)
    expected = value + ((ctx.new_cache[name] - ctx.cache[name]) * grad).sum(dim=(0, 1, 3))
    assert_close_at_scale(estimates.as_tensor().reshape(-1), expected)


def integrated_gradients(ctx) -> None:
    """`attr_patch(method="ig")`: from the model's own cache every head's and every `mlp_out`'s
    (where the model has MLPs) estimate is the unpatched metric; from the new prompts, each head
    of the last layer is the metric plus the sum over the head's slice of (z_new - z_orig) times
    the mean gradient at the `IG_STEPS` points z_orig + (k / steps)(z_new - z_orig),
    k = 0 .. steps - 1, the whole `hook_z` interpolated (a Riemann sum written here, with
    autograd at each point)."""
    model, name = ctx.model, f"blocks.{ctx.last}.attn.hook_z"
    own = attr_patch(
        model, ctx.orig, IterNode(["z", *mlps(ctx)]), ctx.metric, new_cache=ctx.cache, method="ig", steps=2
    )
    estimates = attr_patch(
        model, ctx.orig, IterNode("z", layers=[ctx.last]), ctx.metric, new_input=ctx.new, method="ig", steps=IG_STEPS
    )["z"]
    for values in own.values():
        assert_close_at_scale(values.as_tensor(), ctx.own.expand(values.shape))
    mean_gradient = interpolated_gradient(ctx, name, name, IG_STEPS)
    expected = ctx.own + ((ctx.new_cache[name] - ctx.cache[name]) * mean_gradient).sum(dim=(0, 1, 3))
    assert_close_at_scale(estimates.as_tensor().reshape(-1), expected)


def edge_reference(ctx, steps: int):
    """The score of edge head (L-1, 0) -> logits by hand: the head's first-order write change
    (see `write_derivative`) dotted with the gradient of the metric with respect to the final
    residual stream, summed over prompts and positions; for `steps` > 1 the mean of that over the
    runs whose residual stream entering layer 0 is x + (k / steps)(x' - x), k = 0 .. steps - 1,
    each with its own gradient and its own write."""
    final = f"blocks.{ctx.last}.hook_resid_post"
    total = 0.0
    for k in range(steps):
        hooks = interpolation_hooks(ctx, k, steps) if k else []
        total = total + write_derivative(ctx, ctx.last, 0, gradient(ctx, final, hooks)[1], hooks)
    return total / steps


def eap(ctx) -> None:
    """Edge attribution (EAP): with new_input = orig every edge's score is 0; from the new
    prompts, edge head (L-1, 0) -> logits scores the change of that head's write dotted with the
    metric's gradient at the final residual stream (autograd), summed over prompts and positions,
    and `unpatched` is the model's metric; per position (`per_position=True`), the scores sum
    over positions to these."""
    same = attr_edges(ctx.model, ctx.orig, ctx.metric, new_input=ctx.orig)
    scores = attr_edges(ctx.model, ctx.orig, ctx.metric, new_input=ctx.new)
    assert_close_at_scale(same.scores, torch.zeros_like(same.scores))
    assert torch.isfinite(scores.scores).all()
    assert_close_at_scale(scores.unpatched, ctx.own)
    assert_close_at_scale(scores.score(logits_edge(ctx, 0)), edge_reference(ctx, 1))
    at_positions = attr_edges(ctx.model, ctx.orig, ctx.metric, new_input=ctx.new, per_position=True)
    assert_close_at_scale(at_positions.total().scores, scores.scores)


def eap_ig(ctx) -> None:
    """EAP-IG (`attr_edges(method="ig")`): with new_input = orig every edge's score is 0; from
    the new prompts, edge head (L-1, 0) -> logits scores that head's write change dotted with the
    mean gradient at the final residual stream over the `IG_STEPS` runs whose residual stream
    entering layer 0 is x + (k / steps)(x' - x), k = 0 .. steps - 1 (autograd at each)."""
    same = attr_edges(ctx.model, ctx.orig, ctx.metric, new_input=ctx.orig, method="ig", steps=2)
    scores = attr_edges(ctx.model, ctx.orig, ctx.metric, new_input=ctx.new, method="ig", steps=IG_STEPS)
    assert_close_at_scale(same.scores, torch.zeros_like(same.scores))
    assert torch.isfinite(scores.scores).all()
    assert_close_at_scale(scores.score(logits_edge(ctx, 0)), edge_reference(ctx, IG_STEPS))


def eap_ig_activations(ctx) -> None:
    """EAP-IG on activations (`attr_edges(method="ig-activations")`): edge head (L-1, 0) -> logits
    scores that head's write change dotted with the mean gradient at the final residual stream
    over the `IG_STEPS` runs whose layer L-1 `z` is z + (k / steps)(z' - z), k = 0 .. steps - 1
    (autograd at each, the write through each run's own norm where one follows attention)."""
    scores = attr_edges(ctx.model, ctx.orig, ctx.metric, new_input=ctx.new, method="ig-activations", steps=IG_STEPS)
    assert torch.isfinite(scores.scores).all()
    name, final = f"blocks.{ctx.last}.attn.hook_z", f"blocks.{ctx.last}.hook_resid_post"
    a, a_new = ctx.cache[name], ctx.new_cache[name]
    total = 0.0
    for k in range(IG_STEPS):
        hooks = [(name, replacing(a + (k / IG_STEPS) * (a_new - a)))]
        total = total + write_derivative(ctx, ctx.last, 0, gradient(ctx, final, hooks)[1], hooks)
    assert_close_at_scale(scores.score(logits_edge(ctx, 0)), total / IG_STEPS)


def attr_paths(ctx) -> None:
    """`attr_path_patch` of layer 0's heads (senders) to layer 1's `resid_pre` (receiver): each
    head's estimate is the metric plus its first-order write change dotted with the gradient of
    the metric with respect to `blocks.1.hook_resid_pre` (autograd), summed over prompts and
    positions."""
    model = ctx.model
    estimates = attr_path_patch(model, ctx.orig, ctx.new, IterNode("z", layers=[0]), Node("resid_pre", 1), ctx.metric)
    value, grad = gradient(ctx, "blocks.1.hook_resid_pre")
    expected = [value + write_derivative(ctx, 0, head, grad) for head in range(model.cfg.n_heads)]
    assert_close_at_scale(estimates["z"].as_tensor().reshape(-1), torch.stack(expected))


PATTERN_CONSTANT = (
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
)
"""Every hook between the residual stream and an attention pattern: detaching all of them holds the
pattern constant whichever of them a model's attention actually computes from (some bridges
compute their output from the queries and keys they hook, not from the pattern they hook)."""


def relevance_hooks(model, constant: tuple[str, ...] = PATTERN_CONSTANT) -> list:
    """RelP's rules as hooks, written out: every norm's `hook_scale` and every attention pattern
    detached (constants; or, with `constant=("hook_q_input", "hook_k_input")`, each head's query and
    key inputs, which leaves the pattern's own gradient to the queries and keys but no further), and
    each MLP's `hook_post` keeping its value but taking its gradient from the identity rule (`pre`
    times post / pre, held constant) or, gated, the half rule (half of the product over each factor,
    gate and `up`, held constant); TransformerLens 2 adds its gated MLP's `b_in` after the product."""
    points = {}
    for name, point in model.hook_dict.items():
        if name.endswith(("hook_scale", *constant)):
            points.setdefault(id(point), name)
    hooks = [(name, lambda x, hook: x.detach()) for name in points.values()]
    if getattr(model.cfg, "attn_only", False):
        return hooks
    gated = "blocks.0.mlp.hook_pre_linear" in model.hook_dict
    for layer in range(model.cfg.n_layers):
        live = {}

        def keep(part, live=live):
            def hook(x, hook):
                live[part] = x

            return hook

        def ratio(numerator, denominator):
            numerator, denominator = numerator.detach(), denominator.detach()
            return torch.where(denominator == 0, 0.0, numerator / torch.where(denominator == 0, 1.0, denominator))

        def rule(post, hook, live=live, layer=layer):
            if gated:
                bias = model.blocks[layer].mlp.b_in if TL_MAJOR == 2 else 0.0
                product = post - bias
                surrogate = 0.5 * live["pre"] * ratio(product, live["pre"])
                surrogate = surrogate + 0.5 * live["pre_linear"] * ratio(product, live["pre_linear"])
            else:
                surrogate = live["pre"] * ratio(post, live["pre"])
            return post.detach() + (surrogate - surrogate.detach())

        hooks.append((f"blocks.{layer}.mlp.hook_pre", keep("pre")))
        if gated:
            hooks.append((f"blocks.{layer}.mlp.hook_pre_linear", keep("pre_linear")))
        hooks.append((f"blocks.{layer}.mlp.hook_post", rule))
    return hooks


def relevance_patching(ctx) -> None:
    """RelP (`attr_patch(method="relp")`): from the model's own cache every head's and every
    neuron's estimate is the unpatched metric; from the new prompts each is the metric plus the sum
    over its slice of (new - orig) times the gradient of the metric through `relevance_hooks`
    (autograd, every layer's z and MLP post at once)."""
    model = ctx.model
    names = ["z", *(["post"] if mlps(ctx) else [])]
    own = attr_patch(model, ctx.orig, IterNode(names), ctx.metric, new_cache=ctx.cache, method="relp")
    estimates = attr_patch(model, ctx.orig, IterNode(names), ctx.metric, new_input=ctx.new, method="relp")
    for values in own.values():
        assert_close_at_scale(values.as_tensor(), ctx.own.expand(values.shape))
    hooks = {"z": "blocks.{}.attn.hook_z", "post": "blocks.{}.mlp.hook_post"}
    layers = range(model.cfg.n_layers)
    offsets = {
        (name, layer): torch.zeros_like(ctx.cache[hooks[name].format(layer)], requires_grad=True)
        for name in names
        for layer in layers
    }
    added = [(hooks[name].format(layer), lambda x, hook, o=offset: x + o) for (name, layer), offset in offsets.items()]
    with torch.enable_grad():
        value = plain_logit_diff(model.run_with_hooks(ctx.orig, fwd_hooks=[*relevance_hooks(model), *added]))
        grads = dict(zip(offsets, torch.autograd.grad(value, list(offsets.values()))))
    for name in names:
        per_layer = []
        for layer in layers:
            hook = hooks[name].format(layer)
            weighted = (ctx.new_cache[hook] - ctx.cache[hook]) * grads[(name, layer)]
            per_layer.append(weighted.sum(dim=(0, 1, 3) if name == "z" else (0, 1)))
        assert_close_at_scale(estimates[name].as_tensor(), value.detach() + torch.stack(per_layer))


def relevance_edges(ctx) -> None:
    """RelP for edges and paths: `attr_edges(method="relp")` scores every edge 0 with new_input =
    orig, and edge head (L-1, 0) -> logits as
    that head's write change dotted with the gradient of the metric at the final residual stream
    through `relevance_hooks` (autograd); `attr_path_patch(method="relp")` of layer 0's heads to
    layer 1's `resid_pre` is the metric plus each head's write change dotted with the gradient there
    through the same hooks."""
    model = ctx.model
    same = attr_edges(model, ctx.orig, ctx.metric, new_input=ctx.orig, method="relp")
    scores = attr_edges(model, ctx.orig, ctx.metric, new_input=ctx.new, method="relp")
    assert_close_at_scale(same.scores, torch.zeros_like(same.scores))
    paths = attr_path_patch(
        model, ctx.orig, ctx.new, IterNode("z", layers=[0]), Node("resid_pre", 1), ctx.metric, method="relp"
    )
    final = f"blocks.{ctx.last}.hook_resid_post"
    expected = write_derivative(ctx, ctx.last, 0, gradient(ctx, final, relevance_hooks(model))[1])
    assert_close_at_scale(scores.score(logits_edge(ctx, 0)), expected)
    value, grad = gradient(ctx, "blocks.1.hook_resid_pre", relevance_hooks(model))
    expected = [value + write_derivative(ctx, 0, head, grad) for head in range(model.cfg.n_heads)]
    assert_close_at_scale(paths["z"].as_tensor().reshape(-1), torch.stack(expected))


def confirmed(ctx) -> None:
    """`confirm` of the last layer's heads' AtP estimates (top 2): each confirmed cell's exact
    value is that head's `z` replaced by hand (as in "act: heads"), its estimate the AtP estimate,
    and `unpatched` the model's metric."""
    node = IterNode("z", layers=[ctx.last])
    estimates = attr_patch(ctx.model, ctx.orig, node, ctx.metric, new_input=ctx.new)
    confirmation = confirm(ctx.model, estimates, ctx.orig, node, ctx.metric, new_input=ctx.new, top_k=2)
    assert len(confirmation.cells) == 2
    assert_close_at_scale(confirmation.unpatched, ctx.own)
    for cell in confirmation.cells:
        assert cell.component == "z" and cell.coords["layer"] == ctx.last, cell
        assert_close_at_scale(cell.exact, head_replaced(ctx, cell.coords["head"]))
        assert_close_at_scale(cell.estimate, estimates["z"].sel(**cell.coords))


def confirmed_paths(ctx) -> None:
    """`confirm_paths` of `attr_path_patch`'s estimates for the last layer's heads to the logits
    (top 2): each confirmed cell's exact value is that head's write replaced in the final
    residual stream by hand (as in "path: resid only")."""
    senders, receiver = IterNode("z", layers=[ctx.last]), Node("resid_post", ctx.last)
    estimates = attr_path_patch(ctx.model, ctx.orig, ctx.new, senders, receiver, ctx.metric)
    confirmation = confirm_paths(ctx.model, estimates, ctx.orig, ctx.new, senders, receiver, ctx.metric, top_k=2)
    assert len(confirmation.cells) == 2
    assert_close_at_scale(confirmation.unpatched, ctx.own)
    for cell in confirmation.cells:
        assert cell.component == "z" and cell.coords["layer"] == ctx.last, cell
        assert_close_at_scale(cell.exact, write_replaced(ctx, ctx.last, cell.coords["head"]))


def confirmed_edges(ctx) -> None:
    """`confirm_edges` of hand-made scores whose 2 strongest edges are heads (L-1, 0) and (L-1, 1)
    -> logits: their exact scores are each head's write replaced in the final residual stream by
    hand minus the model's metric; every other edge keeps its score."""
    graph = EdgeGraph.of(ctx.model)
    scores = torch.linspace(0.0, 0.5, len(graph))
    scores[graph.index(logits_edge(ctx, 0))], scores[graph.index(logits_edge(ctx, 1))] = 2.0, -1.5
    confirmed = confirm_edges(
        ctx.model, EdgeScores(graph, scores, "hand", float(ctx.own)), ctx.orig, ctx.metric, ctx.new, candidates=2
    )
    assert_close_at_scale(confirmed.unpatched, ctx.own)
    for head in (0, 1):
        index = graph.index(logits_edge(ctx, head))
        assert_close_at_scale(confirmed.scores[index], write_replaced(ctx, ctx.last, head) - ctx.own)
        scores[index] = confirmed.scores[index]
    assert_close_at_scale(confirmed.scores, scores)


def faithfulness(ctx) -> None:
    """MIB faithfulness of random edge scores: each curve's full circuit is the orig run, its
    empty one the new run, and its last point (every edge) has faithfulness 1.
    `faithfulness_curve` of scores that rank head (L-1, 0) -> logits last, at one edge and at every
    edge but one (unpruned): its full and empty circuits are the orig and new runs, and its last
    point is that head's write replaced in the final residual stream by hand."""
    graph = EdgeGraph.of(ctx.model)
    scores = torch.randn(len(graph), generator=torch.Generator().manual_seed(2))
    mib = mib_faithfulness(
        ctx.model, EdgeScores(graph, scores, "random", float(ctx.own)), ctx.orig, ctx.metric, new_input=ctx.new
    )
    ranked = torch.ones(len(graph))
    ranked[graph.index(logits_edge(ctx, 0))] = 0.0
    curve = faithfulness_curve(
        ctx.model,
        EdgeScores(graph, ranked, "hand", float(ctx.own)),
        ctx.orig,
        ctx.metric,
        new_input=ctx.new,
        sizes=[1, len(graph) - 1],
        prune=False,
    )
    for each in (mib.signed, mib.absolute, curve):
        assert_close_at_scale(each.full, ctx.own)
        assert_close_at_scale(each.empty, ctx.own_new)
    for each in (mib.signed, mib.absolute):
        assert each.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.edge_counts == (1, len(graph) - 1)
    assert_close_at_scale(curve.values[-1], write_replaced(ctx, ctx.last, 0))


def ioi_dry_run(ctx) -> None:
    """`tl-patch ioi --dry-run` (`planned_ioi_steps`, what it prints, with `IOI_PROMPTS` prompts):
    every step of the job is named, each with its plans (which print) or as skipped with a reason;
    the neuron step is skipped exactly where `plan_act_patch` refuses MLP neurons, and the circuit
    step exactly where `plan_circuit_evaluation` refuses the model, with that refusal's message.
    A step the library refuses that the job cannot skip refuses the whole dry run (the cell then
    shows that refusal)."""
    from transformer_lens_patching._tasks.ioi.analysis import STEP_KEYS, IOISettings, planned_ioi_steps

    entries = planned_ioi_steps(ctx.model, IOISettings(n_prompts=IOI_PROMPTS))
    named = {key: [entry for entry in entries if entry[0].startswith(key)] for key in STEP_KEYS}
    assert sum(map(len, named.values())) == len(entries), [label for label, _ in entries]
    skipped = {}
    for key, steps in named.items():
        assert steps, f"the dry run does not name step {key}"
        for label, plan in steps:
            if isinstance(plan, str):
                assert label == key and len(steps) == 1 and plan.startswith("Skipped: "), (label, plan)
                skipped[key] = plan.removeprefix("Skipped: ")
            else:
                assert str(plan).strip(), label
    neuron_refusal = refusal(
        lambda: plan_act_patch(ctx.model, ctx.orig, IterNode("post", layers=[0], neurons=[0]), ctx.metric, ctx.new)
    )
    assert ("attr_neurons" in skipped) == (neuron_refusal is not None), (skipped, neuron_refusal)
    graph = EdgeGraph.of(ctx.model)
    circuit_refusal = refusal(
        lambda: plan_circuit_evaluation(ctx.model, [Circuit.empty(graph)], ctx.orig, ctx.metric, ctx.new)
    )
    assert skipped.get("circuit") == circuit_refusal, (skipped.get("circuit"), circuit_refusal)
    assert skipped.keys() <= {"attr_neurons", "circuit"}, skipped


def refusal(call):
    """The message of the `PatchingError` `call()` raises, or None."""
    try:
        call()
    except PatchingError as error:
        return str(error)
    return None


# (column header, cell), in the order of the table
CELLS = [
    ("metric objects", metric_objects),
    ("task metrics", task_metrics),
    ("act: heads", act_heads),
    ("uncertainty", uncertainty),
    ("act: attention", act_attention),
    ("act: resid", act_residual),
    ("act: mlp_out", act_mlp_out),
    ("act: neurons", act_neurons),
    ("act: embed", act_embed),
    ("act: scores/result", act_scores),
    ("act: inputs", act_inputs),
    ("act: stacked", act_stacked),
    ("path: MLPs direct", path_mlps_direct),
    ("path: resid only", path_residual_only),
    ("circuits", circuits),
    ("learned masks", learned_masks),
    ("atp: own cache", atp_own_cache),
    ("atp*: own cache", atp_star_own_cache),
    ("atp: first order", atp_first_order),
    ("ig", integrated_gradients),
    ("EAP", eap),
    ("EAP-IG", eap_ig),
    ("EAP-IG activations", eap_ig_activations),
    ("attr_path_patch", attr_paths),
    ("relp", relevance_patching),
    ("RelP edges", relevance_edges),
    ("confirm", confirmed),
    ("confirm_paths", confirmed_paths),
    ("confirm_edges", confirmed_edges),
    ("faithfulness", faithfulness),
    ("IOI dry run", ioi_dry_run),
]


def stable(message: str) -> str:
    """`message` with each bracketed list of quoted names sorted: some list hooks in set order."""
    names = r"\[('[^'\]]*'(?:, '[^'\]]*')*)\]"
    return re.sub(names, lambda match: "[" + ", ".join(sorted(match[1].split(", "))) + "]", message)


def classify(build) -> dict:
    """Each cell's outcome on the model `build()` returns: {"boot": None, "cells": {header:
    "exact" | ("refused", message) | ("wrong", traceback)}}; or `boot` set to the exception if the
    model cannot be built and run (no call of the library yet: TransformerLens' limit)."""
    result = {"boot": None, "adapter": None, "cells": {}}
    try:
        model = build()
        ctx = Context(model)
    except Exception as error:  # noqa: BLE001 - TransformerLens' limit (no call of the library yet), recorded
        result["boot"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        return result
    adapter = getattr(model, "adapter", None)
    result["adapter"] = None if adapter is None else type(adapter).__name__
    for header, cell in CELLS:
        try:
            cell(ctx)
            result["cells"][header] = "exact"
        except PatchingError as error:
            result["cells"][header] = ("refused", stable(" ".join(str(error).split())))
        except Exception:  # noqa: BLE001 - a wrong number or an internal error: the test fails on it
            result["cells"][header] = ("wrong", traceback.format_exc())
    return result


def render(rows: list[dict], columns: list[str], unbooted_cell: str, unbooted_title: str) -> str:
    """A generated table: one line per row (its `columns` values, then each cell's outcome), the
    refusals' messages as numbered notes, the cells that gave a wrong number or an internal error,
    and the rows that did not boot."""
    headers = [*columns, *(header for header, _ in CELLS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    notes: list[str] = []
    bugs: list[str] = []
    unbooted = []
    for outcome in rows:
        if outcome["boot"] is not None:
            unbooted.append(f"- {outcome['values'][0]}: {outcome['boot']}")
            cells = [unbooted_cell] + ["-"] * (len(CELLS) - 1)
        else:
            cells = []
            for header, _ in CELLS:
                value = outcome["cells"][header]
                if value == "exact":
                    cells.append("exact")
                elif value[0] == "refused":
                    if value[1] not in notes:
                        notes.append(value[1])
                    cells.append(f"refused ({notes.index(value[1]) + 1})")
                else:
                    cells.append("**BUG**")
            wrong = [header for header, _ in CELLS if outcome["cells"][header][0] == "wrong"]
            if wrong:  # the exceptions are in the test's output (their text depends on pytest's instrumentation)
                bugs.append(f"- {outcome['values'][0]}: {', '.join(wrong)}")
        lines.append("| " + " | ".join([*outcome["values"], *cells]) + " |")
    lines += ["", counts(rows), "", "Refusals:", ""]
    lines += [f"{n}. {escaped(note)}" for n, note in enumerate(notes, 1)] or ["None."]
    if bugs:
        lines += [
            "",
            "Bugs: a wrong number or an internal error, in these cells (`tests/properties/test_support_matrix.py` "
            "fails, with the exception, until they are fixed):",
            "",
            *bugs,
        ]
    if unbooted:
        lines += ["", unbooted_title, "", *unbooted]
    return "\n".join(lines) + "\n"


def counts(rows: list[dict]) -> str:
    """Per column, how many rows are exact and how many refused (of those that boot)."""
    booted = [outcome for outcome in rows if outcome["boot"] is None]
    parts = []
    for header, _ in CELLS:
        values = [outcome["cells"][header] for outcome in booted]
        exact = sum(value == "exact" for value in values)
        refused = sum(value != "exact" and value[0] == "refused" for value in values)
        parts.append(f"{header} {exact}/{refused}")
    return f"Exact/refused of the {len(booted)} rows that run, per column: " + "; ".join(parts) + "."


def escaped(text: str) -> str:
    """`text` for a markdown list item, its pipes, angle brackets and asterisks kept literal."""
    return re.sub(r"([|<>*])", r"\\\1", text)
