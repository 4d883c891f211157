"""Shared fixtures: offline models (session-scoped), inputs, and a check that tests leave models as they were."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests import models  # noqa: E402
from tests.helpers import model_state  # noqa: E402

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


@pytest.fixture(params=MODEL_NAMES)
def model(request):
    """Each test model in turn; fails the test if the model was changed. SmolLM2 takes part once,
    on TransformerLens 2: on TransformerLens 4 it is checked by its own tests (against naive
    patching and Hugging Face transformers), the IOI report and the tutorials."""
    if request.param == "smollm2" and os.environ.get("TLP_FAST"):
        pytest.skip("TLP_FAST set: SmolLM2 skipped")
    if request.param == "smollm2" and models.TL_MAJOR >= 4:
        pytest.skip("the shared model tests run SmolLM2 once, on TransformerLens 2")
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
