"""Path patching on models that normalise each attention and MLP output before adding it to the
residual stream (Gemma-2, Gemma-3, OLMo-2): exact against the two-pass algorithm written literally.

A head's write to the residual stream is not its z times W_O there, so path patching lets the model
compute each layer whose senders change, with every other head frozen at its orig output: the
post-norm sees the sender's change together with the rest of its layer's output, as the
definition (freeze, record, patch) does. Tiny random models: on TransformerLens 4 booted from
the `transformers` configs of Gemma-2 and OLMo-2, on TransformerLens 2 a HookedTransformer with
`use_normalization_before_and_after`.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, logit_diff_metric
from tests.oracles.models import booted_family, post_norm_hooked
from tests.oracles.reference import naive_path_patch
from transformer_lens_patching import IterNode, Node, PatchingError, attr_edges, path_patch

ORIG = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
NEW = torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(1))
LAYERS = 3
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0)),
}


@functools.cache
def post_norm_model(family: str):
    """A tiny random post-norm model (3 layers, d_model 64, 4 heads, 2 key/value heads)."""
    if TL_MAJOR < 4:
        return post_norm_hooked(n_layers=LAYERS, seed=int(family == "olmo2")).eval()
    config_class, model_class, extra = FAMILIES[family]
    return booted_family(family, config_class, model_class, num_hidden_layers=LAYERS, initializer_range=0.5, **extra)


@pytest.fixture(params=list(FAMILIES))
def model(request):
    return post_norm_model(request.param)


@pytest.mark.parametrize("mlps_direct", [True, False])
def test_every_head_to_the_logits_is_the_literal_two_pass_algorithm(model, mlps_direct):
    metric = logit_diff_metric()
    ours = path_patch(
        model, ORIG, NEW, IterNode("z"), Node("resid_post", LAYERS - 1), metric, direct_includes_mlps=mlps_direct
    )["z"].as_tensor()
    for layer in range(LAYERS):
        for head in range(model.cfg.n_heads):
            expected = naive_path_patch(
                model,
                ORIG,
                NEW,
                [Node("z", layer, head=head)],
                [Node("resid_post", LAYERS - 1)],
                metric,
                mlps_direct=mlps_direct,
            )
            assert_close(ours[layer, head], expected)


def test_a_head_and_an_mlp_into_a_later_layer(model):
    """Senders in layer 0 (a head, the MLP's neurons) into layer 2's residual stream, its queries and
    its MLP's pre-activations, through the residual stream only: each layer between is computed by
    the model."""
    metric = logit_diff_metric()
    for sender in (Node("z", 0, head=1), Node("post", 0)):
        for receiver in (Node("resid_mid", 2), Node("q", 2, head=3), Node("pre", 2)):
            ours = path_patch(model, ORIG, NEW, sender, receiver, metric, direct_includes_mlps=False)
            expected = naive_path_patch(model, ORIG, NEW, [sender], [receiver], metric, mlps_direct=False)
            assert_close(ours, expected)


def test_patching_from_an_identical_run_changes_nothing(model):
    metric = logit_diff_metric()
    with torch.no_grad():
        unpatched = metric(model(ORIG))
    paths = path_patch(model, ORIG, ORIG, IterNode("z"), Node("resid_post", LAYERS - 1), metric)
    assert torch.equal(paths["z"].as_tensor(), unpatched.expand(LAYERS, model.cfg.n_heads))


def test_edges_still_refuse_what_a_linear_write_would_get_wrong(model):
    with pytest.raises(PatchingError, match="normalises each attention and MLP output"):
        attr_edges(model, ORIG, logit_diff_metric(), new_input=NEW)
