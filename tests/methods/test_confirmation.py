"""confirm: its exact values against plain act_patch of each cell, its choice of cells against
a sort written here, its rank statistics against a literal computation, the case where the
estimate is exact, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import linear_metric, logit_diff_metric, make_inputs, raises
from tests.oracles import induction_model
from transformer_lens_patching import (
    Confirmation,
    ConfirmedCell,
    IterNode,
    Node,
    PatchResult,
    act_patch,
    attr_patch,
    attr_path_patch,
    confirm,
    confirm_paths,
    path_patch,
)
from transformer_lens_patching._methods import confirmation as confirmation_module

BATCH = 3
TOP_K = 7


def every_cell(estimates: dict[str, PatchResult], per_prompt: bool):
    """(component, coords, estimate) of every cell, by plain loops over each result's coordinates."""
    cells = []
    for name, result in estimates.items():
        sweep_dims = [dim for dim in result.dims if dim != "batch"]

        def walk(selection, remaining):
            if not remaining:
                value = result.sel(**selection)
                cells.append(
                    (
                        name,
                        dict(selection),
                        float(torch.as_tensor(value).double().mean()) if per_prompt else float(value),
                    )
                )
                return
            for coordinate in result.coords[remaining[0]]:
                walk({**selection, remaining[0]: coordinate}, remaining[1:])

        walk({}, sweep_dims)
    return cells


def node_of(component: str, coords: dict[str, int]) -> Node:
    """The Node that patches one cell of a sweep."""
    coords = dict(coords)
    head = coords.pop("head", coords.pop("kv_head", None))
    return Node(
        component,
        coords.pop("layer", None),
        head=head,
        neuron=coords.pop("neuron", None),
        seq_pos=coords.pop("seq_pos", None),
    )


def unpatched_metric(model, orig, metric) -> float:
    with torch.no_grad():
        return float(torch.as_tensor(metric(model(orig))).double().mean())


@pytest.mark.parametrize("per_prompt", [False, True])
def test_exact_values_are_act_patch_of_each_cell(small_model, per_prompt):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt)
    sweep = IterNode(["z", "k", "post"], layers=[0, 2], heads=[0, 1], neurons=[3, 8, 11])
    estimates = attr_patch(model, orig, sweep, metric, new_input=new)
    checked = confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=TOP_K)
    assert isinstance(checked, Confirmation) and len(checked.cells) == TOP_K and checked.per_prompt == per_prompt
    unpatched = unpatched_metric(model, orig, metric)
    assert checked.unpatched == pytest.approx(unpatched, abs=1e-5)
    for cell in checked.cells:
        exact = act_patch(model, orig, node_of(cell.component, cell.coords), metric, new_input=new)
        expected = float(torch.as_tensor(exact).double().mean())
        assert cell.exact == pytest.approx(expected, abs=1e-5, rel=1e-5), cell.label
        assert cell.exact_change == pytest.approx(expected - unpatched, abs=1e-5)
        estimate = torch.as_tensor(estimates[cell.component].sel(**cell.coords)).double().mean()
        assert cell.estimate == pytest.approx(float(estimate), abs=1e-6)
        assert cell.estimated_change == pytest.approx(float(estimate) - unpatched, abs=1e-5)


@pytest.mark.parametrize("per_prompt", [False, True])
def test_the_chosen_cells_have_the_largest_estimated_changes(small_model, per_prompt):
    model = small_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric(per_prompt)
    sweep = IterNode(["z", "v", "post"], layers=[1, 3])
    estimates = attr_patch(model, orig, sweep, metric, new_input=new)
    unpatched = unpatched_metric(model, orig, metric)
    cells = every_cell(estimates, per_prompt)
    ranked = sorted(cells, key=lambda cell: -abs(cell[2] - unpatched))
    checked = confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=TOP_K)
    assert [(c.component, c.coords) for c in checked.cells] == [(name, coords) for name, coords, _ in ranked[:TOP_K]]
    assert checked.screened == len(cells)
    delta = attr_patch(model, orig, sweep, metric, new_input=new, estimate="delta")
    by_delta = confirm(model, delta, orig, sweep, metric, new_input=new, top_k=TOP_K, estimate="delta")
    assert [c.label for c in by_delta.cells] == [c.label for c in checked.cells]
    assert [c.exact for c in by_delta.cells] == pytest.approx([c.exact for c in checked.cells], abs=1e-6)


def test_positions_and_top_k_beyond_the_sweep(gpt2_model):
    """A sweep over positions confirms cells with a seq_pos coordinate; a top_k larger than
    the sweep confirms every cell."""
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    sweep = IterNode("resid_pre", layers=[2], seq_pos="each")
    estimates = attr_patch(model, orig, sweep, metric, new_input=new)
    checked = confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=100)
    assert len(checked.cells) == orig.shape[1] == checked.screened
    assert {tuple(cell.coords) for cell in checked.cells} == {("seq_pos", "layer")}
    for cell in checked.cells:
        exact = act_patch(model, orig, Node("resid_pre", 2, seq_pos=cell.coords["seq_pos"]), metric, new_input=new)
        assert cell.exact == pytest.approx(float(exact), abs=1e-5)


