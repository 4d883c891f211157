"""Path and activation patching on an induction model whose circuit is known by construction.

The model (tests/oracles/induction_model.py) has a previous-token head L0H0 feeding the key of an induction
head L1H0, which alone writes the logits; L0H1 and L1H1 are decoys with the same attention
that write into a direction nothing reads. Every expected value is computed from the
construction (`induction_model.induction_logits`), never from the library.

orig = BOS x1..x4 x1..x4; new = BOS x4..x1 x1..x4. In new the second repeat is unchanged
but every induction answer changes. The metric is the mean logit of the induction answer
over the repeated half, minus ALPHA (its clean value), so unaffected cells are exactly 0.
"""

from __future__ import annotations

import pytest
import torch

from tests.oracles.induction_model import (
    ALPHA,
    N_HEADS,
    N_LAYERS,
    build_induction_model,
    clean_logits,
    induction_logits,
    induction_pattern,
    previous_tokens,
    repeated_tokens,
    reverse_first_half,
)
from transformer_lens_patching import IterNode, Node, act_patch, path_patch

HALF = 4
BATCH = 6
REPEATED = list(range(HALF + 1, 2 * HALF + 1))
"""Positions of the second repeat, where the induction head has a unique match."""
ZERO = 1e-5
MODES = [pytest.param(True, id="mlps_direct"), pytest.param(False, id="residual_only")]


@pytest.fixture(scope="module")
def induction():
    """The hand-set induction model, built once for this module."""
    return build_induction_model()


@pytest.fixture(scope="module")
def orig() -> torch.Tensor:
    """BOS x1..x4 x1..x4, six prompts."""
    return repeated_tokens(BATCH, HALF, seed=0)


@pytest.fixture(scope="module")
def new(orig) -> torch.Tensor:
    """BOS x4..x1 x1..x4: the same second repeat, other induction answers."""
    return reverse_first_half(orig)


def targets(tokens: torch.Tensor) -> torch.Tensor:
    """(batch, len(REPEATED)): the induction answer at each repeated position."""
    return tokens[:, [t - HALF + 1 for t in REPEATED]]


def answer_logit(tokens: torch.Tensor, per_prompt: bool = False):
    """Metric: the orig induction answer's logit over the repeated half, minus its clean value."""
    answers = targets(tokens)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        picked = logits[:, REPEATED].gather(-1, answers.to(logits.device).unsqueeze(-1)).squeeze(-1)
        change = picked.mean(-1) - ALPHA
        return change if per_prompt else change.mean()

    return metric


