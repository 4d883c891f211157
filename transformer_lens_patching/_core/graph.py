"""The model's edge graph: nodes that write to or read from the residual stream, the edges
between them, and a score per edge. Types only: nothing here runs a model.

A transformer's residual stream is a sum, so every component reads the sum of what the
components before it wrote. An edge `sender -> receiver` is one term of that sum at one
reader: the sender's output as it enters the receiver's own input.

- Senders: the embeddings (`embed`: the residual stream entering layer 0), each attention
  head's output (`head L.h`: its z times its rows of W_O) and each MLP's output (`mlp L`).
- Receivers: each head's query, key and value input (`head L.h (q)`; on grouped-query models
  keys and values are read per key/value head: `kv head L.g (k)`), each MLP's input (`mlp L`)
  and the logits (`logits`: the final residual stream).

A sender reaches the receivers that read after it writes: the embeddings reach every
receiver; head L reaches MLP L, every receiver of later layers and the logits; MLP L
reaches the receivers of later layers and the logits.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import total_ordering

import torch

from .. import _stats, _tl
from .._stats import PromptSamples
from ..errors import PatchingError

KINDS = ("embed", "head", "mlp", "logits")
"""The kinds of node of the edge graph."""
INPUTS = ("q", "k", "v")
"""The inputs a head receives at: its query, key and value."""


@total_ordering
@dataclass(frozen=True)
class GraphNode:
    """A sender or receiver of the edge graph.

    Args:
        kind: "embed", "head", "mlp" or "logits".
        layer: The layer of a head or MLP (None for the embeddings and the logits).
        head: The head (None unless `kind == "head"`); a key/value head where `kv_head`.
        input: For a head receiver, the input it reads at: "q", "k" or "v"; None for a head's
            output (a sender) and for every other kind (an MLP is one node: its output as a
            sender, its input as a receiver).
        kv_head: Whether `head` counts key/value heads: the "k" and "v" receivers of a
            grouped-query model, where several query heads share each key and value.

    Nodes compare by content and sort in the order the forward pass reaches them: the
    embeddings, then per layer the heads' inputs (q, k, v), the heads' outputs and the MLP,
    then the logits.

    >>> str(GraphNode("head", 5, head=1, input="q"))
    'head 5.1 (q)'
    >>> str(GraphNode("head", 3, head=1, input="k", kv_head=True))
    'kv head 3.1 (k)'
    >>> sorted([GraphNode("logits"), GraphNode("mlp", 0), GraphNode("embed")])[0]
    GraphNode('embed')
    """

    kind: str
    layer: int | None = None
    head: int | None = None
    input: str | None = None
    kv_head: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PatchingError(f"A GraphNode's kind must be one of {', '.join(map(repr, KINDS))}; got {self.kind!r}.")
        layered = self.kind in ("head", "mlp")
        if layered != _is_index(self.layer):
            need = "a layer (an int >= 0)" if layered else "no layer"
            raise PatchingError(f"A GraphNode of kind {self.kind!r} takes {need}; got layer={self.layer!r}.")
        if (self.kind == "head") != _is_index(self.head):
            need = "a head (an int >= 0)" if self.kind == "head" else "no head"
            raise PatchingError(f"A GraphNode of kind {self.kind!r} takes {need}; got head={self.head!r}.")
        if self.input is not None and (self.kind != "head" or self.input not in INPUTS):
            raise PatchingError(
                f"Only head receivers have an input, one of 'q', 'k', 'v'; got input={self.input!r} "
                f"for kind {self.kind!r}."
            )
        if self.kv_head is not False and (self.kv_head is not True or self.input not in ("k", "v")):
            raise PatchingError(
                f"kv_head=True is for the 'k' and 'v' inputs of a head; got kv_head={self.kv_head!r} "
                f"with input={self.input!r}."
            )

    @property
    def is_sender(self) -> bool:
        """Whether the node writes to the residual stream (embeddings, head outputs, MLPs)."""
        return self.kind in ("embed", "mlp") or (self.kind == "head" and self.input is None)

    @property
    def is_receiver(self) -> bool:
        """Whether the node reads from the residual stream (head inputs, MLPs, logits)."""
        return self.kind in ("mlp", "logits") or self.input is not None

    def _key(self) -> tuple:
        """Where the forward pass reaches this node: (layer, stage, input, head)."""
        if self.kind in ("embed", "logits"):
            return (-1 if self.kind == "embed" else math.inf, 0, 0, 0)
        if self.kind == "mlp":
            return (self.layer, 2, 0, 0)
        return (self.layer, 0 if self.input else 1, INPUTS.index(self.input) if self.input else 0, self.head)

    def __lt__(self, other: "GraphNode") -> bool:
        if not isinstance(other, GraphNode):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind == "mlp":
            return f"mlp {self.layer}"
        name = f"{'kv head' if self.kv_head else 'head'} {self.layer}.{self.head}"
        return f"{name} ({self.input})" if self.input else name

    def __repr__(self) -> str:
        parts = [repr(self.kind)] + ([] if self.layer is None else [str(self.layer)])
        parts += [f"{key}={getattr(self, key)!r}" for key in ("head", "input") if getattr(self, key) is not None]
        return f"GraphNode({', '.join(parts + (['kv_head=True'] if self.kv_head else []))})"


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@total_ordering
@dataclass(frozen=True)
class Edge:
    """One edge of the graph: `sender`'s output as it enters `receiver`'s input.

    Edges compare by content, hash, and sort by sender, then receiver (each in forward order).

    >>> edge = Edge(GraphNode("head", 3, head=2), GraphNode("logits"))
    >>> str(edge)
    'head 3.2 -> logits'
    """

    sender: GraphNode
    receiver: GraphNode

    def __post_init__(self):
        for node, role, ok in ((self.sender, "sender", "is_sender"), (self.receiver, "receiver", "is_receiver")):
            if not isinstance(node, GraphNode) or not getattr(node, ok):
                raise PatchingError(f"{node!r} cannot be the {role} of an edge.")

    def __lt__(self, other: "Edge") -> bool:
        if not isinstance(other, Edge):
            return NotImplemented
        return (self.sender, self.receiver) < (other.sender, other.receiver)

    def __str__(self) -> str:
        return f"{self.sender} -> {self.receiver}"

    def __repr__(self) -> str:
        return f"Edge({self})"


def _reaches(sender: GraphNode, receiver: GraphNode, parallel: bool) -> bool:
    """Whether `sender` writes to the residual stream before `receiver` reads it (in a parallel
    block the MLP reads the layer's input, beside the heads, not after them)."""
    if sender.kind == "embed" or receiver.kind == "logits":
        return True
    if sender.kind == "head":
        same_layer_mlp = receiver.kind == "mlp" and receiver.layer == sender.layer and not parallel
        return receiver.layer > sender.layer or same_layer_mlp
    return receiver.layer > sender.layer


@dataclass(frozen=True)
class EdgeGraph:
    """Every edge of a model, in a fixed order: by sender, then by receiver, each in the order
    the forward pass reaches them (see `GraphNode`). Build it with `EdgeGraph.of(model)`.

    `senders` and `receivers` list the nodes in that order; `index(edge)` is an edge's
    position, which is also its row in an `EdgeScores`' scores.

    In a model whose blocks compute attention and MLP in parallel (GPT-NeoX/Pythia, GPT-J),
    `parallel_attn_mlp` is True and an MLP reads its layer's input: there is no edge from a
    layer's heads to its own MLP.

    >>> graph = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=True)
    >>> len(graph), str(graph.edges[0])
    (46, 'embed -> head 0.0 (q)')
    >>> len(EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=2, has_mlps=True, parallel_attn_mlp=True))
    42
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_mlps: bool
    parallel_attn_mlp: bool = field(default=False, repr=False)
    senders: tuple[GraphNode, ...] = field(init=False, repr=False, compare=False)
    receivers: tuple[GraphNode, ...] = field(init=False, repr=False, compare=False)
    edges: tuple[Edge, ...] = field(init=False, repr=False, compare=False)
    _positions: dict = field(init=False, repr=False, compare=False)
    edge_senders: torch.Tensor = field(init=False, repr=False, compare=False)
    """(n_edges,) each edge's sender, as its index in `senders`."""
    edge_receivers: torch.Tensor = field(init=False, repr=False, compare=False)
    """(n_edges,) each edge's receiver, as its index in `receivers`."""

    def __post_init__(self):
        for name in ("n_layers", "n_heads", "n_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatchingError(f"EdgeGraph's {name} must be an int >= 1, got {value!r}.")
        if self.n_heads % self.n_kv_heads:
            raise PatchingError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")
        grouped = self.n_kv_heads != self.n_heads
        senders, receivers = [GraphNode("embed")], []
        for layer in range(self.n_layers):
            receivers += [GraphNode("head", layer, head=h, input="q") for h in range(self.n_heads)]
            receivers += [
                GraphNode("head", layer, head=h, input=part, kv_head=grouped)
                for part in ("k", "v")
                for h in range(self.n_kv_heads)
            ]
            senders += [GraphNode("head", layer, head=h) for h in range(self.n_heads)]
            if self.has_mlps:
                senders.append(GraphNode("mlp", layer))
                receivers.append(GraphNode("mlp", layer))
        receivers.append(GraphNode("logits"))
        parallel = bool(self.parallel_attn_mlp)
        edges = tuple(Edge(s, r) for s in senders for r in receivers if _reaches(s, r, parallel))
        object.__setattr__(self, "senders", tuple(senders))
        object.__setattr__(self, "receivers", tuple(receivers))
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "_positions", {edge: i for i, edge in enumerate(edges)})
        sender_row = {node: i for i, node in enumerate(senders)}
        receiver_row = {node: i for i, node in enumerate(receivers)}
        object.__setattr__(self, "edge_senders", torch.tensor([sender_row[e.sender] for e in edges]))
        object.__setattr__(self, "edge_receivers", torch.tensor([receiver_row[e.receiver] for e in edges]))

    @classmethod
    def of(cls, model) -> "EdgeGraph":
        """The edge graph of a TransformerLens model.

        >>> EdgeGraph.of(model)
        EdgeGraph(n_layers=4, n_heads=4, n_kv_heads=4, has_mlps=True)
        """
        shape = _tl.model_shape(model)
        return cls(shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.has_mlps, shape.parallel_attn_mlp)

    def __repr__(self) -> str:
        parallel = ", parallel_attn_mlp=True" if self.parallel_attn_mlp else ""
        return (
            f"EdgeGraph(n_layers={self.n_layers}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"has_mlps={self.has_mlps}{parallel})"
        )

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __getitem__(self, index: int) -> Edge:
        return self.edges[index]

    def __contains__(self, edge) -> bool:
        return edge in self._positions

    def index(self, edge: Edge) -> int:
        """The position of `edge` in the graph's order."""
        if edge not in self._positions:
            raise PatchingError(f"{edge!r} is not an edge of {self!r}: {self._why_not(edge)}")
        return self._positions[edge]

    def _why_not(self, edge) -> str:
        if not isinstance(edge, Edge):
            return f"expected an Edge, got {type(edge).__name__}."
        for node, nodes in ((edge.sender, self.senders), (edge.receiver, self.receivers)):
            if node not in nodes:
                return (
                    f"the graph has no node {node!r} (layers 0..{self.n_layers - 1}, {self.n_heads} heads, "
                    f"{self.n_kv_heads} key/value heads{'' if self.has_mlps else ', no MLPs'})."
                )
        if self.parallel_attn_mlp and _reaches(edge.sender, edge.receiver, parallel=False):
            return (
                "this model computes attention and MLP in parallel, so an MLP reads its layer's input, not its heads."
            )
        return "the sender writes after the receiver reads."


