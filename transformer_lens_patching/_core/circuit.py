"""Circuits: sets of edges of a model's edge graph, optionally kept at some positions only.

A circuit says which edges carry their orig values; every other edge of the graph carries
its ablated value (`evaluate_circuit`). Types only: nothing here runs a model.
"""

import json
import math
from collections.abc import Iterable, Iterator, Mapping

import torch

from ..errors import PatchingError
from .graph import Edge, EdgeGraph, EdgeScores, GraphNode, ranked_indices
from .position_scores import EdgePositionScores


class Circuit:
    """A set of edges of an `EdgeGraph`, each kept at every position or at some positions only.

    Args:
        graph: The model's edge graph (`EdgeGraph.of(model)`).
        edges: The edges kept: `Edge`s of `graph`.
        positions: Optionally, for some of `edges`, the token positions (ints; negative ones
            count from the end) where they are kept; elsewhere they are removed. Edges not
            listed are kept at every position.

    Circuits compare, hash and print by content. Build them by hand, from edge scores
    (`Circuit.from_scores`), or as `Circuit.full(graph)` / `Circuit.empty(graph)`.

    >>> graph = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=False)
    >>> edge = Edge(GraphNode("head", 1, head=0), GraphNode("logits"))
    >>> circuit = Circuit(graph, [edge, Edge(GraphNode("embed"), GraphNode("head", 1, head=0, input="q"))])
    >>> len(circuit), edge in circuit
    (2, True)
    >>> print(circuit)
    Circuit(2 of 29 edges: embed -> head 1.0 (q), head 1.0 -> logits)
    """

    def __init__(self, graph: EdgeGraph, edges: Iterable[Edge], positions: Mapping[Edge, Iterable[int]] | None = None):
        if not isinstance(graph, EdgeGraph):
            raise PatchingError(f"A Circuit needs the model's EdgeGraph, got {type(graph).__name__}.")
        kept = torch.zeros(len(graph), dtype=torch.bool)
        kept[[graph.index(edge) for edge in edges]] = True
        self._graph, self._kept = graph, kept
        self._positions = self._checked_positions(positions or {})

    @classmethod
    def from_mask(cls, graph: EdgeGraph, kept: torch.Tensor) -> "Circuit":
        """The circuit of the edges where the boolean `kept` (one entry per edge, in the graph's
        order) is True: quicker than listing them, for circuits of many thousand edges.

        >>> Circuit.from_mask(graph, scores.scores.abs() > 0.01)  # doctest: +ELLIPSIS
        Circuit(...)
        """
        if not isinstance(graph, EdgeGraph):
            raise PatchingError(f"A Circuit needs the model's EdgeGraph, got {type(graph).__name__}.")
        if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool or tuple(kept.shape) != (len(graph),):
            shape = tuple(kept.shape) if isinstance(kept, torch.Tensor) else type(kept).__name__
            raise PatchingError(
                f"A circuit's mask must be a bool tensor of shape ({len(graph)},), one entry per edge "
                f"of the graph; got {shape}."
            )
        circuit = cls.__new__(cls)
        circuit._graph, circuit._kept, circuit._positions = graph, kept.detach().cpu().clone(), {}
        return circuit

    def _checked_positions(self, positions: Mapping[Edge, Iterable[int]]) -> dict[Edge, tuple[int, ...]]:
        fixed = {}
        for edge, where in positions.items():
            if edge not in self:
                raise PatchingError(f"positions names {edge}, which is not one of the circuit's edges.")
            where = tuple(sorted(set(where)))
            if not where or not all(isinstance(p, int) and not isinstance(p, bool) for p in where):
                raise PatchingError(f"The positions of {edge} must be a non-empty collection of ints, got {where!r}.")
            fixed[edge] = where
        return fixed

    @classmethod
    def full(cls, graph: EdgeGraph) -> "Circuit":
        """Every edge of `graph`: evaluating it gives the orig run's metric."""
        return cls.from_mask(graph, torch.ones(len(graph), dtype=torch.bool))

    @classmethod
    def empty(cls, graph: EdgeGraph) -> "Circuit":
        """No edge: evaluating it gives the metric of the fully ablated run."""
        return cls.from_mask(graph, torch.zeros(len(graph), dtype=torch.bool))

    @classmethod
    def from_scores(
        cls, scores: EdgeScores | EdgePositionScores, size: int | float, *, absolute: bool = True, prune: bool = True
    ) -> "Circuit":
        """The `size` strongest edges of `scores` (an int: that many edges; a float in (0, 1]:
        that fraction of the graph's edges, rounded down as MIB does), then, with `prune`,
        without the edges that no longer connect the embeddings to the logits.

        Strongest means largest |score| with `absolute`, else most negative score: the edges
        whose ablation lowers the metric most (per-prompt scores count by their mean over
        prompts). Unscored edges (NaN) come last.

        From `EdgePositionScores` (`attr_edges(..., per_position=True)`) the circuit is
        position-aware: the `size` strongest (edge, position) pairs (a float: that fraction of
        every edge at every position), each edge kept at the positions chosen for it. Pruning
        then looks at edges, whatever their positions.

        >>> Circuit.from_scores(scores, 0.01)  # doctest: +ELLIPSIS
        Circuit(...)
        >>> at_positions = attr_edges(model, clean, metric, new_input=corrupted, per_position=True)
        >>> Circuit.from_scores(at_positions, 20, prune=False).positions  # doctest: +ELLIPSIS
        {...}
        """
        if isinstance(scores, EdgePositionScores):
            circuit = cls._at_positions(scores, size, absolute)
            return circuit.pruned() if prune else circuit
        if not isinstance(scores, EdgeScores):
            raise PatchingError(
                "Circuit.from_scores needs EdgeScores or EdgePositionScores (e.g. from attr_edges), "
                f"got {type(scores).__name__}."
            )
        kept = torch.zeros(len(scores.graph), dtype=torch.bool)
        kept[ranked_indices(scores, absolute)[: edge_count(size, len(scores.graph))]] = True
        circuit = cls.from_mask(scores.graph, kept)
        return circuit.pruned() if prune else circuit

    @classmethod
    def _at_positions(cls, scores: EdgePositionScores, size: int | float, absolute: bool) -> "Circuit":
        """The strongest (edge, position) pairs of `scores`, as a circuit keeping each edge at its pairs' positions."""
        graph, seq_len = scores.graph, scores.seq_len
        chosen = scores.ranked_pairs(absolute)[: edge_count(size, len(graph) * seq_len)]
        where: dict[int, list[int]] = {}
        for edge, position in zip((chosen // seq_len).tolist(), (chosen % seq_len).tolist()):
            where.setdefault(edge, []).append(position)
        kept = torch.zeros(len(graph), dtype=torch.bool)
        kept[list(where)] = True
        circuit = cls.from_mask(graph, kept)
        circuit._positions = {
            graph.edges[edge]: tuple(sorted(positions)) for edge, positions in where.items() if len(positions) < seq_len
        }
        return circuit

    @property
    def graph(self) -> EdgeGraph:
        return self._graph

    @property
    def mask(self) -> torch.Tensor:
        """(n_edges,) booleans in the graph's order: True for the kept edges."""
        return self._kept.clone()

    @property
    def edges(self) -> list[Edge]:
        """The kept edges, sorted as in the graph."""
        return [self._graph.edges[i] for i in self._kept.nonzero().flatten().tolist()]

    @property
    def positions(self) -> dict[Edge, tuple[int, ...]]:
        """The edges kept only at some positions, and those positions."""
        return dict(self._positions)

    @property
    def nodes(self) -> list[GraphNode]:
        """The senders and receivers the kept edges join, in forward order."""
        graph = self._graph
        senders = graph.edge_senders[self._kept].unique().tolist()
        receivers = graph.edge_receivers[self._kept].unique().tolist()
        return sorted({graph.senders[i] for i in senders} | {graph.receivers[i] for i in receivers})

    @property
    def heads(self) -> list[tuple[int, int]]:
        """(layer, head) of each attention head whose output is a sender of a kept edge."""
        senders = [self._graph.senders[i] for i in self._graph.edge_senders[self._kept].unique().tolist()]
        return sorted((node.layer, node.head) for node in senders if node.kind == "head")

    def __len__(self) -> int:
        return int(self._kept.sum())

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __contains__(self, edge) -> bool:
        return edge in self._graph and bool(self._kept[self._graph.index(edge)])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return (
            self._graph == other._graph and torch.equal(self._kept, other._kept) and self._positions == other._positions
        )

    def __hash__(self) -> int:
        return hash((self._graph, self._kept.numpy().tobytes(), frozenset(self._positions.items())))

    def pruned(self) -> "Circuit":
        """The circuit without dangling edges: each kept edge's sender is reached from the
        embeddings and its receiver reaches the logits through kept edges.

        A head counts as reached when any of its inputs (q, k, v; on grouped-query models
        its key/value head's k and v) has a kept edge from a reached sender; a key/value
        head's input reaches the logits when any query head that shares it does.
        """
        graph = self._graph
        kept = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.bool)
        kept[graph.edge_senders[self._kept], graph.edge_receivers[self._kept]] = True
        feeds = [[graph.senders.index(node) for node in _writers(r, graph)] for r in graph.receivers]
        reached = torch.zeros(len(graph.senders), dtype=torch.bool)
        reached[0] = True
        for receiver, fed in enumerate(feeds):
            if fed and (kept[:, receiver] & reached).any():
                reached[fed] = True
        useful = torch.zeros(len(graph.receivers), dtype=torch.bool)
        useful[-1] = True
        readers = [[graph.receivers.index(node) for node in _readers(s, graph)] for s in graph.senders]
        for sender in reversed(range(len(graph.senders))):
            if reached[sender] and readers[sender] and (kept[sender] & useful).any():
                useful[readers[sender]] = True
        on_path = reached[graph.edge_senders] & useful[graph.edge_receivers] & self._kept
        circuit = Circuit.from_mask(graph, on_path)
        circuit._positions = {edge: where for edge, where in self._positions.items() if edge in circuit}
        return circuit

    def kept_mask(self, seq_len: int) -> torch.Tensor:
        """(positions, senders, receivers) booleans: True where an edge of the graph is kept;
        positions is 1 unless some edge is kept at some positions only. Pairs that are not
        edges of the graph are True (nothing to remove)."""
        graph = self._graph
        rows = 1 if not self._positions else seq_len
        mask = torch.ones(rows, len(graph.senders), len(graph.receivers), dtype=torch.bool)
        removed = ~self._kept
        mask[:, graph.edge_senders[removed], graph.edge_receivers[removed]] = False
        for edge, where in self._positions.items():
            for position in where:
                if not -seq_len <= position < seq_len:
                    raise PatchingError(
                        f"The circuit keeps {edge} at position {position}, but the prompts have {seq_len} tokens."
                    )
            index = graph.index(edge)
            row, column = int(graph.edge_senders[index]), int(graph.edge_receivers[index])
            mask[:, row, column] = False
            mask[[p % seq_len for p in where], row, column] = True
        return mask

    def to_frame(self, scores: EdgeScores | None = None):
        """A pandas DataFrame, one row per kept edge in the graph's order: `sender`,
        `receiver`, their kinds, layers and heads (as `EdgeScores.to_frame`), `positions`
        (None: every position) and, given `scores`, each edge's `score`."""
        frame = EdgeScores(self._graph, torch.zeros(len(self._graph)), "circuit", 0.0).to_frame()
        indices = [self._graph.index(edge) for edge in self.edges]
        frame = frame.iloc[indices].drop(columns="score").reset_index(drop=True)
        frame["positions"] = [self._positions.get(edge) for edge in self.edges]
        if scores is not None:
            values = scores.scores.float()
            values = values.mean(1) if values.ndim == 2 else values
            frame["score"] = [float(values[i]) for i in indices]
        return frame

    def to_json(self) -> str:
        """The circuit as JSON text (the graph's sizes, the edges' names and their positions);
        `Circuit.from_json` reads it back."""
        return json.dumps(
            {
                "graph": {
                    "n_layers": self._graph.n_layers,
                    "n_heads": self._graph.n_heads,
                    "n_kv_heads": self._graph.n_kv_heads,
                    "has_mlps": self._graph.has_mlps,
                    **({"parallel_attn_mlp": True} if self._graph.parallel_attn_mlp else {}),
                },
                "edges": [str(edge) for edge in self.edges],
                "positions": {str(edge): list(where) for edge, where in sorted(self._positions.items())},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Circuit":
        """Read what `to_json` wrote.

        >>> Circuit.from_json(circuit.to_json()) == circuit
        True
        """
        try:
            data = json.loads(text)
            graph = EdgeGraph(**data["graph"])
            names, positions = data["edges"], data["positions"]
        except (ValueError, KeyError, TypeError) as error:
            raise PatchingError(f"This is not the JSON of Circuit.to_json(): {error!r}.") from None
        _check_json_structure(names, positions)
        by_name = {str(edge): edge for edge in graph}
        unknown = [name for name in [*names, *positions] if name not in by_name]
        if unknown:
            raise PatchingError(f"The JSON names edges its graph does not have, e.g. {unknown[0]!r}.")
        return cls(graph, [by_name[n] for n in names], {by_name[n]: where for n, where in positions.items()})

    def __repr__(self) -> str:
        first = [self._graph.edges[i] for i in self._kept.nonzero().flatten()[:4].tolist()]
        shown = ", ".join(
            str(edge) + (f" at {list(self._positions[edge])}" if edge in self._positions else "") for edge in first
        )
        more = f", ... ({len(self) - 4} more)" if len(self) > 4 else ""
        return f"Circuit({len(self)} of {len(self._graph)} edges" + (f": {shown}{more})" if first else ")")


def _check_json_structure(names: object, positions: object) -> None:
    """Raise a PatchingError unless `edges` is a list of edge names and `positions` maps edge
    names to lists of positions, as `Circuit.to_json` writes them."""
    expected = (
        'Circuit JSON holds "edges", a list of edge names, and "positions", an object from edge '
        'names to lists of positions (e.g. {"embed -> logits": [3, 4]})'
    )
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise PatchingError(f"{expected}; its edges are {names!r}.")
    if not isinstance(positions, dict):
        raise PatchingError(f"{expected}; its positions are {positions!r}.")
    for name, where in positions.items():
        if not isinstance(where, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in where):
            raise PatchingError(f"{expected}; the positions of {name!r} are {where!r}.")


def _writers(receiver: GraphNode, graph: EdgeGraph) -> list[GraphNode]:
    """The senders whose output a receiver's input feeds: its head(s), its MLP, or none."""
    if receiver.kind == "mlp":
        return [receiver]
    if receiver.kind != "head":
        return []
    if not receiver.kv_head:
        return [GraphNode("head", receiver.layer, head=receiver.head)]
    group = graph.n_heads // graph.n_kv_heads
    return [
        GraphNode("head", receiver.layer, head=h) for h in range(receiver.head * group, (receiver.head + 1) * group)
    ]


def _readers(sender: GraphNode, graph: EdgeGraph) -> list[GraphNode]:
    """The receivers that feed a sender's output: a head's q/k/v inputs, an MLP's input."""
    if sender.kind == "mlp":
        return [sender]
    if sender.kind != "head":
        return []
    grouped = graph.n_kv_heads != graph.n_heads
    kv = sender.head // (graph.n_heads // graph.n_kv_heads)
    return [GraphNode("head", sender.layer, head=sender.head, input="q")] + [
        GraphNode("head", sender.layer, head=kv, input=part, kv_head=grouped) for part in ("k", "v")
    ]


def edge_count(size: int | float, n_edges: int) -> int:
    """How many edges a circuit size means: an int is a count, a float a fraction of `n_edges`."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise PatchingError(
            f"A circuit size must be an edge count (int) or a fraction of the edges (float), got {size!r}."
        )
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0 or math.isnan(size):
            raise PatchingError(f"A circuit size given as a fraction must be in [0, 1], got {size}.")
        return int(size * n_edges)
    if not 0 <= size <= n_edges:
        raise PatchingError(f"A circuit size must be between 0 and the graph's {n_edges} edges, got {size}.")
    return size
