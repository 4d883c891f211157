"""Exchange formats: EAP-IG's graph JSON and MIB's circuit-track submission folders. Types and
files only: nothing here runs a model.

EAP-IG (`eap.graph.Graph.to_json` / `from_json`) writes a graph as one JSON object:

- `"cfg"`: `n_layers`, `n_heads`, `parallel_attn_mlp` and `d_model`;
- `"nodes"`: each node's name to `{"in_graph": bool}` (`input`, `a{layer}.h{head}`, `m{layer}`,
  `logits`);
- `"edges"`: each edge's name to `{"score": float, "in_graph": bool}`, named `parent->child`, with
  `<q>`, `<k>` or `<v>` after a head child (`input->a0.h0<q>`, `a0.h0->m0`, `m11->logits`).

Its nodes are this library's senders (`input` is `embed`, `a{L}.h{h}` is `head L.h`, `m{L}` is
`mlp L`) and its children its receivers, so each edge of `EdgeGraph` has exactly one name there,
with two exceptions:

- Grouped-query attention: EAP-IG works on the ungrouped model (`ungroup_grouped_query_attention`),
  so every query head has its own `<k>` and `<v>` inputs, where this graph has one per key/value
  head (`kv head L.g (k)`). An edge into a key/value head is written as the same edge into each
  query head of its group (same score, same membership), and read back only when those agree:
  a file that scores or keeps them differently describes what this graph cannot, and is refused.
- Features EAP-IG's graph lacks are refused: a model without MLPs (EAP-IG has `m{L}` in every
  layer), a circuit that keeps an edge at some positions only, and a neuron-level file.

MIB's circuit track (Mueller et al. 2025) takes one folder per task and model, named
`{task}_{model}` with the task's underscores as hyphens (`ioi_gpt2`, `arc-easy_llama3`), holding
either one file of importance scores (`importances.json`, as MIB's `run_attribution.py` writes
it) or nine circuits of at most 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20% and 50% of the edges
(`MIB_CIRCUIT_FRACTIONS`), each in EAP-IG's JSON.
"""

import difflib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import PatchingError
from .circuit import Circuit
from .graph import EdgeGraph, EdgeScores, GraphNode, ranked_indices

MIB_CIRCUIT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""The sizes of MIB's nine submitted circuits: the most edges each may keep, as fractions of
EAP-IG's graph (MIB's curve fractions, `MIB_FRACTIONS`, but the full graph)."""

IMPORTANCES_FILE = "importances.json"
"""The name MIB's own attribution script gives a folder's importance file."""

_KEYS = ("cfg", "nodes", "edges")


@dataclass(frozen=True)
class _Layout:
    """A graph's edges as EAP-IG names and orders them."""

    names: tuple[str, ...]
    """Every EAP-IG edge name, in the order EAP-IG's `Graph.from_model` adds them."""
    rows: torch.Tensor
    """(n_names,) each name's edge, as its index in the EdgeGraph."""
    first: torch.Tensor
    """(n_edges,) each EdgeGraph edge's first name, as its index in `names`."""
    position: dict
    """Each name's index in `names`."""
    nodes: tuple[str, ...]
    """EAP-IG's node names in its order: `input`, per layer the heads then the MLP, `logits`."""
    parents: torch.Tensor
    """(n_names,) each name's parent, as its index in `nodes`."""
    children: torch.Tensor
    """(n_names,) each name's child node (the head, for a q/k/v input), as its index in `nodes`."""


def _sender_name(node: GraphNode) -> str:
    if node.kind == "embed":
        return "input"
    return f"m{node.layer}" if node.kind == "mlp" else f"a{node.layer}.h{node.head}"


def _check_expressible(graph: EdgeGraph) -> None:
    if not isinstance(graph, EdgeGraph):
        raise PatchingError(f"EAP-IG's format needs the model's EdgeGraph, got {type(graph).__name__}.")
    if not graph.has_mlps:
        raise PatchingError(
            "EAP-IG's graph has an MLP node in every layer (m0, m1, ...), but this model has no MLPs "
            f"({graph!r}): its edge graph has no EAP-IG form."
        )


