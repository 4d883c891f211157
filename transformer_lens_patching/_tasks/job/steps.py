"""The steps of the circuit-analysis job, each one `JobStep` with its prose beside it: those of
every task (`TASK_STEPS`), and the factories of the steps a task words its own way (the IOI job's
in `_tasks.ioi.analysis`)."""

from __future__ import annotations

import torch

import transformer_lens_patching as tlp

from ... import _tl
from ...results import PatchResult
from . import circuit_step
from .records import TopHead
from .step import Context, JobStep, Outcome, Receivers, Skipped

HEAD_COMPONENTS = ["z", "q", "k", "v", "pattern"]
"""What the every-head step patches."""
POSITION_COMPONENTS = ["resid_pre", "attn_out", "mlp_out"]
"""What the by-position step patches."""
NEURONS = "post"
"""What the neuron step screens: each MLP neuron's activation after the nonlinearity (for a
gated MLP, the gate's activation times the linear branch), the coefficient of the neuron's
output weights, so that it carries everything the neuron writes. `pre` would miss a gated
MLP's linear branch, and its first-order estimate would have to cross the nonlinearity."""
NEURON_SCREEN_PASSES = 4
"""The neuron screen's work in forward passes of the prompts, for the time estimate: the
clean run patched from, and the corrupted run's forward and backward pass (a backward
costs about two forwards)."""


def _clean_into_corrupted(ctx: Context, nodes, uncertainty: bool = True) -> tlp.PatchPlan:
    """Activation patching of `nodes` from the clean run into the corrupted run (denoising),
    keeping each cell's per-prompt values (`uncertainty`: error bars and significance at no
    extra forward pass of the layers)."""
    return tlp.plan_act_patch(
        ctx.model,
        orig_input=ctx.prompts.corrupted,
        patching_nodes=nodes,
        patching_metric=ctx.restored,
        new_input=ctx.prompts.clean,
        uncertainty=uncertainty,
        batch_size=ctx.settings.batch_size,
    )


def _corrupted_into_clean(ctx: Context, senders, receivers) -> tlp.PatchPlan:
    """Path patching from `senders`, corrupted, to `receivers` in the clean run (noising),
    keeping each cell's per-prompt values."""
    return tlp.plan_path_patch(
        ctx.model,
        orig_input=ctx.prompts.clean,
        new_input=ctx.prompts.corrupted,
        sender_nodes=senders,
        receiver_nodes=receivers,
        patching_metric=ctx.damaged,
        uncertainty=True,
        batch_size=ctx.settings.batch_size,
    )


ACT_HEADS = JobStep(
    key="act_heads",
    title="Activation patching: every head",
    header=lambda ctx, receivers: (
        f"activation patching of {', '.join(HEAD_COMPONENTS)} for {ctx.shape.n_layers * ctx.shape.n_heads} heads"
    ),
    plan=lambda ctx, receivers: {"act_heads": _clean_into_corrupted(ctx, tlp.IterNode(HEAD_COMPONENTS))},
    describe=lambda ctx, receivers, outcome: (
        "Each head's output (z), query, key, value and attention pattern, at all positions, patched from "
        "the clean run into the corrupted run. Values: fraction of the clean logit difference restored."
    ),
    roles={"restoring heads (z: raise the logit diff)": +1, "opposing heads (z: lower it)": -1},
)


def _position_components(ctx: Context) -> list[str]:
    """`POSITION_COMPONENTS` that the model has (no `mlp_out` without MLPs)."""
    return [name for name in POSITION_COMPONENTS if ctx.shape.has_mlps or name != "mlp_out"]


