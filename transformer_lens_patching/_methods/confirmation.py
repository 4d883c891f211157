"""confirm: exact activation patching of the cells an attribution estimate ranks highest.

`attr_patch` estimates every cell of a sweep at the cost of one backward pass; `confirm`
takes those estimates, picks the `top_k` cells whose estimated effect is largest in size,
and patches exactly those with `act_patch`'s machinery: the chosen cells are planned
together and stacked into passes as a sweep's cells are. The result puts both numbers of
each cell side by side, with how well the estimate ranks them.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _tl
from .._core.distributed import shared_by_ranks
from .._core.executor import Runs
from .._core.measure import BATCH, MetricCalls, as_tensor
from .._core.memory import check_chunk_args
from .._core.nodes import IterNode
from .._core.sites import Sweep
from .._core.tensor_types import ModelInput, OtherModelInput
from .._stats import PromptSamples, top_k_frequency
from ..errors import PatchingError
from ..results import PatchResult
from .activation import plan_cells
from .common import cell_places, check_ranking_arguments, patch_cells, prepare_runs

CONFIRMED = "confirmed"
"""The name of the one sweep of a confirmation's plan: the chosen cells, in rank order."""


@dataclass(frozen=True)
class ConfirmedCell:
    """One cell of a sweep, with its estimated and its exact patched metric.

    For a per-prompt metric every number is the mean over the prompts.
    """

    component: str
    """The component, as a key of the sweep's results (`"z"`, `"post"`, ...)."""
    coords: dict[str, int]
    """The cell's coordinate on each dim of its component's result, e.g. `{"layer": 3, "neuron": 17}`."""
    estimate: float
    """The estimated patched metric (`attr_patch`)."""
    exact: float
    """The patched metric (`act_patch`)."""
    estimated_change: float
    """`estimate` minus the unpatched metric."""
    exact_change: float
    """`exact` minus the unpatched metric."""
    top_k_frequency: float | None = None
    """For estimates computed with `uncertainty=True`: the fraction of bootstrap resamples of the
    prompts in which this cell's estimated change is among the `top_k` largest in size (how
    stable its place in the ranking is); None otherwise."""

    @property
    def label(self) -> str:
        """The component and coordinates, e.g. `post layer=3, neuron=17`."""
        return f"{self.component} " + ", ".join(f"{dim}={value}" for dim, value in self.coords.items())


