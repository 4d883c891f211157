"""The user's model, caches, nodes and autograd state are left exactly as they were; a model in
training mode with dropout active is refused by every engine."""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, logit_diff_metric, make_inputs, model_state, raises
from tests.oracles.reference import full_cache, naive_act_patch, naive_path_patch
from transformer_lens_patching import (
    IterNode,
    Node,
    act_patch,
    attr_edges,
    attr_patch,
    mean_ablation_cache,
    path_patch,
    plan_act_patch,
    plan_path_patch,
)

KNOCKOUT_HOOK = "blocks.1.attn.hook_z"


def hook_counts(model) -> dict[str, int]:
    """Forward hooks on each hook point that has any (a hook point listed under two names counts once)."""
    counts, seen = {}, set()
    for name, hook_point in model.hook_dict.items():
        if hook_point.fwd_hooks and id(hook_point) not in seen:
            seen.add(id(hook_point))
            counts[name] = len(hook_point.fwd_hooks)
    return counts


@contextmanager
def user_hook(model, name: str, fn):
    """A hook the user added with model.add_hook, removed again when the block ends."""
    model.add_hook(name, fn)
    try:
        yield
    finally:
        model.hook_dict[name].remove_hooks("fwd")


@contextmanager
def split_qkv_on(model):
    """use_split_qkv_input switched on by the user for the block."""
    model.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(False)


def knockout(calls: list):
    """A user hook that zeroes head 0 of z and counts its calls."""

    def hook(z, hook):
        calls.append(1)
        out = z.clone()
        out[:, :, 0] = 0.0
        return out

    return hook


class Boom(Exception):
    """An error raised by a user's metric."""


def raising_metric(model, after: int, error: BaseException, seen: list):
    """A metric that records model.cfg.use_split_qkv_input in `seen` and raises `error` on call `after + 1`."""

    def metric(logits):
        seen.append(model.cfg.use_split_qkv_input)
        if len(seen) > after:
            raise error
        return logits[:, -1, 5].mean()

    return metric


# --- (a) user hooks stay and are applied ---


def test_user_hook_kept_and_applied_act_patch(small_model):
    model = small_model
    orig, new = make_inputs(model)
    node, metric = Node("z", 3, head=1), logit_diff_metric(per_prompt=True)
    without = act_patch(model, orig, node, metric, new_input=new)
    calls: list = []
    with user_hook(model, KNOCKOUT_HOOK, knockout(calls)):
        with_hook = act_patch(model, orig, node, metric, new_input=new)
        assert calls, "the user's hook never ran during act_patch"
        assert sum(hook_counts(model).values()) == 1
        expected = naive_act_patch(model, orig, [node], metric, full_cache(model, new))
        n_calls = len(calls)
        model(orig)
        assert len(calls) == n_calls + 1, "the user's hook no longer fires after act_patch"
    assert_close(with_hook, expected)
    assert (with_hook - without).abs().max() > 1e-4, "knocking out a head changed nothing: the test is blind"


def test_user_hook_kept_and_applied_iter_node(small_model):
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    sweep = IterNode("resid_pre", layers=[2, 3], seq_pos=-1)
    without = act_patch(model, orig, sweep, metric, new_input=new)["resid_pre"]
    calls: list = []
    with user_hook(model, KNOCKOUT_HOOK, knockout(calls)):
        with_hook = act_patch(model, orig, sweep, metric, new_input=new)["resid_pre"]
        cache = full_cache(model, new)
        expected = [
            naive_act_patch(model, orig, [Node("resid_pre", layer, seq_pos=-1)], metric, cache) for layer in (2, 3)
        ]
        assert sum(hook_counts(model).values()) == 1
    assert_close(with_hook, torch.stack(expected))
    assert (with_hook - without).abs().max() > 1e-4


