"""Stacking many patched variants in one forward pass gives the one-at-a-time results."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, logit_diff_metric, make_inputs
from transformer_lens_patching import IterNode, Node, act_patch, path_patch


def act_sweeps(model) -> dict[str, IterNode]:
    """An IterNode over every component act_patch accepts, at the first and last layer."""
    last = model.cfg.n_layers - 1
    sweeps = {
        "heads": IterNode(["z", "q", "k", "v", "pattern", "attn_scores"], layers=[0, last]),
        "head inputs": IterNode(["q_input", "k_input", "v_input"], layers=[0, last]),
        "residual by position": IterNode(["resid_pre", "resid_mid", "resid_post"], seq_pos="each", layers=[0, last]),
        "outputs by position": IterNode(["attn_out", "mlp_out"], seq_pos="each", layers=[0, last]),
        "neurons": IterNode(["pre", "post"], layers=[0, last], neurons=[0, 5, 9]),
        "heads at a position per prompt": IterNode(["z", "v"], seq_pos=torch.tensor([1, 4, 6]), layers=[1]),
        "embeddings": IterNode(["embed"], seq_pos="each"),
    }
    return sweeps


SWEEP_NAMES = [
    "heads",
    "head inputs",
    "residual by position",
    "outputs by position",
    "neurons",
    "heads at a position per prompt",
    "embeddings",
]


@pytest.mark.parametrize("sweep", SWEEP_NAMES)
def test_act_patch_stacked_equals_one_at_a_time(small_model, sweep):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    iter_node = act_sweeps(model)[sweep]
    one = act_patch(model, orig, iter_node, metric, new_input=new, batch_size=1)
    for stacked in (
        act_patch(model, orig, iter_node, metric, new_input=new),
        act_patch(model, orig, iter_node, metric, new_input=new, batch_size=5),
    ):
        assert set(stacked) == set(one)
        for name in one:
            assert stacked[name].dims == one[name].dims
            assert_close(stacked[name], one[name])


def test_apply_metric_to_cache_stacked_equals_one_at_a_time(small_model):
    model = small_model
    orig, new = make_inputs(model)
    read = lambda cache: cache["blocks.3.hook_resid_post"][:, -1, :4]  # noqa: E731
    sweep = IterNode(["z", "mlp_out"], layers=[0, 2])
    one = act_patch(model, orig, sweep, read, new_input=new, apply_metric_to_cache=True)
    stacked = act_patch(model, orig, sweep, read, new_input=new, apply_metric_to_cache=True, batch_size=4)
    for name in one:
        assert_close(stacked[name], one[name])


RECEIVERS = {
    "q": lambda m: [Node("q", 2, head=1)],
    "pattern and z": lambda m: [Node("pattern", 2, head=0), Node("z", 3, head=1)],
    "residual and neurons": lambda m: [Node("resid_mid", 1), Node("pre", 2)],
    "final residual": lambda m: [Node("resid_post", m.cfg.n_layers - 1)],
}


@pytest.mark.parametrize("receivers", list(RECEIVERS))
@pytest.mark.parametrize("direct_includes_mlps", [True, False])
def test_path_patch_stacked_equals_one_at_a_time(small_model, receivers, direct_includes_mlps):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    nodes = RECEIVERS[receivers](model)
    senders = IterNode(["z", "post"], layers=[0, 1, 2], neurons=[0, 3])
    kwargs = dict(direct_includes_mlps=direct_includes_mlps)
    one = path_patch(model, orig, new, senders, nodes, metric, batch_size=1, **kwargs)
    for stacked in (
        path_patch(model, orig, new, senders, nodes, metric, **kwargs),
        path_patch(model, orig, new, senders, nodes, metric, batch_size=3, **kwargs),
    ):
        for name in one:
            assert_close(stacked[name], one[name])


def test_path_patch_iter_receivers_stacked_equals_one_at_a_time(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    receivers = IterNode(["q", "v", "resid_pre"], seq_pos="each", layers=[1, 3])
    one = path_patch(model, orig, new, Node("z", 0), receivers, metric, batch_size=1)
    stacked = path_patch(model, orig, new, Node("z", 0), receivers, metric, batch_size=6)
    for name in one:
        assert_close(stacked[name], one[name])
