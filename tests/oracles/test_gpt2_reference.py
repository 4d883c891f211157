"""GPT-2 small reference numbers (../shared/spec/reference-numbers.md, section 8A).

These need GPT-2 small from the Hugging Face hub, so they run only when asked:
`TLP_HUB=1 HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 python -m pytest tests/oracles/test_gpt2_reference.py`.
Tolerances: 1e-3 on logit differences, 0.005 on normalised scores (half a percentage point).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TL_MAJOR
from transformer_lens_patching import IterNode, act_patch
from transformer_lens_patching.ioi import example_prompts
from transformer_lens_patching.metrics import logit_diff

pytestmark = [
    pytest.mark.hub,
    pytest.mark.skipif(os.environ.get("TLP_HUB") != "1", reason="needs GPT-2 small from the model hub (set TLP_HUB=1)"),
]


@pytest.fixture(scope="module")
def gpt2():
    if TL_MAJOR >= 4:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers("gpt2", device="cpu")
        model.enable_compatibility_mode()
        return model
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(
        "gpt2-small",
        center_unembed=True,
        center_writing_weights=True,
        fold_ln=True,
        refactor_factored_attn_matrices=True,
        device="cpu",
    )


@pytest.fixture(scope="module")
def ioi(gpt2):
    return example_prompts(gpt2)


def test_clean_logit_diff(gpt2, ioi):
    clean, corrupted, answers = ioi
    with torch.no_grad():
        per_prompt = logit_diff(gpt2(clean), answers, per_prompt=True)
        corrupted_ld = logit_diff(gpt2(corrupted), answers)
    expected = torch.tensor([3.3368, 3.2018, 2.7098, 3.7976, 1.7206, 5.2815, 2.6010, 5.7676])
    torch.testing.assert_close(per_prompt, expected, atol=1e-3, rtol=0)
    assert abs(per_prompt.mean().item() - 3.552075) < 1e-3
    assert abs(corrupted_ld.item() + 3.5521) < 1e-3


def test_denoising_activation_patching(gpt2, ioi):
    clean, corrupted, answers = ioi
    with torch.no_grad():
        clean_ld, corrupted_ld = logit_diff(gpt2(clean), answers), logit_diff(gpt2(corrupted), answers)

    def metric(logits):
        return (logit_diff(logits, answers) - corrupted_ld) / (clean_ld - corrupted_ld)

    results = act_patch(gpt2, corrupted, IterNode(["z", "v", "pattern"]), metric, new_input=clean)
    z, v, pattern = results["z"], results["v"], results["pattern"]
    for (layer, head), value in {
        (5, 5): 0.343,
        (8, 6): 0.319,
        (8, 10): 0.278,
        (9, 9): 0.264,
        (10, 7): -0.480,
        (11, 10): -0.278,
        (3, 0): 0.116,
    }.items():
        assert abs(z.sel(layer=layer, head=head).item() - value) < 0.005, (layer, head)
    for (layer, head), value in {(8, 6): 0.317, (8, 10): 0.273, (7, 9): 0.208, (7, 3): 0.133}.items():
        assert abs(v.sel(layer=layer, head=head).item() - value) < 0.005, (layer, head)
    for (layer, head), value in {(5, 5): 0.344, (9, 9): 0.277, (10, 7): -0.505, (11, 10): -0.320}.items():
        assert abs(pattern.sel(layer=layer, head=head).item() - value) < 0.005, (layer, head)
    resid = act_patch(gpt2, corrupted, IterNode("resid_pre", seq_pos="each"), metric, new_input=clean)["resid_pre"]
    at_s2 = [1.000, 1.001, 1.001, 1.000, 0.995, 0.968, 0.968, 0.923, 0.657, 0.027, -0.027, -0.006]
    torch.testing.assert_close(resid.sel(seq_pos=10), torch.tensor(at_s2), atol=0.005, rtol=0)
