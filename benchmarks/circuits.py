"""Circuit benchmark: scoring GPT-2 small's edge graph (EAP, and exact scores on a sample of edges
with the whole graph's time at their rate), and a 50-point faithfulness curve evaluated stacked
against one circuit at a time and against auto-circuit, in one process.

    python benchmarks/circuits.py            # GPT-2-small shape (random weights), median of 3
    python benchmarks/circuits.py --tiny     # small shapes, one repeat: a smoke test
    python benchmarks/circuits.py --sections auto_circuit   # where auto-circuit (TransformerLens 2.x) is installed

Every time is the median wall time over the repeats, and every ratio is of two times
measured in this process. The circuits are the strongest edges of `attr_edges` (EAP)
scores at 50 sizes, geometric from 0.1% to 100% of the graph's edges, pruned; each curve
also evaluates the full and the empty circuit, so 52 circuits in all. Each comparison
also checks that both sides give the same metric values, and the script exits 1 where
they differ by more than `TOLERANCE` of |full - empty|.
"""

import argparse
import functools
import importlib.metadata
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _harness import (
    ANSWERS,
    SHAPES,
    Row,
    Setup,
    comma_separated,
    hooked_transformer,
    logit_diff,
    machine,
    parse,
    parser,
    print_table,
    prompt_pairs,
    run_sections,
    seconds,
    setup,
    speed_up,
    timed,
)

from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    attr_edges,
    evaluate_circuit,
    exact_edge_scores,
    faithfulness_curve,
    plan_circuit_evaluation,
)

SECTIONS = ("edges", "exact", "curve", "auto_circuit")
EXACT_SAMPLE = 128
"""The edges `exact_edge_scores` is timed on: every (edges / 128)-th edge of the graph."""
POINTS = 50
TOLERANCE = 1e-4
"""The largest difference between two evaluations of the same circuits, as a fraction of |full - empty|
(against auto-circuit, another implementation, a fraction of the largest |value|)."""
COLUMNS = {
    "measurement": lambda row: row.name,
    "ours": lambda row: seconds(row.ours),
    "baseline": lambda row: seconds(row.baseline),
    "ratio (baseline / ours)": lambda row: speed_up(row.ratio),
    "values agree": lambda row: "-" if row.gap is None else ("yes" if row.agrees else "**no**") + f" ({row.gap:.1e})",
}


def sizes(points: int) -> list[float]:
    """`points` fractions of the graph's edges, geometric from 0.001 to 1."""
    return [0.001 ** (1 - index / (points - 1)) for index in range(points)]


def edge_rows(s: Setup, repeats: int) -> list[Row]:
    """The size of the model's edge graph and the time attr_edges (EAP) takes to score all of it."""
    graph = EdgeGraph.of(s.model)
    timing = timed(lambda: attr_edges(s.model, s.orig, s.metric, new_input=s.new), repeats)
    return [
        Row(
            f"attr_edges EAP, the whole edge graph ({len(graph)} edges)",
            timing.seconds,
            None,
            how=f"`len(EdgeGraph.of(model))` = {len(graph)} edges; attr_edges from the tokens (it runs the new "
            "input itself), LogitDiff object.",
        )
    ]


