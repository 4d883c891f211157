"""Edge attribution: a first-order estimate of path patching for every sender-receiver pair.

The residual stream is a sum, so when a sender's output moves from its orig value `s` to
its new value `s'`, the input of a receiver that reads the stream after it moves by
`s' - s`. Setting only that receiver's input so (path patching with
`direct_includes_mlps=False`) changes the metric by about `(s' - s) . dM/dx_r`, the
gradient taken with respect to the receiver's *own copy* of its input `x_r` (its per-head
q/k/v input hook, its MLP's `hook_mlp_in`, the final residual stream), so that only the
paths through that receiver count. One forward and one backward pass of the orig run give
every receiver's gradient; one run of the new input gives every sender's `s'`; every
edge's score is then a dot product (EAP, Syed et al. 2023).

`attr_path_patch` (in `edge_paths`) gives the same estimate for chosen senders and
receivers, in `path_patch`'s result form.

EAP-IG (Hanna et al. 2024) averages the receivers' gradients over runs whose input
embeddings are interpolated between orig and new. Node-level `attr_patch(method="ig")`
instead interpolates each patched activation on its own; for edges that would take one
set of passes per receiver, while interpolating the input costs `steps` passes in all.
EAP-IG on activations (MIB, 2025) interpolates the senders' own outputs instead, one group of
senders (the embeddings, a layer's heads, an MLP) at a time, so the new values may be any
activations (zero or mean ablation too), at `1 + groups * (steps - 1)` passes.

With `per_position`, the dot products are kept per position (an edge at a position: the
sender's change there, read by the receiver there), for position-aware circuits.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .. import _tl
from .._core.components import hook_name
from .._core.distributed import shared_by_ranks
from .._core.gradients import GradientPass, GradientRun, NeuronRead
from .._core.graph import EdgeGraph, EdgeScores
from .._core.memory import check_chunk_args
from .._core.position_scores import EdgePositionScores
from .._core.relevance import check_relevance_rules
from .._core.sources import ActivationSource
from .._core.tensor_types import ModelInput, OtherModelInput
from .._core.wiring import (
    EMBEDDINGS,
    SenderWrites,
    Wiring,
    check_head_inputs,
    residual_gradients,
)
from ..errors import PatchingError
from .common import check_choice, check_hooks_exist, checked_steps, gradient_progress, patched_in_source, prepare_runs
from .path_rules import check_head_outputs

EDGE_METHODS = ("atp", "ig", "relp", "ig-activations")
"""The estimates edge attribution computes: EAP, EAP-IG (on the input), RelP and EAP-IG on activations."""
INTEGRATED = ("ig", "ig-activations")
"""The edge methods that take `steps`."""


@shared_by_ranks
def attr_edges(
    model,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    method: str = "atp",
    steps: int | None = None,
    uncertainty: bool = False,
    per_position: bool = False,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> EdgeScores | EdgePositionScores:
    """Score every edge of the model's graph (`EdgeGraph.of(model)`) at once.

    An edge `s -> r`'s score is the first-order estimate of what path patching from `s` to
    `r` alone (`path_patch(..., direct_includes_mlps=False)`) changes the metric by: the sum
    over prompts (or per prompt) and positions of `(s_new - s_orig) . dM/dx_r`, with `x_r`
    the receiver's own input. Sender outputs: the embeddings are the residual stream
    entering layer 0, a head's is its z times its rows of W_O, an MLP's is its `mlp_out`.
    The cost is one run of the new input and one forward and backward pass of the orig
    input (`steps` of them for "ig"), whatever the number of edges.

    Args:
        model: A TransformerLens model with per-head q/k/v input hooks (`use_split_qkv_input`;
            TransformerLens 4 bridges made by `boot_transformers`).
        orig_input: The run whose edges would be patched (text or tokens).
        patching_metric: A function of the logits returning one number or one per prompt, or
            "loss".
        new_input: The run the senders' new outputs come from.
        new_cache: Or an ActivationCache of it (or `mean_ablation_cache(...)`, or "zero").
        method: "atp" (the gradient in the orig run: EAP) or "ig" (EAP-IG: the mean gradient
            over `steps` runs whose residual stream entering layer 0 is `x + (k / steps)(x' - x)`,
            k = 0 .. steps - 1, between the orig embeddings `x` and the new ones `x'`; `steps=1`
            is AtP). The inputs are interpolated, not each receiver's activation as node-level
            `attr_patch(method="ig")` does, which would cost a set of passes per receiver. Or
            "relp": the receivers' gradients from one backward pass following relevance
            propagation's rules, as `attr_patch(method="relp")` (refused where a norm follows
            each block's output, as in Gemma-2 and OLMo-2, and on parallel blocks whose attention
            and MLP share one norm, as in Phi, Falcon and Cohere). Or "ig-activations" (EAP-IG on
            activations): an edge's receiver gradient is the mean over `steps` runs of the orig
            input whose sender group (the embeddings, its layer's heads, or its MLP) outputs
            `s + (k / steps)(s' - s)`, k = 0 .. steps - 1, every other activation computed as
            usual. The new values need not come from an input: `new_cache="zero"` or a mean
            cache give zero or mean ablation of edges. It costs `1 + groups * (steps - 1)`
            passes (`groups` = 1 + 2 per layer).
        steps: For "ig" and "ig-activations", the points of the sum (default 10).
        uncertainty: Keep each edge's per-prompt scores (`EdgeScores.samples`): the scores are
            then their means, with `stderr`, `ci`, `significant`, and the stability of the
            circuits and rankings they give over resampled prompts (`stability`,
            `top_stability`), at no extra pass.
        per_position: Score each edge at each position: `EdgePositionScores`, whose positions
            sum to the scores without it; `Circuit.from_scores` picks position-aware circuits
            from them. Positions are token indices, the same for every prompt: align the prompts
            (one template) for a position to mean one token.
        max_memory: Bytes of activations one gradient pass may use (default as `act_patch`):
            the prompts run in chunks that fit, each reduced to its edge scores at once.
        progress: Show a progress bar over the gradient passes (a string labels it).

    Returns:
        EdgeScores: one score per edge (per edge and prompt for a per-prompt metric), with the
        orig run's metric as `unpatched`; `EdgePositionScores` with `per_position`.

    Raises:
        PatchingError: For an unknown `method`, a metric that is neither one number nor one
            per prompt, a model without per-head input hooks, and anything `attr_patch` refuses.

    >>> scores = attr_edges(model, corrupted, metric, new_input=clean)
    >>> [str(edge) for edge in scores.top(3)]  # doctest: +ELLIPSIS
    ['... -> ...', '... -> ...', '... -> ...']
    """
    check_choice(method, EDGE_METHODS, "method")
    steps = checked_steps(method, steps, INTEGRATED)
    check_chunk_args(None, max_memory)
    if not isinstance(per_position, bool):
        raise PatchingError(f"per_position must be True or False, got {per_position!r}.")
    runs = prepare_runs(model, orig_input, patching_metric, uncertainty=uncertainty)
    if method == "relp":
        check_relevance_rules(model, method, edges=True)
    graph = EdgeGraph.of(model)
    check_head_inputs(model, "attr_edges reads every head's q/k/v input, which needs")
    check_head_outputs(model, "attr_edges")
    wiring = Wiring.of(model, graph, "attr_edges")
    if method == "relp" and wiring.normed_inputs:
        raise PatchingError(
            "method='relp' (RelP) for edges is not available on a parallel block whose attention and MLP share one "
            "norm (Phi, Falcon, Cohere): each MLP's gradient is pulled back through that norm outside the pass, "
            "where RelP's rule (its scale held constant) is not applied. Use method='atp' or 'ig' for edges, or "
            "attr_patch(method='relp') for nodes."
        )
    senders, receivers = wiring.sender_hooks, wiring.receiver_hooks
    check_hooks_exist(model, senders + receivers)
    source, _ = patched_in_source(runs, new_input, new_cache, senders)
    along_activations = method == "ig-activations"
    passes = 1 + len(sender_groups(graph)) * (steps - 1) if along_activations else steps
    with (
        _tl.model_flags(model, _tl.flags_for(receivers)),
        torch.no_grad(),
        gradient_progress(progress, passes, "attr_edges") as bar,
    ):
        new = source()
        gradient_pass = GradientPass(
            runs, max_memory, split_inputs=True, new_input=new_input, progress=bar, relevance=method == "relp"
        )
        run, per_pair = _scored_pairs(
            gradient_pass, wiring, new, steps, along_activations=along_activations, per_position=per_position
        )
    pairs = per_pair[..., graph.edge_senders.to(per_pair.device), graph.edge_receivers.to(per_pair.device)]
    scores = pairs.movedim(-1, 0).movedim(1, -1)  # (edge, [position,] prompt)
    result = EdgePositionScores if per_position else EdgeScores
    if runs.prompt_form is not None:
        form, value = runs.prompt_form, run.value.cpu()
        samples = form.samples(scores.cpu(), torch.zeros_like(value), change=True)
        unpatched = float(form.samples(value.unsqueeze(0)).estimate()[0])
        return result(graph, samples.estimate().float(), method, unpatched, samples)
    if run.dims != ("batch",):
        scores = scores.sum(-1)
    return result(graph, scores.cpu(), method, run.value.cpu() if run.value.ndim else float(run.value))


def sender_groups(graph: EdgeGraph) -> dict[str, list[int]]:
    """The hooks EAP-IG on activations interpolates, one per module that writes senders (the
    embeddings, each layer's attention, each MLP), each with its senders' indices in `graph.senders`."""
    groups: dict[str, list[int]] = {}
    for index, node in enumerate(graph.senders):
        part = "z" if node.kind == "head" else "mlp_out"
        groups.setdefault(EMBEDDINGS if node.kind == "embed" else hook_name(part, node.layer), []).append(index)
    return groups


def _scored_pairs(
    gradient_pass: GradientPass,
    wiring: Wiring,
    new: ActivationSource,
    steps: int,
    *,
    along_activations: bool = False,
    per_position: bool = False,
) -> tuple[GradientRun, Tensor]:
    """The orig run's gradient pass and (batch, [pos,] sender, receiver) scores of every node pair,
    reduced chunk by chunk of prompts so that no receiver gradient outlives its chunk; for
    EAP-IG averaged over the interpolated passes: of the input embeddings, or with
    `along_activations` of each sender group's output (its pairs scored by its own passes). The
    senders' output changes are those of the orig and new runs, kept per chunk; where attention
    outputs are normalised, each pass takes the heads' changes through the norm's Jacobian at its
    own outputs (its z recorded); where MLPs read their input through a norm shared with
    attention, the gradient at that norm's output is pulled back to the MLP's own copy of the
    residual stream, at each pass's own residual stream. Scores are products summed in float32
    whatever the model's dtype, on the input device."""
    model, graph = gradient_pass.model, wiring.graph
    senders, receivers = wiring.sender_hooks, wiring.receiver_hooks
    writes = SenderWrites(model)
    normalised = writes.attention_normalised
    residuals = [wiring.residual_of(name) for name in wiring.normed_inputs]
    each_pass = [name for name in senders if name.endswith("hook_z")] if normalised else []
    each_pass = list(dict.fromkeys([*each_pass, *residuals]))
    groups = sender_groups(graph) if along_activations else {EMBEDDINGS: None}
    changes: dict[int, _SenderChanges] = {}
    linear_outputs: dict[int, Tensor] = {}

    def scored(
        rows: slice, part: GradientRun, fills: dict[str, Tensor] | None = None, group: list[int] | None = None
    ) -> Tensor:
        if rows.start not in changes:
            changes[rows.start] = _SenderChanges(graph, part.activations, new.rows(rows))
        if fills:  # the recorded activations are those before the fill: the pass read the fill
            part = dataclasses.replace(part, activations={**part.activations, **_rows_of(fills, rows)})
        if normalised or rows.start not in linear_outputs:
            outputs = changes[rows.start].outputs(writes, part.activations)
            if not normalised:
                linear_outputs[rows.start] = outputs
        else:
            outputs = linear_outputs[rows.start]
        if group is not None:
            outputs = outputs[:, :, group]
        parts = [_with_unit_axis(_own_gradient(model, wiring, name, part)).to(outputs.device) for name in receivers]
        gradients = torch.cat(parts, dim=2)
        if per_position:
            return torch.matmul(outputs.float(), gradients.float().transpose(2, 3))
        return torch.bmm(_flattened(outputs).float(), _flattened(gradients).float().transpose(1, 2))

    def scored_with_starts(rows: slice, part: GradientRun) -> tuple[Tensor, dict[str, Tensor]]:
        return scored(rows, part), {name: part.activations[name] for name in groups} if steps > 1 else {}

    run = gradient_pass(receivers, [*senders, *residuals, EMBEDDINGS], reduce=scored_with_starts)
    per_pair = torch.cat([scores for scores, _ in run.reduced])
    if steps == 1:
        return run, per_pair
    for name, group in groups.items():
        start = torch.cat([starts[name] for _, starts in run.reduced])
        moved = difference(name, {name: start}, new)
        for k in range(1, steps):
            fills = {name: between(start, moved, k / steps)}
            point = gradient_pass(
                receivers, each_pass, fills=fills, reduce=functools.partial(scored, fills=fills, group=group)
            )
            if group is None:
                per_pair += torch.cat(point.reduced)
            else:
                per_pair[..., group, :] += torch.cat(point.reduced)
    return run, per_pair / steps


def _rows_of(tensors: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    return {name: tensor[rows] for name, tensor in tensors.items()}


def _own_gradient(model, wiring: Wiring, name: str, part: GradientRun) -> Tensor:
    """The metric's gradient at the receiver input hook `name`'s own copy of the residual stream:
    for a `normed_inputs` hook, pulled back through its layer's norm at the pass's residual."""
    if name not in wiring.normed_inputs:
        return part.gradients[name]
    residual = part.activations[wiring.residual_of(name)]
    return residual_gradients(model, wiring, name, residual, part.gradients[name])


def _flattened(stacked: Tensor) -> Tensor:
    """(batch, pos, node, d_model) as (batch, node, pos * d_model): one matrix product then
    sums every node pair's dot products over positions."""
    batch, seq_len, nodes, d_model = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(batch, nodes, seq_len * d_model)


def _with_unit_axis(gradient: Tensor) -> Tensor:
    """A gradient as (batch, pos, units, d_model): per-head input hooks have a head axis already."""
    return gradient if gradient.ndim == 4 else gradient.unsqueeze(2)


class _SenderChanges:
    """One chunk of prompts' sender output changes (new - orig), kept from the orig run's pass."""

    def __init__(self, graph: EdgeGraph, orig: dict, new: ActivationSource):
        self.graph = graph
        self.embeddings = difference(EMBEDDINGS, orig, new)
        self.z = [difference(hook_name("z", layer), orig, new) for layer in range(graph.n_layers)]
        mlps = range(graph.n_layers) if graph.has_mlps else ()
        self.mlps = [difference(hook_name("mlp_out", layer), orig, new) for layer in mlps]

    def outputs(self, writes: SenderWrites, live: dict) -> Tensor:
        """(batch, pos, sender, d_model): each sender's change as the residual stream sees it, in
        `graph.senders`' order; a head's through its layer's norm at the pass's `live` z, if any."""
        parts = [self.embeddings.unsqueeze(2)]
        for layer in range(self.graph.n_layers):
            name = hook_name("z", layer)
            parts.append(writes.heads(layer, live.get(name), self.z[layer]))
            if self.graph.has_mlps:
                parts.append(self.mlps[layer].unsqueeze(2))
        return torch.cat([part.to(parts[0].device) for part in parts], dim=2)


def difference(name: str, orig: dict, new: ActivationSource) -> Tensor:
    """The new run's activation at hook `name` minus the orig run's."""
    before = orig[name]
    return new.tensor_like(name, before).to(before) - before


def between(start: Tensor, moved: Tensor, fraction: float) -> Tensor:
    """The point `fraction` of the way from `start` by `moved`, in float32 at least."""
    return start.to(_tl.summing_dtype(start.dtype)) + fraction * moved


def eap_gradients(
    gradient_pass: GradientPass,
    recorded: Sequence[str],
    differentiated: Sequence[str],
    new: ActivationSource,
    steps: int,
    *,
    stopped: Sequence[tuple[str, Tensor]] = (),
    neuron_reads: Sequence[NeuronRead] = (),
) -> GradientRun:
    """The orig run's gradients; for EAP-IG (`steps` > 1) averaged with those of `steps - 1`
    more passes whose embeddings are interpolated toward the new run's (points and sums in
    float32 whatever the model's dtype)."""
    passes = interpolated_passes(
        gradient_pass, recorded, differentiated, new, steps, stopped=stopped, neuron_reads=neuron_reads
    )
    first = next(passes)
    if steps == 1:
        return first
    gradients = {name: g.to(_tl.summing_dtype(g.dtype), copy=True) for name, g in first.gradients.items()}
    neurons = [g.to(_tl.summing_dtype(g.dtype), copy=True) for g in first.through_neurons]
    for point in passes:
        for name in gradients:
            gradients[name] += point.gradients[name]
        for total, gradient in zip(neurons, point.through_neurons):
            total += gradient
    return GradientRun(
        first.value,
        first.dims,
        first.activations,
        {name: g / steps for name, g in gradients.items()},
        [g / steps for g in neurons],
    )


def interpolated_passes(
    gradient_pass: GradientPass,
    recorded: Sequence[str],
    differentiated: Sequence[str],
    new: ActivationSource,
    steps: int,
    *,
    stopped: Sequence[tuple[str, Tensor]] = (),
    neuron_reads: Sequence[NeuronRead] = (),
    record_each: bool = False,
) -> Iterator[GradientRun]:
    """The gradient passes of EAP-IG, one by one: the orig run's (with the `recorded` hooks and
    the embeddings), then `steps - 1` whose embeddings are `k / steps` of the way to the new
    run's (with the `recorded` hooks too if `record_each`)."""
    first = gradient_pass(differentiated, [*recorded, EMBEDDINGS], stopped=stopped, neuron_reads=neuron_reads)
    yield first
    start = first.activations.get(EMBEDDINGS)
    moved = None if steps == 1 else difference(EMBEDDINGS, first.activations, new)
    for k in range(1, steps):
        fills = {EMBEDDINGS: between(start, moved, k / steps)}
        yield gradient_pass(
            differentiated,
            recorded if record_each else (),
            fills=fills,
            stopped=stopped,
            neuron_reads=neuron_reads,
        )


def position_mask(positions: Tensor | None, batch: int, seq_len: int, device, dtype) -> Tensor:
    """(batch, pos): 1 at the given positions of each prompt (every position for None)."""
    if positions is None:
        return torch.ones(batch, seq_len, device=device, dtype=dtype)
    mask = torch.zeros(batch, seq_len, device=device, dtype=dtype)
    mask[torch.arange(batch, device=device).unsqueeze(1), positions.to(device)] = 1
    return mask
