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