@dataclass(frozen=True)
class Confirmation:
    """What `confirm` measured: the cells with the largest estimated effect, each patched exactly.

    `cells` are ordered by the size of their estimated change, largest first (ties in the
    sweep's order). `spearman` and `overlap` say how well the estimate ranks them.

    >>> checked = confirm(model, estimates, corrupted, IterNode("post"), metric, new_input=clean)
    >>> checked.spearman, checked.top_k_overlap  # doctest: +ELLIPSIS
    (..., ...)
    >>> list(checked.to_frame().columns)
    ['component', 'layer', 'neuron', 'estimate', 'exact', 'estimated_change', 'exact_change']
    """

    cells: tuple[ConfirmedCell, ...]
    unpatched: float
    """The metric of the unpatched orig run (for a per-prompt metric, its mean)."""
    screened: int
    """How many cells the estimates ranked."""
    per_prompt: bool = False
    """Whether the metric returns one value per prompt (every number here is then a mean over prompts)."""

    @property
    def spearman(self) -> float:
        """The rank correlation of the estimated and the exact changes over the confirmed cells:
        Pearson's correlation of their ranks, tied values sharing the mean of their ranks.
        NaN for fewer than two cells, or when either side has a single value."""
        estimated = torch.tensor([cell.estimated_change for cell in self.cells], dtype=torch.float64)
        exact = torch.tensor([cell.exact_change for cell in self.cells], dtype=torch.float64)
        return _pearson(_mean_ranks(estimated), _mean_ranks(exact))

    @property
    def overlap_size(self) -> int:
        """The `n` of `top_k_overlap`: half the confirmed cells, rounded up."""
        return (len(self.cells) + 1) // 2

    @property
    def top_k_overlap(self) -> int:
        """`overlap(overlap_size)`: how many of the estimate's top half of the confirmed cells
        are also in the exact top half. It equals `overlap_size` when the estimate picks out
        the same strongest cells as exact patching."""
        return self.overlap(self.overlap_size)

    def overlap(self, n: int) -> int:
        """How many of the `n` confirmed cells with the largest estimated change in size are
        among the `n` with the largest exact change in size (ties in either order broken by
        the order of `cells`).

        >>> 0 <= checked.overlap(5) <= 5  # 5: the estimate's five strongest are exact patching's five
        True
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.cells):
            raise PatchingError(
                f"overlap(n) needs a whole number 1 <= n <= {len(self.cells)} (the cells confirmed), got {n!r}."
            )
        exact = torch.tensor([abs(cell.exact_change) for cell in self.cells])
        exact_top = set(exact.argsort(descending=True, stable=True)[:n].tolist())
        return len(exact_top & set(range(n)))

    def to_frame(self):
        """A pandas DataFrame with one row per confirmed cell: `component`, a column per dim
        (empty where a component has no such dim), `estimate`, `exact`, `estimated_change`
        and `exact_change` (and `top_k_frequency` for estimates with uncertainty)."""
        try:
            import pandas as pd
        except ImportError as error:
            raise PatchingError("to_frame needs pandas: pip install pandas.") from error
        dims = list(dict.fromkeys(dim for cell in self.cells for dim in cell.coords))
        rows = [
            {
                "component": cell.component,
                **{dim: cell.coords.get(dim) for dim in dims},
                "estimate": cell.estimate,
                "exact": cell.exact,
                "estimated_change": cell.estimated_change,
                "exact_change": cell.exact_change,
            }
            for cell in self.cells
        ]
        columns = ["component", *dims, "estimate", "exact", "estimated_change", "exact_change"]
        frame = pd.DataFrame(rows, columns=columns)
        if all(cell.top_k_frequency is not None for cell in self.cells):
            frame["top_k_frequency"] = [cell.top_k_frequency for cell in self.cells]
        return frame.astype({dim: "Int64" for dim in dims})

    def __repr__(self) -> str:
        mean = " (means over prompts)" if self.per_prompt else ""
        width = max([len("cell"), *(len(cell.label) for cell in self.cells)])
        lines = [
            f"Confirmation: the {len(self.cells)} of {self.screened} cells with the largest estimated change, "
            f"patched exactly{mean}",
            f"  unpatched metric {self.unpatched:.4g}; Spearman {self.spearman:.3f}; "
            f"top-{self.overlap_size} overlap {self.top_k_overlap} of {self.overlap_size}",
            f"  {'cell':<{width}}  {'estimated change':>16}  {'exact change':>12}",
        ]
        lines += [
            f"  {cell.label:<{width}}  {cell.estimated_change:>+16.4g}  {cell.exact_change:>+12.4g}"
            for cell in self.cells
        ]
        return "\n".join(lines)


@shared_by_ranks
def confirm(
    model,
    estimates: Mapping[str, PatchResult],
    orig_input: ModelInput,
    patching_nodes: IterNode,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    top_k: int = 20,
    estimate: str = "value",
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> Confirmation:
    """Patch exactly the `top_k` cells of a sweep whose estimated effect is largest in size.

    `estimates` is what `attr_patch` returned for the same arguments. Every cell of every
    component is ranked by the size of its estimated change (the estimate minus the
    unpatched metric, which is measured once); the `top_k` largest are patched with
    `act_patch`'s engine, planned together so that they stack into a few forward passes.

    A per-prompt metric (estimates with a trailing `batch` dim) is confirmed by its mean
    over the prompts: cells are ranked, patched and compared by the mean change. Estimates
    computed with `uncertainty=True` also say how stable the ranking is: each confirmed cell's
    `top_k_frequency` over bootstrap resamples of the prompts (no forward pass).

    Args:
        model: The model `estimates` were computed on.
        estimates: `attr_patch(model, orig_input, patching_nodes, patching_metric, ...)`: a
            dict of PatchResults with the sweep's dims and coordinates (and `batch` for a
            per-prompt metric).
        orig_input: The run patched into, as given to `attr_patch`.
        patching_nodes: The IterNode the estimates sweep.
        patching_metric: The metric of the estimates: one number, or one per prompt.
        new_input: The run patched from (resample ablation), as given to `attr_patch`.
        new_cache: Instead of `new_input`: an ActivationCache or "zero", as given to `attr_patch`.
        top_k: How many cells to patch exactly (at most every cell of the sweep).
        estimate: What `estimates` hold, as `attr_patch`'s argument of that name says:
            "value" (estimated patched metrics, the default) or "delta" (their changes).
        batch_size: Patched variants per forward pass (default: as many as fit in `max_memory`).
        max_memory: Bytes of activations one forward pass may use.
        progress: Show a progress bar over the confirmed cells (a string labels it).

    Returns:
        A `Confirmation`: each confirmed cell's coordinates, estimate and exact value, and
        the rank correlation and overlap of the two.

    Raises:
        PatchingError: For anything `act_patch` refuses, a `patching_nodes` that is not an
            IterNode, estimates whose components, dims or coordinates are not the sweep's,
            a metric that returns more than one number per prompt, and a `top_k` below 1.

    >>> estimates = attr_patch(model, corrupted, IterNode("post"), metric, new_input=clean)
    >>> checked = confirm(
    ...     model, estimates, corrupted, IterNode("post"), metric, new_input=clean, top_k=20
    ... )
    >>> print(checked)  # doctest: +ELLIPSIS
    Confirmation: the 20 of ... cells with the largest estimated change, patched exactly
    ...
    """
    check_ranking_arguments(patching_nodes, top_k, estimate)
    check_chunk_args(batch_size, max_memory)
    runs = prepare_runs(model, orig_input, patching_metric)
    patched = patch_cells(model, runs.tokens, patching_nodes)
    sweeps: list[Sweep] = patched.resolved
    ranking = rank_estimates(runs, estimates, sweeps, estimate, top_k)
    per_prompt, unpatched_mean, changes, chosen = ranking.per_prompt, ranking.unpatched, ranking.changes, ranking.chosen
    layout = (Sweep(CONFIRMED, ("cell",), {"cell": tuple(range(len(chosen)))}, [patched.cells[i] for i in chosen]),)
    what = f"the {len(chosen)} cells of {patching_nodes!r} with the largest estimated change"
    plan = plan_cells(
        runs, layout[0].sites, layout, what, new_input, new_cache, batch_size=batch_size, max_memory=max_memory
    )
    exact = plan.compute(progress=progress)[CONFIRMED].as_tensor().double()
    exact = exact.mean(-1) if per_prompt else exact
    places = list(cell_places(sweeps))
    frequency = top_k_frequencies(estimates, sweeps, len(chosen))
    cells = tuple(
        ConfirmedCell(
            places[index][0],
            places[index][1],
            float(changes[index]) + unpatched_mean,
            float(value),
            float(changes[index]),
            float(value) - unpatched_mean,
            None if frequency is None else float(frequency[index]),
        )
        for index, value in zip(chosen, exact)
    )
    return Confirmation(cells, unpatched_mean, len(changes), per_prompt)


def top_k_frequencies(estimates, sweeps: list[Sweep], top_k: int, n_resamples: int = 200) -> Tensor | None:
    """For estimates that keep per-prompt values, each cell's fraction of bootstrap resamples of the
    prompts (the same resamples for every component) in which its estimated change is among the
    `top_k` largest in size, in the sweeps' cell order; None for estimates without them."""
    samples = [estimates[sweep.name].samples for sweep in sweeps]
    if any(part is None or part.baseline is None for part in samples):
        return None
    changes = [
        PromptSamples((part.values - part.baseline).reshape(-1, part.n), scale=part.scale).bootstrap(n_resamples)
        for part in samples
    ]
    return top_k_frequency(torch.cat(changes).abs(), top_k)