def test_the_cells_are_planned_together(gpt2_model, monkeypatch):
    """One plan of the chosen cells, stacked (not one act_patch per cell); batch_size splits it
    into more passes with the same values."""
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    sweep = IterNode("post", layers=[0, 1])
    estimates = attr_patch(model, orig, sweep, metric, new_input=new)
    plans = []
    planned = confirmation_module.plan_cells
    monkeypatch.setattr(confirmation_module, "plan_cells", lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1])
    stacked = confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=12)
    split = confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=12, batch_size=3)
    assert [plan.n_cells for plan in plans] == [12, 12]
    assert len(plans[0].passes) <= 2 < len(plans[1].passes), "every cell of a start layer in one pass"
    assert plans[1].variants_per_pass == 3
    assert [c.exact for c in split.cells] == pytest.approx([c.exact for c in stacked.cells], abs=1e-5)


def literal_ranks(values: list[float]) -> list[float]:
    """Rank of each value: 1 + how many are smaller + half of the others equal to it."""
    return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def literal_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = literal_ranks(a), literal_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    covariance = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return covariance / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def literal_overlap(estimated: list[float], exact: list[float], n: int) -> int:
    by_estimate = sorted(range(len(estimated)), key=lambda i: (-abs(estimated[i]), i))[:n]
    by_exact = sorted(range(len(exact)), key=lambda i: (-abs(exact[i]), i))[:n]
    return len(set(by_estimate) & set(by_exact))


def hand_made(estimated: list[float], exact: list[float]) -> Confirmation:
    cells = tuple(
        ConfirmedCell("z", {"layer": i, "head": 0}, e, x, e, x) for i, (e, x) in enumerate(zip(estimated, exact))
    )
    return Confirmation(cells, unpatched=0.0, screened=100)


def test_rank_statistics_against_a_literal_computation(gpt2_model):
    estimated = [0.9, -0.7, 0.5, 0.5, -0.3, 0.2, 0.1]
    exact = [0.4, -0.8, 0.05, 0.3, -0.3, -0.6, 0.1]  # ties in the estimate, a reordered exact top
    checked = hand_made(estimated, exact)
    assert checked.spearman == pytest.approx(literal_spearman(estimated, exact), abs=1e-12)
    assert checked.overlap_size == 4
    assert checked.top_k_overlap == literal_overlap(estimated, exact, 4) == 3
    assert [checked.overlap(n) for n in range(1, 8)] == [literal_overlap(estimated, exact, n) for n in range(1, 8)]
    assert math.isnan(hand_made([0.3], [0.1]).spearman) and math.isnan(hand_made([0.3, 0.2], [0.1, 0.1]).spearman)

    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    sweep = IterNode(["z", "post"], layers=[2])
    measured = confirm(
        model, attr_patch(model, orig, sweep, metric, new_input=new), orig, sweep, metric, new_input=new, top_k=9
    )
    estimated, exact = [c.estimated_change for c in measured.cells], [c.exact_change for c in measured.cells]
    assert measured.spearman == pytest.approx(literal_spearman(estimated, exact), abs=1e-9)
    assert measured.top_k_overlap == literal_overlap(estimated, exact, 5)


def test_a_frame_and_a_readable_summary(gpt2_model):
    pytest.importorskip("pandas")
    checked = hand_made([0.9, -0.7], [0.8, -0.4])
    frame = checked.to_frame()
    assert list(frame.columns) == [
        "component",
        "layer",
        "head",
        "estimate",
        "exact",
        "estimated_change",
        "exact_change",
    ]
    assert frame["layer"].tolist() == [0, 1] and frame["exact"].tolist() == [0.8, -0.4]
    text = repr(checked)
    assert text.startswith("Confirmation: the 2 of 100 cells with the largest estimated change")
    assert "Spearman 1.000; top-1 overlap 1 of 1" in text and "z layer=1, head=0" in text
    assert "top-1 overlap 0 of 1" in repr(hand_made([0.9, -0.7], [0.4, -0.8])), "the exact strongest is the second"