@pytest.mark.parametrize("mlps_direct", [True, False])
def test_user_hook_kept_and_applied_path_patch(small_model, mlps_direct):
    model = small_model
    orig, new = make_inputs(model)
    senders, receivers, metric = [Node("z", 0, head=1)], [Node("resid_post", 2)], logit_diff_metric(per_prompt=True)
    without = path_patch(model, orig, new, senders, receivers, metric, direct_includes_mlps=mlps_direct)
    calls: list = []
    with user_hook(model, KNOCKOUT_HOOK, knockout(calls)):
        with_hook = path_patch(model, orig, new, senders, receivers, metric, direct_includes_mlps=mlps_direct)
        assert calls and sum(hook_counts(model).values()) == 1
        expected = naive_path_patch(model, orig, new, senders, receivers, metric, mlps_direct=mlps_direct)
    assert_close(with_hook, expected)
    assert (with_hook - without).abs().max() > 1e-4


# --- (b) exceptions leave no hooks of ours and restore flags ---


def test_metric_exception_path_patch_restores_model(small_model):
    model = small_model
    orig, new = make_inputs(model)
    seen: list = []
    metric = raising_metric(model, 0, Boom("metric failed"), seen)
    with pytest.raises(Boom, match="metric failed"):
        path_patch(model, orig, new, Node("z", 0, head=0), Node("q", 2, head=1), metric, direct_includes_mlps=False)
    assert seen == [True], "use_split_qkv_input was not on while patching: the test does not exercise the flag"
    assert model.cfg.use_split_qkv_input is False
    assert hook_counts(model) == {}


def test_keyboard_interrupt_mid_sweep_restores_model(small_model):
    model = small_model
    orig, new = make_inputs(model)
    seen: list = []
    metric = raising_metric(model, 2, KeyboardInterrupt(), seen)
    with pytest.raises(KeyboardInterrupt):
        path_patch(
            model,
            orig,
            new,
            IterNode("z", layers=[0, 1]),
            Node("q", 2, head=1),
            metric,
            direct_includes_mlps=False,
            batch_size=1,
        )
    assert len(seen) == 3 and all(seen)
    assert model.cfg.use_split_qkv_input is False
    assert hook_counts(model) == {}


def test_interrupt_inside_forward_pass_removes_our_hooks(small_model):
    """An interrupt raised by a user hook mid-forward, while our hooks are on: only the user's stays."""
    model = small_model
    orig, new = make_inputs(model)
    calls: list = []

    def interrupt_on_third_call(act, hook):
        calls.append(model.cfg.use_split_qkv_input)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return act

    name = "blocks.3.hook_resid_post"
    with user_hook(model, name, interrupt_on_third_call):
        with pytest.raises(KeyboardInterrupt):
            path_patch(
                model,
                orig,
                new,
                IterNode("z", layers=[0, 1]),
                Node("q", 3, head=1),
                logit_diff_metric(),
                direct_includes_mlps=False,
                batch_size=1,
            )
        assert sum(hook_counts(model).values()) == 1
        assert model.cfg.use_split_qkv_input is False
    assert calls[-1] is True


def test_metric_exception_act_patch_restores_model(small_model):
    model = small_model
    orig, new = make_inputs(model)
    seen: list = []
    metric = raising_metric(model, 1, Boom("second cell"), seen)
    with pytest.raises(Boom, match="second cell"):
        act_patch(model, orig, IterNode("q_input", layers=[1]), metric, new_input=new, batch_size=1)
    assert seen == [True, True]
    assert model.cfg.use_split_qkv_input is False
    assert hook_counts(model) == {}


def test_metric_exception_restores_attn_result(small_model):
    model = small_model
    orig, new = make_inputs(model)
    seen: list = []

    def metric(logits):
        seen.append(model.cfg.use_attn_result)
        raise Boom("result metric")

    with pytest.raises(Boom, match="result metric"):
        act_patch(model, orig, Node("result", 1, head=0), metric, new_input=new)
    assert seen == [True]
    assert not model.cfg.use_attn_result
    assert hook_counts(model) == {}


