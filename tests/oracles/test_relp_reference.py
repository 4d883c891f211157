"""Checks of the RelP reference (tests/oracles/relp_reference.py), and of attr_patch(method="relp") against it.

The reference's walk is checked twice: with the true local Jacobians it is the ordinary
gradient (autograd through the whole model); with RelP's rules it is autograd through the
model with the rules written as hooks (norm scales and attention patterns detached, the MLP's
activation replaced by a value-preserving substitution). Models: the random GPT-2-shaped and
Llama-shaped fixtures with every norm weight and bias randomised (the gated MLP's b_in too),
and two small variants with LNPre / ReLU and RMSPre / GELU / partial rotary on adjacent pairs.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TL_MAJOR, logit_diff_metric, make_inputs
from tests.oracles import models
from tests.oracles.relp_reference import hook_names, ratio, relevance_gradients, relp_deltas

pytestmark = pytest.mark.skipif(TL_MAJOR != 2, reason="the reference reads HookedTransformer weights")

VARIANTS = ["gpt2", "gqa", "lnpre_relu", "rmspre_gated"]
BIASES = ("b", "b_in", "b_out", "b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_O", "b_U")


def randomised(model, seed: int = 2):
    """`model` with every norm weight (around 1) and every bias (around 0) random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            last = name.split(".")[-1]
            if last == "w":
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
            elif last in BIASES:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def small(**config):
    """A 2-layer random HookedTransformer, d_model 32, 4 heads of 8."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shape = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=models.VOCAB, n_ctx=64)
    return HookedTransformer(HookedTransformerConfig(**shape, initializer_range=0.2, seed=0, **config))


def build(name: str, tok):
    if name == "gpt2":
        return randomised(models.gpt2_like(tok=tok))
    if name == "gqa":
        return randomised(models.llama_gqa(tok=tok))
    if name == "lnpre_relu":
        return randomised(small(act_fn="relu", normalization_type="LNPre"))
    return randomised(
        small(
            act_fn="gelu",
            normalization_type="RMSPre",
            n_key_value_heads=2,
            positional_embedding_type="rotary",
            rotary_dim=4,
            rotary_adjacent_pairs=True,
            gated_mlp=True,
        )
    )


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, tok):
    return build(request.param, tok)


def autograd_gradients(model, tokens, metric, rule_hooks=()) -> dict[str, torch.Tensor]:
    """d metric / d activation at every hook of `hook_names`, by autograd: a zero tensor that
    requires grad is added at each, after `rule_hooks` (if any) have run there."""
    names = hook_names(model.cfg.n_layers)
    zeros = {}

    def add_zero(act, hook):
        zeros[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + zeros[hook.name]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[*rule_hooks, *((name, add_zero) for name in names)])
        grads = torch.autograd.grad(metric(logits), [zeros[name] for name in names])
    return dict(zip(names, grads))


def rule_hooks(model) -> list:
    """RelP's rules as forward hooks: norm scales and attention patterns detached; at
    mlp.hook_post, post.detach() + (s - s.detach()) with s = pre * (post / pre).detach()
    (gated: s = 0.5 * gate * (p / gate).detach() + 0.5 * up * (p / up).detach(), p = post - b_in)."""
    inputs = {}

    def detach(act, hook):
        return act.detach()

    def keep(act, hook):
        inputs[hook.name.split(".")[-1]] = act

    def substitute(act, hook):
        layer = int(hook.name.split(".")[1])
        pre = inputs["hook_pre"]
        if model.cfg.gated_mlp:
            up, b_in = inputs["hook_pre_linear"], model.blocks[layer].mlp.b_in
            product = act - b_in
            s = 0.5 * pre * ratio(product, pre).detach() + 0.5 * up * ratio(product, up).detach() + b_in
        else:
            s = pre * ratio(act, pre).detach()
        return act.detach() + (s - s.detach())

    return [
        (lambda name: name.endswith("hook_scale"), detach),
        (lambda name: name.endswith("attn.hook_pattern"), detach),
        (lambda name: name.endswith(("mlp.hook_pre", "mlp.hook_pre_linear")), keep),
        (lambda name: name.endswith("mlp.hook_post"), substitute),
    ]


def assert_all_close(actual: dict, expected: dict) -> None:
    """Per key: equal to 1e-4 relative, plus 2e-5 of the largest magnitude under that key (float32
    sums in another order differ by about 1e-6 of it here; the rules change values by over 10%)."""
    assert set(expected) <= set(actual)
    for name in expected:
        scale = float(expected[name].abs().max())
        assert scale > 0, name
        value = actual[name]
        value = value.as_tensor() if hasattr(value, "as_tensor") else value
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=2e-5 * scale, msg=name)


def test_true_jacobians_are_the_gradient(variant):
    orig, _ = make_inputs(variant)
    metric = logit_diff_metric()
    reference = relevance_gradients(variant, orig, metric, rules=False)
    assert_all_close(reference, autograd_gradients(variant, orig, metric))


def test_rules_are_the_hooked_gradient(variant):
    orig, _ = make_inputs(variant)
    metric = logit_diff_metric()
    reference = relevance_gradients(variant, orig, metric, rules=True)
    assert_all_close(reference, autograd_gradients(variant, orig, metric, rule_hooks(variant)))
    true = relevance_gradients(variant, orig, metric, rules=False)
    first = "blocks.0.hook_resid_pre"
    assert not torch.allclose(reference[first], true[first], rtol=1e-2, atol=0), "the rules changed nothing"


def test_deltas_match_atp(variant):
    """The estimate's bookkeeping (shapes, sums, signs): with true Jacobians it is attr_patch's AtP."""
    from transformer_lens_patching import IterNode, attr_patch

    orig, new = make_inputs(variant)
    metric = logit_diff_metric()
    nodes = IterNode(["z", "post", "resid_pre"])
    atp = attr_patch(variant, orig, nodes, metric, new_input=new, method="atp", estimate="delta")
    assert_all_close(atp, relp_deltas(variant, orig, new, metric, rules=False))


def check_attr_patch_relp(model) -> None:
    from transformer_lens_patching import IterNode, attr_patch

    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    nodes = IterNode(["z", "post", "resid_pre"])
    relp = attr_patch(model, orig, nodes, metric, new_input=new, method="relp", estimate="delta")
    assert_all_close(relp, relp_deltas(model, orig, new, metric, rules=True))


def test_attr_patch_relp(variant):
    check_attr_patch_relp(variant)


def test_attr_patch_relp_on_shared_fixtures(small_model):
    """The shared fixtures as they are (norm weights 1, norm biases and the gated b_in 0)."""
    check_attr_patch_relp(small_model)
