"""attr_patch: attribution patching, a gradient-based estimate of what `act_patch` returns.

AtP (Nanda, 2023): when patching moves an activation from its orig value `a` to the new
value `a'`, the metric changes by about `(a' - a) . dM/da`, the gradient taken in the orig
run. One run of the new input (or the given cache), and one forward and one backward pass
of the orig input, give that estimate for every cell of a sweep at once: its cost does not
depend on the number of cells. Integrated gradients (as in EAP-IG, Hanna et al. 2024)
average the gradient over points between `a` and `a'` instead. RelP (Jafari et al. 2025)
takes the one backward pass through the model with its nonlinearities linearised by
relevance propagation's rules (`_core/relevance.py`).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _tl
from .._core.components import hook_name, lookup
from .._core.distributed import shared_by_ranks
from .._core.gradients import GradientPass
from .._core.memory import check_chunk_args
from .._core.nodes import IterNode, Node
from .._core.plan import assembled_sweeps
from .._core.relevance import check_relevance_rules
from .._core.sites import PatchSite
from .._core.tensor_types import ModelInput, OtherModelInput
from ..errors import PatchingError
from .attribution_qk import is_qk, qk_changes
from .common import (
    ESTIMATES,
    check_choice,
    checked_steps,
    gradient_progress,
    kept_per_prompt,
    patch_cells,
    patched_in_source,
    prepare_runs,
)

ATTR_METHODS = ("atp", "atp*", "ig", "relp")
"""The estimates `attr_patch` computes."""


@shared_by_ranks
def attr_patch(
    model,
    orig_input: ModelInput,
    patching_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    method: str = "atp",
    steps: int | None = None,
    estimate: str = "value",
    grad_drop: bool = False,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
):
    """Estimate what `act_patch` returns with the same arguments, for every cell at once.

    Each cell's estimate is the orig run's metric plus `(new - orig) . gradient` summed over
    the cell's slice (its head, neuron and positions; every node of a list together), the
    gradient of the metric with respect to the activation in the orig run. It is exact where
    the metric is linear in the patched activation (e.g. the last layer's `z`, `v`,
    `attn_out` or `resid_post` of an attention-only model without LayerNorm, with a metric
    linear in the logits), and an approximation elsewhere: confirm the cells that matter
    with `act_patch`.

    Args:
        model: A TransformerLens 4 `TransformerBridge` or TransformerLens 2 `HookedTransformer`.
        orig_input: The run whose activations would be patched (text or tokens).
        patching_nodes: A `Node`, a list of Nodes (patched together) or an `IterNode` (swept).
        patching_metric: The metric of `act_patch`, returning one number or one number per
            prompt (a `(batch,)` tensor); "loss" for the LM loss.
        new_input: The run patched from (resample ablation).
        new_cache: An ActivationCache to patch from (e.g. `mean_ablation_cache(...)`), or
            "zero" (zero ablation).
        method: "atp" (attribution patching: the gradient in the orig run), "atp*" (AtP's
            QK fix: for sites on `q`, `k`, `q_input`, `k_input` and `attn_scores`, the
            attention pattern the patch gives is computed exactly, by a pass that starts at
            the site's layer and stops at its pattern, and only what follows the softmax is
            linearised; every other site is estimated as by "atp"), or "ig" (integrated
            gradients: the mean gradient at `steps` points `a + (k / steps)(a' - a)`,
            k = 0 .. steps - 1, between each activation's orig value `a` and new value `a'`).
            The interpolated quantity is the patched activation itself: each hook the cells
            patch is interpolated on its own, as a whole (every head, neuron and position,
            the rest of the model computed from it), so that the attributions of all of one
            hook's cells sum to the change of patching that whole hook, up to the sum's
            error, which shrinks as `steps` grows. `steps=1` is AtP. It costs `steps - 1`
            more forward and backward passes per hook. Or "relp" (relevance patching, Jafari
            et al. 2025): AtP with the backward pass following layer-wise relevance
            propagation's rules, at AtP's cost: every norm's scale and every attention pattern
            held constant (relevance reaches the residual stream through the values only; the
            queries, keys, scores and pattern keep the softmax's gradient), an MLP activation
            passing relevance through unchanged and a gated MLP's product halving it between
            its factors (see "Relevance patching" in the concepts page). Refused on
            mixture-of-experts models and SoLU's normalised activation.
        steps: For "ig", the points of the sum (default `IG_STEPS`); not used otherwise.
        estimate: "value" for the estimated patched metric (what `act_patch` returns) or
            "delta" for its change from the orig run's metric.
        grad_drop: AtP*'s GradDrop, for "atp*" with estimate="delta": against cancellation,
            where a cell's effects along different paths offset each other in the gradient.
            For each layer l, the estimate is computed again with no gradient flowing back
            through layer l's output to the residual stream (`attn_out`, `mlp_out`); the
            result is the sum of those estimates' absolute values over the layers, divided by
            `n_layers - 1`: a magnitude to rank cells by, not a signed change. It costs one
            more forward and backward pass per layer.
        uncertainty: Keep each cell's per-prompt estimates, as `act_patch(uncertainty=True)`
            does (one orig prompt's estimate depends on that prompt only), at no extra pass;
            p-values test the estimated change against 0. Not with `grad_drop` (magnitudes).
        batch_size: Variants per stacked pass of AtP*'s pattern passes, as in `act_patch`
            (default: as many as fit in `max_memory`).
        max_memory: Bytes of activations one pass may use (default as `act_patch`). The
            gradient pass runs the prompts in chunks that fit: the metric's gradient with
            respect to every prompt's logits is taken once, and each chunk is run again
            with gradients and given its rows of it, so any metric, even one that mixes
            prompts, gets the gradient of the whole batch.
        progress: Show a progress bar over the gradient passes (a string labels it).

    Returns:
        What `act_patch` returns: the metric's type for a Node or a list of Nodes, and for an
        IterNode a dict of `PatchResult`s with the dims and coords `act_patch` gives (plus
        `batch` for a per-prompt metric), so an estimate and an exact result subtract.

    Raises:
        PatchingError: For anything `act_patch` refuses, an unknown `method` or `estimate`,
            and a metric whose value is neither one number nor one per prompt.

    >>> estimates = attr_patch(model, corrupted, IterNode(["z", "post"]), metric, new_input=clean)
    >>> estimates["post"].dims
    ('layer', 'neuron')
    """
    check_choice(method, ATTR_METHODS, "method")
    check_choice(estimate, ESTIMATES, "estimate")
    steps = checked_steps(method, steps)
    _check_grad_drop(grad_drop, method, estimate)
    check_chunk_args(batch_size, max_memory)
    if grad_drop and uncertainty:
        raise PatchingError("grad_drop gives magnitudes summed over layers, not a mean over prompts: no uncertainty.")
    runs = prepare_runs(model, orig_input, patching_metric, uncertainty=uncertainty)
    if method == "relp":
        check_relevance_rules(model, method)
    tokens = runs.tokens
    patched = patch_cells(model, tokens, patching_nodes)
    names = sorted(patched.names)
    source, _ = patched_in_source(runs, new_input, new_cache, names)
    qk_fix = method == "atp*"
    linear_cells = [[site for site in cell if not is_qk(site)] for cell in patched.cells] if qk_fix else patched.cells
    qk_parts = _qk_parts(patched.cells) if qk_fix else []
    qk_layers = sorted({sites[0].layer for _, sites in qk_parts})
    linear = sorted({site.hook_name for cell in linear_cells for site in cell})
    differentiated = sorted(set(linear) | {hook_name("pattern", layer) for layer in qk_layers})
    recorded = sorted(patched.names | {hook_name("resid_pre", layer) for layer in qk_layers if layer > 0})
    passes = 1 + (steps - 1) * len(linear) + (model.cfg.n_layers if grad_drop else 0)
    with (
        _tl.model_flags(model, _tl.flags_for(names)),
        torch.no_grad(),
        gradient_progress(progress, passes, "attr_patch") as bar,
    ):
        gradient_pass = GradientPass(runs, max_memory, new_input=new_input, progress=bar, relevance=method == "relp")
        new = source()
        run = gradient_pass(differentiated, recorded)
        orig_value, dims, orig, gradients = run.value, run.dims, run.activations, run.gradients
        differences = {
            name: _difference(new.tensor_like(name, orig[name]).to(orig[name]), orig[name]) for name in linear
        }
        if steps > 1:
            gradients = _integrated(gradient_pass, orig, differences, gradients, steps)
        layers = range(model.cfg.n_layers)
        gradient_sets = [gradients]
        if grad_drop:
            gradient_sets = [_dropped(gradient_pass, differentiated, layer) for layer in layers]
        per_row_sets = [_linear_changes(linear_cells, differences, g, tokens) for g in gradient_sets]
        if qk_parts:
            fixed_sets = qk_changes(
                model,
                tokens,
                qk_parts,
                lambda name: new.tensor_like(name, orig[name]),
                orig,
                gradient_sets,
                batch_size=batch_size,
                max_memory=max_memory,
            )
            per_row_sets = [
                [change + fixed.get(cell, 0) for cell, change in enumerate(per_row)]
                for per_row, fixed in zip(per_row_sets, fixed_sets)
            ]
    change_sets = [torch.stack(per_row) for per_row in per_row_sets]
    if dims != ("batch",):
        change_sets = [changes.sum(1) for changes in change_sets]
    if grad_drop:
        changes = sum(changes.abs() for changes in change_sets) / max(len(layers) - 1, 1)
    else:
        (changes,) = change_sets
    values = changes if estimate == "delta" else orig_value.to(changes.device) + changes
    result = values[0].cpu() if not patched.is_sweep else assembled_sweeps(patched.resolved, values, dims)
    return kept_per_prompt(result, runs, orig_value.cpu(), change=estimate == "delta")


def _check_grad_drop(grad_drop: bool, method: str, estimate: str) -> None:
    if not isinstance(grad_drop, bool):
        raise PatchingError(f"grad_drop must be True or False, got {grad_drop!r}.")
    if grad_drop and method != "atp*":
        raise PatchingError(f"grad_drop is part of AtP*: use method='atp*' with it (got method={method!r}).")
    if grad_drop and estimate != "delta":
        raise PatchingError(
            "grad_drop gives a magnitude per cell (a sum of absolute values over the layers), not a patched metric: "
            "use estimate='delta' with it."
        )


def _qk_parts(cells: list[list[PatchSite]]) -> list[tuple[int, list[PatchSite]]]:
    """(cell index, its query/key sites at one layer) for every cell and layer that has some."""
    parts = []
    for index, cell in enumerate(cells):
        layers: dict[int, list[PatchSite]] = {}
        for site in cell:
            if is_qk(site):
                layers.setdefault(site.layer, []).append(site)
        parts += [(index, sites) for sites in layers.values()]
    return parts


def _dropped(gradient_pass: GradientPass, differentiated: list[str], layer: int) -> dict[str, Tensor]:
    """The gradients with none flowing back through `layer`'s outputs to the residual stream (GradDrop)."""
    outputs = [hook_name("attn_out", layer)]
    if _tl.model_shape(gradient_pass.model).has_mlps:
        outputs.append(hook_name("mlp_out", layer))
    return gradient_pass(differentiated, stopped=[(name, None) for name in outputs]).gradients


def _integrated(gradient_pass: GradientPass, orig: dict, differences: dict, first: dict, steps: int) -> dict:
    """The mean gradient at each hook over the points orig + (k / steps) * difference, k = 0 ..
    steps - 1, each hook interpolated on its own; `first` holds the gradients at k = 0. The
    points are computed and the gradients summed in float32 (or the model's dtype, if wider)."""
    totals = {name: gradient.to(_tl.summing_dtype(gradient.dtype), copy=True) for name, gradient in first.items()}
    for k in range(1, steps):
        for name in totals:
            point = {name: orig[name].to(_tl.summing_dtype(orig[name].dtype)) + (k / steps) * differences[name]}
            totals[name] += gradient_pass([name], fills=point).gradients[name]
    return {name: total / steps for name, total in totals.items()}


def _difference(new: Tensor, orig: Tensor) -> Tensor:
    """new - orig, and 0 where they are equal: masked attention scores are -inf in both runs."""
    return torch.where(new == orig, torch.zeros_like(orig), new - orig)


def _linear_changes(
    cells: list[list[PatchSite]], differences: dict[str, Tensor], gradients: dict[str, Tensor], tokens: Tensor
) -> list[Tensor]:
    """Each cell's first-order change, per prompt: (new - orig) . gradient over its sites, the
    products summed in float32 (or wider) whatever the model's dtype, on the input device.

    Cells of one site (a sweep's cells) are read from one table per hook: the weighted
    differences summed over everything but the batch, the position and the unit, then
    gathered for all such cells of that hook at once.
    """
    batch = tokens.shape[0]
    weighted = {
        name: difference.to(_tl.summing_dtype(difference.dtype)) * gradients[name]
        for name, difference in differences.items()
    }
    changes: list[Tensor | None] = [None] * len(cells)
    single: dict[tuple[str, int | None], list[int]] = {}
    for index, cell in enumerate(cells):
        if len(cell) == 1:
            site = cell[0]
            single.setdefault((site.hook_name, None if site.positions is None else site.positions.shape[1]), []).append(
                index
            )
        else:
            changes[index] = _cell_change(cell, weighted, batch, tokens.device)
    for (name, width), members in single.items():
        table = _position_unit_table(weighted[name], lookup(name)[0])
        units = torch.tensor([cells[i][0].unit if cells[i][0].unit is not None else -1 for i in members])
        units = _tl.moved(units, table.device)
        if width is None:
            per_unit = table.sum(1)
            per_unit = torch.cat([per_unit, per_unit.sum(1, keepdim=True)], dim=1)
            picked = per_unit[:, units].T
        else:
            table = torch.cat([table, table.sum(2, keepdim=True)], dim=2)
            positions = torch.stack([cells[i][0].device_positions for i in members]).to(table.device)
            rows = torch.arange(batch, device=table.device)[None, :, None]
            picked = table[rows, positions, units[:, None, None]].sum(-1)
        picked = picked.to(tokens.device)
        for row, index in enumerate(members):
            changes[index] = picked[row]
    return changes


def _position_unit_table(tensor: Tensor, component) -> Tensor:
    """(batch, pos, units) sums of `tensor` over its other axes (one unit where the component has none)."""
    n_axes = 1 + max(component.pos_axis, component.unit_axis or 0)
    table = tensor.sum(dim=tuple(range(n_axes, tensor.ndim))) if tensor.ndim > n_axes else tensor
    if component.unit_axis is None:
        return table.movedim(component.pos_axis, 1).reshape(tensor.shape[0], tensor.shape[component.pos_axis], -1)
    return table.movedim((component.pos_axis, component.unit_axis), (1, 2))


def _cell_change(cell: list[PatchSite], weighted: dict[str, Tensor], batch: int, device: torch.device) -> Tensor:
    """The estimated change of the metric for patching every site of `cell`, per prompt:
    the weighted differences summed over the sites' union."""
    per_row = torch.zeros(batch, device=device)
    for name in dict.fromkeys(site.hook_name for site in cell):
        tensor = weighted[name]
        sites = [site for site in cell if site.hook_name == name]
        if len(sites) == 1:
            per_row = per_row + tensor[sites[0].index(0, batch, tensor.device)].reshape(batch, -1).sum(1).to(device)
            continue
        mask = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
        for site in sites:
            mask[site.index(0, batch, tensor.device)] = True
        per_row = per_row + (tensor * mask).reshape(batch, -1).sum(1).to(device)
    return per_row
