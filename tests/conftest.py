"""Shared fixtures: offline models (session-scoped), inputs, a check that tests leave models as they
were, and the names the package's docstring examples use (`doctest_examples`; the repository's root
conftest.py brings that one fixture to the doctests under transformer_lens_patching/)."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402

from tests.helpers import TL_MAJOR, model_state  # noqa: E402
from tests.oracles import models  # noqa: E402

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
def wide_model(tok):
    """A 3-layer random GPT-2-shaped model with the tokenizer's whole vocabulary, for text prompts."""
    return models.gpt2_like(n_layers=3, tok=tok, vocab=len(tok))


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
    if request.param == "smollm2" and TL_MAJOR >= 4:
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


@functools.cache
def doctest_names() -> dict:
    """What the package's docstring examples use, built once and small enough that all of them run
    in seconds: `model`, a random GPT-2-shaped model (`models.gpt2_like` with 4 layers of 4 heads,
    d_model 64, d_head 16, a vocabulary of 2048); `clean` and `corrupted` (also `tokens`,
    `clean_tokens`, `corrupted_tokens` and `abc_tokens`), two batches of 4 prompts of 6 random
    tokens; `answers` (each prompt's right and wrong token) and `metric = LogitDiff(answers)`;
    `templates` (a label per prompt); `cache`, the clean run's ActivationCache; `held_out_clean`,
    `held_out_corrupted` and `held_out_metric`, 4 other prompts; `scores` (also `atp_scores`) and
    `ig_scores` from `attr_edges`, their `graph`, and `circuit` (their 200 strongest edges);
    `estimates` from `attr_patch` over every neuron and `checked`, their `confirm`; `plan`, an
    act_patch plan of every head; `torch`; and every public name of the package. (The package is
    imported here, not at the top, so that typeguard instruments it first.)"""
    import transformer_lens_patching as tlp

    model = models.gpt2_like(n_layers=4, tok=models.tokenizer())
    generator = torch.Generator().manual_seed(0)
    clean, corrupted, held_out_clean, held_out_corrupted = (
        torch.randint(100, 2000, (4, 6), generator=generator) for _ in range(4)
    )
    answers, held_out_answers = (torch.randint(100, 2000, (4, 2), generator=generator) for _ in range(2))
    metric = tlp.LogitDiff(answers)
    scores = tlp.attr_edges(model, clean, metric, new_input=corrupted)
    estimates = tlp.attr_patch(model, corrupted, tlp.IterNode("post"), metric, new_input=clean)
    names = {name: getattr(tlp, name) for name in tlp.__all__}
    return {
        **names,
        "torch": torch,
        "model": model,
        "clean": clean,
        "corrupted": corrupted,
        "tokens": clean,
        "clean_tokens": clean,
        "corrupted_tokens": corrupted,
        "abc_tokens": corrupted,
        "answers": answers,
        "metric": metric,
        "templates": ["ABBA", "BABA", "ABBA", "BABA"],
        "cache": model.run_with_cache(clean)[1],
        "held_out_clean": held_out_clean,
        "held_out_corrupted": held_out_corrupted,
        "held_out_metric": tlp.LogitDiff(held_out_answers),
        "scores": scores,
        "atp_scores": scores,
        "ig_scores": tlp.attr_edges(model, clean, metric, new_input=corrupted, method="ig"),
        "graph": scores.graph,
        "circuit": tlp.Circuit.from_scores(scores, 200),
        "estimates": estimates,
        "checked": tlp.confirm(model, estimates, corrupted, tlp.IterNode("post"), metric, new_input=clean),
        "plan": tlp.plan_act_patch(model, corrupted, tlp.IterNode("z"), metric, new_input=clean),
    }


@pytest.fixture(autouse=True)
def doctest_examples(request):
    """For a doctest only: put `doctest_names()` in pytest's `doctest_namespace`."""
    if isinstance(request.node, DoctestItem):
        request.getfixturevalue("doctest_namespace").update(doctest_names())