def _head_input(layer: int, head: int, part: str, group: int) -> GraphNode:
    """The receiver of EAP-IG's `a{layer}.h{head}<{part}>`: a query head's q input, or its key/value
    head's k or v input (a query head of its own without grouped-query attention)."""
    if part == "q" or group == 1:
        return GraphNode("head", layer, head=head, input=part)
    return GraphNode("head", layer, head=head // group, input=part, kv_head=True)


@lru_cache(maxsize=4)
def _layout(graph: EdgeGraph) -> _Layout:
    """EAP-IG's names of `graph`'s edges, in the order of EAP-IG's `Graph.from_model`: per layer,
    the edges from every earlier sender into each head's q, k and v, then those into the MLP (in a
    parallel block, each sender's MLP edge right after its head edges); last, the logits' edges."""
    _check_expressible(graph)
    group = graph.n_heads // graph.n_kv_heads
    sender_row = {node: i for i, node in enumerate(graph.senders)}
    receiver_row = {node: i for i, node in enumerate(graph.receivers)}
    table = torch.full((len(graph.senders), len(graph.receivers)), -1, dtype=torch.long)
    table[graph.edge_senders, graph.edge_receivers] = torch.arange(len(graph))
    names, pairs, children = [], [], []
    logits_node = len(graph.senders)

    def add(sender: GraphNode, child_name: str, receiver: GraphNode, child: int) -> None:
        names.append(f"{_sender_name(sender)}->{child_name}")
        pairs.append((sender_row[sender], receiver_row[receiver]))
        children.append(child)

    stream = [GraphNode("embed")]
    for layer in range(graph.n_layers):
        heads = [GraphNode("head", layer, head=h) for h in range(graph.n_heads)]
        mlp = GraphNode("mlp", layer)
        inputs = [
            (f"a{layer}.h{h}<{part}>", _head_input(layer, h, part, group), sender_row[heads[h]])
            for h in range(graph.n_heads)
            for part in "qkv"
        ]
        for sender in stream:
            for child_name, receiver, child in inputs:
                add(sender, child_name, receiver, child)
            if graph.parallel_attn_mlp:
                add(sender, f"m{layer}", mlp, sender_row[mlp])
        stream += heads
        if not graph.parallel_attn_mlp:
            for sender in stream:
                add(sender, f"m{layer}", mlp, sender_row[mlp])
        stream.append(mlp)
    for sender in stream:
        add(sender, "logits", GraphNode("logits"), logits_node)
    pair_tensor = torch.tensor(pairs, dtype=torch.long)
    rows = table[pair_tensor[:, 0], pair_tensor[:, 1]]
    if not (rows >= 0).all() or torch.bincount(rows, minlength=len(graph)).min() < 1:
        raise PatchingError(
            "This model's edge graph and EAP-IG's do not match edge for edge (an edge one of them has, the other "
            "lacks), so its edges cannot be written or read in EAP-IG's format."
        )
    first = torch.full((len(graph),), len(names), dtype=torch.long)
    first.scatter_reduce_(0, rows, torch.arange(len(names)), reduce="amin")
    return _Layout(
        names=tuple(names),
        rows=rows,
        first=first,
        position={name: i for i, name in enumerate(names)},
        nodes=tuple(_sender_name(node) for node in graph.senders) + ("logits",),
        parents=pair_tensor[:, 0],
        children=torch.tensor(children, dtype=torch.long),
    )


def _eap_ig_edge_count(graph: EdgeGraph) -> torch.Tensor:
    """(n_edges,) how many EAP-IG edges each edge of `graph` is (1; a query-head group's size for
    an edge into a key/value head)."""
    return torch.bincount(_layout(graph).rows, minlength=len(graph))


def _checked_d_model(d_model) -> int:
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise PatchingError(
            f"EAP-IG's cfg records the model's d_model (its loader needs it): pass d_model=model.cfg.d_model, "
            f"an int >= 1; got {d_model!r}."
        )
    return d_model


def _score_values(scores: EdgeScores, graph: EdgeGraph) -> torch.Tensor:
    if not isinstance(scores, EdgeScores):
        raise PatchingError(f"scores must be EdgeScores (e.g. from attr_edges), got {type(scores).__name__}.")
    if scores.graph != graph:
        raise PatchingError(f"The scores are of {scores.graph!r}, the circuit of {graph!r}: they must share a graph.")
    if scores.per_prompt:
        raise PatchingError(
            "EAP-IG's JSON holds one score per edge, and these scores hold one per prompt: average them first, "
            "e.g. EdgeScores(scores.graph, scores.scores.mean(1), scores.method, scores.unpatched)."
        )
    return scores.scores.detach().cpu()


def _check_whole_positions(circuit: Circuit) -> None:
    if circuit.positions:
        edge, where = next(iter(sorted(circuit.positions.items())))
        raise PatchingError(
            f"The circuit keeps {edge} at positions {list(where)} only, and EAP-IG's and MIB's edges are kept at "
            "every position or none: a position-specific circuit has no EAP-IG form."
        )


def _eap_ig_dict(graph: EdgeGraph, d_model: int, values: torch.Tensor | None, kept: torch.Tensor | None) -> dict:
    """EAP-IG's JSON object of `graph`: each edge's score (if `values`) and membership (`kept`, or none)."""
    layout = _layout(graph)
    kept_names = torch.zeros(len(layout.names), dtype=torch.bool) if kept is None else kept[layout.rows]
    has_out = torch.zeros(len(layout.nodes), dtype=torch.bool)
    has_in = torch.zeros(len(layout.nodes), dtype=torch.bool)
    has_out[layout.parents[kept_names]] = True
    has_in[layout.children[kept_names]] = True
    has_in[0] = True  # EAP-IG counts the input as fed
    node_in = (has_out & has_in).tolist()
    node_in[-1] = True  # EAP-IG's logits are always in the graph
    memberships = kept_names.tolist()
    if values is None:
        edges = {name: {"in_graph": member} for name, member in zip(layout.names, memberships)}
    else:
        named = values[layout.rows].double().tolist()
        edges = {
            name: {"score": value, "in_graph": member} for name, value, member in zip(layout.names, named, memberships)
        }
    return {
        "cfg": {
            "n_layers": graph.n_layers,
            "n_heads": graph.n_heads,
            "parallel_attn_mlp": bool(graph.parallel_attn_mlp),
            "d_model": d_model,
        },
        "nodes": {name: {"in_graph": member} for name, member in zip(layout.nodes, node_in)},
        "edges": edges,
    }


def to_eap_ig_json(what: EdgeScores | Circuit, *, d_model: int, scores: EdgeScores | None = None) -> str:
    """`what` as EAP-IG's graph JSON (`eap.graph.Graph.from_json` reads it; so do
    `eap_ig_scores` and `eap_ig_circuit`, exactly).

    Edge scores give every edge its score, none in the graph (as EAP-IG's attribution leaves
    them); a circuit gives every edge its membership (`in_graph`), each node EAP-IG's (a parent
    of a kept edge that a kept edge feeds), and, with `scores`, the edges' scores too. The edges
    come in EAP-IG's order, so the text matches EAP-IG's own `to_json` of the same graph.

    Args:
        what: `EdgeScores` (one score per edge) or a `Circuit` (kept at every position).
        d_model: The model's `d_model` (`model.cfg.d_model`), which EAP-IG's cfg records.
        scores: For a circuit, optionally the scores to write beside its memberships.

    On a grouped-query model each edge into a key/value head becomes one edge into each query
    head of its group (see the module's notes); an attention-only model is refused.

    >>> text = to_eap_ig_json(scores, d_model=model.cfg.d_model)
    >>> list(json.loads(text)["edges"])[:2]
    ['input->a0.h0<q>', 'input->a0.h0<k>']
    >>> eap_ig_scores(text, graph).top(5) == scores.top(5)
    True
    """
    d_model = _checked_d_model(d_model)
    if isinstance(what, EdgeScores):
        if scores is not None:
            raise PatchingError("scores= is for a circuit; the EdgeScores given are written with their own scores.")
        _check_expressible(what.graph)
        return json.dumps(_eap_ig_dict(what.graph, d_model, _score_values(what, what.graph), None))
    if not isinstance(what, Circuit):
        raise PatchingError(f"to_eap_ig_json writes EdgeScores or a Circuit, got {type(what).__name__}.")
    _check_expressible(what.graph)
    _check_whole_positions(what)
    values = None if scores is None else _score_values(scores, what.graph)
    return json.dumps(_eap_ig_dict(what.graph, d_model, values, what.mask))


def _parsed(text, graph: EdgeGraph) -> dict:
    """The JSON object of EAP-IG's graph JSON `text`, checked against `graph`."""
    _check_expressible(graph)
    if not isinstance(text, (str, bytes, bytearray)):
        raise PatchingError(f"Pass EAP-IG's graph JSON as text (Path(file).read_text()), got {type(text).__name__}.")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise PatchingError(f"This is not JSON, so not EAP-IG's graph JSON: {error}.") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), dict) for key in _KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise PatchingError(
            "EAP-IG's graph JSON (Graph.to_json) is an object with the objects 'cfg', 'nodes' and 'edges'; "
            f"this has {found}."
        )
    cfg = data["cfg"]
    theirs = (cfg.get("n_layers"), cfg.get("n_heads"), bool(cfg.get("parallel_attn_mlp", False)))
    ours = (graph.n_layers, graph.n_heads, bool(graph.parallel_attn_mlp))
    if theirs != ours:
        raise PatchingError(
            f"The JSON is of a model with n_layers={theirs[0]!r}, n_heads={theirs[1]!r}, parallel_attn_mlp="
            f"{theirs[2]} (its cfg), and the graph given has n_layers={ours[0]}, n_heads={ours[1]}, "
            f"parallel_attn_mlp={ours[2]}: read it with the EdgeGraph of the model it was made for."
        )
    for name, node in data["nodes"].items():
        neurons = node.get("neurons") if isinstance(node, dict) else None
        if neurons is not None and not (isinstance(neurons, list) and all(member == 1 for member in neurons)):
            raise PatchingError(
                f"The JSON's node {name!r} is in the graph with some of its neurons only: a neuron-level circuit, "
                "which an edge circuit here cannot express."
            )
    return data


