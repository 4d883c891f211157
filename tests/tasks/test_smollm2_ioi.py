"""The IOI picture on the real SmolLM2-135M: the example prompts, and where the S2 information flows."""

from __future__ import annotations

import torch

from transformer_lens_patching import IterNode, act_patch
from transformer_lens_patching.ioi import example_prompts
from transformer_lens_patching.metrics import logit_diff


def test_example_prompts_on_smollm2(smollm2_model):
    model = smollm2_model
    clean, corrupted, answers = example_prompts(model)
    assert clean.shape == corrupted.shape and clean.shape[0] == 8
    differs = (clean != corrupted).nonzero()
    assert differs[:, 1].unique().numel() == 1, "only the S2 token differs"
    with torch.no_grad():
        clean_ld = logit_diff(model(clean), answers, per_prompt=True)
        corrupted_ld = logit_diff(model(corrupted), answers, per_prompt=True)
    assert (clean_ld > 0).all(), clean_ld
    torch.testing.assert_close(corrupted_ld.mean(), -clean_ld.mean(), atol=1e-4, rtol=0)


def test_s2_information_leaves_the_s2_position_late(smollm2_model):
    """Denoising resid_pre at S2: all of the effect early on, almost none at the last layers."""
    model = smollm2_model
    clean, corrupted, answers = example_prompts(model)
    s2 = int((clean != corrupted).nonzero()[0, 1])
    with torch.no_grad():
        clean_ld, corrupted_ld = logit_diff(model(clean), answers), logit_diff(model(corrupted), answers)

    def recovered(logits):
        return (logit_diff(logits, answers) - corrupted_ld) / (clean_ld - corrupted_ld)

    layers = [0, 5, 10, 28, 29]
    result = act_patch(model, corrupted, IterNode("resid_pre", seq_pos=s2, layers=layers), recovered, new_input=clean)
    by_layer = dict(zip(layers, result["resid_pre"].tolist()))
    for layer in (0, 5, 10):
        assert abs(by_layer[layer] - 1.0) < 0.05, by_layer
    for layer in (28, 29):
        assert abs(by_layer[layer]) < 0.1, by_layer
