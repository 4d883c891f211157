"""act_patch against the naive reference (one full forward per patch), on every test model, and its
errors: nodes, inputs, caches and metrics that do not fit the model or the prompts."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import assert_close, logit_diff_metric, make_inputs, n_kv, raises
from tests.oracles.reference import full_cache, naive_act_patch, split_qkv_input
from transformer_lens_patching import IterNode, Node, PatchingError, act_patch, mean_ablation_cache


def node_cases(model, batch: int) -> dict[str, list[Node]]:
    """Every Node form, on layers and heads that exist in `model`."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    kv_heads = n_kv(model)
    last = n_layers - 1
    per_prompt = torch.arange(batch) % 5 + 1
    two_per_prompt = torch.stack([per_prompt, per_prompt - 1], dim=1)
    cases = {
        "z one head": [Node("z", last, head=n_heads - 1)],
        "z all heads": [Node("z", 1)],
        "full hook name, last layer": [Node(f"blocks.{last}.attn.hook_z", head=0)],
        "negative layer": [Node("resid_post", -1)],
        "resid_pre int pos": [Node("resid_pre", 2, seq_pos=-1)],
        "resid_mid 1-D pos": [Node("resid_mid", 1, seq_pos=per_prompt)],
        "resid_post 2-D pos": [Node("resid_post", 0, seq_pos=two_per_prompt)],
        "attn_out": [Node("attn_out", 1)],
        "mlp_out at pos": [Node("mlp_out", 2, seq_pos=3)],
        "q": [Node("q", 1, head=1)],
        "k last kv head": [Node("k", 2, head=kv_heads - 1)],
        "v at pos": [Node("v", 0, head=0, seq_pos=1)],
        "pattern": [Node("pattern", 2, head=1)],
        "pattern per-prompt query pos": [Node("pattern", 1, head=0, seq_pos=per_prompt)],
        "attn_scores": [Node("attn_scores", 1, head=2)],
        "pre neuron": [Node("pre", 1, neuron=5)],
        "post neuron at pos": [Node("post", 2, neuron=7, seq_pos=2)],
        "post all": [Node("post", 1)],
        "q_input head": [Node("q_input", 1, head=2)],
        "k_input kv head": [Node("k_input", 2, head=kv_heads - 1)],
        "v_input all": [Node("v_input", 1)],
        "embed": [Node("embed")],
        "list patched together": [
            Node("z", 0, head=1),
            Node("mlp_out", 1, seq_pos=-1),
            Node("resid_pre", 3, seq_pos=2),
        ],
    }
    if model.cfg.positional_embedding_type == "standard":
        cases["pos_embed"] = [Node("pos_embed", seq_pos=2)]
    return cases


_SHAPE_ONLY = SimpleNamespace(
    cfg=SimpleNamespace(n_layers=4, n_heads=4, n_key_value_heads=4, positional_embedding_type="standard")
)
CASE_NAMES = list(node_cases(_SHAPE_ONLY, 3))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_node_forms_match_naive(model, case):
    orig, new = make_inputs(model)
    nodes = node_cases(model, orig.shape[0]).get(case)
    if nodes is None:
        pytest.skip(f"{case} does not exist on this model")
    metric = logit_diff_metric(per_prompt=True)
    with split_qkv_input(model, any(n.name.endswith("_input") for n in nodes)):
        new_cache = full_cache(model, new)
    expected = naive_act_patch(model, orig, nodes, metric, new_cache)
    spec = nodes[0] if len(nodes) == 1 else nodes
    assert_close(act_patch(model, orig, spec, metric, new_input=new), expected)
    assert_close(act_patch(model, orig, spec, metric, new_cache="zero"), naive_act_patch(model, orig, nodes, metric, 0))