def _most_like(word: str, options) -> str:
    """The option most like `word` (difflib's ratio), the first of equals."""
    return max(options, key=lambda option: difflib.SequenceMatcher(None, word, option).ratio(), default="")


def _closest_name(name: str, layout: _Layout, graph: EdgeGraph) -> str | None:
    """The valid edge name most like `name`: EAP-IG's name of an edge named as this library names
    it; else its parent and child each fixed to the closest node name (`embed` read as `input`),
    and failing that the closest edge into the same child (or out of the same parent)."""
    ours = {str(edge): layout.names[int(first)] for edge, first in zip(graph.edges, layout.first)}
    if " ".join(name.split()) in ours:
        return ours[" ".join(name.split())]
    parent, arrow, child = name.partition("->")
    if not arrow:
        return None
    parent = "input" if parent == "embed" else parent
    parents = layout.nodes[:-1]
    children = list(dict.fromkeys(n.partition("->")[2] for n in layout.names))
    best_parent = parent if parent in parents else _most_like(parent, parents)
    best_child = child if child in children else _most_like(child, children)
    guess = f"{best_parent}->{best_child}"
    if guess in layout.position:
        return guess
    pool = [n for n in layout.names if n.endswith("->" + best_child)]
    return _most_like(name, pool or [n for n in layout.names if n.startswith(best_parent + "->")]) or None


