"""Metric objects: each equals its definition written out on full logits, declares the
logits it reads, and rejects bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_lens_patching import LogitSelection, PatchingError
from transformer_lens_patching._core.selection import selection_of
from transformer_lens_patching.metrics import (
    LogitDiff,
    LogitsAt,
    TokenLogit,
    TokenProbability,
    denoising_metric,
    noising_metric,
)

BATCH, SEQ, VOCAB = 3, 5, 11


@pytest.fixture
def logits():
    return torch.randn(BATCH, SEQ, VOCAB, generator=torch.Generator().manual_seed(0))


ANSWERS = torch.tensor([[4, 9], [9, 2], [7, 4]])
POSITIONS = torch.tensor([4, 1, 2])


@pytest.mark.parametrize("positions", [None, POSITIONS])
def test_logit_diff_is_right_minus_wrong_at_each_prompts_position(logits, positions):
    expected = []
    for b in range(BATCH):
        p = SEQ - 1 if positions is None else int(positions[b])
        expected.append(float(logits[b, p, ANSWERS[b, 0]] - logits[b, p, ANSWERS[b, 1]]))
    per_prompt = LogitDiff(ANSWERS, positions, per_prompt=True)
    torch.testing.assert_close(per_prompt(logits), torch.tensor(expected))
    torch.testing.assert_close(LogitDiff(ANSWERS, positions)(logits), torch.tensor(sum(expected) / BATCH))


def test_logit_diff_declares_its_tokens_positions_and_prompts():
    selection = LogitDiff(ANSWERS, POSITIONS).selection
    assert selection.token_ids.tolist() == [2, 4, 7, 9]
    assert selection.positions == tuple(POSITIONS.tolist())
    assert selection.batch == BATCH
    assert LogitDiff(ANSWERS).selection.positions is None


@pytest.mark.parametrize("tokens", [3, torch.tensor([3, 0, 10])])
def test_token_logit_and_probability_are_their_definitions(logits, tokens):
    per_prompt_tokens = torch.as_tensor(tokens).expand(BATCH)
    logit, prob, log_prob = [], [], []
    for b in range(BATCH):
        row = logits[b, int(POSITIONS[b])]
        token = int(per_prompt_tokens[b])
        logit.append(float(row[token]))
        total = sum(math.exp(float(x)) for x in row)
        prob.append(math.exp(float(row[token])) / total)
        log_prob.append(float(row[token]) - math.log(total))
    torch.testing.assert_close(TokenLogit(tokens, POSITIONS, per_prompt=True)(logits), torch.tensor(logit))
    torch.testing.assert_close(TokenProbability(tokens, POSITIONS, per_prompt=True)(logits), torch.tensor(prob))
    log_metric = TokenProbability(tokens, POSITIONS, per_prompt=True, log=True)
    torch.testing.assert_close(log_metric(logits), torch.tensor(log_prob))
    torch.testing.assert_close(TokenProbability(tokens, POSITIONS)(logits), torch.tensor(sum(prob) / BATCH))


def test_token_logit_at_the_last_position_by_default(logits):
    torch.testing.assert_close(TokenLogit(3, per_prompt=True)(logits), logits[:, -1, 3])


def test_probability_reads_the_whole_vocabulary_logit_only_its_tokens():
    assert TokenProbability(3).selection.token_ids is None
    assert TokenLogit(torch.tensor([3, 0, 3])).selection.token_ids.tolist() == [0, 3]


def test_logits_at_returns_the_logits_of_the_given_tokens_and_positions_in_order(logits):
    positions = torch.tensor([[0, 4], [3, 3], [2, 1]])
    ids = [9, 2, 9, 5]
    result = LogitsAt(ids, positions)(logits)
    assert result.shape == (BATCH, 2, 4)
    for b in range(BATCH):
        for k in range(2):
            for n, token in enumerate(ids):
                assert result[b, k, n] == logits[b, int(positions[b, k]), token]


def test_logits_at_per_prompt_tokens_and_a_reduction(logits):
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    metric = LogitsAt(ids, positions=2, reduce=lambda x: x[..., 0] - x[..., 1])
    expected = torch.tensor([[float(logits[b, 2, ids[b, 0]] - logits[b, 2, ids[b, 1]])] for b in range(BATCH)])
    torch.testing.assert_close(metric(logits), expected)
    assert metric.selection.batch == BATCH


def test_normalised_metrics_read_what_their_base_reads(logits):
    base = LogitDiff(ANSWERS, POSITIONS)
    for make in (denoising_metric, noising_metric):
        metric = make(base, clean=2.0, corrupted=-1.0)
        assert metric.selection is base.selection
        selected = base.selection.select(logits)
        torch.testing.assert_close(metric.measure_selected(selected), metric(logits))
    plain = denoising_metric(lambda x: x[:, -1, 0].mean(), clean=2.0, corrupted=-1.0)
    assert selection_of(plain) is None


def test_a_plain_function_declares_nothing():
    assert selection_of(lambda logits: logits.sum()) is None


def test_selection_select_is_indexing(logits):
    selection = LogitSelection(torch.tensor([[1], [0], [4]]), torch.tensor([2, 6]))
    expected = torch.stack([logits[b, [p], :][:, [2, 6]] for b, p in enumerate([1, 0, 4])])
    torch.testing.assert_close(selection.select(logits), expected)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LogitDiff(torch.tensor([1, 2])), "shape (batch, 2)"),
        (lambda: LogitDiff(ANSWERS, torch.tensor([1, 2])), "one position per prompt"),
        (lambda: LogitDiff(torch.tensor([[1, -2], [0, 1], [0, 1]])), "negative token id -2"),
        (lambda: TokenLogit(torch.tensor([[1, 2]])), "one per prompt"),
        (lambda: TokenLogit(torch.tensor([1, 2]), positions=torch.tensor([0, 1, 2])), "expected shape (2,)"),
        (lambda: TokenProbability(1.5), "integer token id"),
        (lambda: LogitsAt(torch.zeros(2, 2, 2, dtype=torch.long)), "shape (n,) or (batch, n)"),
        (lambda: LogitsAt([]), "at least one"),
    ],
)
def test_bad_arguments_raise_patching_errors(make, message):
    with pytest.raises(PatchingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_a_metric_for_other_prompts_says_so(logits):
    with pytest.raises(PatchingError, match="is for 2 prompts, but the input has 3"):
        LogitDiff(torch.tensor([[1, 2], [2, 1]]))(logits)
