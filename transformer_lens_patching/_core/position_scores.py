"""EdgePositionScores: a score for every edge at every position, as `attr_edges(..., per_position=True)` returns.

An edge at a position is one term of a receiver's input at one token: the sender's output
there, read by the receiver there. Summed over positions, the scores are the edge's.
Position-aware circuits (`Circuit.from_scores`) keep the strongest (edge, position) pairs.
Types only: nothing here runs a model.
"""

import math
from dataclasses import dataclass

import torch

from .._stats import PromptSamples
from ..errors import PatchingError
from .graph import Edge, EdgeGraph, EdgeScores


@dataclass(frozen=True)
class EdgePositionScores:
    """A score for every edge of an `EdgeGraph` at every position.

    Attributes:
        graph: The edges scored.
        scores: `(n_edges, seq_len)`, or `(n_edges, seq_len, batch)` for a per-prompt metric:
            each edge's estimated change of the metric from its sender's change at one position
            alone, row `graph.index(edge)`.
        method: How the scores were estimated (as `EdgeScores.method`).
        unpatched: The metric on the orig run (a number, or one per prompt).
        samples: With `uncertainty=True`, the per-prompt scores behind them (cells
            `(n_edges, seq_len)`), for `stderr`; None otherwise.

    >>> scores = attr_edges(model, corrupted, metric, new_input=clean, per_position=True)
    >>> scores.scores.shape == (len(scores.graph), corrupted.shape[1])
    True
    >>> torch.allclose(scores.total().scores, attr_edges(model, corrupted, metric, new_input=clean).scores, atol=1e-5)
    True
    >>> [(str(edge), position) for edge, position in scores.top(2)]  # doctest: +ELLIPSIS
    [('... -> ...', ...), ('... -> ...', ...)]
    """

    graph: EdgeGraph
    scores: torch.Tensor
    method: str
    unpatched: float | torch.Tensor
    samples: PromptSamples | None = None

    def __post_init__(self):
        if not isinstance(self.graph, EdgeGraph):
            raise PatchingError(f"EdgePositionScores needs an EdgeGraph, got {type(self.graph).__name__}.")
        scores = self.scores
        if not isinstance(scores, torch.Tensor) or scores.ndim not in (2, 3) or scores.shape[0] != len(self.graph):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise PatchingError(
                f"EdgePositionScores' scores must be a tensor of shape ({len(self.graph)}, seq_len) or "
                f"({len(self.graph)}, seq_len, batch), one row per edge; got {shape}."
            )
        object.__setattr__(self, "scores", scores.detach())
        if self.samples is not None and self.samples.cell_shape != tuple(scores.shape[:2]):
            raise PatchingError(
                f"EdgePositionScores' samples must hold one cell per edge and position, {tuple(scores.shape[:2])}; "
                f"got cells of shape {self.samples.cell_shape}."
            )

    @property
    def seq_len(self) -> int:
        """The positions scored."""
        return self.scores.shape[1]

    @property
    def per_prompt(self) -> bool:
        """Whether the scores hold one value per prompt."""
        return self.scores.ndim == 3

    @property
    def stderr(self) -> torch.Tensor:
        """Each edge's standard error over prompts at each position, `(n_edges, seq_len)`."""
        if self.samples is None:
            raise PatchingError(
                "stderr needs the per-prompt scores behind these: compute them with attr_edges(..., uncertainty=True)."
            )
        return self.samples.stderr().float()

    def score(self, edge: Edge) -> torch.Tensor:
        """The scores of `edge` at each position: `(seq_len,)`, or `(seq_len, batch)`."""
        return self.scores[self.graph.index(edge)]

    def total(self) -> EdgeScores:
        """The scores summed over positions: each edge's `EdgeScores` (those of `attr_edges`
        without `per_position`), with their per-prompt samples where these were kept."""
        samples = self.samples
        if samples is not None:
            samples = PromptSamples(samples.values.sum(1), samples.offset, samples.scale, samples.baseline)
        return EdgeScores(self.graph, self.scores.sum(1), self.method, self.unpatched, samples)

    def ranked_pairs(self, absolute: bool = True) -> torch.Tensor:
        """Every (edge, position) pair as `edge_index * seq_len + position`, strongest first:
        largest |score| (the mean over prompts for per-prompt scores), or with `absolute=False`
        the most negative; ties keep the graph's order, NaN comes last."""
        values = self.scores.float()
        values = values.mean(2) if values.ndim == 3 else values
        strength = torch.nan_to_num(values.abs() if absolute else -values, nan=-math.inf).flatten()
        return torch.sort(strength, descending=True, stable=True).indices

    def top(self, n: int, absolute: bool = True) -> list[tuple[Edge, int]]:
        """The `n` strongest (edge, position) pairs, strongest first (see `ranked_pairs`)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PatchingError(f"top(n) needs an int n >= 0, got {n!r}.")
        pairs = self.ranked_pairs(absolute)[:n].tolist()
        return [(self.graph.edges[pair // self.seq_len], pair % self.seq_len) for pair in pairs]

    def to_frame(self):
        """A pandas DataFrame, one row per edge and position (and prompt, for per-prompt
        scores): `EdgeScores.to_frame`'s edge columns, `position`, then `batch` for per-prompt
        scores, and `score` (and `stderr` with uncertainty)."""
        edges = EdgeScores(self.graph, torch.zeros(len(self.graph)), self.method, 0.0).to_frame().drop(columns="score")
        repeats = self.seq_len * (self.scores.shape[2] if self.per_prompt else 1)
        frame = edges.loc[edges.index.repeat(repeats)].reset_index(drop=True)
        positions = torch.arange(self.seq_len)
        if self.per_prompt:
            batch = self.scores.shape[2]
            frame["position"] = positions.repeat_interleave(batch).repeat(len(self.graph)).numpy()
            frame["batch"] = torch.arange(batch).repeat(len(self.graph) * self.seq_len).numpy()
        else:
            frame["position"] = positions.repeat(len(self.graph)).numpy()
        frame["score"] = self.scores.float().flatten().numpy()
        if self.samples is not None:
            frame["stderr"] = self.stderr.flatten().numpy()
        return frame

    def __repr__(self) -> str:
        graph = self.graph
        shape = f"{len(graph)} edges x {self.seq_len} positions" + (
            f" x {self.scores.shape[2]} prompts" if self.per_prompt else ""
        )
        strongest = ", ".join(f"{edge} at {position}" for edge, position in self.top(3))
        return f"EdgePositionScores({self.method}: {shape} of a {graph.n_layers}-layer model; strongest: {strongest})"
