"""act_patch sweeps against TransformerLens 4's own `patching.get_act_patch_*` helpers."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, logit_diff_metric, make_inputs
from tests.models import TL_MAJOR
from transformer_lens_patching import IterNode, act_patch

pytestmark = pytest.mark.skipif(TL_MAJOR < 4, reason="get_act_patch_* as cross-checked here are TransformerLens 4.3's")


@pytest.fixture
def setup(gpt2_model):
    orig, new = make_inputs(gpt2_model)
    with torch.no_grad():
        _, new_cache = gpt2_model.run_with_cache(new)
    return gpt2_model, orig, new, new_cache, logit_diff_metric()


@pytest.mark.parametrize(
    "component, helper",
    [("z", "get_act_patch_attn_head_out_all_pos"), ("q", "get_act_patch_attn_head_q_all_pos"),
     ("k", "get_act_patch_attn_head_k_all_pos"), ("v", "get_act_patch_attn_head_v_all_pos"),
     ("pattern", "get_act_patch_attn_head_pattern_all_pos")],
)  # fmt: skip
def test_heads_all_positions(setup, component, helper):
    from transformer_lens import patching

    model, orig, new, new_cache, metric = setup
    ours = act_patch(model, orig, IterNode(component), metric, new_input=new)[component]
    assert ours.dims == ("layer", "head")
    with torch.no_grad():
        assert_close(ours, getattr(patching, helper)(model, orig, new_cache, metric))


def test_heads_by_position(setup):
    from transformer_lens import patching

    model, orig, new, new_cache, metric = setup
    ours = act_patch(model, orig, IterNode("z", seq_pos="each"), metric, new_input=new)["z"]
    with torch.no_grad():
        theirs = patching.get_act_patch_attn_head_out_by_pos(model, orig, new_cache, metric)
    assert_close(ours.permute_dims("layer", "seq_pos", "head"), theirs)


def test_block_every(setup):
    from transformer_lens import patching

    model, orig, new, new_cache, metric = setup
    names = ["resid_pre", "attn_out", "mlp_out"]
    ours = act_patch(model, orig, IterNode(names, seq_pos="each"), metric, new_input=new)
    with torch.no_grad():
        theirs = patching.get_act_patch_block_every(model, orig, new_cache, metric)
    for index, name in enumerate(names):
        assert ours[name].dims == ("seq_pos", "layer")
        assert_close(ours[name].permute_dims("layer", "seq_pos"), theirs[index])
