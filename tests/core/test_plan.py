"""Plans: made without a forward pass, printable, run with or without gradients, and split into
shards whose outputs assemble into exactly the unsharded result."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tests.helpers import early_logit_diff, logit_diff_metric, make_inputs, plans_of_each_kind, raises
from transformer_lens_patching import (
    IterNode,
    Node,
    PatchPlan,
    PlanOutputs,
    act_patch,
    path_patch,
    plan_act_patch,
    plan_path_patch,
)


@contextmanager
def forward_passes(model):
    """Count forward passes (firings of the first layer's input hook) in the block."""
    calls = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: calls.append(act.shape[0]))]):
        yield calls


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k].dims == b[k].dims and torch.equal(a[k], b[k]) for k in a)
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_planning_runs_no_forward_pass(small_model):
    """Planning never runs the prompts. What a bridge's architecture calls (which hooks fire, whether
    its per-head inputs copy the residual stream) is probed once per model, on one prompt of at most
    two tokens; planning again probes nothing."""
    model = small_model
    with forward_passes(model) as calls:
        made = plans_of_each_kind(model)
    assert all(batch == 1 for batch in calls) and len(calls) <= 2, f"planning ran the model: {calls}"
    assert all(isinstance(plan, PatchPlan) for plan in made.values())
    with forward_passes(model) as calls:
        plans_of_each_kind(model)
    assert calls == [], "planning ran the model"


def test_every_cell_is_measured_by_exactly_one_block(small_model):
    for name, plan in plans_of_each_kind(small_model).items():
        cells = [cell for block in plan.blocks for cell in block.cells]
        assert sorted(cells) == list(range(plan.n_cells)), name
        for block in plan.blocks:
            measured = [v for p in block.passes if p.stage == "patch" for v in p.variants]
            if block.passes[0].stage != "unpatched":
                assert sorted(measured) == sorted(block.cells), name


def test_running_a_plan_is_the_call(small_model):
    model = small_model
    orig, new = make_inputs(model)
    last = model.cfg.n_layers - 1
    ld = early_logit_diff()
    sweep = IterNode(["z", "resid_pre"], seq_pos="each", layers=[0, last])
    plan = plan_act_patch(model, orig, sweep, ld, new_input=new)
    assert equal(plan.assemble(plan.run()), act_patch(model, orig, sweep, ld, new_input=new))
    senders = IterNode("z", layers=[0, last])
    plan = plan_path_patch(model, orig, new, senders, Node("resid_post", last), ld)
    assert equal(plan.assemble(plan.run()), path_patch(model, orig, new, senders, Node("resid_post", last), ld))
    nodes = [Node("z", 1, head=0), Node("mlp_out", 2)]
    plan = plan_act_patch(model, orig, nodes, logit_diff_metric(), new_input=new)
    assert equal(plan.assemble(plan.run()), act_patch(model, orig, nodes, logit_diff_metric(), new_input=new))


def test_shards_assemble_into_exactly_the_unsharded_result(small_model):
    for name, plan in plans_of_each_kind(small_model).items():
        whole = plan.assemble(plan.run())
        for count in (3, 50):
            shards = [plan.shard(index, count) for index in range(count)]
            assert sum(bool(shard.blocks) for shard in shards) == min(count, len(plan.blocks)), name
            assert sorted(id(b) for s in shards for b in s.blocks) == sorted(id(b) for b in plan.blocks), name
            assert equal(plan.assemble([shard.run() for shard in shards]), whole), (name, count)


def test_shards_share_the_work(small_model):
    plan = plans_of_each_kind(small_model)["act sweep"]
    loads = [sum(block.cost for block in plan.shard(index, 3).blocks) for index in range(3)]
    biggest = max(block.cost for block in plan.blocks)
    assert max(loads) - min(loads) <= biggest, loads


def test_an_empty_shard_runs_nothing(small_model):
    model = small_model
    plan = plans_of_each_kind(model)["act nodes"]
    assert len(plan.blocks) == 1
    empty = plan.shard(1, 2)
    with forward_passes(model) as calls:
        outputs = empty.run()
    assert calls == [] and outputs.values == {} and isinstance(outputs, PlanOutputs)
    assert equal(plan.assemble([plan.shard(0, 2).run(), outputs]), plan.assemble(plan.run()))


