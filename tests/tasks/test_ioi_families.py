"""`tl-patch ioi` on model families other than the embedded Llama: tiny random Qwen2 (grouped-query
attention), Gemma-2 (post-norm blocks and a final logit soft cap) and GPT-NeoX (attention and MLP
in parallel) folders, as a user would save them with `save_pretrained`, with SmolLM2's tokenizer
so that the IOI names are real words.

Each run completes and every step runs, the circuit step included (on Gemma-2 through its
post-norms), in the dry run and in the run alike. Random weights make the numbers meaningless:
what is checked is that every step runs, never that it finds IOI.
"""

from __future__ import annotations

import json

import pytest
import torch

import tl_patch
from tests.helpers import TL_MAJOR
from tests.oracles.models import tokenizer

pytestmark = pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens 4 boots these families from their folders")

SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SHAPE, num_key_value_heads=2)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(SHAPE, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0),
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SHAPE),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    """A saved tiny random model of the family, with SmolLM2's tokenizer."""
    import transformers

    config_class, model_class, shape = FAMILIES[request.param]
    tok = tokenizer()
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(tok), max_position_embeddings=128, **shape)
    config.architectures = [model_class]
    path = tmp_path_factory.mktemp(request.param)
    getattr(transformers, model_class)(config).save_pretrained(path)
    tok.save_pretrained(path)
    return request.param, path


def test_every_step_runs(folder, tmp_path, capsys):
    family, path = folder
    arguments = ["ioi", "--model", str(path), "--n-prompts", "4", "--quiet"]
    assert tl_patch.main([*arguments, "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    dry_run = capsys.readouterr().out
    assert tl_patch.main([*arguments, "--out", str(tmp_path / "report")]) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["complete"] and not results["missing_steps"]
    steps = {step["key"]: step for step in results["steps"]}
    assert len(steps) == 7
    skipped = {key: step["description"] for key, step in steps.items() if step["description"].startswith("Skipped: ")}
    # with 4 prompts no head is significant (the smallest p-value is 1/8): the steps back from the name movers skip
    followed = ("Skipped: the previous step found no head", "Skipped: the previous step was skipped.")
    assert all(reason.startswith(followed) for reason in skipped.values()), skipped
    for key in steps.keys() - skipped.keys() - {"circuit"}:
        assert steps[key]["results"], f"{family}: step {key} has no results"
    assert {"act_heads", "act_words", "path_logits", "attr_neurons", "circuit"}.isdisjoint(skipped), skipped
    assert "Skipped" not in dry_run
    assert len(steps["circuit"]["circuit"]["curves"]) == 3
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