def exact_rows(s: Setup, repeats: int) -> list[Row]:
    """exact_edge_scores on `EXACT_SAMPLE` edges spread over the graph, and the whole graph's time at
    that rate (one stacked circuit per edge, so the time grows with the edges)."""
    graph = EdgeGraph.of(s.model)
    edges = list(graph.edges)
    step = max(1, len(edges) // EXACT_SAMPLE)
    sample = edges[::step][:EXACT_SAMPLE]
    timing = timed(lambda: exact_edge_scores(s.model, s.orig, s.metric, new_input=s.new, edges=sample), repeats)
    return [
        Row(
            f"exact_edge_scores, {len(sample)} edges",
            timing.seconds,
            None,
            how=("every edge" if step == 1 else f"every {step}th edge of the graph")
            + ", each removed alone, stacked; the unpatched run evaluated with them.",
        ),
        Row(
            f"exact_edge_scores, the whole edge graph ({len(edges)} edges), at that rate",
            timing.seconds / len(sample) * len(edges),
            None,
            how="the time per edge of the row above, times the graph's edges: an estimate, not a run.",
        ),
    ]


def _gap(ours: list[float], theirs: list[float], full: float, empty: float) -> float:
    """The largest difference of two lists of metric values, over |full - empty|."""
    difference = (torch.tensor(ours, dtype=torch.float64) - torch.tensor(theirs, dtype=torch.float64)).abs().max()
    return float(difference / abs(full - empty))


def curve_rows(s: Setup, repeats: int, points: int) -> list[Row]:
    """faithfulness_curve at `points` sizes against one evaluate_circuit call per circuit, and the
    same circuits evaluated stacked in one evaluate_circuit call, given the same cache; the circuits
    chosen by attr_edges (EAP) scores."""
    model = s.model
    scores = attr_edges(model, s.orig, s.metric, new_input=s.new)
    with torch.no_grad():
        new_cache = model.run_with_cache(s.new)[1]

    def curve_call():
        return faithfulness_curve(model, scores, s.orig, s.metric, new_input=s.new, sizes=sizes(points))

    curve = curve_call()
    circuits = [*curve.circuits, Circuit.full(scores.graph), Circuit.empty(scores.graph)]

    def one_at_a_time():
        return [float(evaluate_circuit(model, c, s.orig, s.metric, new_cache=new_cache).mean()) for c in circuits]

    def stacked():
        values = evaluate_circuit(model, circuits, s.orig, s.metric, new_cache=new_cache).as_tensor()
        return values.reshape(len(circuits), -1).mean(1).tolist()

    values = [*curve.values, curve.full, curve.empty]
    curve_gap = _gap(values, one_at_a_time(), curve.full, curve.empty)
    stacked_gap = _gap(values, stacked(), curve.full, curve.empty)
    curve_seconds = timed(curve_call, repeats).seconds
    choosing = timed(lambda: [Circuit.from_scores(scores, size) for size in sizes(points)], repeats).seconds
    stacked_seconds = timed(stacked, repeats).seconds
    baseline = timed(one_at_a_time, repeats).seconds
    plan = plan_circuit_evaluation(model, circuits, s.orig, s.metric, new_input=s.new)
    passes = len(plan.passes)
    passes_text = f"{passes} forward pass{'' if passes == 1 else 'es'}"
    counts = curve.edge_counts
    how = (
        f"faithfulness_curve from the tokens at {points} sizes geometric from 0.1% to 100% of the edges, "
        f"pruned ({min(counts)} to {max(counts)} edges kept), plus the full and the empty circuit: "
        f"{len(circuits)} circuits x {s.orig.shape[0]} prompts stacked in {passes_text} "
        f"(`len(plan_circuit_evaluation(...).passes)`, at most {plan.variants_per_pass} circuits a pass) and one "
        f"run of the new input; choosing and pruning the {points} circuits (`Circuit.from_scores`) takes "
        f"{seconds(choosing)} of it. Against one `evaluate_circuit` call per circuit, each one forward pass, "
        f"given the new run's cache (computed once, not timed), the circuits chosen beforehand. Largest "
        f"difference of the two sides' {len(circuits)} metric values {curve_gap:.1e} of |full - empty| "
        f"(area under the curve {curve.area_under:.3f}, between it and 1 {curve.area_from_1:.3f})."
    )
    stacked_how = (
        f"one `evaluate_circuit` call on the list of the same {len(circuits)} circuits, given the same "
        f"cache: only the stacking differs from the baseline. Largest difference from the curve's metric "
        f"values {stacked_gap:.1e} of |full - empty|."
    )
    return [
        Row(
            f"faithfulness_curve, {points} sizes + full + empty ({passes_text}) vs one evaluate_circuit per circuit",
            curve_seconds,
            baseline,
            how=how,
            gap=curve_gap,
            tolerance=TOLERANCE,
        ),
        Row(
            f"evaluate_circuit of the same {len(circuits)} circuits stacked vs one at a time",
            stacked_seconds,
            baseline,
            how=stacked_how,
            gap=stacked_gap,
            tolerance=TOLERANCE,
        ),
    ]


def auto_circuit_rows(shape: str, repeats: int, points: int) -> list[Row]:
    """The same curve evaluated by auto-circuit, where it imports (it needs TransformerLens' HookedTransformer,
    which TransformerLens 4 removed); otherwise a row saying why not."""
    try:
        import auto_circuit  # noqa: F401
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError as error:
        return [Row("auto-circuit: not installed", None, None, how=f"`import auto_circuit` failed: {error}")]
    return [AutoCircuitComparison(shape, points).row(repeats)]


class AutoCircuitComparison:
    """Two random GPT-2-shaped HookedTransformers with the same weights: this library's curve on one,
    auto-circuit's `run_circuits` of the same circuits (tree patching, resample ablation) on the other."""

    def __init__(self, shape: str, points: int):
        from auto_circuit import prune
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.utils.graph_utils import patchable_model

        prune.tqdm = functools.partial(prune.tqdm, disable=True)
        self.model = hooked_transformer(SHAPES[shape])
        theirs = hooked_transformer(SHAPES[shape])
        theirs.load_state_dict(self.model.state_dict())
        theirs.set_use_attn_result(True)
        theirs.set_use_split_qkv_input(True)
        theirs.set_use_hook_mlp_in(True)
        self.patchable = patchable_model(
            theirs, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu")
        )
        batch = SHAPES[shape].batch
        self.orig, self.new = prompt_pairs(batch, SHAPES[shape].seq_len)
        self.metric = logit_diff(batch)
        dataset = PromptDataset(
            self.orig, self.new, [torch.tensor([ANSWERS[0]])] * batch, [torch.tensor([ANSWERS[1]])] * batch
        )
        self.loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=batch)
        self.points = points
        self.scores = attr_edges(self.model, self.orig, self.metric, new_input=self.new)

    def ours(self):
        return faithfulness_curve(
            self.model, self.scores, self.orig, self.metric, new_input=self.new, sizes=sizes(self.points)
        )

    def theirs(self, counts: list[int], prune_scores) -> dict[int, float]:
        """auto-circuit's metric (mean logit difference) of its circuit of each edge count."""
        from auto_circuit import prune
        from auto_circuit.types import AblationType, PatchType

        outputs = prune.run_circuits(
            self.patchable,
            self.loader,
            counts,
            prune_scores,
            patch_type=PatchType.TREE_PATCH,
            ablation_type=AblationType.RESAMPLE,
        )
        return {
            count: float(_logit_difference(logits))
            for count, by_batch in outputs.items()
            for logits in by_batch.values()
        }

    def prune_scores(self, circuits: list[Circuit]):
        """auto-circuit scores whose top n edges are each circuit of n edges: the circuits are nested
        (pruning keeps the edges on paths from the embeddings to the logits, and a larger set of top
        edges has every path a smaller one has), so an edge scores by the first circuit that has it."""
        by_name = {(edge.src.name, edge.dest.name): edge for edge in self.patchable.edges}
        graph = self.scores.graph
        if len(by_name) != len(graph):
            raise RuntimeError(f"auto-circuit's graph has {len(by_name)} edges, this library's {len(graph)}")
        for smaller, larger in itertools.pairwise(circuits):
            if not set(smaller) <= set(larger):
                raise RuntimeError("the curve's circuits are not nested, so no one ranking gives all of them")
        first = {}
        for index, circuit in enumerate(circuits):
            for edge in circuit:
                first.setdefault(edge, index)
        ranked = sorted(graph, key=lambda edge: first.get(edge, len(circuits)))
        prune_scores = self.patchable.new_prune_scores()
        for rank, edge in enumerate(ranked):
            theirs = by_name[(_auto_circuit_name(edge.sender), _auto_circuit_name(edge.receiver, receiver=True))]
            prune_scores[theirs.dest.module_name][theirs.patch_idx] = float(len(ranked) - rank)
        return prune_scores

    def row(self, repeats: int) -> Row:
        curve = self.ours()
        graph = self.scores.graph
        circuits = [*curve.circuits, Circuit.full(graph)]
        counts = [len(circuit) for circuit in circuits] + [0]
        prune_scores = self.prune_scores(circuits)
        values = self.theirs(counts, prune_scores)
        ours_values = [*curve.values, curve.full, curve.empty]
        theirs_values = [values[count] for count in counts]
        gap = _gap(ours_values, theirs_values, curve.full, curve.empty)
        largest = max(abs(value) for value in ours_values)
        difference = gap * abs(curve.full - curve.empty)
        ours = timed(self.ours, repeats).seconds
        theirs = timed(lambda: self.theirs(counts, prune_scores), repeats).seconds
        version = importlib.metadata.version("auto-circuit")
        how = (
            f"auto-circuit {version} (TransformerLens {importlib.metadata.version('transformer-lens')}): "
            "`run_circuits(patchable_model(..., factorized=True, separate_qkv=True), ..., "
            "patch_type=TREE_PATCH, ablation_type=RESAMPLE)` on a copy of the same random HookedTransformer "
            f"({len(self.patchable.edges)} edges), given scores whose top n edges are each of this library's "
            f"{len(counts)} circuits, its progress bars off; it runs the new input once, then one forward pass "
            "per circuit. Ours: faithfulness_curve as in the row above, on the HookedTransformer. Largest "
            f"difference of the two sides' metric values {difference:.1e}: {difference / largest:.1e} of the "
            f"largest |value| ({largest:.3g}), {gap:.1e} of |full - empty| ({abs(curve.full - curve.empty):.3g}). "
            "The two implementations sum the edges' contributions in different orders, so they agree to float32 "
            "rounding of the values, which is what the row checks."
        )
        return Row(
            f"faithfulness_curve vs auto-circuit `run_circuits`, the same {len(counts)} circuits",
            ours,
            theirs,
            how=how,
            gap=difference / largest,
            tolerance=TOLERANCE,
        )