@dataclass(frozen=True)
class Ranking:
    """An estimate's cells ranked: the unpatched metric (its mean over prompts), each cell's
    estimated change in the sweeps' order, and the `top_k` cells by its size."""

    per_prompt: bool
    unpatched: float
    changes: Tensor
    chosen: list[int]


def rank_estimates(runs: Runs, estimates, sweeps: list[Sweep], estimate: str, top_k: int) -> Ranking:
    """Check `estimates` against `sweeps` and rank their cells by the size of their estimated change."""
    unpatched, metric_dims = _unpatched(runs.model, runs.tokens, runs.metric)
    _check_components(estimates, sweeps)
    batch = runs.tokens.shape[0]
    flat = torch.cat([_estimates_of(estimates[sweep.name], sweep, metric_dims, batch) for sweep in sweeps])
    unpatched_mean = float(unpatched.double().mean())
    changes = flat - unpatched_mean if estimate == "value" else flat
    chosen = changes.abs().argsort(descending=True, stable=True)[: min(top_k, len(flat))].tolist()
    return Ranking(metric_dims == (BATCH,), unpatched_mean, changes, chosen)


def _unpatched(model, tokens: Tensor, metric) -> tuple[Tensor, tuple[str, ...]]:
    """The metric of the unpatched orig run, and its dims: one number, or one per prompt."""
    calls = MetricCalls(metric, tokens.shape[0], model=model)
    with torch.no_grad():
        value = as_tensor(calls(_tl.forward_logits(model, tokens))).detach()
    if calls.dims not in ((), (BATCH,)):
        raise PatchingError(
            f"confirm needs a metric that returns one number, or one number per prompt (as attr_patch does); this one "
            f"returns shape {tuple(value.shape)} (dims {calls.dims})."
        )
    return value.cpu(), calls.dims