# --- (c) flags the user set stay set ---


def test_user_split_qkv_input_stays_on(small_model):
    model = small_model
    orig, new = make_inputs(model)
    args = (model, orig, new, Node("z", 0, head=0), Node("q", 2, head=1), logit_diff_metric(per_prompt=True))
    expected = path_patch(*args, direct_includes_mlps=False)
    with split_qkv_on(model):
        actual = path_patch(*args, direct_includes_mlps=False)
        assert model.cfg.use_split_qkv_input is True
        act_patch(model, orig, Node("k_input", 1, head=0), logit_diff_metric(), new_input=new)
        assert model.cfg.use_split_qkv_input is True
        assert hook_counts(model) == {}
    assert_close(actual, expected)


# --- (d) caches passed in are read, never written ---


def clone_all(cache) -> dict:
    return {name: tensor.clone() for name, tensor in cache.items()}


def assert_unchanged(cache, before: dict) -> None:
    assert set(cache.keys()) == set(before)
    for name, tensor in before.items():
        assert torch.equal(cache[name], tensor), f"{name} was written to"


def test_new_cache_not_written_act_patch(small_model):
    model = small_model
    orig, new = make_inputs(model)
    _, new_cache = model.run_with_cache(new)
    before = clone_all(new_cache)
    metric = logit_diff_metric()
    act_patch(model, orig, IterNode(["z", "resid_pre"], layers=[0, 1]), metric, new_cache=new_cache)
    act_patch(
        model, orig, [Node("resid_pre", 1, seq_pos=[1, 2, 3]), Node("post", 0, neuron=3)], metric, new_cache=new_cache
    )
    assert_unchanged(new_cache, before)


def test_mean_cache_and_source_not_written(small_model):
    model = small_model
    orig, new = make_inputs(model)
    _, cache = model.run_with_cache(new)
    before = clone_all(cache)
    means = mean_ablation_cache(cache, groups=[0, 1, 0])
    means_before = clone_all(means)
    act_patch(model, orig, IterNode("z", layers=[0, 1]), logit_diff_metric(), new_cache=means)
    assert_unchanged(cache, before)
    assert_unchanged(means, means_before)


@pytest.mark.parametrize("mlps_direct", [True, False])
def test_caches_not_written_path_patch(small_model, mlps_direct):
    model = small_model
    orig, new = make_inputs(model)
    _, orig_cache = model.run_with_cache(orig)
    _, new_cache = model.run_with_cache(new)
    orig_before, new_before = clone_all(orig_cache), clone_all(new_cache)
    path_patch(
        model,
        orig,
        new,
        IterNode("z", layers=[0], heads=[0, 1]),
        [Node("resid_mid", 2), Node("q", 2, head=0)],
        logit_diff_metric(),
        orig_cache=orig_cache,
        new_cache=new_cache,
        direct_includes_mlps=mlps_direct,
    )
    assert_unchanged(orig_cache, orig_before)
    assert_unchanged(new_cache, new_before)


# --- (e) nothing is left attached to autograd ---


