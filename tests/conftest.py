"""Shared fixtures: offline models (session-scoped), inputs, and a check that tests leave models as they were."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import models  # noqa: E402

MODEL_NAMES = ["gpt2", "gqa", "smollm2"]


@pytest.fixture(scope="session")
def tok():
    return models.tokenizer()


@pytest.fixture(scope="session")
def gpt2_model(tok):
    return models.gpt2_like(tok=tok)


@pytest.fixture(scope="session")
def gqa_model(tok):
    return models.llama_gqa(tok=tok)


@pytest.fixture(scope="session")
def smollm2_model():
    return models.smollm2()


def model_state(model) -> tuple:
    """Everything a patching call must leave untouched: hooks, flags, mode, gradients, block and attention methods."""
    hooks = tuple((name, len(hp.fwd_hooks), len(hp.bwd_hooks)) for name, hp in sorted(model.hook_dict.items()))
    flags = tuple(
        getattr(model.cfg, flag, None)
        for flag in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "use_attn_in")
    )
    grads = tuple(p.grad is None for p in model.parameters())
    overridden = tuple("forward" in module.__dict__ for block in model.blocks for module in (block, block.attn))
    return hooks, flags, model.training, grads, torch.is_grad_enabled(), overridden


@pytest.fixture(params=MODEL_NAMES)
def model(request):
    """Each test model in turn; fails the test if the model was changed."""
    if request.param == "smollm2" and os.environ.get("TLP_FAST"):
        pytest.skip("TLP_FAST set: SmolLM2 skipped")
    instance = request.getfixturevalue(f"{request.param}_model")
    before = model_state(instance)
    yield instance
    assert model_state(instance) == before, "the patching call changed the model's hooks or flags"


@pytest.fixture(params=["gpt2", "gqa"])
def small_model(request):
    """The random models only (for heavier sweeps)."""
    instance = request.getfixturevalue(f"{request.param}_model")
    before = model_state(instance)
    yield instance
    assert model_state(instance) == before, "the patching call changed the model's hooks or flags"


def make_inputs(model, batch: int = 3, seq_len: int = 7, seed: int = 0):
    """Two random token batches of the same shape (orig and new)."""
    generator = torch.Generator().manual_seed(seed)
    orig = torch.randint(100, 2000, (batch, seq_len), generator=generator)
    new = torch.randint(100, 2000, (batch, seq_len), generator=generator)
    return orig, new


def logit_diff_metric(per_prompt: bool = False):
    """A sensitive metric: logit of token 5 minus token 6 at the last position."""

    def metric(logits):
        diff = logits[:, -1, 5] - logits[:, -1, 6]
        return diff if per_prompt else diff.mean()

    return metric