def _by_position(ctx: Context, plans: dict[str, tlp.PatchPlan], bars: bool | str) -> Outcome:
    """Each position's plan run (its bars labelled with the position); one (seq_pos, layer) result
    per component, keeping its per-prompt values: every position's plan patches into the same
    corrupted run, normalised by the same calibration, so their per-prompt values stack."""
    labels = list(ctx.prompts.positions)
    per_label = {
        label: plan.compute(progress=bars and f"{bars} at {label}") for label, plan in zip(labels, plans.values())
    }
    results = {}
    for component, first in per_label[labels[0]].items():
        coords = {"seq_pos": tuple(labels), "layer": first.coords["layer"]}
        samples = first.samples
        values = torch.stack([per_label[label][component].samples.values for label in labels]).to(first.dtype)
        per_prompt = PatchResult(values, ("seq_pos", "layer", "batch"), {**coords, "batch": tuple(range(samples.n))})
        results[component] = PatchResult.from_per_prompt(
            per_prompt, offset=samples.offset, scale=samples.scale, baseline=samples.baseline
        )
    return Outcome(results)


def by_position(key: str, word: str, description: str) -> JobStep:
    """Activation patching of the residual stream, attention and MLP outputs of every layer at each
    of the prompts' labelled positions (`JobPrompts.positions`), each called a `word` in the title;
    `description` says what they are ("one word of every prompt (S1, ...)")."""

    def header(ctx: Context, receivers: Receivers) -> str:
        labels = list(ctx.prompts.positions)
        return (
            f"activation patching of {', '.join(_position_components(ctx))} at {len(labels)} "
            f"{word}s ({', '.join(labels)}) x {ctx.shape.n_layers} layers"
        )

    return JobStep(
        key=key,
        title=f"Activation patching: residual stream, attention and MLP outputs by {word}",
        header=header,
        plan=lambda ctx, receivers: {
            f"{key} at {label}": _clean_into_corrupted(ctx, tlp.IterNode(_position_components(ctx), seq_pos=positions))
            for label, positions in ctx.prompts.positions.items()
        },
        compute=_by_position,
        describe=lambda ctx, receivers, outcome: (
            "The residual stream entering each layer, and each layer's attention and MLP output, patched at "
            f"{description}, clean into corrupted. Values: fraction of the clean logit difference restored."
        ),
    )


def path_to_logits(roles: dict[str, int]) -> JobStep:
    """Path patching of every head to the logits; `roles` names the heads it picks (role -> sign)."""
    return JobStep(
        key="path_logits",
        title="Path patching: every head -> logits",
        header=lambda ctx, receivers: f"path patching of {ctx.shape.n_layers * ctx.shape.n_heads} heads -> logits",
        plan=lambda ctx, receivers: {
            "path_logits": _corrupted_into_clean(ctx, tlp.IterNode("z"), tlp.Node("resid_post", ctx.shape.n_layers - 1))
        },
        describe=lambda ctx, receivers, outcome: (
            f"Each head's output, corrupted, reaching the final residual stream (resid_post {ctx.shape.n_layers - 1}) "
            "only directly (other heads frozen, MLPs recomputed), in the clean run. Values: change of the logit "
            "difference as a fraction of clean - corrupted (0: no effect, -100%: as corrupted)."
        ),
        roles=roles,
        refusable=True,
    )


def _heads_list(heads: list[TopHead]) -> str:
    """'23.3, 29.1'."""
    return ", ".join(f"{h.layer}.{h.head}" for h in heads)


def _reachable(receivers: Receivers) -> list[TopHead]:
    """The receivers with earlier heads to receive from: those after layer 0."""
    return [head for head in receivers or [] if head.layer > 0]


def _grouped(ctx: Context, component: str) -> bool:
    """Whether the receivers' `component` is a key/value head shared by several heads."""
    return component in ("k", "v") and ctx.shape.n_kv_heads != ctx.shape.n_heads


