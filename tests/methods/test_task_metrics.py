"""The task metrics (KL divergence, answers of several tokens by teacher forcing, accuracy):
each against its plain-function form on full logits written out here, through the engines
(selected logits against full logits), with uncertainty, and their refusals."""

import pytest
import torch

from tests.helpers import make_inputs, raises


def _kl(reference, logits, positions):
    """KL(reference || logits) at `positions` (batch, k), averaged over them, per prompt."""
    rows = torch.arange(reference.shape[0])[:, None]
    p = reference[rows, positions].float().softmax(-1)
    q = logits[rows, positions].float().log_softmax(-1)
    return (p * (p.log() - q)).sum(-1).mean(-1)


def test_kl_divergence_against_its_definition():
    from transformer_lens_patching import KLDivergence

    generator = torch.Generator().manual_seed(0)
    reference, logits = torch.randn(2, 3, 4, 11, generator=generator)
    positions = torch.tensor([[0, 2], [1, 2], [3, 3]])
    expected = _kl(reference, logits, positions)
    torch.testing.assert_close(KLDivergence(reference, positions, per_prompt=True)(logits), expected)
    torch.testing.assert_close(KLDivergence(reference, positions)(logits), expected.mean())
    assert float(KLDivergence(reference)(reference)) == pytest.approx(0.0, abs=1e-6)


def _answer_log_prob(logits, answers, starts):
    """The sum over each answer's tokens of log softmax(logits at the position before it)."""
    totals = []
    for row, (answer, start) in enumerate(zip(answers.tolist(), starts.tolist())):
        tokens = [token for token in answer if token >= 0]
        log_probs = logits[row].float().log_softmax(-1)
        totals.append(sum(log_probs[start - 1 + i, token] for i, token in enumerate(tokens)))
    return torch.stack(totals)


def test_answer_log_prob_against_teacher_forcing_written_out():
    from transformer_lens_patching import AnswerLogProb

    logits = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(1))
    answers = torch.tensor([[4, 2, 7], [1, -1, -1], [8, 3, -1]])
    starts = torch.tensor([2, 5, 3])
    expected = _answer_log_prob(logits, answers, starts)
    torch.testing.assert_close(AnswerLogProb(answers, starts, per_prompt=True)(logits), expected)
    probability = AnswerLogProb(answers, starts, probability=True)(logits)
    torch.testing.assert_close(probability, expected.exp().mean())
    with raises("padding"):
        AnswerLogProb(torch.tensor([[-1, 2]]), torch.tensor([1]))
    with raises("position 0"):
        AnswerLogProb(torch.tensor([[1]]), torch.tensor([0]))


def test_accuracy_against_its_definition():
    from transformer_lens_patching import Accuracy

    logits = torch.randn(5, 2, 12, generator=torch.Generator().manual_seed(2))
    answers = torch.tensor([[3, 4, 5], [6, 1, 2], [0, 9, 11], [7, 8, 10], [2, 3, 4]])
    last = logits[:, -1]
    among = (last.gather(1, answers[:, :1]) > last.gather(1, answers[:, 1:]).max(1, keepdim=True).values).float()
    torch.testing.assert_close(Accuracy(answers, per_prompt=True)(logits), among[:, 0])
    vocabulary = (last.argmax(-1) == answers[:, 0]).float()
    torch.testing.assert_close(Accuracy(answers, among="vocabulary")(logits), vocabulary.mean())