def test_results_carry_no_grad(small_model):
    model = small_model
    orig, new = make_inputs(model)
    assert torch.is_grad_enabled()
    metric = logit_diff_metric(per_prompt=True)
    single = act_patch(model, orig, Node("z", 1, head=0), metric, new_input=new)
    sweep = act_patch(model, orig, IterNode("z", layers=[1]), metric, new_input=new)["z"]
    path = path_patch(model, orig, new, Node("z", 0), Node("q", 1, head=0), metric)
    on_cache = act_patch(
        model,
        orig,
        Node("resid_pre", 1),
        lambda cache: cache["blocks.2.hook_resid_pre"].norm(),
        new_input=new,
        apply_metric_to_cache=True,
    )
    for result in (single, sweep, path, on_cache):
        assert result.grad_fn is None and not result.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_sweeps_leave_no_tensors_for_the_cycle_collector(small_model):
    """What a pass kept (records, gradient leaves, the last residual stream) is freed when the call
    returns, not when the cycle collector next runs: EAP-IG's passes once piled up 120 MB each so."""
    model = small_model
    orig, new = make_inputs(model)
    metric = logit_diff_metric()
    calls = [
        lambda: act_patch(model, orig, IterNode(["z", "resid_pre"]), metric, new_input=new),
        lambda: path_patch(model, orig, new, IterNode("z"), Node("resid_post", -1), metric),
        lambda: attr_patch(model, orig, IterNode(["z", "post"]), metric, new_input=new, method="ig", steps=2),
        lambda: attr_edges(model, orig, metric, new_input=new, method="ig", steps=2, max_memory=1),
    ]
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        for call in calls:
            call()
        gc.collect()
        left = [type(thing).__name__ for thing in gc.garbage if isinstance(thing, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


# --- (f) specs passed in are not mutated ---


def test_nodes_unchanged_after_sweeps(small_model):
    model = small_model
    orig, new = make_inputs(model)
    positions = torch.tensor([-1, 2, 3])
    nodes = [Node("z", -1, head=0), Node("resid_pre", -2, seq_pos=positions), Node("post", 1, neuron=2, seq_pos=-1)]
    sweep = IterNode(["z", "resid_pre"], seq_pos="each", layers=[1], heads=[0])
    saved_nodes, saved_sweep = copy.deepcopy(nodes), copy.deepcopy(sweep)
    saved_reprs = [repr(node) for node in nodes] + [repr(sweep)]
    metric = logit_diff_metric()
    act_patch(model, orig, nodes, metric, new_input=new)
    act_patch(model, orig, sweep, metric, new_input=new)
    path_patch(
        model,
        orig,
        new,
        [Node("z", 0, head=1), Node("mlp_out", 0)],
        [Node("q", -1, head=0), Node("resid_mid", 1)],
        metric,
        seq_pos=positions,
        direct_includes_mlps=False,
    )
    path_patch(
        model,
        orig,
        new,
        IterNode("z", layers=[0], heads=[0, 1]),
        Node("resid_post", -1),
        metric,
        direct_includes_mlps=False,
    )
    assert nodes == saved_nodes and sweep == saved_sweep
    assert [repr(node) for node in nodes] + [repr(sweep)] == saved_reprs
    assert torch.equal(positions, torch.tensor([-1, 2, 3]))
    assert nodes[0].layer == -1 and nodes[1].seq_pos == (-1, 2, 3)


# --- training mode: refused where dropout is active, else the same as eval mode ---


def test_dropout_in_training_mode_is_refused_everywhere(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model)
    if TL_MAJOR < 4:
        pytest.skip("HookedTransformer has no dropout: training mode changes nothing (tested below)")
    model.train()
    try:
        before = model_state(model)
        message = r"training mode with dropout active .*Call model.eval\(\) first"
        with raises(message):
            act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(), new_input=new)
        with raises(message):
            path_patch(model, orig, new, IterNode("z", layers=[0]), Node("resid_post", 2), logit_diff_metric())
        with raises(message):
            plan_act_patch(model, orig, Node("z", 0, head=0), logit_diff_metric(), new_input=new)
        with raises(message):
            plan_path_patch(model, orig, new, Node("z", 0, head=0), Node("resid_post", 2), logit_diff_metric())
        assert model_state(model) == before
    finally:
        model.eval()


def test_training_mode_without_dropout_patches_as_eval_mode(gpt2_model):
    model = gpt2_model
    if TL_MAJOR >= 4:
        pytest.skip("the bridged GPT-2 has dropout (tested above)")
    orig, new = make_inputs(model)
    expected = act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(), new_input=new)["z"]
    model.train()
    try:
        assert torch.equal(
            act_patch(model, orig, IterNode("z", layers=[0]), logit_diff_metric(), new_input=new)["z"], expected
        )
    finally:
        model.eval()
