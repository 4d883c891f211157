"""Engines given a metric object compute only the logits it reads, skip the patches that
cannot reach them, and return what the same metric gives on full logits.

Each result is compared with the same sweep given a plain function wrapping the metric:
the engines cannot see what a plain function reads, so they compute full logits and run
every patch.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_at_scale, counted, make_inputs
from transformer_lens_patching import IterNode, Node, PatchingError, act_patch, path_patch
from transformer_lens_patching.metrics import LogitDiff, LogitsAt, TokenLogit, TokenProbability, denoising_metric

READS = torch.tensor([4, 3, 5])
"""Positions read in the three prompts of `make_inputs` (7 tokens): position 6 is read in none."""


def plain(metric):
    """The same metric as a function: the engines compute full logits for it."""
    return lambda logits: metric(logits)


def metrics(model) -> dict:
    answers = torch.tensor([[5, 6], [17, 3], [6, 5]])
    if model.cfg.d_vocab > 40000:
        answers = answers + 1000
    return {
        "logit diff per prompt": LogitDiff(answers, READS, per_prompt=True),
        "normalised logit diff": denoising_metric(LogitDiff(answers, READS), clean=2.0, corrupted=-1.0),
        "token probability": TokenProbability(answers[:, 0], READS, per_prompt=True),
        "logits at two positions": LogitsAt(answers, positions=torch.tensor([[1, 4], [3, 0], [5, 5]])),
    }


METRICS = ["logit diff per prompt", "normalised logit diff", "token probability", "logits at two positions"]


def assert_equal_results(actual, expected) -> None:
    """Equal to 1e-5 of the values' scale, result by result: summing a row of W_U in another
    order (a product over fewer columns) moves a logit of SmolLM2's size (tens) by a few 1e-5."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for name in expected:
            assert actual[name].dims == expected[name].dims
            assert_close_at_scale(actual[name], expected[name])
        return
    assert_close_at_scale(actual, expected)


def sweeps(model) -> dict:
    last = model.cfg.n_layers - 1
    layers = [0, 1, last] if model.cfg.n_layers > 12 else None
    return {
        "heads": IterNode(["z", "v"], layers=layers),
        "every position": IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each", layers=layers),
        "neurons": IterNode("post", layers=[last], neurons=[0, 7]),
        "nodes together": [Node("z", 0, head=1), Node("mlp_out", 1, seq_pos=[6, 2, 6])],
    }


@pytest.mark.parametrize("sweep", ["heads", "every position", "neurons", "nodes together"])
@pytest.mark.parametrize("name", METRICS)
def test_act_patch_with_selected_logits_equals_full_logits(model, sweep, name):
    orig, new = make_inputs(model)
    metric, nodes = metrics(model)[name], sweeps(model)[sweep]
    expected = act_patch(model, orig, nodes, plain(metric), new_input=new)
    assert_equal_results(act_patch(model, orig, nodes, metric, new_input=new), expected)
    assert_equal_results(act_patch(model, orig, nodes, metric, new_input=new, batch_size=1), expected)


PATHS = {
    "heads to logits": (IterNode("z"), "final", True),
    "heads to queries, MLPs direct": (IterNode("z"), "queries", True),
    "heads to queries, residual only": (IterNode("z"), "queries", False),
    "each position to logits": (IterNode(["z", "mlp_out"], seq_pos="each"), "final", True),
    "each position to values, residual only": (IterNode("z", seq_pos="each"), "values", False),
}


def receivers(model, kind: str):
    late = model.cfg.n_layers - 2
    return {
        "final": Node("resid_post", model.cfg.n_layers - 1),
        "queries": [Node("q", late, head=0), Node("q", late, head=1)],
        "values": Node("v", late, head=0),
    }[kind]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", METRICS)
def test_path_patch_with_selected_logits_equals_full_logits(model, path, name):
    orig, new = make_inputs(model)
    metric = metrics(model)[name]
    senders, kind, mlps = PATHS[path]
    if model.cfg.n_layers > 12:
        senders = IterNode(senders.names, seq_pos=senders.seq_pos, layers=[0, 14, model.cfg.n_layers - 2])
    args = (model, orig, new, senders, receivers(model, kind))
    expected = path_patch(*args, plain(metric), direct_includes_mlps=mlps)
    assert_equal_results(path_patch(*args, metric, direct_includes_mlps=mlps), expected)


