"""path_patch against the naive two-pass reference, for every sender and receiver type, and its
errors: senders, receivers, positions, inputs and caches it refuses."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_at_scale, logit_diff_metric, make_inputs, n_kv, raises
from tests.oracles.reference import naive_path_patch
from transformer_lens_patching import IterNode, Node, path_patch


def _kv_last(model) -> int:
    return (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads) - 1


SENDERS = {
    "z head": lambda m: [Node("z", 0, head=1)],
    "z all heads": lambda m: [Node("z", 1)],
    "attn_out": lambda m: [Node("attn_out", 0)],
    "post neuron": lambda m: [Node("post", 1, neuron=3)],
    "post all": lambda m: [Node("post", 0)],
    "mlp_out": lambda m: [Node("mlp_out", 1)],
    "resid_pre": lambda m: [Node("resid_pre", 1)],
    "resid_mid": lambda m: [Node("resid_mid", 0)],
    "resid_post": lambda m: [Node("resid_post", 0)],
    "several": lambda m: [Node("z", 0, head=0), Node("mlp_out", 1), Node("post", 0, neuron=1)],
}
RECEIVERS = {
    "q": lambda m: [Node("q", 2, head=1)],
    "k kv head": lambda m: [Node("k", 2, head=_kv_last(m))],
    "v": lambda m: [Node("v", 3, head=0)],
    "q all heads": lambda m: [Node("q", 2)],
    "q_input": lambda m: [Node("q_input", 2, head=0)],
    "k_input all": lambda m: [Node("k_input", 3)],
    "v_input kv head": lambda m: [Node("v_input", 2, head=_kv_last(m))],
    "pattern": lambda m: [Node("pattern", 2, head=2)],
    "z": lambda m: [Node("z", 3, head=1)],
    "resid_pre": lambda m: [Node("resid_pre", 3)],
    "resid_mid": lambda m: [Node("resid_mid", 2)],
    "resid_post last": lambda m: [Node("resid_post", m.cfg.n_layers - 1)],
    "pre": lambda m: [Node("pre", 2)],
    "several layers": lambda m: [Node("q", 2, head=0), Node("v", 3, head=1), Node("resid_post", 3)],
}
MODES = {"mlps direct": True, "residual only": False}


def check(model, senders, receivers, direct_includes_mlps, seq_pos=None, per_prompt=True):
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt)
    expected = naive_path_patch(model, orig, new, senders, receivers, metric, seq_pos, mlps_direct=direct_includes_mlps)
    actual = path_patch(
        model,
        orig,
        new,
        senders[0] if len(senders) == 1 else senders,
        receivers[0] if len(receivers) == 1 else receivers,
        metric,
        seq_pos=seq_pos,
        direct_includes_mlps=direct_includes_mlps,
    )
    assert_close_at_scale(actual, expected)
    return actual


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("receiver", list(RECEIVERS))
def test_every_receiver_matches_naive(model, receiver, mode):
    check(model, [Node("z", 0, head=1), Node("mlp_out", 0)], RECEIVERS[receiver](model), MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sender", list(SENDERS))
def test_every_sender_matches_naive(model, sender, mode):
    check(
        model, SENDERS[sender](model), [Node("q", 2, head=1), Node("resid_post", model.cfg.n_layers - 1)], MODES[mode]
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seq_pos", ["int", "1-D", "2-D"])
@pytest.mark.parametrize("receiver", ["q", "pattern", "z", "resid_mid", "pre"])
def test_seq_pos_matches_naive(small_model, seq_pos, receiver, mode):
    batch = 3
    per_prompt = torch.tensor([6, 4, 5])
    positions = {"int": -2, "1-D": per_prompt, "2-D": torch.stack([per_prompt, per_prompt - 3], dim=1)}[seq_pos]
    check(small_model, [Node("z", 0), Node("post", 1)], RECEIVERS[receiver](small_model), MODES[mode], positions)
    assert batch == per_prompt.shape[0]


def _cell_nodes(result, name):
    """(index, Node) for every cell of a PatchResult whose last dim is the batch."""
    import itertools

    for index in itertools.product(*[range(n) for n in result.shape[:-1]]):
        cell = {d: result.coords[d][i] for d, i in zip(result.dims, index)}
        unit = next((cell[d] for d in ("head", "kv_head", "neuron") if d in cell), None)
        node = Node(
            name,
            cell.get("layer"),
            head=unit if "neuron" not in cell else None,
            neuron=unit if "neuron" in cell else None,
        )
        yield index, node, cell.get("seq_pos")


@pytest.mark.parametrize("mode", list(MODES))
def test_iter_senders_match_naive(small_model, mode):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    receiver = Node("resid_post", model.cfg.n_layers - 1)
    result = path_patch(model, orig, new, IterNode("z"), receiver, metric, direct_includes_mlps=MODES[mode])["z"]
    assert result.dims == ("layer", "head", "batch")
    unpatched = metric(model(orig)).detach()
    assert (result.as_tensor() - unpatched).abs().max() > 1e-3
    for index, node, _ in _cell_nodes(result, "z"):
        assert_close_at_scale(
            result[index], naive_path_patch(model, orig, new, [node], [receiver], metric, mlps_direct=MODES[mode])
        )


@pytest.mark.parametrize("mode", list(MODES))
def test_iter_receivers_match_naive(small_model, mode):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    senders = [Node("z", 0), Node("mlp_out", 0)]
    results = path_patch(
        model,
        orig,
        new,
        senders,
        IterNode(["q", "k", "v", "pattern"], layers=[1, 2]),
        metric,
        direct_includes_mlps=MODES[mode],
    )
    for name, result in results.items():
        for index, node, _ in _cell_nodes(result, name):
            expected = naive_path_patch(model, orig, new, senders, [node], metric, mlps_direct=MODES[mode])
            assert_close_at_scale(result[index], expected)


@pytest.mark.parametrize("side", ["senders", "receivers"])
def test_each_position_matches_naive(small_model, side):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    if side == "senders":
        iterated, fixed = IterNode("mlp_out", seq_pos="each", layers=[0, 1]), Node("q", 2, head=1)
        result = path_patch(model, orig, new, iterated, fixed, metric)["mlp_out"]
    else:
        iterated, fixed = IterNode("resid_mid", seq_pos="each", layers=[1, 2]), Node("z", 0)
        result = path_patch(model, orig, new, fixed, iterated, metric)["resid_mid"]
    assert result.dims == ("seq_pos", "layer", "batch")
    for index, node, pos in _cell_nodes(result, iterated.names[0]):
        senders, receivers = ([node], [fixed]) if side == "senders" else ([fixed], [node])
        assert_close_at_scale(
            result[index], naive_path_patch(model, orig, new, senders, receivers, metric, seq_pos=pos)
        )


def test_smollm2_heads_to_logits_match_naive(smollm2_model):
    model = smollm2_model
    orig, new = make_inputs(model, batch=2, seq_len=6)
    metric = logit_diff_metric()
    receiver = Node("resid_post", 29)
    for direct in (True, False):
        result = path_patch(
            model,
            orig,
            new,
            IterNode("z", layers=[27, 29], heads=[0, 8]),
            receiver,
            metric,
            direct_includes_mlps=direct,
        )["z"]
        for i, layer in enumerate((27, 29)):
            for j, head in enumerate((0, 8)):
                expected = naive_path_patch(
                    model, orig, new, [Node("z", layer, head=head)], [receiver], metric, mlps_direct=direct
                )
                assert_close_at_scale(result[i, j], expected)


# --- errors: every invalid input raises one PatchingError that says what was wrong ---


def ppatch(model, senders, receivers, **kwargs):
    """path_patch from `senders` to `receivers` with inputs from make_inputs."""
    orig, new = make_inputs(model)
    new_input = kwargs.pop("new_input", new)
    return path_patch(model, orig, new_input, senders, receivers, kwargs.pop("metric", logit_diff_metric()), **kwargs)


def test_non_transformer_lens_model():
    orig, new = make_inputs(None)
    with raises(r"Expected a TransformerLens .* model .*got Linear"):
        path_patch(torch.nn.Linear(3, 3), orig, new, Node("z", 0), Node("resid_post", 1), logit_diff_metric())


def test_path_patch_iter_node_both_sides(small_model):
    with raises(r"Only one of sender_nodes and receiver_nodes may be an IterNode"):
        ppatch(small_model, IterNode("z"), IterNode("q"))


def test_path_patch_per_node_seq_pos(small_model):
    with raises(r"has its own seq_pos, which path_patch does not allow.*seq_pos= argument"):
        ppatch(small_model, Node("z", 0, head=0, seq_pos=2), Node("resid_post", 1))


def test_path_patch_per_node_seq_pos_on_receiver_list(small_model):
    with raises(r"has its own seq_pos, which path_patch does not allow"):
        ppatch(small_model, Node("z", 0, head=0), [Node("resid_post", 1), Node("q", 2, head=0, seq_pos=[1, 2, 3])])


def test_path_patch_iter_node_fixed_seq_pos(small_model):
    with raises(r"an IterNode's seq_pos must be None or 'each'.*path_patch\(seq_pos=...\)"):
        ppatch(small_model, IterNode("z", seq_pos=3), Node("resid_post", 1))


def test_path_patch_each_plus_seq_pos(small_model):
    with raises(r"IterNode\(seq_pos='each'\) sweeps positions, so path_patch's seq_pos must be None"):
        ppatch(small_model, IterNode("z", seq_pos="each"), Node("resid_post", 1), seq_pos=2)


@pytest.mark.parametrize("sender", [Node("q", 0, head=0), Node("pattern", 0, head=0), Node("embed")])
def test_path_patch_invalid_sender(small_model, sender):
    with raises(rf"'{sender.name}' cannot be a sender in path patching\. Valid senders: z, attn_out"):
        ppatch(small_model, sender, Node("resid_post", 1))


@pytest.mark.parametrize("receiver", [Node("attn_out", 1), Node("mlp_out", 1), Node("post", 1)])
def test_path_patch_invalid_receiver(small_model, receiver):
    with raises(rf"'{receiver.name}' cannot be a receiver in path patching\. Valid receivers: q, k, v"):
        ppatch(small_model, Node("z", 0, head=0), receiver)


def test_path_patch_invalid_receiver_in_iter_node(small_model):
    with raises(r"'attn_out' cannot be a receiver"):
        ppatch(small_model, Node("z", 0, head=0), IterNode(["q", "attn_out"]))


def test_path_patch_seq_pos_wrong_shape(small_model):
    with raises(r"seq_pos has shape \(2,\).*expected shape \(3,\)"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), seq_pos=[1, 2])


def test_path_patch_seq_pos_out_of_range(small_model):
    with raises(r"seq_pos contains position 7, out of range"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), seq_pos=7)


def test_path_patch_seq_pos_float(small_model):
    with raises(r"seq_pos must hold integer positions"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), seq_pos=torch.tensor([1.0, 2.0, 3.0]))


def test_path_patch_kv_head_receiver_out_of_range(gqa_model):
    kv_heads = n_kv(gqa_model)
    with raises(rf"Key/value head {kv_heads} is out of range for 'k'.*key/value head"):
        ppatch(gqa_model, Node("z", 0, head=0), Node("k", 2, head=kv_heads))


def test_path_patch_new_input_of_another_shape(small_model):
    orig, new = make_inputs(small_model)
    with raises(r"new_input has token shape \(3, 5\), but orig_input has \(3, 7\)"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), new_input=new[:, :5])


def test_path_patch_neither_new_input_nor_new_cache(small_model):
    with raises(r"path_patch needs new_input or new_cache"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), new_input=None)


def test_path_patch_new_cache_invalid_string(small_model):
    with raises(r"new_cache must be .*; got 'mean'"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), new_input=None, new_cache="mean")


def test_path_patch_orig_cache_zero_string(small_model):
    with raises(r"orig_cache must be an ActivationCache or a dict; got 'zero'"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), orig_cache="zero")


def test_path_patch_new_cache_missing_hook(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(new, names_filter=lambda name: name == "blocks.0.attn.hook_q")
    with raises(
        r"new_cache has no activation 'blocks\.0\.attn\.hook_z'.*Closest cached name: 'blocks\.0\.attn\.hook_q'"
    ):
        path_patch(
            small_model, orig, None, Node("z", 0, head=0), Node("resid_post", 1), logit_diff_metric(), new_cache=cache
        )


def test_path_patch_caches_wrong_sequence_length(small_model):
    orig, new = make_inputs(small_model)
    _, short_new = small_model.run_with_cache(new[:, :5])
    _, short_orig = small_model.run_with_cache(orig[:, :5])
    with raises(r"new_cache.*\b5\b.*\b7\b"):
        path_patch(
            small_model,
            orig,
            None,
            Node("z", 1, head=0),
            Node("resid_post", 2),
            logit_diff_metric(),
            new_cache=short_new,
        )
    with raises(r"orig_cache.*\b5\b.*\b7\b"):
        ppatch(small_model, Node("z", 1, head=0), Node("resid_post", 2), orig_cache=short_orig)


def test_path_patch_orig_cache_wrong_batch(small_model):
    orig, new = make_inputs(small_model)
    _, cache = small_model.run_with_cache(orig[:2])
    with raises(r"orig_cache\[.*\] has batch size 2, but the orig input has 3 prompts"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), orig_cache=cache)


def test_path_patch_metric_not_callable(small_model):
    with raises(r"patching_metric must be a callable"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), metric=None)


def test_path_patch_bad_direct_includes_mlps(small_model):
    with raises(r"direct_includes_mlps must be True or False, got 'yes'"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", 1), direct_includes_mlps="yes")


def test_path_patch_layer_out_of_range(small_model):
    n = small_model.cfg.n_layers
    with raises(rf"Layer {n} is out of range"):
        ppatch(small_model, Node("z", 0, head=0), Node("resid_post", n))


def test_path_patch_batch_size_zero(small_model):
    with raises(r"batch_size must be a positive int"):
        ppatch(small_model, IterNode("z", layers=[0]), Node("resid_post", 1), batch_size=0)
