"""How stable a circuit is over prompts: the circuit that edge scores give, found again on
resamples of the prompts (from the per-prompt scores `attr_edges(..., uncertainty=True)` keeps:
no forward pass)."""

from dataclasses import dataclass

import torch

from ..errors import PatchingError
from .circuit import Circuit
from .graph import EdgeScores

STABILITY_METHODS = ("bootstrap", "halves")
"""How `circuit_stability` resamples prompts: with replacement, or two disjoint halves."""


@dataclass(frozen=True)
class CircuitStability:
    """The circuit of some scores at one size, and how often resampled prompts find it again.

    Attributes:
        circuit: The circuit of the scores over every prompt.
        inclusion: `(n_edges,)`: the fraction of the resamples' circuits that hold each edge.
        jaccard: One value per resample: the Jaccard overlap (shared edges over edges in either)
            of its circuit with `circuit` ("bootstrap"), or of the two halves' circuits ("halves").
        method: "bootstrap" or "halves".
    """

    circuit: Circuit
    inclusion: torch.Tensor
    jaccard: torch.Tensor
    method: str

    @property
    def mean_jaccard(self) -> float:
        """The mean Jaccard overlap over the resamples."""
        return float(self.jaccard.mean())

    def to_frame(self):
        """A pandas DataFrame of the circuit's edges (as `Circuit.to_frame`) with each edge's
        `inclusion` frequency, most stable first."""
        frame = self.circuit.to_frame()
        graph = self.circuit.graph
        frequency = [float(self.inclusion[graph.index(edge)]) for edge in self.circuit.edges]
        return frame.assign(inclusion=frequency).sort_values("inclusion", ascending=False, kind="stable")

    def __repr__(self) -> str:
        stable = int((self.inclusion[self.circuit.mask] >= 0.9).sum())
        return (
            f"CircuitStability({self.method}, {len(self.jaccard)} resamples: circuit of {len(self.circuit)} edges, "
            f"{stable} of them in at least 90% of resampled circuits; mean Jaccard {self.mean_jaccard:.3f})"
        )


def circuit_stability(
    scores: EdgeScores,
    size: int | float,
    *,
    method: str = "bootstrap",
    n_resamples: int = 100,
    absolute: bool = True,
    prune: bool = True,
    seed: int = 0,
) -> CircuitStability:
    """Find the circuit of `scores` at `size` again on resampled prompts: how often each edge is
    in it, and how much the circuits overlap. Each resample's scores are the per-prompt scores'
    combination over its prompts, and its circuit is `Circuit.from_scores(..., size, absolute=,
    prune=)`, as for all prompts.

    Args:
        scores: Edge scores computed with `uncertainty=True` (they keep per-prompt scores).
        size: The circuit's size, as in `Circuit.from_scores`.
        method: "bootstrap" (`n_resamples` resamples with replacement, each compared with the
            circuit of all prompts) or "halves" (`n_resamples` random splits into two halves,
            whose circuits are compared with each other: two independent samples of half the size).
        n_resamples: Resamples (or splits).
        absolute: Rank by |score| (else most negative), as in `Circuit.from_scores`.
        prune: Drop edges that no longer connect the embeddings to the logits.
        seed: Seeds the resampling.

    >>> stability = circuit_stability(attr_edges(model, clean, metric, new_input=corrupted,
    ...                                          uncertainty=True), 50)
    >>> stability.inclusion.shape == (len(stability.circuit.graph),)
    True
    """
    if method not in STABILITY_METHODS:
        raise PatchingError(f"method must be one of {', '.join(map(repr, STABILITY_METHODS))}; got {method!r}.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise PatchingError(f"n_resamples must be a whole number of at least 1, got {n_resamples!r}.")
    if not isinstance(scores, EdgeScores) or scores.samples is None:
        raise PatchingError(
            "circuit_stability needs EdgeScores that keep their per-prompt scores: attr_edges(..., uncertainty=True)."
        )
    samples = scores.samples

    def circuit_of(values: torch.Tensor) -> Circuit:
        resampled = EdgeScores(scores.graph, values.float(), scores.method, scores.unpatched)
        return Circuit.from_scores(resampled, size, absolute=absolute, prune=prune)

    full = Circuit.from_scores(scores, size, absolute=absolute, prune=prune)
    generator = torch.Generator().manual_seed(seed)
    masks, overlaps = [], []
    if method == "bootstrap":
        for resampled in samples.bootstrap(n_resamples, seed).T:
            mask = circuit_of(resampled).mask
            masks.append(mask)
            overlaps.append(_jaccard(mask, full.mask))
    else:
        if samples.n < 2:
            raise PatchingError(
                f"Splitting prompts into halves needs at least 2 prompts; these scores have {samples.n}."
            )
        for _ in range(n_resamples):
            order = torch.randperm(samples.n, generator=generator)
            half = samples.n // 2
            first, second = (circuit_of(samples.subset(part).estimate()).mask for part in (order[:half], order[half:]))
            masks += [first, second]
            overlaps.append(_jaccard(first, second))
    inclusion = torch.stack(masks).double().mean(0).float()
    return CircuitStability(full, inclusion, torch.tensor(overlaps), method)


def _jaccard(first: torch.Tensor, second: torch.Tensor) -> float:
    union = int((first | second).sum())
    return 1.0 if union == 0 else int((first & second).sum()) / union