def expected_cells(cells: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """A (layer, head) grid: the given cells, zero elsewhere."""
    grid = torch.zeros(N_LAYERS, N_HEADS)
    for (layer, head), value in cells.items():
        grid[layer, head] = value
    return grid


def assert_result(result, expected: torch.Tensor, dims=("layer", "head")) -> None:
    """`result` has `dims`, exact zeros where `expected` is zero and `expected` elsewhere."""
    assert result.dims == dims
    values = result.as_tensor().float().cpu()
    assert values.shape == expected.shape
    zero = expected == 0
    assert (values[zero].abs() < ZERO).all(), f"cells that must be 0 are not:\n{values}\nexpected\n{expected}"
    torch.testing.assert_close(values, expected, atol=ZERO, rtol=0)


def with_new_prev(orig: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Logits when only the previous-token head's output comes from new."""
    return induction_logits(orig, previous_tokens(new), orig)


def test_model_matches_construction(induction, orig, new):
    """The model computes exactly the logits the construction says."""
    for tokens in (orig, new):
        logits = induction(tokens, return_type="logits").detach()
        torch.testing.assert_close(logits, clean_logits(tokens), atol=ZERO, rtol=0)


def test_model_does_induction(induction, orig):
    """Every repeated position predicts its induction answer (the next token)."""
    logits = induction(orig, return_type="logits").detach()
    predictions = logits[:, REPEATED].argmax(-1)
    assert torch.equal(predictions, targets(orig))
    assert torch.equal(predictions[:, :-1], orig[:, REPEATED[0] + 1 :])
    assert answer_logit(orig)(logits).abs() < ZERO


def test_corruption_changes_every_answer(orig, new):
    """new changes every answer, both in its own run and through the previous-token head alone."""
    metric = answer_logit(orig)
    assert torch.equal(new[:, REPEATED], orig[:, REPEATED])
    assert metric(clean_logits(new)) == -ALPHA
    assert metric(with_new_prev(orig, new)) == -ALPHA


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_heads_to_logits(induction, orig, new, direct_includes_mlps):
    """Only the induction head writes the logits directly."""
    result = path_patch(
        induction,
        orig,
        new,
        IterNode("z"),
        Node("resid_post", 1),
        answer_logit(orig),
        direct_includes_mlps=direct_includes_mlps,
    )
    expected = expected_cells({(1, 0): answer_logit(orig)(clean_logits(new))})
    assert_result(result["z"], expected)


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_heads_to_induction_key(induction, orig, new, direct_includes_mlps):
    """Only the previous-token head feeds the induction head's key."""
    result = path_patch(
        induction,
        orig,
        new,
        IterNode("z"),
        Node("k", 1, head=0),
        answer_logit(orig),
        direct_includes_mlps=direct_includes_mlps,
    )
    expected = expected_cells({(0, 0): answer_logit(orig)(with_new_prev(orig, new))})
    assert_result(result["z"], expected)


@pytest.mark.parametrize("direct_includes_mlps", MODES)
@pytest.mark.parametrize("receiver", ["q", "v"])
def test_heads_to_induction_query_and_value(induction, orig, new, receiver, direct_includes_mlps):
    """q and v read only the token subspace, which no head writes, though the layer-0 heads' outputs change."""
    _, orig_cache = induction.run_with_cache(orig)
    _, new_cache = induction.run_with_cache(new)
    assert not torch.equal(orig_cache["blocks.0.attn.hook_z"], new_cache["blocks.0.attn.hook_z"])
    result = path_patch(
        induction,
        orig,
        new,
        IterNode("z"),
        Node(receiver, 1, head=0),
        answer_logit(orig),
        direct_includes_mlps=direct_includes_mlps,
    )
    assert_result(result["z"], expected_cells({}))


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_previous_token_head_to_each_receiver(induction, orig, new, direct_includes_mlps):
    """Of all q, k, v receivers, L0H0 reaches only L1H0's key (for the logits)."""
    result = path_patch(
        induction,
        orig,
        new,
        Node("z", 0, head=0),
        IterNode(["q", "k", "v"]),
        answer_logit(orig),
        direct_includes_mlps=direct_includes_mlps,
    )
    assert set(result) == {"q", "k", "v"}
    assert_result(result["q"], expected_cells({}))
    assert_result(result["k"], expected_cells({(1, 0): answer_logit(orig)(with_new_prev(orig, new))}))
    assert_result(result["v"], expected_cells({}))


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_embedding_to_each_receiver(induction, orig, new, direct_includes_mlps):
    """The embeddings reach L0H0's value (then L1H0's key, through it) and L1H0's value directly."""
    result = path_patch(
        induction,
        orig,
        new,
        Node("resid_pre", 0),
        IterNode(["q", "k", "v"]),
        answer_logit(orig),
        direct_includes_mlps=direct_includes_mlps,
    )
    metric = answer_logit(orig)
    new_values = induction_logits(orig, previous_tokens(orig), new)
    assert_result(result["q"], expected_cells({}))
    assert_result(result["k"], expected_cells({}))
    assert_result(result["v"], expected_cells({(0, 0): metric(with_new_prev(orig, new)), (1, 0): metric(new_values)}))


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_decoy_key_receives_the_path(induction, orig, new, direct_includes_mlps):
    """L1H1's keys read L0H0's output too: seen in L1H1's attention, though never in the logits."""
    answer_positions = torch.tensor([t - HALF + 1 for t in REPEATED])

    def decoy_attention(cache) -> torch.Tensor:
        pattern = cache["blocks.1.attn.hook_pattern"][:, 1].detach().cpu()[:, REPEATED]
        return pattern.gather(-1, answer_positions.expand(pattern.shape[0], -1).unsqueeze(-1)).mean() - 1

    result = path_patch(
        induction,
        orig,
        new,
        Node("z", 0, head=0),
        IterNode("k"),
        decoy_attention,
        apply_metric_to_cache=True,
        direct_includes_mlps=direct_includes_mlps,
    )
    patched = induction_pattern(orig, previous_tokens(new))[:, REPEATED]
    expected = patched.gather(-1, answer_positions.expand(BATCH, -1).unsqueeze(-1)).mean() - 1
    assert expected == -1
    assert_result(result["k"], expected_cells({(1, 1): expected}))


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_one_position(induction, orig, new, direct_includes_mlps):
    """With seq_pos=2 only the key at position 2 sees new's previous token: partial, fractional effects."""
    position = 2
    prev = previous_tokens(orig).clone()
    prev[:, position] = previous_tokens(new)[:, position]
    result = path_patch(
        induction,
        orig,
        new,
        IterNode("z"),
        Node("k", 1, head=0),
        answer_logit(orig),
        seq_pos=position,
        direct_includes_mlps=direct_includes_mlps,
    )
    expected = answer_logit(orig)(induction_logits(orig, prev, orig))
    assert -ALPHA < expected < -ALPHA / 10
    assert_result(result["z"], expected_cells({(0, 0): expected}))


@pytest.mark.parametrize("direct_includes_mlps", MODES)
def test_per_prompt(induction, orig, new, direct_includes_mlps):
    """Only odd prompts are corrupted: the batch dim keeps each prompt's own value."""
    corrupted = torch.arange(BATCH) % 2 == 1
    mixed = torch.where(corrupted[:, None], new, orig)
    result = path_patch(
        induction,
        orig,
        mixed,
        IterNode("z"),
        Node("resid_post", 1),
        answer_logit(orig, per_prompt=True),
        direct_includes_mlps=direct_includes_mlps,
    )
    expected = torch.zeros(N_LAYERS, N_HEADS, BATCH)
    expected[1, 0] = answer_logit(orig, per_prompt=True)(clean_logits(mixed))
    assert (expected[1, 0][corrupted] == -ALPHA).all() and (expected[1, 0][~corrupted] == 0).all()
    assert_result(result["z"], expected, dims=("layer", "head", "batch"))


def test_act_patch_heads(induction, orig, new):
    """Activation patching: both circuit heads matter, the decoys do not."""
    result = act_patch(induction, orig, IterNode("z"), answer_logit(orig), new_input=new)
    metric = answer_logit(orig)
    expected = expected_cells({(0, 0): metric(with_new_prev(orig, new)), (1, 0): metric(clean_logits(new))})
    assert_result(result["z"], expected)