def _named_values(data: dict, graph: EdgeGraph, key: str) -> torch.Tensor:
    """(n_edges,) each edge's `key` ("score" or "in_graph") from the JSON's edges, as EAP-IG's loader
    reads them (an edge the JSON leaves out has score 0 and is not in the graph), refusing unknown
    names and query heads of one key/value group that disagree."""
    layout = _layout(graph)
    is_score = key == "score"
    named = torch.zeros(len(layout.names), dtype=torch.float64 if is_score else torch.bool)
    positions, values = [], []
    expected = '{"score": <a number>, "in_graph": <true or false>}'
    for name, info in data["edges"].items():
        position = layout.position.get(name)
        if position is None:
            closest = _closest_name(name, layout, graph)
            hint = (
                f"the closest valid name is {closest!r}"
                if closest
                else f"names are 'parent->child', e.g. {layout.names[0]!r}"
            )
            raise PatchingError(
                f"The JSON names the edge {name!r}, which the EAP-IG graph of {graph!r} does not have: {hint}."
            )
        value = info.get(key) if isinstance(info, dict) else None
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) if is_score else isinstance(value, bool)
        if not valid:
            raise PatchingError(f"The JSON's edge {name!r} is {info!r}; EAP-IG writes each edge as {expected}.")
        positions.append(position)
        values.append(value)
    if positions:
        named[torch.tensor(positions)] = torch.tensor(values, dtype=named.dtype)
    mine = named[layout.first]
    differs = named != mine[layout.rows]
    if is_score:
        differs &= ~(torch.isnan(named) & torch.isnan(mine[layout.rows]))
    if differs.any():
        position = int(differs.nonzero()[0])
        row = int(layout.rows[position])
        first = layout.names[int(layout.first[row])]
        what = "scores" if is_score else "memberships (in_graph)"
        raise PatchingError(
            f"The JSON gives {first!r} and {layout.names[position]!r} different {what} "
            f"({named[layout.first[row]].item()!r} and {named[position].item()!r}); on this grouped-query model "
            f"both are one edge, {graph.edges[row]}, as the query heads of a group share their key/value "
            "head's input. A file of EAP-IG's ungrouped graph that tells them apart cannot be read exactly here."
        )
    return mine


