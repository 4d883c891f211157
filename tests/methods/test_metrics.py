"""The IOI metrics: LogitDiff / logit_diff, the normalised denoising and noising metrics, calibrate,
and their use as act_patch's patching_metric on the random test models."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import make_inputs, raises
from transformer_lens_patching import IterNode, Node, act_patch, logit_diff
from transformer_lens_patching.metrics import LogitDiff, NormalisedMetric, calibrate, denoising_metric, noising_metric


def random_case(batch: int = 5, seq_len: int = 6, d_vocab: int = 11, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, d_vocab, generator=generator)
    right = torch.randint(0, d_vocab, (batch,), generator=generator)
    wrong = (right + torch.randint(1, d_vocab, (batch,), generator=generator)) % d_vocab
    positions = torch.randint(0, seq_len, (batch,), generator=generator)
    return logits, torch.stack([right, wrong], dim=1), positions


def loop_logit_diff(logits, answers, positions) -> list[float]:
    """logits[i, pos_i, right_i] - logits[i, pos_i, wrong_i], one prompt at a time."""
    values = []
    for i in range(logits.shape[0]):
        position = logits.shape[1] - 1 if positions is None else int(positions[i])
        right, wrong = int(answers[i, 0]), int(answers[i, 1])
        values.append(float(logits[i, position, right]) - float(logits[i, position, wrong]))
    return values


def logits_with_diffs(diffs: list[float], seq_len: int = 4, d_vocab: int = 7, positions=None) -> torch.Tensor:
    """Logits whose answer logit minus wrong-answer logit (answers (1, 0)) is diffs[i] at the read
    position of prompt i (the last one, or positions[i]); every other logit is 10."""
    logits = torch.full((len(diffs), seq_len, d_vocab), 10.0)
    for i, diff in enumerate(diffs):
        position = seq_len - 1 if positions is None else int(positions[i])
        logits[i, position, 1], logits[i, position, 0] = diff, 0.0
    return logits


ANSWERS_10 = torch.tensor([[1, 0], [1, 0]])


# LogitDiff


@pytest.mark.parametrize("use_positions", [False, True])
def test_logit_diff_matches_a_loop_over_prompts(use_positions):
    logits, answers, positions = random_case()
    positions = positions if use_positions else None
    expected = torch.tensor(loop_logit_diff(logits, answers, positions))
    per_prompt = LogitDiff(answers, positions, per_prompt=True)(logits)
    assert per_prompt.shape == (5,)
    torch.testing.assert_close(per_prompt, expected, rtol=0, atol=1e-6)
    mean = LogitDiff(answers, positions)(logits)
    assert mean.shape == ()
    torch.testing.assert_close(mean, expected.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logit_diff(logits, answers, per_prompt=True, positions=positions), expected, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(logit_diff(logits, answers, positions=positions), expected.mean(), rtol=0, atol=1e-6)


def test_logit_diff_reads_the_given_positions_not_the_last():
    logits, answers, _ = random_case(batch=4, seed=1)
    first = torch.zeros(4, dtype=torch.long)
    at_first = LogitDiff(answers, first, per_prompt=True)(logits)
    torch.testing.assert_close(at_first, logits[:, 0].gather(1, answers) @ torch.tensor([1.0, -1.0]), rtol=0, atol=1e-6)
    assert not torch.allclose(at_first, LogitDiff(answers, per_prompt=True)(logits))


def test_logit_diff_negative_position_is_counted_from_the_end():
    logits, answers, _ = random_case(seed=2)
    last = torch.full((5,), -1)
    torch.testing.assert_close(LogitDiff(answers, last)(logits), LogitDiff(answers)(logits), rtol=0, atol=0)


def test_logit_diff_is_antisymmetric_in_the_answers():
    logits, answers, positions = random_case(seed=3)
    forward = LogitDiff(answers, positions, per_prompt=True)(logits)
    backward = LogitDiff(answers.flip(1), positions, per_prompt=True)(logits)
    torch.testing.assert_close(backward, -forward, rtol=0, atol=0)


def test_logit_diff_leaves_the_logits_unchanged():
    logits, answers, positions = random_case(seed=4)
    before = logits.clone()
    LogitDiff(answers, positions)(logits)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 2, 1), (5, 1)])
def test_answers_must_be_batch_by_two(shape):
    with raises(r"answers must have shape \(batch, 2\).*got shape " + re.escape(str(shape))):
        LogitDiff(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(4,), (5, 1), (6,), ()])
def test_positions_must_be_one_per_prompt(shape):
    with raises(r"positions must hold one position per prompt: expected shape \(5,\)"):
        LogitDiff(torch.zeros(5, 2, dtype=torch.long), torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("batch", [4, 6])
def test_logits_batch_must_match_the_answers(batch):
    logits, _, _ = random_case(batch=batch)
    with raises(rf"is for 5 prompts, but the input has {batch}"):
        LogitDiff(torch.zeros(5, 2, dtype=torch.long))(logits)


# Normalised metrics


def test_denoising_is_zero_on_corrupted_and_one_on_clean():
    metric = denoising_metric(LogitDiff(ANSWERS_10), clean=3.0, corrupted=-1.5)
    assert isinstance(metric, NormalisedMetric)
    assert float(metric(logits_with_diffs([2.0, 4.0]))) == 1.0
    assert float(metric(logits_with_diffs([-1.0, -2.0]))) == 0.0
    assert float(metric(logits_with_diffs([0.5, 1.0]))) == 0.5
    assert float(metric(logits_with_diffs([6.0, 9.0]))) == 2.0


def test_noising_is_zero_on_clean_and_minus_one_on_corrupted():
    metric = noising_metric(LogitDiff(ANSWERS_10), clean=3.0, corrupted=-1.5)
    assert float(metric(logits_with_diffs([2.0, 4.0]))) == 0.0
    assert float(metric(logits_with_diffs([-1.0, -2.0]))) == -1.0
    assert float(metric(logits_with_diffs([0.5, 1.0]))) == -0.5


def test_normalised_metrics_of_per_prompt_values():
    positions = torch.tensor([1, 3])
    base = LogitDiff(ANSWERS_10, positions, per_prompt=True)
    clean, corrupted = torch.tensor([2.0, -4.0]), torch.tensor([-1.0, 4.0])
    clean_logits = logits_with_diffs([2.0, -4.0], positions=positions)
    corrupted_logits = logits_with_diffs([-1.0, 4.0], positions=positions)
    halfway = logits_with_diffs([0.5, 0.0], positions=positions)
    denoise, noise = denoising_metric(base, clean, corrupted), noising_metric(base, clean, corrupted)
    assert denoise(clean_logits).tolist() == [1.0, 1.0]
    assert denoise(corrupted_logits).tolist() == [0.0, 0.0]
    assert denoise(halfway).tolist() == [0.5, 0.5]
    assert noise(clean_logits).tolist() == [0.0, 0.0]
    assert noise(corrupted_logits).tolist() == [-1.0, -1.0]
    assert noise(halfway).tolist() == [-0.5, -0.5]


def test_normalised_metric_of_a_plain_float_metric():
    metric = denoising_metric(lambda logits: float(logits.sum()), clean=10.0, corrupted=2.0)
    assert float(metric(torch.full((1, 1, 4), 1.5))) == 0.5


@pytest.mark.parametrize("make", [denoising_metric, noising_metric])
@pytest.mark.parametrize(
    "clean, corrupted",
    [(1.5, 1.5), (torch.tensor(0.25), torch.tensor(0.25)), (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]))],
)
def test_equal_clean_and_corrupted_values_are_an_error(make, clean, corrupted):
    with raises(r"same value on the clean and the corrupted run"):
        make(LogitDiff(ANSWERS_10), clean, corrupted)


# calibrate and act_patch, on the random test models


def ioi_like_case(model):
    """Random clean and corrupted tokens, per-prompt answers and positions, and the logit diff."""
    corrupted, clean = make_inputs(model, batch=3, seq_len=7, seed=12)
    answers = torch.tensor([[5, 6], [701, 77], [1500, 9]])
    positions = torch.tensor([6, 3, 5])
    return clean, corrupted, LogitDiff(answers, positions, per_prompt=True)


def test_calibrate_is_the_metric_on_the_two_runs(small_model):
    clean_tokens, corrupted_tokens, base = ioi_like_case(small_model)
    weights = {name: value.clone() for name, value in small_model.state_dict().items()}
    clean, corrupted = calibrate(small_model, base, clean_tokens, corrupted_tokens)
    with torch.no_grad():
        expected_clean = base(small_model(clean_tokens, return_type="logits"))
        expected_corrupted = base(small_model(corrupted_tokens, return_type="logits"))
    torch.testing.assert_close(clean, expected_clean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(corrupted, expected_corrupted, rtol=1e-6, atol=1e-6)
    assert clean.shape == corrupted.shape == (3,)
    assert not clean.requires_grad and not corrupted.requires_grad
    assert (clean - corrupted).abs().min() > 0.1
    mean_clean, mean_corrupted = calibrate(
        small_model, LogitDiff(base.answers, base.positions), clean_tokens, corrupted_tokens
    )
    torch.testing.assert_close(mean_clean, expected_clean.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean_corrupted, expected_corrupted.mean(), rtol=1e-6, atol=1e-6)
    after = small_model.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[name], weights[name]) for name in weights)


def test_normalised_metrics_as_act_patch_metric(small_model):
    clean_tokens, corrupted_tokens, base = ioi_like_case(small_model)
    clean, corrupted = calibrate(small_model, base, clean_tokens, corrupted_tokens)
    denoise, noise = denoising_metric(base, clean, corrupted), noising_metric(base, clean, corrupted)
    ones = torch.ones(3)

    def close(actual, expected):
        torch.testing.assert_close(torch.as_tensor(actual).float(), expected, rtol=0, atol=1e-4)

    whole_stream = Node("resid_pre", 0)
    close(act_patch(small_model, corrupted_tokens, whole_stream, denoise, new_input=clean_tokens), ones)
    close(act_patch(small_model, corrupted_tokens, whole_stream, denoise, new_input=corrupted_tokens), 0 * ones)
    close(act_patch(small_model, clean_tokens, whole_stream, noise, new_input=corrupted_tokens), -ones)
    close(act_patch(small_model, clean_tokens, whole_stream, noise, new_input=clean_tokens), 0 * ones)

    sweep = act_patch(small_model, corrupted_tokens, IterNode("resid_pre"), denoise, new_input=clean_tokens)
    assert sweep["resid_pre"].dims == ("layer", "batch")
    close(torch.as_tensor(sweep["resid_pre"]), torch.ones(small_model.cfg.n_layers, 3))

    head = Node("z", small_model.cfg.n_layers - 1, head=0)
    raw = act_patch(small_model, corrupted_tokens, head, base, new_input=clean_tokens)
    normalised = act_patch(small_model, corrupted_tokens, head, denoise, new_input=clean_tokens)
    close(normalised, (raw - corrupted) / (clean - corrupted))
    assert not torch.allclose(torch.as_tensor(normalised), ones, atol=1e-3)
    assert not torch.allclose(torch.as_tensor(normalised), 0 * ones, atol=1e-3)