@dataclass(frozen=True, eq=False)
class EdgeScores:
    """A score for every edge of an `EdgeGraph`, as `attr_edges` returns.

    Attributes:
        graph: The edges scored.
        scores: `(n_edges,)`, or `(n_edges, batch)` for a per-prompt metric: each edge's
            estimated change of the metric, row `graph.index(edge)`.
        method: How the scores were estimated ("atp" or "ig").
        unpatched: The metric on the orig run (a number, or one per prompt).
        samples: With `attr_edges(..., uncertainty=True)`, the per-prompt scores behind each
            edge's (then `stderr`, `ci`, `p_values`, `significant` and `top_stability` work,
            and `circuit_stability`); None otherwise.

    >>> scores = attr_edges(model, corrupted, metric, new_input=clean)
    >>> [str(edge) for edge in scores.top(3)]  # doctest: +ELLIPSIS
    ['... -> ...', '... -> ...', '... -> ...']
    >>> list(scores.to_frame().columns)  # doctest: +ELLIPSIS
    ['sender', 'receiver', 'sender_kind', ..., 'kv_head', 'score']
    """

    graph: EdgeGraph
    scores: torch.Tensor
    method: str
    unpatched: float | torch.Tensor
    samples: PromptSamples | None = None

    def __post_init__(self):
        if not isinstance(self.graph, EdgeGraph):
            raise PatchingError(f"EdgeScores needs an EdgeGraph, got {type(self.graph).__name__}.")
        scores = self.scores
        if not isinstance(scores, torch.Tensor) or scores.ndim not in (1, 2) or scores.shape[0] != len(self.graph):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise PatchingError(
                f"EdgeScores' scores must be a tensor of shape ({len(self.graph)},) or "
                f"({len(self.graph)}, batch), one row per edge; got {shape}."
            )
        object.__setattr__(self, "scores", scores.detach())
        if self.samples is not None and self.samples.cell_shape != (len(self.graph),):
            raise PatchingError(
                f"EdgeScores' samples must hold one row per edge, ({len(self.graph)}, prompts); "
                f"got cells of shape {self.samples.cell_shape}."
            )

    def _uncertain(self, what: str) -> PromptSamples:
        if self.samples is None:
            raise PatchingError(
                f"{what} needs the per-prompt scores behind these: compute them with attr_edges(..., uncertainty=True)."
            )
        return self.samples

    @property
    def stderr(self) -> torch.Tensor:
        """Each edge's standard error over prompts, `(n_edges,)` (see `PatchResult.stderr`)."""
        return self._uncertain("stderr").stderr().float()

    def ci(self, level: float = 0.95, method: str = "bootstrap", *, n_resamples: int = 2000, seed: int = 0):
        """Each edge's confidence interval, `(low, high)` of `(n_edges,)` (see `PatchResult.ci`)."""
        low, high = self._uncertain("ci").ci(level, method, n_resamples, seed)
        return low.float(), high.float()

    def p_values(self, *, test: str = "sign_flip", n_permutations: int = 10000, seed: int = 0) -> torch.Tensor:
        """Each edge's two-sided sign-flip p-value that removing it changes the metric by 0."""
        return self._uncertain("p_values").p_values(n_permutations, seed, test).float()

    def significant(
        self,
        alpha: float = 0.05,
        correction: str | None = "fdr_bh",
        *,
        test: str = "sign_flip",
        n_permutations: int = 10000,
        seed: int = 0,
    ) -> torch.Tensor:
        """Which edges' scores differ from 0 significantly, `(n_edges,)` booleans, corrected over
        every edge (see `PatchResult.significant`)."""
        p_values = self._uncertain("significant").p_values(n_permutations, seed, test)
        return _stats.significant(p_values, alpha, correction)

    def top_stability(self, k: int, *, absolute: bool = True, n_resamples: int = 200, seed: int = 0) -> torch.Tensor:
        """How stable the top `k` is: for each edge, the fraction of `n_resamples` bootstrap
        resamples of the prompts in whose scores it ranks among the `k` strongest, `(n_edges,)`.
        An edge of `top(k)` near 1 is there whichever prompts are drawn; near k / n_edges, by chance.

        >>> kept = attr_edges(model, clean, metric, new_input=corrupted, uncertainty=True)
        >>> frequency = kept.top_stability(20)
        >>> [round(float(frequency[kept.graph.index(edge)]), 2) for edge in kept.top(3)]  # doctest: +ELLIPSIS
        [...]
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= len(self.graph):
            raise PatchingError(f"k must be a whole number from 1 to {len(self.graph)}, got {k!r}.")
        resampled = self._uncertain("top_stability").bootstrap(n_resamples, seed)
        return _stats.top_k_frequency(resampled.abs() if absolute else -resampled, k).float()

    @property
    def per_prompt(self) -> bool:
        """Whether the scores hold one value per prompt."""
        return self.scores.ndim == 2

    def score(self, edge: Edge) -> torch.Tensor:
        """The score of `edge`: a 0-d tensor, or `(batch,)` for a per-prompt metric."""
        return self.scores[self.graph.index(edge)]

    def top(self, n: int, absolute: bool = True) -> list[Edge]:
        """The `n` strongest edges, strongest first: largest |score| (for per-prompt scores,
        of the mean over prompts), or with `absolute=False` the most negative scores; ties
        keep the graph's order and unscored edges (NaN) come last."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PatchingError(f"top(n) needs an int n >= 0, got {n!r}.")
        return ranked_edges(self, absolute)[:n]

    def to_frame(self):
        """A pandas DataFrame, one row per edge (per edge and prompt for per-prompt scores):
        `sender`, `receiver` (their names), `sender_kind`, `sender_layer`, `sender_head`,
        `receiver_kind`, `receiver_layer`, `receiver_head`, `receiver_input`, `kv_head`
        (whether `receiver_head` counts key/value heads), then `batch` for per-prompt
        scores, and `score` (and `stderr` for scores computed with uncertainty). Layers and
        heads are pandas' nullable integers."""
        import pandas as pd

        edges = self.graph.edges
        columns = {
            "sender": [str(e.sender) for e in edges],
            "receiver": [str(e.receiver) for e in edges],
            "sender_kind": [e.sender.kind for e in edges],
            "sender_layer": pd.array([e.sender.layer for e in edges], dtype="Int64"),
            "sender_head": pd.array([e.sender.head for e in edges], dtype="Int64"),
            "receiver_kind": [e.receiver.kind for e in edges],
            "receiver_layer": pd.array([e.receiver.layer for e in edges], dtype="Int64"),
            "receiver_head": pd.array([e.receiver.head for e in edges], dtype="Int64"),
            "receiver_input": [e.receiver.input for e in edges],
            "kv_head": [e.receiver.kv_head for e in edges],
        }
        frame = pd.DataFrame(columns)
        values = self.scores.float().cpu()
        if self.samples is not None:
            spread = self.stderr if self.samples.n > 1 else torch.full(values.shape, float("nan"))
            return frame.assign(score=values.numpy(), stderr=spread.numpy())
        if not self.per_prompt:
            return frame.assign(score=values.numpy())
        batch = values.shape[1]
        frame = frame.loc[frame.index.repeat(batch)].reset_index(drop=True)
        return frame.assign(batch=list(range(batch)) * len(edges), score=values.flatten().numpy())

    def to_json(self) -> str:
        """The scores as JSON text: the graph's sizes, the method, the unpatched metric, the
        edges' names and their scores, in the graph's order. `EdgeScores.from_json` reads it
        back exactly."""
        unpatched = self.unpatched.tolist() if isinstance(self.unpatched, torch.Tensor) else self.unpatched
        return json.dumps(
            {
                "graph": {
                    "n_layers": self.graph.n_layers,
                    "n_heads": self.graph.n_heads,
                    "n_kv_heads": self.graph.n_kv_heads,
                    "has_mlps": self.graph.has_mlps,
                },
                "method": self.method,
                "unpatched": unpatched,
                "unpatched_dtype": _dtype_name(self.unpatched) if isinstance(self.unpatched, torch.Tensor) else None,
                "dtype": _dtype_name(self.scores),
                "edges": [str(edge) for edge in self.graph.edges],
                "scores": self.scores.cpu().tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "EdgeScores":
        """Read what `to_json` wrote.

        >>> EdgeScores.from_json(scores.to_json()).top(5) == scores.top(5)
        True
        """
        try:
            data = json.loads(text)
            graph = EdgeGraph(**data["graph"])
            scores = torch.tensor(data["scores"], dtype=_dtype(data["dtype"]))
            unpatched, unpatched_dtype = data["unpatched"], data["unpatched_dtype"]
            if unpatched_dtype is not None:
                unpatched = torch.tensor(unpatched, dtype=_dtype(unpatched_dtype))
            names, method = data["edges"], data["method"]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise PatchingError(f"This is not the JSON of EdgeScores.to_json(): {error!r}.") from None
        if names != [str(edge) for edge in graph.edges]:
            raise PatchingError(
                "The JSON's edges are not those of its graph, in its order: it was not written by "
                "EdgeScores.to_json(), or was changed since."
            )
        return cls(graph, scores, method, unpatched)

    def __repr__(self) -> str:
        graph = self.graph
        shape = f"{len(graph)} edges" + (f" x {self.scores.shape[1]} prompts" if self.per_prompt else "")
        unpatched = self.unpatched
        if isinstance(unpatched, torch.Tensor):
            unpatched = unpatched.float().mean().item() if unpatched.ndim else unpatched.item()
        strongest = ", ".join(f"{edge} {float(self._mean(edge)):+.4g}" for edge in self.top(3))
        return (
            f"EdgeScores({self.method}: {shape} of a {graph.n_layers}-layer model; unpatched metric "
            f"{unpatched:.4g}{' (mean)' if self.per_prompt else ''}; strongest: {strongest})"
        )

    def _mean(self, edge: Edge) -> torch.Tensor:
        score = self.score(edge)
        return score.float().mean() if self.per_prompt else score


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unknown dtype {name!r}")
    return dtype


def ranked_edges(scores: EdgeScores, absolute: bool = True) -> list[Edge]:
    """Every edge of `scores`, strongest first (see `EdgeScores.top`)."""
    return [scores.graph.edges[i] for i in ranked_indices(scores, absolute).tolist()]


def ranked_indices(scores: EdgeScores, absolute: bool = True) -> torch.Tensor:
    """The graph positions of `ranked_edges`."""
    values = scores.scores.float()
    values = values.mean(1) if values.ndim == 2 else values
    strength = torch.nan_to_num(values.abs() if absolute else -values, nan=-math.inf)
    return torch.sort(strength, descending=True, stable=True).indices