def eap_ig_scores(text: str | bytes, graph: EdgeGraph, *, dtype: torch.dtype = torch.float32) -> EdgeScores:
    """The edge scores of EAP-IG's graph JSON, for ranking and circuits here (`Circuit.from_scores`,
    `faithfulness_curve`). Every edge the JSON lists needs a `score`; one it leaves out scores 0,
    as in EAP-IG's loader. Memberships (`in_graph`) and node entries are ignored.

    Args:
        text: The JSON (`Path(file).read_text()`), written by EAP-IG's `Graph.to_json` or
            `to_eap_ig_json`.
        graph: The model's edge graph (`EdgeGraph.of(model)`); its layers and heads must be the JSON's.
        dtype: The scores' dtype. EAP-IG's are float32, whose JSON values read back exactly; pass the
            dtype of scores written in another.

    The scores' method is "imported" and their unpatched metric NaN (EAP-IG's JSON records neither).
    A name that is not an edge of the graph is refused, with the closest valid one, and so is a
    node-level file (scored nodes).

    >>> eap_ig_scores(to_eap_ig_json(scores, d_model=64), graph).top(5) == scores.top(5)
    True
    """
    data = _parsed(text, graph)
    for name, node in data["nodes"].items():
        score = node.get("score") if isinstance(node, dict) else None
        if isinstance(score, (int, float)) and not math.isnan(score):
            raise PatchingError(
                f"The JSON scores its nodes (e.g. {name!r}): a node-level attribution, and these are edge scores. "
                "Its circuit, the edges marked in_graph, reads with eap_ig_circuit."
            )
    values = _named_values(data, graph, "score")
    return EdgeScores(graph, values.to(dtype), "imported", math.nan)


def eap_ig_circuit(text: str | bytes, graph: EdgeGraph) -> Circuit:
    """The circuit of EAP-IG's graph JSON: the edges it marks `in_graph` (one it leaves out is not),
    to evaluate here exactly (`evaluate_circuit`). EAP-IG's evaluation prunes a circuit first; for
    the same circuit, evaluate `eap_ig_circuit(...).pruned()`.

    Args:
        text: The JSON, written by EAP-IG's `Graph.to_json` or `to_eap_ig_json` (also a MIB circuit).
        graph: The model's edge graph (`EdgeGraph.of(model)`); its layers and heads must be the JSON's.

    Scores and node entries are ignored (EAP-IG's evaluation reads edges only); a neuron-level
    circuit is refused, as is a name that is not an edge of the graph (with the closest valid one).

    >>> eap_ig_circuit(to_eap_ig_json(circuit, d_model=64), graph) == circuit
    True
    """
    data = _parsed(text, graph)
    return Circuit.from_mask(graph, _named_values(data, graph, "in_graph"))


