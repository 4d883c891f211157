"""attr_path_patch: edge attribution for chosen senders and receivers, in `path_patch`'s form.

Each cell's estimate sums, over its receivers and the senders that reach them, the
sender's change of contribution to the residual stream dotted with the metric's gradient
at the receiver's own input (see `edges`). Receivers are read where `path_patch` sets
them (`_Read`): a head receiver at its per-head q/k/v input hooks, a residual receiver at
its own hook, a `pre` receiver at its MLP's input through only the chosen neurons. All
writes and reads of a call are stacked (`_Terms`) so that one product gives every cell.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import _tl
from .._core.components import COMPONENTS, hook_name, lookup
from .._core.distributed import shared_by_ranks
from .._core.gradients import GradientPass, GradientRun, NeuronRead
from .._core.memory import check_chunk_args
from .._core.nodes import IterNode, Node, normalize_seq_pos
from .._core.program import resid_mid_carries
from .._core.relevance import check_relevance_rules
from .._core.sites import PatchSite, Sweep, resolve_spec
from .._core.sources import ActivationSource
from .._core.tensor_types import ModelInput, OtherModelInput
from .._core.wiring import EMBEDDINGS, SenderWrites, check_head_inputs
from ..errors import PatchingError
from ..results import PatchResult
from .common import (
    ESTIMATES,
    check_choice,
    check_hooks_exist,
    checked_steps,
    gradient_progress,
    kept_per_prompt,
    patched_in_source,
    prepare_runs,
)
from .edges import EDGE_METHODS, INTEGRATED, between, difference, eap_gradients, interpolated_passes, position_mask
from .path_rules import (
    HEAD_INPUTS,
    WHOLE_HEAD_RECEIVERS,
    check_head_outputs,
    check_parallel_receivers,
    check_specs,
    residual_write,
)


@shared_by_ranks
def attr_path_patch(
    model,
    orig_input: ModelInput,
    new_input: OtherModelInput | None,
    sender_nodes: Node | Sequence[Node] | IterNode,
    receiver_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    *,
    new_cache=None,
    seq_pos=None,
    method: str = "atp",
    steps: int | None = None,
    estimate: str = "value",
    uncertainty: bool = False,
    max_memory: int | None = None,
    progress: bool | str = False,
):
    """Estimate what `path_patch(..., direct_includes_mlps=False)` returns, for every cell at once.

    Each cell's estimate is the orig run's metric plus, for each receiver and each sender
    that reaches it, `(new - orig contribution of the sender) . dM/dx_r` summed over prompts
    (or per prompt) and the `seq_pos` positions, with `x_r` the receiver's own input: a head
    receiver's per-head q/k/v input hooks (those of `path_rules.HEAD_INPUTS`: `pattern` is
    its q and k inputs, `z` all three), a residual receiver's own hook, and for `pre`
    the MLP's input through only the chosen neurons. Senders and receivers are those of
    `path_patch`; pairs where the sender writes after the receiver reads change nothing.
    One forward and one backward pass (`steps` for "ig", more for "ig-activations") serve every cell.

    Args:
        model: A TransformerLens model (head receivers need per-head q/k/v input hooks).
        orig_input: The run to patch into.
        new_input: The run whose sender values are patched in (or None with `new_cache`).
        sender_nodes: Node, list of Nodes or IterNode over path_patch's senders.
        receiver_nodes: Node, list of Nodes or IterNode over path_patch's receivers. Unlike
            path_patch, both sides may be IterNodes (see Returns).
        patching_metric: A function of the logits returning one number or one per prompt, or
            "loss".
        new_cache: An ActivationCache of the new run (or a mean-ablation cache, or "zero").
        seq_pos: Positions for senders and receivers alike (as for path_patch).
        method: "atp", "ig" (EAP-IG: the receivers' gradients averaged over `steps` runs
            with interpolated input embeddings, as in `attr_edges`), "relp" (relevance
            patching's propagation rules, as in `attr_patch`) or "ig-activations" (EAP-IG on
            activations: each sender cell's receiver gradients averaged over `steps` runs whose
            sender hooks, whole, are interpolated, as `attr_edges` interpolates a layer's heads
            together; `1 + (sender hook sets) * (steps - 1)` passes).
        steps: For "ig" and "ig-activations", the points of the sum (default 10).
        estimate: "value" for the estimated patched metric, "delta" for its change.
        uncertainty: Keep each cell's per-prompt estimates, as `attr_patch(uncertainty=True)`.
        max_memory: Bytes of activations one gradient pass may use (default as `act_patch`).
        progress: Show a progress bar over the gradient passes (a string labels it).

    Returns:
        What `path_patch` returns: the metric's type for Nodes or lists on both sides; for
        one IterNode a dict of PatchResults with path_patch's keys, dims and coords (plus
        `batch` for a per-prompt metric), so that estimates and exact results subtract. When
        both sides sweep, a dict keyed by `(sender_name, receiver_name)` whose results have
        the sender sweep's dims prefixed `sender_`, then the receiver's prefixed
        `receiver_` (e.g. `("sender_layer", "sender_head", "receiver_layer", "receiver_head")`).

    Raises:
        PatchingError: For anything path_patch refuses (but both sides sweeping), post-norm
            models (a head's write is not linear in its output there), an unknown
            `method` or `estimate`, a metric that is neither one number nor one per prompt,
            `pattern` or `z` receivers on grouped-query models (their keys and values are
            shared with other heads, so their own inputs have no hook), both sides sweeping
            `seq_pos="each"`, and head receivers on models without per-head input hooks.

    >>> last = Node("resid_post", model.cfg.n_layers - 1)
    >>> est = attr_path_patch(model, corrupted, clean, IterNode("z"), last, metric)
    >>> exact = path_patch(model, corrupted, clean, IterNode("z"), last, metric, direct_includes_mlps=False)
    >>> (est["z"] - exact["z"]).abs().max()  # doctest: +ELLIPSIS
    tensor(...)
    """
    check_choice(method, EDGE_METHODS, "method")
    check_choice(estimate, ESTIMATES, "estimate")
    steps = checked_steps(method, steps, INTEGRATED)
    check_chunk_args(None, max_memory)
    for spec, what in ((sender_nodes, "sender_nodes"), (receiver_nodes, "receiver_nodes")):
        if spec is None:
            raise PatchingError(f"attr_path_patch needs {what}: a Node, a list of Nodes or an IterNode.")
    runs = prepare_runs(model, orig_input, patching_metric, uncertainty=uncertainty)
    if method == "relp":
        check_relevance_rules(model, method, edges=True)
    tokens = runs.tokens
    shape = _tl.model_shape(model)
    check_specs(sender_nodes, (), seq_pos)
    check_specs((), receiver_nodes, seq_pos)
    check_head_outputs(model, "attr_path_patch")
    check_parallel_receivers(shape, receiver_nodes, "attr_path_patch")
    if all(isinstance(spec, IterNode) and spec.seq_pos == "each" for spec in (sender_nodes, receiver_nodes)):
        raise PatchingError(
            "Only one of sender_nodes and receiver_nodes may sweep seq_pos='each': direct paths "
            "never cross positions, so every other cell would be zero."
        )
    positions = normalize_seq_pos(seq_pos)
    senders = resolve_spec(sender_nodes, shape, tokens, "sender_nodes", positions)
    receivers = resolve_spec(receiver_nodes, shape, tokens, "receiver_nodes", positions)
    sender_cells, receiver_cells = _cells(sender_nodes, senders), _cells(receiver_nodes, receivers)
    _check_receivers(model, shape, receiver_cells)
    reads = [_reads(cell) for cell in receiver_cells]
    frozen = _frozen_reads(model, sender_nodes, receiver_nodes, reads)
    sender_hooks = sorted({site.hook_name for cell in sender_cells for site in cell})
    differentiated = sorted({read.hook for cell in reads for read in cell if read.kind != "neuron"})
    neuron_reads = [read for cell in reads for read in cell if read.kind == "neuron"]
    neuron_hooks = {name for read in neuron_reads for name in (read.hook, hook_name("mlp_in", read.layer))}
    all_hooks = set(sender_hooks) | set(differentiated) | neuron_hooks
    check_hooks_exist(model, all_hooks)
    needed = set(sender_hooks) | ({EMBEDDINGS} if method == "ig" and steps > 1 else set())
    source, _ = patched_in_source(runs, new_input, new_cache, needed, "attr_path_patch needs new_input or new_cache.")
    groups = _sender_groups(sender_cells) if method == "ig-activations" else {}
    passes = 1 + len(groups) * (steps - 1) if groups else steps
    with (
        _tl.model_flags(model, _tl.flags_for(all_hooks)),
        torch.no_grad(),
        gradient_progress(progress, passes, "attr_path_patch") as bar,
    ):
        new = source()
        through = [NeuronRead(read.layer, _neuron_mask(read, tokens.shape, shape.d_mlp)) for read in neuron_reads]
        stopped = [(read.hook, _slice_mask(read, tokens.shape, shape)) for read in frozen]
        split = "use_split_qkv_input" in _tl.flags_for(all_hooks)
        gradient_pass = GradientPass(
            runs, max_memory, split_inputs=split, new_input=new_input, progress=bar, relevance=method == "relp"
        )
        writes = SenderWrites(model)
        if groups:
            run = gradient_pass(differentiated, sender_hooks, stopped=stopped, neuron_reads=through)
            changes = _changes(run, run, sender_cells, reads, neuron_reads, new, writes)
            for hooks, indices in groups.items():
                moved = {name: difference(name, run.activations, new) for name in hooks}
                cells = [sender_cells[i] for i in indices]
                for k in range(1, steps):
                    fills = {name: between(run.activations[name], moved[name], k / steps) for name in hooks}
                    point = gradient_pass(
                        differentiated, sender_hooks, fills=fills, stopped=stopped, neuron_reads=through
                    )
                    point = replace(point, activations={**point.activations, **fills})  # it read the fills
                    changes[indices] += _changes(run, point, cells, reads, neuron_reads, new, writes)
            changes /= steps
        elif writes.normalised:  # each pass's writes go through the norms at its own activations
            passes = interpolated_passes(
                gradient_pass,
                sender_hooks,
                differentiated,
                new,
                steps,
                stopped=stopped,
                neuron_reads=through,
                record_each=True,
            )
            run = next(passes)
            changes = _changes(run, run, sender_cells, reads, neuron_reads, new, writes)
            for point in passes:
                changes += _changes(run, point, sender_cells, reads, neuron_reads, new, writes)
            changes /= steps
        else:
            run = eap_gradients(
                gradient_pass, sender_hooks, differentiated, new, steps, stopped=stopped, neuron_reads=through
            )
            changes = _changes(run, run, sender_cells, reads, neuron_reads, new, writes)
    per_prompt = run.dims == ("batch",)
    changes = changes if per_prompt else changes.sum(-1)
    values = changes if estimate == "delta" else run.value.to(changes.device) + changes
    result = _assembled(sender_nodes, senders, receiver_nodes, receivers, values, run.dims)
    return kept_per_prompt(result, runs, run.value.cpu(), change=estimate == "delta")


def _changes(
    orig: GradientRun,
    point: GradientRun,
    sender_cells: list[list[PatchSite]],
    reads: list[list["_Read"]],
    neuron_reads: list["_Read"],
    new: ActivationSource,
    writes: SenderWrites,
) -> Tensor:
    """(sender cell, receiver cell, batch): the estimates of one gradient pass `point` (or of the
    averaged passes): each sender's write of its change (new minus `orig`'s activations, through
    any output norm at `point`'s activations) dotted with the gradient of each receiver that it
    reaches, summed over each cell's terms."""
    neuron_gradients = dict(zip(map(id, neuron_reads), point.through_neurons))
    sender_terms = _Terms.of(
        sender_cells,
        lambda site: [
            residual_write(site, difference(site.hook_name, orig.activations, new), writes, point.activations)
        ],
        lambda site: [2 * site.layer + site.component.write_offset],
    )
    gradients = [[_read_gradient(read, point.gradients, neuron_gradients) for read in cell] for cell in reads]
    points = [[read.point for read in cell] for cell in reads]
    read_terms = _Terms.from_lists(gradients, points, sender_terms.tensors.device)
    reaching = (sender_terms.points[:, None] <= read_terms.points[None, :]).to(sender_terms.tensors.dtype)
    pairs = torch.einsum("wbpd,rbpd->wrb", sender_terms.tensors, read_terms.tensors) * reaching[..., None]
    return torch.einsum("ws,wrb,rt->stb", sender_terms.cells, pairs, read_terms.cells)


def _sender_groups(sender_cells: list[list[PatchSite]]) -> dict[tuple[str, ...], list[int]]:
    """EAP-IG on activations' groups: the sender hooks each cell writes from, with the cells that
    share them (whose estimates come from the same interpolated passes)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, cell in enumerate(sender_cells):
        groups.setdefault(tuple(sorted({site.hook_name for site in cell})), []).append(index)
    return groups


def _cells(spec, resolved) -> list[list[PatchSite]]:
    """One list of sites per result cell: each cell of an IterNode's sweeps, or all the sites of a Node or list."""
    if isinstance(spec, IterNode):
        return [cell for sweep in resolved for cell in sweep.sites]
    return [resolved]


@dataclass(frozen=True, eq=False)
class _Read:
    """Where a receiver cell reads the residual stream: one input hook, its units and positions."""

    hook: str
    kind: str
    """"head" (a per-head input hook), "residual" (the stream itself) or "neuron" (`pre`)."""
    layer: int
    point: int
    """The residual stream point read: `2 * layer + read_offset`, as in `path_rules.reaches`."""
    units: frozenset[int] | None
    """The heads or neurons read (None: all)."""
    positions: Tensor | None
    """(batch, k) positions on the model's device, or None for all."""


def _reads(cell: list[PatchSite]) -> list[_Read]:
    """The input hooks a receiver cell reads, each once: receivers sharing an input hook (e.g.
    `q` and `pattern` of one head) patch it once in path_patch too."""
    found: dict[str, dict] = {}
    for site in cell:
        name, layer = site.component.name, site.layer
        point = 2 * layer + site.component.read_offset
        if name in HEAD_INPUTS:
            hooks = [(COMPONENTS[part].hook_name(layer), "head") for part in HEAD_INPUTS[name]]
        else:
            hooks = [(site.hook_name, "neuron" if name == "pre" else "residual")]
        for hook, kind in hooks:
            entry = found.setdefault(
                hook, {"kind": kind, "layer": layer, "point": point, "units": set(), "positions": site.device_positions}
            )
            entry["units"] = None if site.unit is None or entry["units"] is None else entry["units"] | {site.unit}
    return [
        _Read(
            hook,
            e["kind"],
            e["layer"],
            e["point"],
            None if e["units"] is None else frozenset(e["units"]),
            e["positions"],
        )
        for hook, e in found.items()
    ]


def _frozen_reads(model, sender_spec, receiver_spec, reads: list[list[_Read]]) -> list[_Read]:
    """The reads whose slices the gradient must not pass through: path_patch sets every
    receiver of a list at once, so a receiver that reads after another one (e.g. the final
    residual stream after a head's query) stops the change of the earlier one reaching the
    metric through it. Sweeps patch one receiver per cell: nothing is frozen."""
    if isinstance(receiver_spec, IterNode) or len({read.point for read in reads[0]}) < 2:
        return []
    if isinstance(sender_spec, IterNode) and sender_spec.seq_pos == "each":
        raise PatchingError(
            "attr_path_patch cannot sweep senders over seq_pos='each' into receivers that read one after another: "
            "path_patch then sets the receivers at each sender's position only, which one gradient pass cannot "
            "follow. Sweep the receivers instead, or pass one receiver."
        )
    first = min(read.point for read in reads[0])
    later_mid = [read for read in reads[0] if read.hook.endswith("hook_resid_mid") and read.point > first]
    if resid_mid_carries(model) and later_mid:
        raise PatchingError(
            "attr_path_patch cannot take a resid_mid receiver together with receivers before it on this model "
            "(its resid_mid hook feeds only the MLP): pass them in separate calls."
        )
    return reads[0]


def _check_receivers(model, shape, cells: list[list[PatchSite]]) -> None:
    """Raise for receivers whose own input has no hook: whole heads (`pattern`, `z`) of
    grouped-query models, and any head receiver on a model without per-head input hooks."""
    names = {site.component.name for cell in cells for site in cell}
    whole = sorted(names & set(WHOLE_HEAD_RECEIVERS))
    if whole and shape.n_kv_heads != shape.n_heads:
        raise PatchingError(
            f"attr_path_patch cannot take {whole[0]!r} receivers on this grouped-query model: a query head shares "
            f"its key and value inputs with {shape.n_heads // shape.n_kv_heads - 1} other heads, so the input of that "
            "head alone has no hook to take the gradient at. Use 'q' receivers (per head) and 'k' / 'v' receivers "
            "(per key/value head), or path_patch."
        )
    if names & set(HEAD_INPUTS):
        check_head_inputs(model, "Head receivers are read at their own q/k/v inputs, which need")


def _read_gradient(read: _Read, gradients: dict[str, Tensor], neurons: dict[int, Tensor]) -> Tensor:
    """(batch, pos, d_model): the metric's gradient with respect to what the read takes in."""
    if read.kind == "neuron":
        return neurons[id(read)]
    gradient = gradients[read.hook]
    if read.kind == "head":
        gradient = gradient.sum(2) if read.units is None else gradient[:, :, sorted(read.units)].sum(2)
    mask = position_mask(read.positions, *gradient.shape[:2], gradient.device, gradient.dtype)
    return gradient * mask.unsqueeze(-1)


def _neuron_mask(read: _Read, tokens_shape, d_mlp: int) -> Tensor:
    """(batch, pos, d_mlp): 1 at the read's neurons and positions."""
    batch, seq_len = tokens_shape
    device = None if read.positions is None else read.positions.device
    neurons = torch.zeros(d_mlp, device=device)
    neurons[slice(None) if read.units is None else sorted(read.units)] = 1
    return position_mask(read.positions, batch, seq_len, device, neurons.dtype).unsqueeze(-1) * neurons


@dataclass(frozen=True)
class _Terms:
    """Per-site tensors of one side, stacked: `tensors` (term, batch, pos, d_model), the
    residual `points` they write or read, and `cells` (term, cell): which cell each belongs to.
    Products of two sides' terms are summed in float32."""

    tensors: Tensor
    points: Tensor
    cells: Tensor

    @classmethod
    def of(cls, cells: list[list[PatchSite]], tensors_of, points_of) -> "_Terms":
        return cls.from_lists(
            [[t for site in cell for t in tensors_of(site)] for cell in cells],
            [[p for site in cell for p in points_of(site)] for cell in cells],
        )

    @classmethod
    def from_lists(cls, tensors: list[list[Tensor]], points: list[list[int]], device=None) -> "_Terms":
        """Terms in float32 (or wider) on `device` (default: the first term's), whatever the
        model's dtype and devices."""
        device = tensors[0][0].device if device is None else device
        flat = [t.to(device, _tl.summing_dtype(t.dtype)) for cell in tensors for t in cell]
        membership = torch.zeros(len(flat), len(tensors), dtype=flat[0].dtype, device=flat[0].device)
        row = 0
        for cell, terms in enumerate(tensors):
            membership[row : row + len(terms), cell] = 1
            row += len(terms)
        flat_points = torch.tensor([p for cell in points for p in cell], device=flat[0].device)
        return cls(torch.stack(flat), flat_points, membership)


def _assembled(sender_spec, senders, receiver_spec, receivers, values: Tensor, metric_dims: tuple):
    """What path_patch returns, from the (sender cell, receiver cell[, batch]) estimates."""
    sender_sweeps = isinstance(sender_spec, IterNode)
    receiver_sweeps = isinstance(receiver_spec, IterNode)
    values = values.detach().cpu()
    if not sender_sweeps and not receiver_sweeps:
        return values[0, 0]
    if not receiver_sweeps:
        return _results(senders, values[:, 0], metric_dims)
    if not sender_sweeps:
        return _results(receivers, values[0], metric_dims)
    results, start = {}, 0
    for sender in senders:
        rows, begin = values[start : start + len(sender.sites)], 0
        start += len(sender.sites)
        for receiver in receivers:
            block = rows[:, begin : begin + len(receiver.sites)]
            begin += len(receiver.sites)
            shaped = block.reshape((*sender.shape, *receiver.shape, *block.shape[2:]))
            dims = tuple(f"sender_{d}" for d in sender.dims) + tuple(f"receiver_{d}" for d in receiver.dims)
            coords = {f"sender_{d}": sender.coords[d] for d in sender.dims}
            coords |= {f"receiver_{d}": receiver.coords[d] for d in receiver.dims}
            results[(sender.name, receiver.name)] = PatchResult(shaped, dims + metric_dims, coords)
    return results


def _results(sweeps: list[Sweep], values: Tensor, metric_dims: tuple) -> dict[str, PatchResult]:
    """One PatchResult per sweep, as path_patch assembles them."""
    results, start = {}, 0
    for sweep in sweeps:
        cells = values[start : start + len(sweep.sites)]
        start += len(sweep.sites)
        results[sweep.name] = PatchResult(
            cells.reshape((*sweep.shape, *cells.shape[1:])), sweep.dims + metric_dims, sweep.coords
        )
    return results


def _slice_mask(read: _Read, tokens_shape, shape) -> Tensor:
    """A boolean mask of the read's positions and units, broadcastable to its hook's activation
    ((batch, pos, d_model), (batch, pos, head, d_model) or (batch, pos, d_mlp) for `pre`)."""
    batch, seq_len = tokens_shape
    device = None if read.positions is None else read.positions.device
    mask = position_mask(read.positions, batch, seq_len, device, torch.bool)
    component, _ = lookup(read.hook)
    if read.kind == "residual":
        return mask.unsqueeze(-1)
    units = torch.zeros(shape.unit_count(component.unit), dtype=torch.bool, device=device)
    units[slice(None) if read.units is None else sorted(read.units)] = True
    if read.kind == "neuron":
        return mask.unsqueeze(-1) & units
    return mask[:, :, None, None] & units[:, None]