SWEEPS = {
    "z": IterNode("z"),
    "qkv": IterNode(["q", "k", "v"]),
    "pattern": IterNode("pattern", layers=[0, 1]),
    "block every pos": IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each"),
    "post restricted": IterNode("post", layers=[1], neurons=[0, 3, 7]),
    "q_input fixed pos": IterNode("q_input", seq_pos=-1, layers=[2]),
}


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_iter_node_matches_naive_per_cell(small_model, sweep):
    model = small_model
    orig, new = make_inputs(model)
    iter_node = SWEEPS[sweep]
    metric = logit_diff_metric(per_prompt=True)
    results = act_patch(model, orig, iter_node, metric, new_input=new)
    with split_qkv_input(model, True):
        new_cache = full_cache(model, new)
    unpatched = metric(model(orig)).detach()
    assert set(results) == set(iter_node.names)
    for name, result in results.items():
        assert result.dims[-1] == "batch" and result.shape[-1] == orig.shape[0]
        expected = torch.empty_like(result.as_tensor())
        for index in itertools.product(*[range(n) for n in result.shape[:-1]]):
            cell = dict(zip(result.dims, (result.coords[d][i] for d, i in zip(result.dims, index))))
            unit = next((cell[d] for d in ("head", "kv_head", "neuron") if d in cell), None)
            node = Node(
                name,
                cell.get("layer"),
                head=unit if "neuron" not in cell else None,
                neuron=unit if "neuron" in cell else None,
                seq_pos=cell.get("seq_pos", None if iter_node.seq_pos == "each" else iter_node.seq_pos),
            )
            expected[index] = naive_act_patch(model, orig, [node], metric, new_cache)
        assert_close(result, expected)
        assert (result.as_tensor() - unpatched).abs().max() > 1e-3, (
            "no patch had an effect: the test would not notice a wrong engine"
        )


def test_smollm2_sweeps_match_naive(smollm2_model):
    model = smollm2_model
    orig, new = make_inputs(model, batch=2, seq_len=6)
    metric = logit_diff_metric()
    new_cache = full_cache(model, new)
    results = act_patch(model, orig, IterNode(["z", "k"], layers=[0, 17, 29]), metric, new_input=new)
    for name, result in results.items():
        for i, layer in enumerate(result.coords["layer"]):
            for j, head in enumerate(result.coords[result.dims[1]]):
                expected = naive_act_patch(model, orig, [Node(name, layer, head=head)], metric, new_cache)
                assert_close(result[i, j], expected)
    resid = act_patch(model, orig, IterNode("resid_pre", seq_pos="each", layers=[0, 29]), metric, new_input=new)[
        "resid_pre"
    ]
    assert resid.dims == ("seq_pos", "layer")
    for pos in range(orig.shape[1]):
        for i, layer in enumerate((0, 29)):
            assert_close(
                resid[pos, i], naive_act_patch(model, orig, [Node("resid_pre", layer, seq_pos=pos)], metric, new_cache)
            )


def test_mean_ablation_matches_naive(model):
    orig, new = make_inputs(model, batch=4)
    groups = ["a", "b", "a", "b"]
    _, cache = model.run_with_cache(new)
    means = mean_ablation_cache(cache, groups=groups)
    node = Node("z", 1, head=0)
    z = cache["blocks.1.attn.hook_z"]
    expected_z = torch.stack([z[[0, 2]].mean(0), z[[1, 3]].mean(0), z[[0, 2]].mean(0), z[[1, 3]].mean(0)])
    torch.testing.assert_close(means["blocks.1.attn.hook_z"], expected_z)
    metric = logit_diff_metric()
    expected = naive_act_patch(model, orig, [node], metric, {"blocks.1.attn.hook_z": expected_z})
    assert_close(act_patch(model, orig, node, metric, new_cache=means), expected)
    batch_mean = mean_ablation_cache(cache)
    torch.testing.assert_close(batch_mean["blocks.1.attn.hook_z"], z.mean(0, keepdim=True).expand_as(z))


def test_loss_metrics(small_model):
    model = small_model
    orig, new = make_inputs(model)
    node = Node("resid_pre", 1)

    def logits_metric(logits):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), orig[:, 1:].reshape(-1), reduction="none"
        ).reshape(orig.shape[0], -1)

    expected = naive_act_patch(model, orig, [node], logits_metric, full_cache(model, new))
    assert_close(act_patch(model, orig, node, "loss_per_token", new_input=new), expected)
    assert_close(act_patch(model, orig, node, "loss", new_input=new), expected.mean())
    with torch.no_grad():
        assert_close(act_patch(model, orig, node, "loss", new_input=orig), model(orig, return_type="loss"))


