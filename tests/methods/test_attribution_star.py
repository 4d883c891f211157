"""attr_patch(method="atp*"): AtP's QK fix against exact patching where the softmax is the
only non-linearity, and against a naive reference that patches one cell at a time."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, linear_metric, logit_diff_metric, make_inputs, raises
from tests.oracles.reference import (
    assign,
    full_cache,
    hook_of,
    layer_of,
    positions_per_prompt,
    run_with_patches,
    split_qkv_input,
)
from transformer_lens_patching import IterNode, Node, act_patch, attr_patch

BATCH = 3


def one_layer_attention_model():
    """A random one-layer, attention-only model without LayerNorm, with grouped-query attention
    (4 heads, 2 key/value heads): the logits are linear in each head's pattern, so the
    softmax is the only non-linearity between a query or key and the logits."""
    torch.manual_seed(0)
    config = dict(
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        n_layers=1,
        n_ctx=16,
        d_vocab=50,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="standard",
        attention_dir="causal",
        act_fn="relu",
        default_prepend_bos=False,
        seed=0,
    )
    if TL_MAJOR >= 4:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(TransformerBridgeConfig(**config))
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def one_layer():
    model = one_layer_attention_model()
    generator = torch.Generator().manual_seed(3)
    orig, new = (torch.randint(0, 50, (BATCH, 7), generator=generator) for _ in range(2))
    return model, orig, new


def beyond_native() -> list[str]:
    """The scores and per-head inputs, on TransformerLens 2 only: on TransformerLens 4 this model is a
    native bridge, which has no per-head input hooks and fires hook_attn_scores after the softmax
    (see the last test)."""
    return ["q_input", "attn_scores"] if TL_MAJOR < 4 else []


@pytest.mark.parametrize("seq_pos", [None, "each"])
def test_exact_where_the_softmax_is_the_only_nonlinearity(one_layer, seq_pos):
    model, orig, new = one_layer
    sweep = IterNode(["q", "k", *beyond_native()], seq_pos=seq_pos)
    exact = act_patch(model, orig, sweep, linear_metric, new_input=new)
    estimate = attr_patch(model, orig, sweep, linear_metric, new_input=new, method="atp*")
    plain = attr_patch(model, orig, sweep, linear_metric, new_input=new)
    for name in sweep.names:
        assert estimate[name].dims == exact[name].dims
        change = exact[name].as_tensor() - linear_metric(model(orig))
        assert change.abs().max() > 0.5, "patching moves the metric"
        torch.testing.assert_close(estimate[name].as_tensor(), exact[name].as_tensor(), rtol=1e-5, atol=1e-4)
        assert (plain[name].as_tensor() - exact[name].as_tensor()).abs().max() > 1e-2, "AtP alone is not exact here"


def test_exact_for_queries_and_keys_patched_together(one_layer):
    """A query and the key/value head it reads, patched as one cell: one joint pattern."""
    model, orig, new = one_layer
    nodes = [
        Node("q", 0, head=3, seq_pos=[[4, 6]] * BATCH),
        Node("k", 0, head=1, seq_pos=[[2, 3]] * BATCH),
        Node("q", 0, head=0),
    ]
    exact = act_patch(model, orig, nodes, linear_metric, new_input=new)
    estimate = attr_patch(model, orig, nodes, linear_metric, new_input=new, method="atp*")
    torch.testing.assert_close(torch.as_tensor(estimate), torch.as_tensor(exact), rtol=1e-5, atol=1e-4)


def naive_atp_star(model, orig, nodes: list[Node], metric, new_cache, per_prompt: bool, dropped: int | None = None):
    """The orig metric, plus for each layer of the query/key nodes (pattern after patching them
    all - orig pattern) . d metric / d pattern, with the patterns from a run with those nodes
    patched, plus for every other node (new - orig) . d metric / d activation; with `dropped`,
    the gradients are taken with layer `dropped`'s attention and MLP outputs detached."""
    batch, seq_len = orig.shape
    qk = [n for n in nodes if n.name in ("q", "k", "q_input", "k_input", "attn_scores")]
    rest = [n for n in nodes if n not in qk]
    layers = sorted({layer_of(model, n) for n in qk})
    names = [hook_of("pattern", layer) for layer in layers] + [hook_of(n.name, layer_of(model, n)) for n in rest]
    leaves, acts = {}, {}

    def make_leaf(name):
        """Add zeros that require grad: the gradient with respect to them is the activation's,
        through every path (a replaced leaf would cut the paths through earlier leaves)."""

        def hook(activation, hook):
            acts[name] = activation.detach().clone()
            leaves[name] = torch.zeros_like(activation, requires_grad=True)
            return activation + leaves[name]

        return hook

    with split_qkv_input(model, any(n.name.endswith("_input") for n in nodes)), torch.enable_grad():
        detached = (
            []
            if dropped is None
            else [(hook_of(c, dropped), lambda act, hook: act.detach()) for c in ("attn_out", "mlp_out")]
        )
        value = metric(model.run_with_hooks(orig, fwd_hooks=[(name, make_leaf(name)) for name in names] + detached))
        rows = [value[b] for b in range(batch)] if per_prompt else [value]
        gradients = []
        for v in rows:
            grads = torch.autograd.grad(v, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
            gradients.append({n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)})
        moved = {}
        for layer in layers:
            recorded = {}
            patches = []
            for node in (n for n in qk if layer_of(model, n) == layer):
                name = hook_of(node.name, layer)
                unit = node.head
                patches.append(
                    (
                        name,
                        lambda act, node=node, name=name, unit=unit: assign(
                            act, new_cache[name], node.name, unit, positions_per_prompt(node.seq_pos, batch, seq_len)
                        ),
                    )
                )
            pattern = hook_of("pattern", layer)
            patches.append((pattern, lambda act, pattern=pattern: recorded.__setitem__(pattern, act.clone())))
            run_with_patches(model, orig, patches)
            moved[pattern] = recorded[pattern] - acts[pattern]
        for node in rest:
            name = hook_of(node.name, layer_of(model, node))
            patched = acts[name].clone()
            assign(
                patched,
                new_cache[name],
                node.name,
                node.head if node.head is not None else node.neuron,
                positions_per_prompt(node.seq_pos, batch, seq_len),
            )
            moved[name] = patched - acts[name]
    estimates = []
    for b, row in enumerate(rows):
        total = row.detach().clone()
        for name, difference in moved.items():
            product = difference * gradients[b][name]
            total = total + (product[b] if per_prompt else product).sum()
        estimates.append(total)
    return torch.stack(estimates) if per_prompt else estimates[0]