def _receiver_nodes(ctx: Context, receivers: list[TopHead], component: str) -> list[tlp.Node]:
    """`component` of each receiver head: of the key/value head it shares on a grouped-query model."""
    group = ctx.shape.n_heads // ctx.shape.n_kv_heads if _grouped(ctx, component) else 1
    return sorted({tlp.Node(component, h.layer, head=h.head // group) for h in receivers}, key=repr)


def into_heads(key: str, component: str, what: str, role: str) -> JobStep:
    """Path patching from every earlier head into `component` of the heads the step before picked."""

    def header(ctx: Context, receivers: Receivers) -> str:
        reachable = _reachable(receivers)
        return f"path patching of every earlier head -> {what}" + (f" ({_heads_list(reachable)})" if reachable else "")

    def plan(ctx: Context, receivers: Receivers) -> dict[str, tlp.PatchPlan]:
        if receivers is None:
            raise Skipped("the previous step was skipped.")
        if not receivers:
            raise Skipped(
                f"the previous step found no head with a significant effect of at least {ctx.settings.min_effect:.0%}."
            )
        if not _reachable(receivers):
            raise Skipped(
                f"no head found by the previous step ({_heads_list(receivers)}) has earlier heads to receive from."
            )
        reachable = _reachable(receivers)
        senders = tlp.IterNode("z", layers=range(max(head.layer for head in reachable)))
        return {key: _corrupted_into_clean(ctx, senders, _receiver_nodes(ctx, reachable, component))}

    def describe(ctx: Context, receivers: Receivers, outcome: Outcome) -> str:
        note = (
            " (on this grouped-query model, the key/value head each receiver shares)"
            if _grouped(ctx, component)
            else ""
        )
        return (
            f"Each earlier head's output, corrupted, reaching the {component} of heads "
            f"{_heads_list(_reachable(receivers))}{note} only directly, in the clean run. Values: change of the logit "
            "difference as a fraction of clean - corrupted."
        )

    return JobStep(
        key=key,
        title=f"Path patching: every earlier head -> {what}",
        header=header,
        plan=plan,
        describe=describe,
        roles={role: -1},
        refusable=True,
        bound=" (at most: receivers in the last layer)",
    )


def _has_neurons(shape: _tl.ModelShape) -> bool:
    """Whether the model has MLP neurons: MLPs that are not a mixture of experts."""
    return shape.has_mlps and not shape.n_experts


def _neurons_header(ctx: Context, receivers: Receivers) -> str:
    if not _has_neurons(ctx.shape):
        return "attribution patching of MLP neurons"
    return (
        f"attribution patching of {ctx.shape.n_layers * ctx.shape.d_mlp} MLP neurons, then activation "
        f"patching of the {ctx.settings.top_neurons} strongest"
    )


def _plan_neurons(ctx: Context, receivers: Receivers) -> dict[str, tlp.PatchPlan]:
    """The exact patching of the strongest neurons at its most work: `top_neurons` neurons in the
    first layer (at most all of its neurons), as each of its passes starts at the first layer it
    patches. The attribution screen has no plan (`NEURON_SCREEN_PASSES`)."""
    if not _has_neurons(ctx.shape):
        why = (
            "it is a mixture of experts, whose MLP hooks hold the experts' mix"
            if ctx.shape.n_experts
            else "it is attention-only"
        )
        raise Skipped(f"this model has no MLP neurons to patch ({why}).")
    neurons = list(range(min(ctx.settings.top_neurons, ctx.shape.d_mlp)))
    strongest = tlp.IterNode(NEURONS, layers=[0], neurons=neurons)
    return {"attr_neurons, exact patching of the strongest": _clean_into_corrupted(ctx, strongest, uncertainty=False)}


def _screen_and_confirm(ctx: Context, plans: dict[str, tlp.PatchPlan], bars: bool | str) -> Outcome:
    """Every neuron estimated by attribution patching (AtP), keeping each estimate's per-prompt
    values (error bars, and how stable each confirmed neuron's place in the top is), then the
    strongest patched exactly (`confirm`); `plans` only bound that work."""
    neurons = tlp.IterNode(NEURONS)
    estimates = tlp.attr_patch(
        ctx.model,
        orig_input=ctx.prompts.corrupted,
        patching_nodes=neurons,
        patching_metric=ctx.restored,
        new_input=ctx.prompts.clean,
        uncertainty=True,
    )
    confirmation = tlp.confirm(
        ctx.model,
        estimates,
        orig_input=ctx.prompts.corrupted,
        patching_nodes=neurons,
        patching_metric=ctx.restored,
        new_input=ctx.prompts.clean,
        top_k=ctx.settings.top_neurons,
        progress=bars,
        batch_size=ctx.settings.batch_size,
    )
    return Outcome(estimates, confirmation=confirmation)


ATTR_NEURONS = JobStep(
    key="attr_neurons",
    title="Attribution patching: every MLP neuron, the strongest patched exactly",
    header=_neurons_header,
    plan=_plan_neurons,
    compute=_screen_and_confirm,
    describe=lambda ctx, receivers, outcome: (
        f"Each MLP neuron's activation ({NEURONS}: after the nonlinearity, the coefficient of its output weights), "
        "at all positions, patched from the clean run into the corrupted run: estimated for every neuron by "
        "attribution patching (AtP: one forward and one backward pass), then the "
        f"{len(outcome.confirmation.cells)} with the largest estimated effect patched exactly (activation patching). "
        "Values: fraction of the clean logit difference restored."
    ),
    bound=" (at most: neurons in the first layer)",
    unplanned_passes=lambda ctx: NEURON_SCREEN_PASSES,
)


def _circuit_header(ctx: Context, receivers: Receivers) -> str:
    return (
        f"edge attribution of {len(tlp.EdgeGraph.of(ctx.model)):,} edges, exact scores of the "
        f"{ctx.settings.circuit_candidates} strongest, faithfulness curves of {len(circuit_step.RANKINGS)} rankings"
    )


def _plan_circuit(ctx: Context, receivers: Receivers) -> dict[str, tlp.PatchPlan]:
    """The exact evaluations of the circuit step (`circuit_step.evaluation_plans`)."""
    if ctx.prompts.n < 2:
        raise Skipped("it needs at least 2 prompts: half score the edges, the other half measure faithfulness.")
    return circuit_step.evaluation_plans(
        ctx.model,
        ctx.prompts.clean,
        ctx.prompts.corrupted,
        ctx.logit_diff,
        ctx.settings.circuit_candidates,
        ctx.settings.batch_size,
    )


def _find_circuit(ctx: Context, plans: dict[str, tlp.PatchPlan], bars: bool | str) -> Outcome:
    """Score, confirm, evaluate and pick (`circuit_step.find_circuit`); `plans` only bound that work."""
    settings = ctx.settings
    finding = circuit_step.find_circuit(
        ctx.model,
        ctx.prompts.clean,
        ctx.prompts.corrupted,
        ctx.logit_diff,
        settings.circuit_candidates,
        settings.circuit_faithfulness,
        settings.batch_size,
    )
    return Outcome({}, circuit=finding)


def _edge_screen_passes(ctx: Context) -> float:
    """The edge scores' passes (`circuit_step.EDGE_SCREEN_PASSES` of the scoring prompts), over all the prompts."""
    scoring = len(circuit_step.split(ctx.prompts.n)[0])
    return circuit_step.EDGE_SCREEN_PASSES * scoring / ctx.prompts.n


CIRCUIT = JobStep(
    key="circuit",
    title="Circuit: every edge scored, circuits evaluated exactly",
    header=_circuit_header,
    plan=_plan_circuit,
    compute=_find_circuit,
    describe=lambda ctx, receivers, outcome: circuit_step.describe(outcome.circuit, len(tlp.EdgeGraph.of(ctx.model))),
    refusable=True,
    unplanned_passes=_edge_screen_passes,
)

ACT_POSITIONS = by_position(
    "act_positions",
    "position",
    "each position the task labels in every prompt, and at its end (where the task labels none: at each position "
    "counted back from each prompt's end, as far back as the shortest prompt reaches)",
)
PATH_LOGITS = path_to_logits(
    {"heads writing the answer (lower the logit diff)": -1, "heads writing against it (raise it)": +1}
)
TASK_STEPS = (ACT_HEADS, ACT_POSITIONS, PATH_LOGITS, ATTR_NEURONS, CIRCUIT)
"""The job on any task (`tl-patch analyze`), in the order its steps run."""