def test_apply_metric_to_cache(small_model):
    model = small_model
    orig, new = make_inputs(model)
    read = lambda cache: cache["blocks.2.attn.hook_pattern"][:, 0, -1, 0]  # noqa: E731
    result = act_patch(model, orig, IterNode("z", layers=[0, 1]), read, new_input=new, apply_metric_to_cache=True)["z"]
    new_cache = full_cache(model, new)
    for layer in (0, 1):
        for head in range(model.cfg.n_heads):
            captured = {}
            with torch.no_grad():
                hooks = [
                    (f"blocks.{layer}.attn.hook_z", lambda act, hook, h=head: _patched(act, new_cache, layer, h)),
                    ("blocks.2.attn.hook_pattern", lambda act, hook: captured.setdefault("p", act.clone())),
                ]
                model.run_with_hooks(orig, fwd_hooks=hooks)
            assert_close(result[layer, head], captured["p"][:, 0, -1, 0])
    assert result.dims == ("layer", "head", "batch")


def _patched(act, cache, layer, head):
    out = act.clone()
    out[:, :, head] = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
    return out


# --- errors: every invalid input raises one PatchingError that says what was wrong ---


def patch(model, node, **kwargs):
    """act_patch `node` with new_input from make_inputs, unless kwargs say otherwise."""
    orig, new = make_inputs(model)
    kwargs.setdefault("new_input", new)
    return act_patch(model, orig, node, kwargs.pop("metric", logit_diff_metric()), **kwargs)


def test_layer_out_of_range(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"Layer {n} is out of range: expected 0 <= layer < {n}"):
        patch(small_model, Node("z", n, head=0))


def test_negative_layer_beyond_n_layers(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"Layer {-n - 1} is out of range"):
        patch(small_model, Node("resid_pre", -n - 1))


def test_head_out_of_range(small_model):
    n = small_model.cfg.n_heads
    with raises(rf"Head {n} is out of range for 'z': expected 0 <= head < {n}"):
        patch(small_model, Node("z", 0, head=n))


@pytest.mark.parametrize("name", ["k", "v", "k_input", "v_input"])
def test_kv_head_out_of_range_on_gqa(gqa_model, name):
    """A head index that is a valid query head but not a key/value head mentions key/value heads."""
    kv_heads = n_kv(gqa_model)
    assert kv_heads < gqa_model.cfg.n_heads
    with raises(rf"Key/value head {kv_heads} is out of range for '{name}'.*key/value head"):
        patch(gqa_model, Node(name, 0, head=kv_heads))


def test_iter_node_heads_beyond_kv_heads_on_gqa(gqa_model):
    """heads=[3] is a valid query head but not a key/value head of k."""
    with raises(r"kv_heads contains 3, out of range.*2 key/value heads"):
        patch(gqa_model, IterNode(["q", "k"], heads=[3]))


def test_neuron_out_of_range(small_model):
    d_mlp = small_model.cfg.d_mlp
    with raises(rf"Neuron {d_mlp} is out of range for 'post': expected 0 <= neuron < {d_mlp}"):
        patch(small_model, Node("post", 0, neuron=d_mlp))


def test_negative_head(small_model):
    with raises(r"Head -1 is out of range"):
        patch(small_model, Node("z", 0, head=-1))


def test_seq_pos_1d_wrong_length(small_model):
    with raises(r"seq_pos has shape \(2,\).*expected shape \(3,\)"):
        patch(small_model, Node("resid_pre", 0, seq_pos=[1, 2]))


def test_seq_pos_2d_wrong_rows(small_model):
    with raises(r"seq_pos has shape \(2, 2\).*one row per prompt: expected shape \(3, k\)"):
        patch(small_model, Node("resid_pre", 0, seq_pos=[[1, 2], [3, 4]]))