@pytest.mark.parametrize("per_prompt", [False, True])
def test_each_cell_matches_the_naive_reference(small_model, per_prompt):
    """Queries, keys (kv heads on the grouped-query model), their inputs and the scores, one
    layer, by position: every cell against the naive reference, patched one at a time."""
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt)
    sweep = IterNode(["q", "k", "attn_scores", "k_input"], layers=[1], seq_pos="each")
    estimates = attr_patch(model, orig, sweep, metric, new_input=new, method="atp*")
    new_cache = full_cache(model, new)
    with split_qkv_input(model, True):
        new_cache.update(full_cache(model, new))
    for name, result in estimates.items():
        unit = "kv_head" if "kv_head" in result.dims else "head"
        for position, head in [(0, 0), (3, 1), (6, 1), (2, 0)]:
            node = Node(name, 1, head=head, seq_pos=position)
            expected = naive_atp_star(model, orig, [node], metric, new_cache, per_prompt)
            assert_close(result.sel(layer=1, seq_pos=position, **{unit: head}), expected)


def test_a_mixed_list_matches_the_naive_reference(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    nodes = [
        Node("q", 2, head=1, seq_pos=-1),
        Node("k", 2, head=0),
        Node("k", 1, head=1, seq_pos=[[2, 3]] * BATCH),
        Node("z", 2, head=1),
        Node("post", 0, neuron=5),
    ]
    estimate = attr_patch(model, orig, nodes, metric, new_input=new, method="atp*")
    assert_close(estimate, naive_atp_star(model, orig, nodes, metric, full_cache(model, new), per_prompt=False))


def test_other_components_are_estimated_as_by_atp(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    sweep = IterNode(["z", "v", "pattern", "mlp_out", "resid_pre"])
    star = attr_patch(model, orig, sweep, logit_diff_metric(), new_input=new, method="atp*")
    plain = attr_patch(model, orig, sweep, logit_diff_metric(), new_input=new)
    for name in sweep.names:
        torch.testing.assert_close(star[name].as_tensor(), plain[name].as_tensor(), rtol=0, atol=0)


def test_an_identical_new_input_changes_nothing(small_model):
    model = small_model
    orig, _ = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    unpatched = metric(model(orig))
    estimates = attr_patch(model, orig, IterNode(["q", "k"], seq_pos="each"), metric, new_input=orig, method="atp*")
    for result in estimates.values():
        assert torch.equal(result.as_tensor(), torch.full_like(result.as_tensor(), float(unpatched.detach())))


def test_pattern_passes_in_small_chunks_give_the_same_estimates(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    sweep = IterNode(["q", "k"], seq_pos="each", layers=[0, 2])
    whole = attr_patch(model, orig, sweep, logit_diff_metric(), new_input=new, method="atp*")
    chunked = attr_patch(model, orig, sweep, logit_diff_metric(), new_input=new, method="atp*", batch_size=2)
    for name in sweep.names:
        torch.testing.assert_close(chunked[name].as_tensor(), whole[name].as_tensor(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4's native bridges fire hook_attn_scores after the softmax")
def test_scores_a_native_bridge_fires_after_the_softmax_are_refused(one_layer):
    model, orig, new = one_layer
    for patch in (act_patch, attr_patch):
        with raises("fires hook_attn_scores only after the softmax"):
            patch(model, orig, Node("attn_scores", 0), linear_metric, new_input=new)


@pytest.mark.parametrize("per_prompt", [False, True])
def test_grad_drop_matches_the_naive_reference(small_model, per_prompt):
    """GradDrop: the mean over layers (divided by n_layers - 1) of |AtP* with that layer's
    outputs detached|, for a head, a query and a neuron."""
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt)
    new_cache = full_cache(model, new)
    n_layers = model.cfg.n_layers
    for node in (Node("z", 1, head=1), Node("q", 2, head=0, seq_pos=-1), Node("post", 0, neuron=3)):
        got = attr_patch(model, orig, node, metric, new_input=new, method="atp*", estimate="delta", grad_drop=True)
        with torch.no_grad():
            unpatched = metric(model(orig))
        per_layer = [
            (naive_atp_star(model, orig, [node], metric, new_cache, per_prompt, dropped=layer) - unpatched).abs()
            for layer in range(n_layers)
        ]
        assert_close(got, sum(per_layer) / (n_layers - 1))
        assert (torch.as_tensor(got) >= 0).all()


def test_grad_drop_is_explained_where_it_does_not_apply(small_model):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    node = Node("z", 1, head=1)
    with raises("grad_drop is part of AtP\\*: use method='atp\\*'"):
        attr_patch(model, orig, node, logit_diff_metric(), new_input=new, grad_drop=True, estimate="delta")
    with raises("use estimate='delta' with it"):
        attr_patch(model, orig, node, logit_diff_metric(), new_input=new, method="atp*", grad_drop=True)
