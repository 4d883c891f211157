"""path_patch against the naive two-pass reference, for every sender and receiver type."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_at_scale, logit_diff_metric, make_inputs
from tests.reference import naive_path_patch
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
