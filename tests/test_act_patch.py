"""act_patch against the naive reference (one full forward per patch), on every test model."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import assert_close, logit_diff_metric, make_inputs
from tests.reference import full_cache, naive_act_patch, split_qkv_input
from transformer_lens_patching import IterNode, Node, act_patch, mean_ablation_cache


def node_cases(model, batch: int) -> dict[str, list[Node]]:
    """Every Node form, on layers and heads that exist in `model`."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
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
        "k last kv head": [Node("k", 2, head=n_kv - 1)],
        "v at pos": [Node("v", 0, head=0, seq_pos=1)],
        "pattern": [Node("pattern", 2, head=1)],
        "pattern per-prompt query pos": [Node("pattern", 1, head=0, seq_pos=per_prompt)],
        "attn_scores": [Node("attn_scores", 1, head=2)],
        "pre neuron": [Node("pre", 1, neuron=5)],
        "post neuron at pos": [Node("post", 2, neuron=7, seq_pos=2)],
        "post all": [Node("post", 1)],
        "q_input head": [Node("q_input", 1, head=2)],
        "k_input kv head": [Node("k_input", 2, head=n_kv - 1)],
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