def test_the_engines_read_the_same_values_as_full_logits(gpt2_model):
    """Selected logits (what the engines compute) against the plain functions on full logits."""
    from transformer_lens_patching import Accuracy, AnswerLogProb, IterNode, KLDivergence, act_patch

    orig, new = make_inputs(gpt2_model, batch=3, seq_len=6)
    with torch.no_grad():
        reference = gpt2_model(new, return_type="logits").float()
    positions = torch.tensor([[3, 5], [4, 5], [2, 5]])
    answers = torch.tensor([[orig[0, 4], orig[0, 5]], [orig[1, 5], -1], [orig[2, 3], orig[2, 4]]])
    starts = torch.tensor([4, 5, 3])
    accuracy_answers = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])

    def accuracy(logits):
        last = logits[:, -1]
        right = last.gather(1, accuracy_answers[:, :1])[:, 0]
        return (right > last.gather(1, accuracy_answers[:, 1:]).max(1).values).float()

    pairs = [
        (KLDivergence(reference, positions, per_prompt=True), lambda logits: _kl(reference, logits, positions)),
        (AnswerLogProb(answers, starts, per_prompt=True), lambda logits: _answer_log_prob(logits, answers, starts)),
        (Accuracy(accuracy_answers, per_prompt=True), accuracy),
    ]
    nodes = IterNode("z", layers=[0, 3])
    for metric, plain in pairs:
        selected = act_patch(gpt2_model, orig, nodes, metric, new_input=new)["z"]
        full = act_patch(gpt2_model, orig, nodes, plain, new_input=new)["z"]
        torch.testing.assert_close(selected, full, rtol=1e-4, atol=1e-5)


def test_kl_of_the_models_own_run_and_uncertainty(gpt2_model):
    from transformer_lens_patching import KLDivergence, Node, act_patch

    orig, new = make_inputs(gpt2_model, batch=4, seq_len=6)
    metric = KLDivergence.of(gpt2_model, orig)
    unchanged = act_patch(gpt2_model, orig, Node("z", 2, head=1), metric, new_input=orig, uncertainty=True)
    assert float(unchanged) == pytest.approx(0.0, abs=1e-5)
    moved = act_patch(gpt2_model, orig, Node("resid_pre", 1), metric, new_input=new, uncertainty=True)
    assert float(moved) > 0 and float(moved.stderr) > 0 and moved.n_prompts == 4


def test_teacher_forced_inputs_from_text(wide_model):
    from transformer_lens_patching import AnswerLogProb

    tokens, metric = AnswerLogProb.teacher_forced(wide_model, ["one two", "a"], [" three four", " b"], per_prompt=True)
    answers = [wide_model.to_tokens(text, prepend_bos=False)[0] for text in (" three four", " b")]
    prompts = [wide_model.to_tokens(text)[0] for text in ("one two", "a")]
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        assert torch.equal(tokens[row, : len(prompt) + len(answer)].cpu(), torch.cat([prompt, answer]).cpu())
    with torch.no_grad():
        logits = wide_model(tokens, return_type="logits")
    padded = torch.full((2, max(len(a) for a in answers)), -1)
    for row, answer in enumerate(answers):
        padded[row, : len(answer)] = answer
    expected = _answer_log_prob(logits, padded, torch.tensor([len(p) for p in prompts]))
    torch.testing.assert_close(metric(logits), expected, rtol=1e-5, atol=1e-5)


def test_attribution_refuses_accuracy(gpt2_model):
    from transformer_lens_patching import Accuracy, IterNode, attr_patch

    orig, new = make_inputs(gpt2_model, batch=2, seq_len=5)
    with raises("has none"):
        attr_patch(gpt2_model, orig, IterNode("z"), Accuracy(torch.tensor([[5, 6], [7, 8]])), new_input=new)


# --- MIB's faithfulness as the attribution target ---


def _calibrated_logit_diff(model, clean, corrupted):
    """A LogitDiff of tokens 5 over 6 at the last position, its calibrate values, and each prompt's
    clean and corrupted logit difference computed here on full logits."""
    from transformer_lens_patching import LogitDiff, calibrate

    answers = torch.tensor([[5, 6]] * clean.shape[0])
    base = LogitDiff(answers)
    with torch.no_grad():
        clean_ld, corrupted_ld = (
            model(tokens, return_type="logits")[:, -1, 5] - model(tokens, return_type="logits")[:, -1, 6]
            for tokens in (clean, corrupted)
        )
    return base, calibrate(model, base, clean, corrupted), clean_ld, corrupted_ld


