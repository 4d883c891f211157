"""Faithfulness curves, and the MIB benchmark's two summaries of them (CPR and CMD).

As the Mechanistic Interpretability Benchmark (MIB, Mueller et al. 2025) defines it, a
circuit's faithfulness is `(m(circuit) - m(empty)) / (m(full) - m(empty))`, `m` the metric
averaged over prompts; a curve takes the strongest edges of some scores at each size (a
fraction of the graph's edges), pruned of dangling edges. MIB summarises two curves of the
same scores, each by the trapezoidal rule over its fractions (0.1% to 100%): CPR is the area
under the curve of the edges ranked by signed score, CMD the area between 1 and the curve of
the edges ranked by |score|.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .._core.circuit import Circuit, edge_count
from .._core.distributed import shared_by_ranks
from .._core.graph import EdgeScores
from .._core.position_scores import EdgePositionScores
from .._core.tensor_types import ModelInput, OtherModelInput
from .._stats import PromptSamples
from ..errors import PatchingError
from .circuit_evaluation import evaluate_circuit

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The circuit sizes of MIB's curves: fractions of the graph's edges."""


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness at each circuit size, with the circuits and the metric values behind it.

    Attributes:
        method: What scored the edges (the scores' method, e.g. "atp", "ig", "exact").
        fractions: Each circuit's size as a fraction of the graph's edges (the curve's x).
        circuits: The circuit evaluated at each size (top edges, pruned if asked).
        values: The metric (mean over prompts) of each circuit.
        full: The metric with every edge kept (the orig run).
        empty: The metric with every edge ablated.
        absolute: How the edges were ranked: by |score| (True) or by most negative score.
        samples: With `uncertainty=True`, the per-prompt values behind the faithfulness at each
            size (`(value - empty) / (full - empty)` is a ratio of means over prompts, each
            prompt's circuit, full and empty values resampled together); None otherwise.
        positions: The positions each edge was scored at: 1 for `EdgeScores`; for
            `EdgePositionScores` their `seq_len`, the sizes then counting (edge, position) pairs.
    """

    method: str
    fractions: tuple[float, ...]
    circuits: tuple[Circuit, ...]
    values: tuple[float, ...]
    full: float
    empty: float
    absolute: bool = True
    samples: PromptSamples | None = None
    positions: int = 1

    @property
    def faithfulness(self) -> tuple[float, ...]:
        """`(value - empty) / (full - empty)` at each size: 0 is the ablated run, 1 the model."""
        return tuple((value - self.empty) / (self.full - self.empty) for value in self.values)

    def _uncertain(self, what: str) -> PromptSamples:
        if self.samples is None:
            raise PatchingError(f"{what} needs the per-prompt values: compute the curve with uncertainty=True.")
        return self.samples

    @property
    def faithfulness_stderr(self) -> tuple[float, ...]:
        """The standard error of the faithfulness at each size (the delta method's, for a ratio)."""
        return tuple(self._uncertain("faithfulness_stderr").stderr().tolist())

    def faithfulness_ci(
        self, level: float = 0.95, method: str = "bootstrap", *, n_resamples: int = 2000, seed: int = 0
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The curve's band: a `level` confidence interval of the faithfulness at each size, as
        (lows, highs), by resampling prompts (see `PatchResult.ci` for the methods)."""
        low, high = self._uncertain("faithfulness_ci").ci(level, method, n_resamples, seed)
        return tuple(low.tolist()), tuple(high.tolist())

    @property
    def edge_counts(self) -> tuple[int, ...]:
        """The edges each circuit kept (after pruning, fewer than the size may remain)."""
        return tuple(len(circuit) for circuit in self.circuits)

    @property
    def ranking(self) -> str:
        """How the edges were ranked, in words: "|score|" or "signed score"."""
        return "|score|" if self.absolute else "signed score"

    @property
    def area_under(self) -> float:
        """The area under the curve over the fractions, by the trapezoidal rule. MIB's CPR is
        this area for the edges ranked by signed score (`mib_faithfulness`)."""
        return _trapezoid(self.fractions, self.faithfulness)

    @property
    def area_from_1(self) -> float:
        """The area between the curve and 1 (`abs(1 - faithfulness)`) over the fractions. MIB's
        CMD is this area for the edges ranked by |score| (`mib_faithfulness`)."""
        return _trapezoid(self.fractions, [abs(1.0 - f) for f in self.faithfulness])

    @property
    def cpr(self):
        """Not a curve's: MIB's CPR is the area under the signed ranking's curve (`mib_faithfulness`)."""
        raise PatchingError(_NOT_A_CURVES.format(name="CPR", area="area_under", ranking="signed score", what="cpr"))

    @property
    def cmd(self):
        """Not a curve's: MIB's CMD is the area from 1 of the |score| ranking's curve (`mib_faithfulness`)."""
        raise PatchingError(_NOT_A_CURVES.format(name="CMD", area="area_from_1", ranking="|score|", what="cmd"))

    def to_frame(self):
        """A pandas DataFrame, one row per size: `method`, `ranking`, `fraction`, `requested_edges`
        (the size in edges, or in (edge, position) pairs for position-aware circuits), `edges`
        (kept after pruning), `metric`, `faithfulness`."""
        import pandas as pd

        n_edges = len(self.circuits[0].graph)
        return pd.DataFrame(
            {
                "method": [self.method] * len(self.fractions),
                "ranking": [self.ranking] * len(self.fractions),
                "fraction": list(self.fractions),
                "requested_edges": [edge_count(f, n_edges * self.positions) for f in self.fractions],
                "edges": list(self.edge_counts),
                "metric": list(self.values),
                "faithfulness": list(self.faithfulness),
            }
        )

    def __repr__(self) -> str:
        points = ", ".join(f"{f:g}: {v:.3f}" for f, v in zip(self.fractions, self.faithfulness))
        return (
            f"FaithfulnessCurve({self.method}, ranked by {self.ranking}: area under {self.area_under:.4f}, "
            f"area from 1 {self.area_from_1:.4f}; {points})"
        )


_NOT_A_CURVES = (
    "FaithfulnessCurve.{what} is gone: MIB's {name} is computed on the curve of the edges ranked by {ranking}, "
    "so it is not any curve's. Use mib_faithfulness(model, scores, ...).{what}, which evaluates MIB's two curves, "
    "or this curve's own area, curve.{area}."
)


@dataclass(frozen=True)
class MIBFaithfulness:
    """MIB's two summaries of some edge scores, each from the curve MIB computes it on.

    Attributes:
        signed: The faithfulness curve of the edges ranked by signed score (most negative
            first: the edges whose removal lowers the metric most), at `MIB_FRACTIONS`.
        absolute: The curve of the edges ranked by |score|, at the same sizes.
    """

    signed: FaithfulnessCurve
    absolute: FaithfulnessCurve

    @property
    def cpr(self) -> float:
        """MIB's CPR: the area under the signed ranking's curve (higher is better)."""
        return self.signed.area_under

    @property
    def cmd(self) -> float:
        """MIB's CMD: the area between 1 and the |score| ranking's curve (lower is better)."""
        return self.absolute.area_from_1

    def to_frame(self):
        """Both curves' `to_frame()` rows, the signed ranking's first."""
        import pandas as pd

        return pd.concat([self.signed.to_frame(), self.absolute.to_frame()], ignore_index=True)

    def __repr__(self) -> str:
        return f"MIBFaithfulness({self.signed.method}: CPR {self.cpr:.4f}, CMD {self.cmd:.4f})"


@shared_by_ranks
def faithfulness_curve(
    model,
    scores: EdgeScores | EdgePositionScores,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    sizes: Sequence[float | int] = MIB_FRACTIONS,
    absolute: bool = True,
    prune: bool = True,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> FaithfulnessCurve:
    """The faithfulness of the strongest edges of `scores` at each size, evaluated exactly.

    Each circuit is `Circuit.from_scores(scores, size, absolute=absolute, prune=prune)`; all
    of them, the full and the empty circuit run stacked in one `evaluate_circuit` call. For
    MIB's CPR and CMD, which rank the edges in two ways, use `mib_faithfulness`.

    Args:
        scores: Edge scores of this model (`attr_edges`, `confirm_edges`, `exact_edge_scores`),
            or `EdgePositionScores` (`attr_edges(..., per_position=True)`) for position-aware
            circuits, whose sizes count (edge, position) pairs.
        sizes: Circuit sizes, increasing: fractions of the graph's edges (floats in (0, 1]) or
            edge counts (ints). The curve's x is the fraction either way.
        absolute: Rank edges by |score| (else by most negative score), as in
            `Circuit.from_scores`.
        prune: Drop the edges that no longer connect the embeddings to the logits.
        uncertainty: Keep the per-prompt values: the curve then has `faithfulness_stderr` and a
            band, `faithfulness_ci`, at no extra forward pass.
        orig_input: As in `evaluate_circuit`.
        patching_metric: As in `evaluate_circuit`; a per-prompt metric is averaged over prompts.
        new_input: As in `evaluate_circuit`.
        new_cache: As in `evaluate_circuit`.
        batch_size: As in `evaluate_circuit`.
        max_memory: As in `evaluate_circuit`.
        progress: As in `evaluate_circuit`.

    >>> curve = faithfulness_curve(model, attr_edges(model, clean, metric, new_input=corrupted),
    ...                            clean, metric, new_input=corrupted)
    >>> curve.area_under, curve.area_from_1  # doctest: +ELLIPSIS
    (..., ...)
    """
    sizes, fractions = _checked_sizes(scores, sizes, "faithfulness_curve")
    return _curves(
        model,
        scores,
        [absolute],
        sizes,
        fractions,
        prune,
        orig_input,
        patching_metric,
        new_input=new_input,
        new_cache=new_cache,
        uncertainty=uncertainty,
        batch_size=batch_size,
        max_memory=max_memory,
        progress=progress,
    )[0]


@shared_by_ranks
def mib_faithfulness(
    model,
    scores: EdgeScores | EdgePositionScores,
    orig_input: ModelInput,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    *,
    prune: bool = True,
    uncertainty: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | str = False,
) -> MIBFaithfulness:
    """MIB's CPR and CMD of `scores`, each on the ranking MIB computes it on, evaluated exactly.

    As MIB's circuit track does: circuits of the strongest edges at `MIB_FRACTIONS` of the
    graph, pruned; CPR is the area under the curve of the edges ranked by signed score, CMD the
    area between 1 and the curve of the edges ranked by |score|. Both curves, the full and the
    empty circuit run stacked in one `evaluate_circuit` call.

    Signed means most negative first here: a score is the change of the metric when the edge
    is removed, so the strongest edges are those whose removal lowers the metric most, as MIB's
    signed ranking keeps the edges that raise its logit difference most. This assumes, as MIB
    does, a metric that grows with the behaviour (a logit difference, not a loss). MIB scores
    edges on one split of its prompts and measures faithfulness on held-out ones: pass the
    held-out prompts here.

    Args:
        scores: Edge scores of this model (`attr_edges`, `confirm_edges`, `exact_edge_scores`), or
            `EdgePositionScores` for position-aware circuits (the sizes then count (edge, position) pairs).
        prune: Drop the edges that no longer connect the embeddings to the logits (MIB does).
        uncertainty: Keep the per-prompt values, for both curves' bands (`faithfulness_ci`).

    The other arguments are `faithfulness_curve`'s.

    >>> mib = mib_faithfulness(model, attr_edges(model, clean, metric, new_input=corrupted),
    ...                        held_out_clean, held_out_metric, new_input=held_out_corrupted)
    >>> mib.cpr, mib.cmd  # doctest: +ELLIPSIS
    (..., ...)
    """
    sizes, fractions = _checked_sizes(scores, MIB_FRACTIONS, "mib_faithfulness")
    signed, absolute = _curves(
        model,
        scores,
        [False, True],
        sizes,
        fractions,
        prune,
        orig_input,
        patching_metric,
        new_input=new_input,
        new_cache=new_cache,
        uncertainty=uncertainty,
        batch_size=batch_size,
        max_memory=max_memory,
        progress=progress,
    )
    return MIBFaithfulness(signed, absolute)


def _checked_sizes(scores, sizes, caller: str) -> tuple[list[float | int], tuple[float, ...]]:
    """The sizes as plain numbers, and the curve's x (each size as a fraction of the graph's
    edges), refusing anything but edge scores and at least two increasing sizes."""
    if not isinstance(scores, (EdgeScores, EdgePositionScores)):
        raise PatchingError(
            f"{caller} needs EdgeScores or EdgePositionScores (e.g. from attr_edges), got {type(scores).__name__}."
        )
    n_edges = len(scores.graph) * _positions(scores)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise PatchingError(f"sizes must be a list of at least two circuit sizes in increasing order, got {sizes!r}.")
    sizes = [size.item() if hasattr(size, "item") else size for size in sizes]  # numpy or torch scalars too
    for size in sizes:
        edge_count(size, n_edges)
    fractions = tuple(size if isinstance(size, float) else size / n_edges for size in sizes)
    if len(fractions) < 2 or any(later <= earlier for earlier, later in zip(fractions, fractions[1:])):
        raise PatchingError(
            f"sizes must be at least two circuit sizes in increasing order (the curve's x runs left to right), "
            f"got {sizes!r}."
        )
    return sizes, fractions


def _positions(scores: EdgeScores | EdgePositionScores) -> int:
    """The positions each edge was scored at: the sizes count edges times these."""
    return scores.seq_len if isinstance(scores, EdgePositionScores) else 1


def _curves(
    model,
    scores: EdgeScores | EdgePositionScores,
    rankings: Sequence[bool],
    sizes,
    fractions: tuple[float, ...],
    prune: bool,
    orig_input,
    patching_metric,
    **evaluation,
) -> tuple[FaithfulnessCurve, ...]:
    """One curve per ranking (`absolute` or not) at `sizes`: every circuit of every curve, the full
    and the empty circuit in one `evaluate_circuit` call."""
    graph = scores.graph
    circuits = [
        [Circuit.from_scores(scores, size, absolute=absolute, prune=prune) for size in sizes] for absolute in rankings
    ]
    stacked = [circuit for curve in circuits for circuit in curve]
    evaluated = evaluate_circuit(
        model, [*stacked, Circuit.full(graph), Circuit.empty(graph)], orig_input, patching_metric, **evaluation
    )
    values = evaluated.as_tensor().float()
    values = values.reshape(values.shape[0], -1).mean(1).tolist()
    full, empty = values[-2], values[-1]
    raw = None if evaluated.samples is None else evaluated.samples.values
    if math.isclose(full, empty, rel_tol=1e-5, abs_tol=1e-6):
        raise PatchingError(
            f"The full and the empty circuit give the same metric ({full:.6g}, to float rounding), "
            "so faithfulness, a fraction of their difference, is undefined: the ablation changes "
            "nothing."
        )
    return tuple(
        FaithfulnessCurve(
            scores.method,
            fractions,
            tuple(curve),
            tuple(values[i * len(sizes) : (i + 1) * len(sizes)]),
            full,
            empty,
            absolute,
            None if raw is None else _faithfulness_samples(raw, i * len(sizes), (i + 1) * len(sizes)),
            _positions(scores),
        )
        for i, (absolute, curve) in enumerate(zip(rankings, circuits))
    )


def _faithfulness_samples(raw: torch.Tensor, start: int, stop: int) -> PromptSamples:
    """The faithfulness of circuits `start:stop` as a ratio of per-prompt means: their values
    less the empty circuit's over the full circuit's less the empty circuit's (the last two
    rows of `raw`, the metric's per-prompt values before any normalisation, which cancels)."""
    full, empty = raw[-2], raw[-1]
    return PromptSamples(raw[start:stop], offset=empty, scale=full - empty)


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(
        torch.trapezoid(torch.tensor(list(ys), dtype=torch.float64), torch.tensor(list(xs), dtype=torch.float64))
    )