def test_where_the_estimate_is_exact_so_is_the_ranking():
    """The last layer's z of the attention-only induction model, with a metric linear in the
    logits: attribution patching is exact there, so the confirmed values equal the estimates,
    the rank correlation is 1 and the top cells are the same."""
    model = induction_model.build_induction_model()
    clean = induction_model.repeated_tokens(4, 5)
    corrupted = induction_model.reverse_first_half(clean)
    sweep = IterNode("z", layers=[model.cfg.n_layers - 1], seq_pos="each")
    estimates = attr_patch(model, corrupted, sweep, linear_metric, new_input=clean)
    unpatched = unpatched_metric(model, corrupted, linear_metric)
    changed = sum(abs(value - unpatched) > 1e-2 for _, _, value in every_cell(estimates, False))
    assert changed >= 6, "enough cells change the metric"
    checked = confirm(model, estimates, corrupted, sweep, linear_metric, new_input=clean, top_k=changed)
    for cell in checked.cells:
        assert cell.exact == pytest.approx(cell.estimate, abs=1e-4, rel=1e-5)
    assert checked.spearman == pytest.approx(1.0, abs=1e-12)
    assert checked.top_k_overlap == checked.overlap_size


def test_bad_arguments_are_explained(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    sweep = IterNode("z", layers=[0, 1])
    estimates = attr_patch(model, orig, sweep, metric, new_input=new)
    for top_k in (0, True, 2.0):
        with raises(f"top_k must be a whole number of at least 1 .*got {top_k!r}"):
            confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=top_k)
    with raises("patching_nodes must be the IterNode .* For one Node or a list of Nodes, call act_patch"):
        confirm(model, estimates, orig, Node("z", 0, head=1), metric, new_input=new)
    with raises(r"estimates\['z'\] has dims \(layer=2, head=4\), but .* \(layer=3, head=4\)"):
        confirm(model, estimates, orig, IterNode("z", layers=[0, 1, 2]), metric, new_input=new)
    with raises(r"estimates\['z'\] has dims .* coordinates \{layer: \[1, 2\]"):
        confirm(model, estimates, orig, IterNode("z", layers=[1, 2]), metric, new_input=new)
    with raises(r"estimates has the components \['z'\], but patching_nodes sweeps \['post', 'z'\]"):
        confirm(model, estimates, orig, IterNode(["z", "post"], layers=[0, 1]), metric, new_input=new)
    with raises("estimates must be the dict of PatchResults"):
        confirm(model, estimates["z"], orig, sweep, metric, new_input=new)
    with raises(r"a per-prompt metric, the inputs give \(layer=2, head=4, batch=3\)"):
        confirm(model, estimates, orig, sweep, logit_diff_metric(per_prompt=True), new_input=new)
    with raises("one number, or one number per prompt"):
        confirm(model, estimates, orig, sweep, lambda logits: logits[:, -1, :2], new_input=new)
    with raises("estimate must be one of 'value', 'delta'; got 'change'"):
        confirm(model, estimates, orig, sweep, metric, new_input=new, estimate="change")
    with raises("Nothing to patch in"):
        confirm(model, estimates, orig, sweep, metric)


def test_the_plugin_method(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    sweep = IterNode("z", layers=[3])
    estimates = attr_patch(model, orig, sweep, metric, new_input=new)
    through_model = model.confirm(estimates, orig, sweep, metric, new_input=new, top_k=3)
    assert [c.exact for c in through_model.cells] == [
        c.exact for c in confirm(model, estimates, orig, sweep, metric, new_input=new, top_k=3).cells
    ]


@pytest.mark.parametrize("swept", ["senders", "receivers"])
def test_confirm_paths_patches_the_strongest_paths_exactly(gpt2_model, swept):
    """confirm_paths against plain path_patch of each chosen cell and a sort written here."""
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    metric = logit_diff_metric()
    last = model.cfg.n_layers - 1
    if swept == "senders":
        senders, receivers = IterNode("z", layers=[3, 5, 8]), Node("resid_post", last)
    else:
        senders, receivers = [Node("z", 1, head=0), Node("mlp_out", 2)], IterNode("q", layers=[4, 9])
    estimates = attr_path_patch(model, orig, new, senders, receivers, metric)
    checked = confirm_paths(model, estimates, orig, new, senders, receivers, metric, top_k=4)
    (name,) = estimates
    with torch.no_grad():
        unpatched = float(metric(model(orig)))
    ranked = sorted(every_cell(estimates, per_prompt=False), key=lambda cell: -abs(cell[2] - unpatched))[:4]
    assert [(cell.component, cell.coords) for cell in checked.cells] == [(c[0], c[1]) for c in ranked]
    for cell in checked.cells:
        unit = {"head": cell.coords["head"]}
        node = Node(name, cell.coords["layer"], **unit)
        one = (node, receivers) if swept == "senders" else (senders, node)
        exact = path_patch(model, orig, new, *one, metric, direct_includes_mlps=False)
        assert cell.exact == pytest.approx(float(exact), rel=1e-5, abs=1e-5)
    assert checked.screened == sum(result.numel() for result in estimates.values())


def test_confirm_paths_needs_one_sweep(gpt2_model):
    model = gpt2_model
    orig, new = make_inputs(model, batch=BATCH)
    with raises("exactly one of sender_nodes and receiver_nodes must be an IterNode"):
        confirm_paths(model, {}, orig, new, Node("z", 1, head=0), Node("resid_post", 2), logit_diff_metric())