def _task_folder(task, model) -> str:
    for what, name in (("task", task), ("model", model)):
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\") or name in (".", ".."):
            raise PatchingError(f"MIB's {what} must be a name such as 'ioi' or 'gpt2' (no path), got {name!r}.")
    if "_" in model:
        raise PatchingError(
            f"MIB names a folder '{{task}}_{{model}}', split at its first underscore, so the model's name cannot have "
            f"one; got {model!r} (MIB's models: gpt2, qwen2.5, gemma2, llama3, interpbench)."
        )
    return f"{task.replace('_', '-')}_{model}"


def _mib_circuits_from_scores(scores: EdgeScores, absolute: bool) -> list[Circuit]:
    """MIB's nine circuits of `scores`: at each fraction the strongest edges that fit its budget of
    EAP-IG edges (`int(fraction * edges)`, as MIB counts), pruned. Without grouped-query attention
    these are `Circuit.from_scores(scores, fraction, absolute=absolute)`."""
    graph = scores.graph
    counts = _eap_ig_edge_count(graph)
    ranked = ranked_indices(scores, absolute)
    spent = torch.cumsum(counts[ranked], 0)
    circuits = []
    for fraction in MIB_CIRCUIT_FRACTIONS:
        kept = torch.zeros(len(graph), dtype=torch.bool)
        kept[ranked[: int((spent <= int(fraction * int(counts.sum()))).sum())]] = True
        circuits.append(Circuit.from_mask(graph, kept).pruned())
    return circuits


def _checked_mib_circuits(circuits) -> list[Circuit]:
    circuits = list(circuits)
    if len(circuits) != len(MIB_CIRCUIT_FRACTIONS) or not all(isinstance(c, Circuit) for c in circuits):
        raise PatchingError(
            f"MIB takes {len(MIB_CIRCUIT_FRACTIONS)} circuits per task and model, smallest first, of at most "
            f"{', '.join(f'{f:.1%}' for f in MIB_CIRCUIT_FRACTIONS)} of the edges; got "
            f"{len(circuits)} {'circuits' if all(isinstance(c, Circuit) for c in circuits) else 'values'}."
        )
    graph = circuits[0].graph
    _check_expressible(graph)
    counts = _eap_ig_edge_count(graph)
    total = int(counts.sum())
    for i, (circuit, fraction) in enumerate(zip(circuits, MIB_CIRCUIT_FRACTIONS)):
        if circuit.graph != graph:
            raise PatchingError(f"MIB's circuits must share one graph; circuit {i} is of {circuit.graph!r}.")
        _check_whole_positions(circuit)
        size, budget = int(counts[circuit.mask].sum()), int(fraction * total)
        if size > budget:
            raise PatchingError(
                f"MIB's circuit {i} may keep at most {fraction:.1%} of EAP-IG's {total} edges, {budget}; this one "
                f"keeps {size}. Pass the circuits smallest first, each within its size."
            )
    return circuits