def test_assembling_needs_every_shard_once_and_from_this_plan(small_model):
    model = small_model
    plan = plans_of_each_kind(model)["act sweep"]
    parts = [plan.shard(index, 2).run() for index in range(2)]
    with raises(r"cells are missing .*pass the outputs of every shard"):
        plan.assemble(parts[:1])
    with raises(r"measured by more than one of the outputs"):
        plan.assemble([parts[0], parts[0], parts[1]])
    other = plans_of_each_kind(model)["act sweep"]
    with raises(r"outputs of run\(\) on this plan or on its shards"):
        other.assemble(parts)
    with raises(r"already shard 0 of 2; shard the whole plan"):
        plan.shard(0, 2).shard(0, 2)
    with raises(r"needs count >= 1 and 0 <= index < count; got \(2, 2\)"):
        plan.shard(2, 2)


def test_a_printed_plan_says_what_it_patches_and_runs(small_model):
    model = small_model
    n_layers = model.cfg.n_layers
    text = str(plans_of_each_kind(model)["act sweep"])
    assert text.startswith("act_patch plan")
    assert f"IterNode(['z', 'resid_pre'], seq_pos='each', layers=(0, 1, {n_layers - 1}))" in text
    assert f"z: (seq_pos=7, layer=3, head={model.cfg.n_heads})" in text
    assert "reads 4 logits at 1 position per prompt" in text
    assert "scoring the unpatched run" in text
    plan = plans_of_each_kind(model)["path two passes"]
    text = str(plan)
    assert "two passes" in text and "record" in text and f"{len(plan.passes)} forward passes" in text
    assert "only the unembedding" in text
    assert "one pass" in str(plans_of_each_kind(model)["path one pass"])
    assert repr(plan).startswith("<PatchPlan path_patch:")


def test_plans_without_a_forward_pass_still_check_everything(small_model):
    model = small_model
    orig, new = make_inputs(model)
    with raises(r"Layer 99 is out of range"):
        plan_act_patch(model, orig, Node("z", 99, head=0), logit_diff_metric(), new_input=new)
    with raises(r"new_input has token shape \(3, 6\)"):
        plan_path_patch(model, orig, new[:, :6], IterNode("z"), Node("resid_post", 1), logit_diff_metric())


def z_replaced(model, orig, layer: int, head: int, leaf: torch.Tensor, metric):
    """The naive reference: one forward pass with grad, head `head`'s z at `layer` taken from `leaf`."""

    def hook(z, hook):
        out = z.clone()
        out[:, :, head] = leaf[:, :, head]
        return out

    with torch.enable_grad():
        logits = model.run_with_hooks(orig, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
        return metric(logits)


def test_run_with_grad_gives_the_gradients_of_the_naive_reference(small_model):
    """Gradients of a stacked sweep with respect to a patched-in tensor and to the embedding
    (which only a pass from layer 0 reaches) equal those of one plain forward pass per cell."""
    model = small_model
    orig, new = make_inputs(model)
    layer = model.cfg.n_layers // 2
    _, cache = model.run_with_cache(new)
    name = f"blocks.{layer}.attn.hook_z"
    leaf = cache[name].clone().requires_grad_(True)
    embedding = next(model.parameters())
    metric = logit_diff_metric()
    plan = plan_act_patch(model, orig, IterNode("z", layers=[layer]), metric, new_cache={name: leaf})
    outputs = plan.run(grad=True)
    for head in range(model.cfg.n_heads):
        value = outputs.values[head]
        expected = z_replaced(model, orig, layer, head, leaf, metric)
        torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(value, [leaf, embedding], retain_graph=True)
        want = torch.autograd.grad(expected, [leaf, embedding])
        for g, w in zip(got, want):
            scale = max(1.0, float(w.abs().max()))
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)
        assert got[0].abs().max() > 0 and got[1].abs().max() > 0, "a gradient is zero: the test is blind"
    assert not any(v.requires_grad for v in plan.run().values.values()), "without grad=True, nothing records gradients"


def test_run_with_grad_through_both_path_patching_passes(small_model):
    model = small_model
    orig, new = make_inputs(model)
    last = model.cfg.n_layers - 1
    plan = plan_path_patch(model, orig, new, IterNode("z", layers=[0]), Node("resid_pre", last), logit_diff_metric())
    outputs = plan.run(grad=True)
    embedding = next(model.parameters())
    grads = [torch.autograd.grad(value, [embedding], retain_graph=True)[0] for value in outputs.values.values()]
    assert all(g.abs().max() > 0 for g in grads)
    assert equal(plan.assemble(outputs), plan.assemble(plan.run()))