@pytest.mark.parametrize("seq_pos", [7, -8, [0, 7, 1], [[0, 1], [2, 3], [4, 9]]])
def test_seq_pos_out_of_range(small_model, seq_pos):
    with raises(r"seq_pos contains position -?\d+, out of range for sequences of length 7"):
        patch(small_model, Node("resid_pre", 0, seq_pos=seq_pos))


def test_new_input_of_another_shape(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"new_input has token shape \(3, 6\), but orig_input has \(3, 7\)"):
        act_patch(small_model, orig, Node("z", 0), logit_diff_metric(), new_input=new[:, :6])


def test_new_input_of_another_batch(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"new_input has token shape \(2, 7\), but orig_input has \(3, 7\)"):
        act_patch(small_model, orig, Node("z", 0), logit_diff_metric(), new_input=new[:2])


def test_new_cache_missing_hook_suggests_closest(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new, names_filter=lambda name: name in ("blocks.1.attn.hook_q", "hook_embed"))
    with raises(
        r"new_cache has no activation 'blocks\.1\.attn\.hook_z'.*Closest cached name: 'blocks\.1\.attn\.hook_q'"
    ):
        act_patch(small_model, orig, Node("z", 1, head=0), logit_diff_metric(), new_cache=cache)


def test_new_cache_wrong_batch(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new[:2])
    with raises(r"new_cache\['blocks\.1\.attn\.hook_z'\] has batch size 2, but the orig input has 3 prompts"):
        act_patch(small_model, orig, Node("z", 1, head=0), logit_diff_metric(), new_cache=cache)


@pytest.mark.parametrize("length", [5, 14])
def test_new_cache_wrong_sequence_length(small_model, length):
    """A cache of prompts of another length is rejected up front, naming both lengths."""
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new.repeat(1, 2)[:, :length])
    with raises(rf"new_cache.*\b{length}\b.*\b7\b"):
        act_patch(small_model, orig, Node("z", 1, head=0), logit_diff_metric(), new_cache=cache)


def test_new_cache_wrong_sequence_length_with_seq_pos(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new[:, :5])
    with raises(r"new_cache.*\b5\b.*\b7\b"):
        act_patch(small_model, orig, Node("z", 1, head=0, seq_pos=6), logit_diff_metric(), new_cache=cache)


def test_new_cache_entry_not_a_tensor(small_model):
    with raises(r"new_cache.*blocks\.0\.attn\.hook_z.*tensor"):
        patch(small_model, Node("z", 0, head=1), new_input=None, new_cache={"blocks.0.attn.hook_z": [1, 2]})


def test_new_cache_invalid_string(small_model):
    with raises(r"new_cache must be an ActivationCache, a dict or 'zero'; got 'mean'"):
        patch(small_model, Node("z", 0), new_input=None, new_cache="mean")


def test_new_cache_wrong_type(small_model):
    with raises(r"Expected an ActivationCache or a dict of tensors, got int"):
        patch(small_model, Node("z", 0), new_input=None, new_cache=3)


def test_metric_not_callable(small_model):
    with raises(r"patching_metric must be a callable, 'loss' or 'loss_per_token'; got int"):
        patch(small_model, Node("z", 0), metric=42)


def test_unknown_metric_string(small_model):
    with raises(r"Unknown metric 'logit_diff': expected a callable, 'loss' or 'loss_per_token'"):
        patch(small_model, Node("z", 0), metric="logit_diff")


def test_metric_returning_a_string(small_model):
    with raises(r"The metric returned str, which is not a number or tensor"):
        patch(small_model, IterNode("z", layers=[0]), metric=lambda logits: "x")


def test_metric_returning_different_shapes(small_model):
    calls = []

    def metric(logits):
        calls.append(1)
        diff = logits[:, -1, 5] - logits[:, -1, 6]
        return diff if len(calls) == 1 else diff.mean()

    with raises(r"The metric returned values of different shapes across the sweep: \[\(\), \(3,\)\]"):
        patch(small_model, IterNode("z", layers=[0]), metric=metric, batch_size=1)


def test_loss_metric_on_one_token(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"The 'loss' metrics need sequences of at least 2 tokens"):
        act_patch(small_model, orig[:, :1], Node("z", 0), "loss", new_input=new[:, :1])