def write_mib_submission(
    folder: str | os.PathLike,
    what: EdgeScores | Sequence[Circuit],
    *,
    task: str,
    model: str,
    d_model: int,
    kind: str | None = None,
    absolute: bool = True,
) -> Path:
    """Write one task and model of a MIB circuit-track submission: the folder `{task}_{model}`
    under `folder` (the task's underscores as hyphens: `ioi_gpt2`, `arc-easy_llama3`), holding
    either an importance file or nine circuits, each in EAP-IG's JSON (`to_eap_ig_json`).

    Args:
        folder: The submission's folder (one per method), created if needed.
        what: Edge scores, or MIB's nine circuits (smallest first, the i-th keeping at most
            `MIB_CIRCUIT_FRACTIONS[i]` of EAP-IG's edges).
        task: MIB's task (ioi, mcqa, arithmetic_addition, arithmetic_subtraction, arc_easy,
            arc_challenge).
        model: MIB's model (gpt2, qwen2.5, gemma2, llama3, interpbench).
        d_model: The model's `d_model` (`model.cfg.d_model`), which EAP-IG's cfg records.
        kind: "importance" (scores only: `importances.json`, which MIB ranks itself) or "circuits"
            (nine files `{task}_{model}_{fraction}.json`, from the scores at MIB's fractions,
            strongest edges first, pruned, written with their scores; or the circuits given,
            without scores). By default, importance for scores and circuits for circuits.
        absolute: For circuits from scores: rank the edges by |score| (else most negative first).

    Returns the folder written. A folder already holding other .json or .pt files is refused:
    MIB reads one file of scores or nine circuits there.

    >>> import tempfile
    >>> written = write_mib_submission(tempfile.mkdtemp(), scores, task="ioi", model="gpt2", d_model=64)
    >>> written.name, [path.name for path in written.iterdir()]
    ('ioi_gpt2', ['importances.json'])
    >>> read_mib_submission(written, graph).top(5) == scores.top(5)
    True
    """
    d_model = _checked_d_model(d_model)
    name = _task_folder(task, model)
    if kind is None:
        kind = "importance" if isinstance(what, EdgeScores) else "circuits"
    if kind not in ("importance", "circuits"):
        raise PatchingError(f"kind must be 'importance' or 'circuits', got {kind!r}.")
    if isinstance(what, EdgeScores):
        _check_expressible(what.graph)
        values = _score_values(what, what.graph)
        if kind == "importance":
            files = {IMPORTANCES_FILE: _eap_ig_dict(what.graph, d_model, values, None)}
        else:
            circuits = _mib_circuits_from_scores(what, absolute)
            files = {
                f"{name}_{fraction:g}.json": _eap_ig_dict(what.graph, d_model, values, circuit.mask)
                for fraction, circuit in zip(MIB_CIRCUIT_FRACTIONS, circuits)
            }
    else:
        if kind != "circuits" or isinstance(what, (str, bytes)) or not isinstance(what, Sequence):
            raise PatchingError(
                "MIB's importance file holds scores: pass EdgeScores, or nine circuits with kind='circuits'; "
                f"got {type(what).__name__} with kind={kind!r}."
            )
        circuits = _checked_mib_circuits(what)
        files = {
            f"{name}_{fraction:g}.json": _eap_ig_dict(circuit.graph, d_model, None, circuit.mask)
            for fraction, circuit in zip(MIB_CIRCUIT_FRACTIONS, circuits)
        }
    target = Path(folder) / name
    stale = sorted(p.name for p in target.glob("*") if p.suffix in (".json", ".pt") and p.name not in files)
    if stale:
        raise PatchingError(
            f"{target} already holds {stale}: MIB reads one importance file or nine circuits per folder, so "
            "remove them or write elsewhere."
        )
    target.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (target / file).write_text(json.dumps(data))
    return target


def read_mib_submission(
    path: str | os.PathLike, graph: EdgeGraph, *, dtype: torch.dtype = torch.float32
) -> EdgeScores | list[Circuit]:
    """Read one task and model of a MIB circuit-track submission: a folder `{task}_{model}` with
    one .json file (importance scores: their `EdgeScores`, as `eap_ig_scores`) or several (the
    circuits: a list of `Circuit`, as `eap_ig_circuit`, fewest edges first), or one importance file.

    Args:
        path: The task and model's folder, or an importance file.
        graph: The model's edge graph (`EdgeGraph.of(model)`).
        dtype: The scores' dtype (see `eap_ig_scores`).

    MIB also accepts EAP-IG's .pt files; this reads the .json form only, and says so for a .pt.

    >>> import tempfile
    >>> written = write_mib_submission(tempfile.mkdtemp(), scores, task="ioi", model="gpt2", d_model=64,
    ...                                kind="circuits")
    >>> read_mib_submission(written, graph) == [Circuit.from_scores(scores, f) for f in MIB_CIRCUIT_FRACTIONS]
    True
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".pt"))
    elif path.is_file():
        files = [path]
    else:
        raise PatchingError(f"{path} is neither a MIB task/model folder nor a file.")
    if not files:
        raise PatchingError(f"{path} holds no .json file: MIB's folders hold one importance file or nine circuits.")
    if any(p.suffix == ".pt" for p in files):
        raise PatchingError(
            f"{path} holds .pt files ({[p.name for p in files if p.suffix == '.pt']}): this reads MIB's .json form "
            "only (EAP-IG's Graph.from_pt(...).to_json(...) converts)."
        )
    if len(files) == 1:
        return eap_ig_scores(files[0].read_text(), graph, dtype=dtype)
    circuits = [(eap_ig_circuit(p.read_text(), graph), p.name) for p in files]
    return [circuit for circuit, _ in sorted(circuits, key=lambda pair: (len(pair[0]), pair[1]))]