def _check_components(estimates, sweeps: list[Sweep]) -> None:
    """`estimates` must be a dict with exactly the components the sweep patches."""
    if not isinstance(estimates, Mapping):
        raise PatchingError(
            "estimates must be the dict of PatchResults attr_patch returns for an IterNode; "
            f"got {type(estimates).__name__}."
        )
    expected = [sweep.name for sweep in sweeps]
    if sorted(estimates) != sorted(expected):
        raise PatchingError(
            f"estimates has the components {sorted(estimates)}, but patching_nodes sweeps {sorted(expected)}: pass the "
            "estimates of the same call."
        )


def _estimates_of(result, sweep: Sweep, metric_dims: tuple[str, ...], batch: int) -> Tensor:
    """The estimates of `sweep`'s cells, in the order of its sites (means over prompts for a
    per-prompt metric), checked against its dims and coordinates."""
    if not isinstance(result, PatchResult):
        raise PatchingError(
            f"estimates[{sweep.name!r}] must be a PatchResult (as attr_patch returns), got {type(result).__name__}."
        )
    dims = sweep.dims + metric_dims
    coords = {dim: tuple(values) for dim, values in sweep.coords.items()}
    if metric_dims:
        coords[BATCH] = tuple(range(batch))
    if result.dims != dims or {dim: result.coords[dim] for dim in dims} != coords:
        what = "a per-prompt metric, " if metric_dims else ""
        raise PatchingError(
            f"estimates[{sweep.name!r}] has dims ({result.dims_text}), but patching_nodes and {what}the inputs give "
            f"({', '.join(f'{dim}={len(coords[dim])}' for dim in dims)}) with coordinates {_short(coords)}: pass the "
            "estimates of the same call."
        )
    values = result.as_tensor().detach().cpu().double().reshape(len(sweep.sites), -1)
    return values.mean(1) if metric_dims else values[:, 0]


def _short(coords: dict[str, tuple]) -> str:
    """Coordinates for an error: each dim's first values."""
    return "{" + ", ".join(f"{dim}: {list(v[:4])}{'...' if len(v) > 4 else ''}" for dim, v in coords.items()) + "}"


def _mean_ranks(values: Tensor) -> Tensor:
    """Ranks 1..n of `values`, tied values sharing the mean of their ranks."""
    order = values.argsort(stable=True)
    ordered = values[order]
    ranks = torch.empty_like(values)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pearson(a: Tensor, b: Tensor) -> float:
    """Pearson's correlation; NaN when either side is constant or has fewer than two values."""
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    scale = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / scale if scale > 0 else math.nan