def test_neither_new_input_nor_new_cache(small_model):
    with raises(r"Nothing to patch in: pass new_input.*new_cache"):
        patch(small_model, Node("z", 0), new_input=None)


def test_empty_node_list(small_model):
    with raises(r"patching_nodes must be a Node, a non-empty list of Nodes or an IterNode"):
        patch(small_model, [])


def test_string_as_patching_nodes(small_model):
    with raises(r"patching_nodes must be a Node, a non-empty list of Nodes or an IterNode"):
        patch(small_model, "z")


def test_iter_node_layer_restriction_out_of_range(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"layers contains {n}, out of range"):
        patch(small_model, IterNode("z", layers=[0, n]))


def test_iter_node_head_restriction_out_of_range(small_model):
    n = small_model.cfg.n_heads
    with raises(rf"heads contains {n}, out of range"):
        patch(small_model, IterNode("z", heads=[n]))


def test_iter_node_fixed_seq_pos_out_of_range(small_model):
    with raises(r"seq_pos contains position 9, out of range for sequences of length 7"):
        patch(small_model, IterNode("resid_pre", seq_pos=9))


def test_missing_hook_pos_embed_on_rotary_model(gqa_model):
    """The rotary model computes no positional embedding: say so, do not KeyError."""
    with raises(r"never fired|no hook"):
        patch(gqa_model, Node("pos_embed"))


def test_missing_hook_pos_embed_zero_ablation(gqa_model):
    with raises(r"never fired|no hook"):
        patch(gqa_model, Node("pos_embed"), new_input=None, new_cache="zero")


def test_non_transformer_lens_model():
    orig, new = make_inputs(None)
    with raises(r"Expected a TransformerLens .* model .*got Linear"):
        act_patch(torch.nn.Linear(3, 3), orig, Node("z", 0), logit_diff_metric(), new_input=new)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_bad_batch_size(small_model, batch_size):
    with raises(r"batch_size must be a positive int"):
        patch(small_model, IterNode("z", layers=[0]), batch_size=batch_size)


def test_bad_max_memory(small_model):
    with raises(r"max_memory must be a positive number of bytes, got 0"):
        patch(small_model, IterNode("z", layers=[0]), max_memory=0)


def test_empty_orig_input(small_model):
    """Prompts with no positions are rejected with a PatchingError, not a reshape error deep in the model."""
    orig, new = make_inputs(small_model)
    with raises(r"\(3, 0\)"):
        act_patch(small_model, orig[:, :0], Node("z", 0, head=1), logit_diff_metric(), new_input=new[:, :0])


def test_empty_positions_per_prompt(small_model):
    """A long (batch, 0) seq_pos either patches nothing or says so; it must not claim a float dtype."""
    orig, new = make_inputs(small_model)
    node = Node("z", 0, head=1, seq_pos=torch.zeros(3, 0, dtype=torch.long))
    metric = logit_diff_metric()
    try:
        result = act_patch(small_model, orig, node, metric, new_input=new)
    except PatchingError as error:
        assert "dtype" not in str(error), f"misleading message: {error}"
    else:
        with torch.no_grad():
            torch.testing.assert_close(result, metric(small_model(orig)))


def test_float_tokens(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"Token input must be an int tensor"):
        act_patch(small_model, orig.float(), Node("z", 0), logit_diff_metric(), new_input=new)


def test_a_sweep_of_a_component_without_layers_is_one_cell(small_model):
    """`IterNode("embed")` has one cell (no layer, no unit): from the model's own cache it is the
    unpatched metric, as a 0-dim result; from the new prompts, the run with the embeddings replaced."""
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    cache = full_cache(model, orig)
    own = act_patch(model, orig, IterNode("embed"), metric, new_cache=cache)["embed"]
    assert own.dims == () and own.shape == ()
    assert_close(own.as_tensor(), metric(model(orig)).detach())
    patched = act_patch(model, orig, IterNode("embed"), metric, new_input=new)["embed"]
    assert_close(patched.as_tensor(), naive_act_patch(model, orig, [Node("embed")], metric, full_cache(model, new)))