def test_patches_after_every_read_position_score_the_unpatched_metric_without_running(small_model):
    """Reads at positions 4, 3, 5: patches at position 6 cannot reach them."""
    model = small_model
    orig, new = make_inputs(model)
    metric = LogitDiff(torch.tensor([[5, 6], [6, 5], [5, 7]]), READS, per_prompt=True)
    n_layers = model.cfg.n_layers
    with counted(model, orig.shape[0]) as counts:
        result = act_patch(model, orig, IterNode("resid_pre", seq_pos="each"), metric, new_input=new)["resid_pre"]
    with torch.no_grad():
        unpatched = metric(model(orig))
    assert result.dims == ("seq_pos", "layer", "batch")
    torch.testing.assert_close(result[6], unpatched.expand(n_layers, -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(result[5, 0], unpatched)
    orig_and_new_runs = 2 * n_layers
    live_cells = sum(n_layers - layer for layer in range(n_layers)) * 6
    assert counts == {"attention": orig_and_new_runs + live_cells, "mlp": orig_and_new_runs + live_cells}


def test_a_patch_read_nowhere_is_the_unpatched_metric_from_one_orig_run(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = TokenLogit(7, READS, per_prompt=True)
    with counted(model, orig.shape[0]) as counts:
        result = act_patch(model, orig, Node("z", 0, seq_pos=6), metric, new_input=new)
        path_result = path_patch(model, orig, new, Node("z", 0), Node("resid_post", 2), metric, seq_pos=6)
    with torch.no_grad():
        unpatched = metric(model(orig))
    torch.testing.assert_close(result, unpatched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(path_result, unpatched, rtol=1e-5, atol=1e-5)
    n_layers = model.cfg.n_layers
    assert counts["attention"] <= 4 * n_layers


def test_read_positions_differ_per_prompt(small_model):
    """A position after one prompt's read but not another's is patched in every prompt."""
    model = small_model
    orig, new = make_inputs(model)
    metric = LogitDiff(torch.tensor([[5, 6], [6, 5], [5, 7]]), torch.tensor([6, 1, 2]), per_prompt=True)
    node = IterNode("resid_pre", seq_pos="each", layers=[1])
    assert_equal_results(
        act_patch(model, orig, node, metric, new_input=new), act_patch(model, orig, node, plain(metric), new_input=new)
    )


class UnembeddingWatch:
    """Records the shapes the final norm receives and whether the full unembedding runs."""

    def __init__(self, model):
        self.model, self.norm_inputs, self.unembeddings = model, [], 0

    def __enter__(self):
        self.handles = [
            self.model.ln_final.register_forward_pre_hook(
                lambda m, args: self.norm_inputs.append(tuple(args[0].shape))
            ),
            self.model.unembed.register_forward_hook(
                lambda m, i, o: setattr(self, "unembeddings", self.unembeddings + 1)
            ),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_only_the_read_positions_are_normalised_and_no_patched_pass_unembeds_fully(small_model):
    """Only the runs that cache the orig and new activations (two per call) compute full logits."""
    model = small_model
    orig, new = make_inputs(model)
    metric = LogitDiff(torch.tensor([[5, 6], [6, 5], [5, 7]]), READS)
    with UnembeddingWatch(model) as watch:
        act_patch(model, orig, IterNode("z"), metric, new_input=new)
        path_patch(model, orig, new, IterNode("z"), Node("resid_post", model.cfg.n_layers - 1), metric)
    assert watch.unembeddings == 4
    full = [shape for shape in watch.norm_inputs if shape == (*orig.shape, model.cfg.d_model)]
    patched = [shape for shape in watch.norm_inputs if shape not in full]
    assert len(full) == 4 and patched
    assert all(shape[1:] == (1, model.cfg.d_model) for shape in patched)
    with UnembeddingWatch(model) as watch:
        act_patch(model, orig, IterNode("z", layers=[0]), plain(metric), new_input=new)
    assert watch.unembeddings > 0


def test_selected_logits_stack_more_variants_per_pass(small_model):
    """Within the same memory budget (here about one variant with full logits), a pass
    holds more variants when it needs no full logits."""
    model = small_model
    orig, new = make_inputs(model)
    metric = LogitDiff(torch.tensor([[5, 6], [6, 5], [5, 7]]))
    last = model.cfg.n_layers - 1
    passes = {}
    for key, used in (("full", plain(metric)), ("selected", metric)):
        calls = []
        handle = model.blocks[last].register_forward_pre_hook(lambda m, args: calls.append(1))
        try:
            act_patch(model, orig, IterNode("z", layers=[last]), used, new_input=new, max_memory=500_000)
        finally:
            handle.remove()
        passes[key] = len(calls) - 2  # the runs caching new and the orig residual stream
    assert passes == {"full": model.cfg.n_heads, "selected": 1}


@pytest.mark.parametrize(
    "metric, message",
    [
        (LogitDiff(torch.tensor([[5, 6], [6, 5]])), "is for 2 prompts, but the input has 3"),
        (TokenLogit(5, torch.tensor([1, 2, 7])), "position 7, out of range for sequences of length 7"),
        (TokenLogit(10**6), "reads token id 1000000, but the model's vocabulary has"),
    ],
)
def test_a_metric_that_does_not_fit_the_input_or_model_fails_before_running(small_model, metric, message):
    model = small_model
    orig, new = make_inputs(model)
    with counted(model, orig.shape[0]) as counts:
        with pytest.raises(PatchingError, match=message):
            act_patch(model, orig, IterNode("z"), metric, new_input=new)
        with pytest.raises(PatchingError, match=message):
            path_patch(model, orig, new, IterNode("z"), Node("resid_post", 1), metric)
    assert counts == {"attention": 0, "mlp": 0}


def test_hooks_on_the_output_get_full_logits_as_before(small_model):
    """A user's hook on the final norm sees every position, as it would without patching."""
    model = small_model
    orig, new = make_inputs(model)
    metric = LogitDiff(torch.tensor([[5, 6], [6, 5], [5, 7]]))
    name = next(n for n in ("ln_final.hook_out", "ln_final.hook_normalized") if n in model.hook_dict)
    shapes = []

    def seen(act, hook):
        shapes.append(act.shape[1])
        return act * 1.5

    model.add_hook(name, seen)
    try:
        result = act_patch(model, orig, IterNode("z", layers=[1]), metric, new_input=new)
        expected = act_patch(model, orig, IterNode("z", layers=[1]), plain(metric), new_input=new)
    finally:
        model.reset_hooks()
    assert_equal_results(result, expected)
    assert set(shapes) == {orig.shape[1]}