def _auto_circuit_name(node, receiver: bool = False) -> str:
    """A node of this library's edge graph, named as auto-circuit names it."""
    if node.kind == "embed":
        return "Resid Start"
    if node.kind == "logits":
        return "Resid End"
    if node.kind == "mlp":
        return f"MLP {node.layer}"
    return f"A{node.layer}.{node.head}" + (f".{node.input.upper()}" if receiver else "")


def _logit_difference(logits: torch.Tensor) -> torch.Tensor:
    """The metric on auto-circuit's output (the last position's logits): the mean logit difference."""
    return (logits[:, ANSWERS[0]] - logits[:, ANSWERS[1]]).mean()


def parse_args(argv=None) -> argparse.Namespace:
    benchmark = parser(__doc__, "small shapes, one repeat: a smoke test")
    benchmark.add_argument("--points", type=int, default=POINTS, help="circuit sizes on the curve")
    benchmark.add_argument(
        "--sections",
        type=comma_separated(SECTIONS),
        default=list(SECTIONS),
        help=f"comma-separated, from: {', '.join(SECTIONS)}",
    )
    args = parse(benchmark, argv)
    if args.points < 2:
        benchmark.error("--points: a curve needs at least 2 sizes")
    return args


def run(args: argparse.Namespace) -> list[Row]:
    """The rows of `args.sections`, on the GPT-2-small shape (with `--tiny`, the tiny one)."""
    shape = "tiny" if args.tiny else "gpt2"
    size = SHAPES[shape]
    print(
        f"{machine()}; TransformerLens {importlib.metadata.version('transformer-lens')}; median of {args.repeats}; "
        f"{size.n_layers} layers, {size.n_heads} heads, d_model {size.d_model}, batch {size.batch} x {size.seq_len}"
    )
    s = setup(size) if {"edges", "exact", "curve"} & set(args.sections) else None
    sections = {
        "edges": lambda: edge_rows(s, args.repeats),
        "exact": lambda: exact_rows(s, args.repeats),
        "curve": lambda: curve_rows(s, args.repeats, args.points),
        "auto_circuit": lambda: auto_circuit_rows(shape, args.repeats, args.points),
    }
    return run_sections(sections, args.sections)


def main(argv=None) -> int:
    rows = run(parse_args(argv))
    print_table(rows, COLUMNS)
    return 0 if all(row.agrees is not False for row in rows) else 1


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    sys.exit(main())