def test_the_faithfulness_target_against_its_definition(gpt2_model):
    from transformer_lens_patching import denoising_metric, faithfulness_target

    clean, corrupted = make_inputs(gpt2_model, batch=4, seq_len=6)
    base, (clean_value, corrupted_value), clean_ld, corrupted_ld = _calibrated_logit_diff(gpt2_model, clean, corrupted)
    logits = torch.randn(4, 6, gpt2_model.cfg.d_vocab, generator=torch.Generator().manual_seed(3))
    ld = logits[:, -1, 5] - logits[:, -1, 6]
    means = faithfulness_target(base, clean_value, corrupted_value)
    expected_means = (ld.mean() - corrupted_ld.mean()) / (clean_ld.mean() - corrupted_ld.mean())
    torch.testing.assert_close(means(logits), expected_means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(means(logits), denoising_metric(base, clean_value, corrupted_value)(logits))
    prompts = faithfulness_target(base, clean_value, corrupted_value, normalise="prompts")
    expected_prompts = ((ld - corrupted_ld) / (clean_ld - corrupted_ld)).mean()
    torch.testing.assert_close(prompts(logits), expected_prompts, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        full = gpt2_model(clean, return_type="logits")
    assert float(prompts(full)) == pytest.approx(1.0, abs=1e-4), "every prompt's own clean run is 1"


def test_attributing_each_prompts_faithfulness_weighs_it_by_its_own_difference(gpt2_model):
    """AtP's estimate of the per-prompt faithfulness equals, prompt by prompt, its estimate of the plain logit
    difference on that prompt alone, normalised by that prompt's own corrupted value and clean - corrupted
    difference, averaged; MIB's ratio of means normalises the plain estimates by the means."""
    from transformer_lens_patching import IterNode, attr_patch, faithfulness_target

    clean, corrupted = make_inputs(gpt2_model, batch=3, seq_len=6, seed=4)
    base, (clean_value, corrupted_value), clean_ld, corrupted_ld = _calibrated_logit_diff(gpt2_model, clean, corrupted)
    nodes = IterNode("z", layers=[1, 4])
    target = faithfulness_target(base, clean_value, corrupted_value, normalise="prompts")
    scores = attr_patch(gpt2_model, clean, nodes, target, new_input=corrupted)["z"].as_tensor()

    def plain(logits):
        return logits[:, -1, 5].mean() - logits[:, -1, 6].mean()

    alone = [
        attr_patch(gpt2_model, clean[i : i + 1], nodes, plain, new_input=corrupted[i : i + 1])["z"].as_tensor()
        for i in range(3)
    ]
    expected = sum((score - corrupted_ld[i]) / (clean_ld[i] - corrupted_ld[i]) for i, score in enumerate(alone)) / 3
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    means = attr_patch(gpt2_model, clean, nodes, faithfulness_target(base, clean_value, corrupted_value), corrupted)
    together = attr_patch(gpt2_model, clean, nodes, plain, new_input=corrupted)["z"].as_tensor()
    expected_means = (together - corrupted_ld.mean()) / (clean_ld.mean() - corrupted_ld.mean())
    torch.testing.assert_close(means["z"].as_tensor(), expected_means, rtol=1e-4, atol=1e-6)
    kept = attr_patch(gpt2_model, clean, nodes, target, new_input=corrupted, uncertainty=True)["z"]
    torch.testing.assert_close(kept.per_prompt.as_tensor().mean(-1), scores, rtol=1e-4, atol=1e-6)


def test_the_faithfulness_target_refuses_what_it_cannot_normalise(gpt2_model):
    from transformer_lens_patching import Accuracy, LogitDiff, faithfulness_target

    base = LogitDiff(torch.tensor([[5, 6], [5, 6]]))
    with raises("calibrate"):
        faithfulness_target(base, 2.0, 1.0, normalise="prompts")
    with raises('"means"'):
        faithfulness_target(base, 2.0, 1.0, normalise="prompt")
    with raises("no gradient"):
        faithfulness_target(Accuracy(torch.tensor([[5, 6], [5, 6]])), 1.0, 0.0, normalise="prompts")
    clean, corrupted = make_inputs(gpt2_model, batch=2, seq_len=5)
    tied = torch.stack([clean[0], corrupted[1]])
    same_first = torch.stack([clean[0], clean[1]])
    _, (clean_value, corrupted_value), _, _ = _calibrated_logit_diff(gpt2_model, tied, same_first)
    with raises(r"Prompts \[0\] have the same value"):
        faithfulness_target(base, clean_value, corrupted_value, normalise="prompts")
