"""The engines do no more work than a sweep needs: counted layer evaluations, not timings.

An attention evaluation is one firing of `hook_pattern` (computed only where attention
runs), an MLP evaluation one firing of `mlp.hook_post`, each counted per copy of the batch.
"""

from __future__ import annotations

import torch

from tests.helpers import counted, logit_diff_metric, make_inputs
from transformer_lens_patching import IterNode, Node, act_patch, path_patch


def test_act_patch_runs_each_cell_from_its_layer(small_model):
    """One orig run for the residual stream, then each head's patch from its own layer on."""
    model = small_model
    orig, new = make_inputs(model)
    new_cache = model.run_with_cache(new)[1]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with counted(model, orig.shape[0]) as counts:
        act_patch(model, orig, IterNode("z"), logit_diff_metric(), new_cache=new_cache)
    needed = n_layers + sum(n_heads * (n_layers - layer) for layer in range(n_layers))
    assert counts == {"attention": needed, "mlp": needed}


def test_path_patch_to_logits_computes_no_attention_after_caching(small_model):
    """Heads -> final residual stream: pass 1 runs only MLPs, from the sender's layer on;
    pass 2 is only the unembedding. Attention runs only to cache the orig and new runs."""
    model = small_model
    orig, new = make_inputs(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with counted(model, orig.shape[0]) as counts:
        path_patch(model, orig, new, IterNode("z"), Node("resid_post", n_layers - 1), logit_diff_metric())
    pass_one = sum(n_heads * (n_layers - layer) for layer in range(n_layers))
    assert counts == {"attention": 2 * n_layers, "mlp": 2 * n_layers + pass_one}


def test_path_patch_to_queries_stops_pass_one_at_the_receiver(small_model):
    """Heads -> queries at layer 2: pass 1 runs MLPs up to layer 2 and stops at the queries;
    pass 2 runs from layer 2; heads at layer 2 and later reach nothing and are not run."""
    model = small_model
    orig, new = make_inputs(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    receiver = 2
    with counted(model, orig.shape[0]) as counts:
        path_patch(model, orig, new, IterNode("z"), Node("q", receiver, head=0), logit_diff_metric())
    pass_one_mlps = sum(n_heads * (receiver - layer) for layer in range(receiver))
    pass_two = n_heads * receiver * (n_layers - receiver)
    assert counts == {"attention": 2 * n_layers + pass_two, "mlp": 2 * n_layers + pass_one_mlps + pass_two}


def test_unreachable_path_is_the_unpatched_metric_without_running_layers(small_model):
    """A sender after its receiver changes nothing: the orig metric, from one orig run."""
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric(per_prompt=True)
    with counted(model, orig.shape[0]) as counts:
        result = path_patch(model, orig, new, Node("z", 3, head=0), Node("q", 1, head=0), metric)
    with torch.no_grad():
        unpatched = metric(model(orig))
    torch.testing.assert_close(result, unpatched, rtol=1e-5, atol=1e-5)
    assert counts == {"attention": model.cfg.n_layers, "mlp": model.cfg.n_layers}
