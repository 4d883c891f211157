"""confirm_paths: exact path patching of the cells an edge-attribution estimate ranks highest.

The counterpart of `confirm` for `attr_path_patch`: its estimates of a sweep over senders
(or receivers) are ranked as `confirm` ranks a node sweep's, and the strongest cells are
path-patched exactly (`direct_includes_mlps=False`, the quantity `attr_path_patch`
estimates). Path patching sweeps whole grids, so each swept component is patched once,
over the grid of the layers and heads (or neurons) its chosen cells use: one batched
`path_patch` call per component, not one per cell.
"""

from collections.abc import Callable, Mapping, Sequence

import torch

from .. import _tl
from .._core.distributed import shared_by_ranks
from .._core.nodes import IterNode, Node, normalize_seq_pos
from .._core.sites import Sweep, resolve_spec
from .._core.tensor_types import ModelInput, OtherModelInput
from ..errors import PatchingError
from ..results import PatchResult
from .common import cell_places, check_ranking_arguments, prepare_runs
from .confirmation import Confirmation, ConfirmedCell, rank_estimates
from .path import plan_path_patch

UNIT_DIMS = {"head": "heads", "kv_head": "heads", "neuron": "neurons"}
"""The IterNode restriction that selects each unit dim of a sweep's results."""


@shared_by_ranks
def confirm_paths(
    model,
    estimates: Mapping[str, PatchResult],
    orig_input: ModelInput,
    new_input: OtherModelInput | None,
    sender_nodes: Node | Sequence[Node] | IterNode,
    receiver_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    *,
    new_cache=None,
    seq_pos=None,
    top_k: int = 20,
    estimate: str = "value",
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> Confirmation:
    """Path-patch exactly the `top_k` cells whose estimated effect `attr_path_patch` ranks largest.

    `estimates` is what `attr_path_patch` returned for the same arguments, with one side an
    IterNode. The cells are ranked by the size of their estimated change (the estimate
    minus the unpatched metric, measured once); the chosen ones are then computed by
    `path_patch(..., direct_includes_mlps=False)` over the grid of layers and units they use.

    Args:
        model: The model the estimates were computed on.
        estimates: `attr_path_patch(model, orig_input, new_input, sender_nodes, receiver_nodes,
            patching_metric, ...)`, one side sweeping.
        orig_input: The run patched into, as given to `attr_path_patch`.
        new_input: The run patched from, as given to `attr_path_patch`.
        sender_nodes: The senders, as given to `attr_path_patch`.
        receiver_nodes: The receivers, as given to `attr_path_patch`.
        patching_metric: The metric of the estimates.
        new_cache: Instead of `new_input`, as given to `attr_path_patch`.
        seq_pos: Positions, as given to `attr_path_patch`.
        top_k: How many cells to path-patch exactly.
        estimate: "value" or "delta": what the estimates hold, as `attr_path_patch`'s
            argument of that name says.
        batch_size: Patched variants per forward pass, as for `path_patch`.
        max_memory: Bytes of activations one forward pass may use, as for `path_patch`.
        progress: Show a progress bar over each component's exact cells (a string labels it).

    Returns:
        A `Confirmation`, as `confirm` returns.

    Raises:
        PatchingError: Unless exactly one side is an IterNode, for estimates that are not that
            sweep's, a `top_k` below 1, and anything `path_patch` refuses.

    >>> receiver = Node("resid_post", model.cfg.n_layers - 1)
    >>> estimates = attr_path_patch(model, corrupted, clean, IterNode("z"), receiver, metric)
    >>> checked = confirm_paths(
    ...     model, estimates, corrupted, clean, IterNode("z"), receiver, metric
    ... )
    >>> -1 <= checked.spearman <= 1  # the rank correlation of the estimated and the exact changes
    True
    """
    sweeping = [spec for spec in (sender_nodes, receiver_nodes) if isinstance(spec, IterNode)]
    if len(sweeping) != 1:
        raise PatchingError(
            "confirm_paths ranks the cells of one sweep: exactly one of sender_nodes and receiver_nodes must be an "
            f"IterNode (got {len(sweeping)})."
        )
    (swept,) = sweeping
    check_ranking_arguments(swept, top_k, estimate)
    runs = prepare_runs(model, orig_input, patching_metric)
    what = "sender_nodes" if swept is sender_nodes else "receiver_nodes"
    sweeps: list[Sweep] = resolve_spec(swept, _tl.model_shape(model), runs.tokens, what, normalize_seq_pos(seq_pos))
    ranking = rank_estimates(runs, estimates, sweeps, estimate, top_k)
    per_prompt, unpatched_mean, changes, chosen = ranking.per_prompt, ranking.unpatched, ranking.changes, ranking.chosen
    places = list(cell_places(sweeps))
    exact = {}
    for name in dict.fromkeys(places[index][0] for index in chosen):
        coords = [places[index][1] for index in chosen if places[index][0] == name]
        grid = _grid(swept, name, coords)
        senders, receivers = (grid, receiver_nodes) if swept is sender_nodes else (sender_nodes, grid)
        plan = plan_path_patch(
            model,
            orig_input,
            new_input,
            senders,
            receivers,
            patching_metric,
            new_cache=new_cache,
            seq_pos=seq_pos,
            direct_includes_mlps=False,
            batch_size=batch_size,
            max_memory=max_memory,
        )
        exact[name] = plan.compute(progress=progress)[name]
    cells = []
    for index in chosen:
        name, coords = places[index]
        value = torch.as_tensor(exact[name].sel(**coords)).double()
        value = float(value.mean() if per_prompt else value)
        estimated = float(changes[index])
        cells.append(ConfirmedCell(name, coords, estimated + unpatched_mean, value, estimated, value - unpatched_mean))
    return Confirmation(tuple(cells), unpatched_mean, len(changes), per_prompt)


def _grid(swept: IterNode, name: str, coords: list[dict[str, int]]) -> IterNode:
    """`swept` for component `name` alone, restricted to the layers and units of `coords`."""
    restrictions = {}
    if "layer" in coords[0]:
        restrictions["layers"] = sorted({cell["layer"] for cell in coords})
    for dim, argument in UNIT_DIMS.items():
        if dim in coords[0]:
            restrictions[argument] = sorted({cell[dim] for cell in coords})
    return IterNode(name, seq_pos=swept.seq_pos, **restrictions)
