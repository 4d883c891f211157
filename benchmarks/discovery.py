"""Circuit discovery: the faithfulness each method's circuits reach, and how small a faithful one is.

    python benchmarks/discovery.py           # the embedded SmolLM2, the IOI job's default 8 prompts
    python benchmarks/discovery.py --tiny    # a small random model and random prompts: a smoke test
    python benchmarks/discovery.py --sections auto_circuit   # against auto-circuit, where it is installed

As the job's circuit step does: the edges are scored on every other prompt (0, 2, 4, ...), the
resample ablation from the corrupted prompts, the raw logit difference. Per method: the time to
its ranking; the smallest of MIB's circuit sizes whose faithfulness reaches 0.8 on the scoring
prompts (signed ranking, as the job picks), with its faithfulness on the held-out prompts
(1, 3, 5, ...); and MIB's CPR and CMD on the held-out prompts. Methods: greedy top-n by EAP,
EAP-IG and RelP, and learned edge masks warm-started from EAP-IG.

The `auto_circuit` section (see `auto_circuit_rows`) times, on the GPT-2-small shape with random
weights and random prompts, each method's way to a circuit against auto-circuit's learned-mask
method (subnetwork probing with tree patching), and measures every circuit with this library's
exact `evaluate_circuit`.
"""

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))

from agreement import ioi_setup

from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    EdgeScores,
    LogitDiff,
    attr_edges,
    evaluate_circuit,
    faithfulness_curve,
    learn_edge_masks,
    mib_faithfulness,
)

TARGET = 0.8
IG_STEPS = 5
SECTIONS = ("methods", "auto_circuit")
AC_SIZES = {"gpt2": (0.005, 0.01, 0.02, 0.05, 0.1), "tiny": (0.1, 0.25, 0.5)}
"""The circuit sizes (fractions of the graph's edges) the `auto_circuit` section evaluates each ranking at."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model: a smoke test")
    parser.add_argument("--mask-steps", type=int, default=100, help="learned masks' optimisation steps")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="learned masks' Adam step size")
    parser.add_argument("--density", type=float, default=0.02, help="learned masks' target share of kept edges")
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        default=None,
        help="only these rows (names' starts), in either section",
    )
    parser.add_argument(
        "--sections",
        type=lambda text: text.split(","),
        default=["methods"],
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: methods)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="auto_circuit: EAP's and EAP-IG's median over this many")
    parser.add_argument(
        "--ac-learning-rate", type=float, default=0.1, help="auto_circuit: auto-circuit's Adam step size (its default)"
    )
    parser.add_argument(
        "--ac-lambda", type=float, default=0.5, help="auto_circuit: auto-circuit's regularize_lambda (its default)"
    )
    parser.add_argument(
        "--ac-target",
        default="logit_diff_percent",
        help="auto_circuit: auto-circuit's faithfulness_target (logit_diff_percent: the logit difference)",
    )
    parser.add_argument(
        "--ac-ablation",
        choices=("resample", "tokenwise-mean"),
        default="resample",
        help="auto_circuit: what auto-circuit ablates with while it learns (its own: tokenwise-mean)",
    )
    parser.add_argument(
        "--max-memory", type=float, default=2.0, help="auto_circuit: learn_edge_masks' max_memory, in GiB"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}: choose from {', '.join(SECTIONS)}")
    if args.tiny:
        args.repeats = 1
    return args


def halves(clean, corrupted, answers, end):
    """(clean, corrupted, metric) of the scoring prompts and of the held-out ones."""
    parts = []
    for rows in (list(range(0, len(clean), 2)), list(range(1, len(clean), 2))):
        positions = None if end is None else end[rows]
        parts.append((clean[rows], corrupted[rows], LogitDiff(answers[rows], positions)))
    return parts


def run(args: argparse.Namespace) -> list[tuple]:
    torch.manual_seed(0)
    model, clean, corrupted, answers, end = ioi_setup(args.tiny)
    (clean_s, corrupted_s, metric_s), (clean_h, corrupted_h, metric_h) = halves(clean, corrupted, answers, end)
    per_prompt = LogitDiff(metric_s.answers, metric_s.positions, per_prompt=True)

    def scored(method):
        return lambda: attr_edges(
            model,
            clean_s,
            metric_s,
            new_input=corrupted_s,
            method=method,
            **({"steps": IG_STEPS} if method == "ig" else {}),
        )

    rankings = {"EAP": scored("atp"), f"EAP-IG ({IG_STEPS} steps)": scored("ig"), "RelP": scored("relp")}
    rows, made = [], {}
    for name, make in rankings.items():
        start = time.perf_counter()
        made[name] = make()
        rows.append((name, made[name], time.perf_counter() - start))
    start = time.perf_counter()
    learned = learn_edge_masks(
        model,
        made[f"EAP-IG ({IG_STEPS} steps)"],
        clean_s,
        per_prompt,
        new_input=corrupted_s,
        absolute=False,
        steps=args.mask_steps,
        density=args.density,
        learning_rate=args.learning_rate,
    )
    ig_time = next(seconds for name, _, seconds in rows if name.startswith("EAP-IG"))
    rows.append(
        (f"learned masks ({args.mask_steps} steps, from EAP-IG)", learned, ig_time + time.perf_counter() - start)
    )
    results = []
    for name, scores, seconds in rows:
        if args.methods is not None and not name.startswith(tuple(args.methods)):
            continue
        selection = faithfulness_curve(model, scores, clean_s, metric_s, new_input=corrupted_s, absolute=False)
        mib = mib_faithfulness(model, scores, clean_h, metric_h, new_input=corrupted_h)
        reaching = [i for i, f in enumerate(selection.faithfulness) if f >= TARGET]
        index = reaching[0] if reaching else None
        held_out = None if index is None else mib.signed.faithfulness[index]
        results.append(
            (
                name,
                seconds,
                None if index is None else selection.fractions[index],
                None if index is None else selection.edge_counts[index],
                held_out,
                mib.cpr,
                mib.cmd,
                len(scores.graph),
            )
        )
    return results


def print_rows(results: list[tuple]) -> None:
    print(
        f"| method | time to ranking | smallest circuit with faithfulness >= {TARGET} (scoring half) | held-out "
        "faithfulness there | CPR (held out) | CMD (held out) |"
    )
    print("|---|---|---|---|---|---|")
    for name, seconds, fraction, edges, held_out, cpr, cmd, total in results:
        size = "none of MIB's sizes" if fraction is None else f"{fraction:.1%} ({edges:,} of {total:,} edges)"
        held = "-" if held_out is None else f"{held_out:.3f}"
        print(f"| {name} | {seconds:.1f} s | {size} | {held} | {cpr:.3f} | {cmd:.3f} |")


AUTO_CIRCUIT_HOW = (
    "random GPT-2-shaped HookedTransformers (seed 0), {batch} pairs of {seq_len} random tokens (clean, corrupted), "
    "the logit difference of tokens {answers} at the last position; every circuit is the top edges of its "
    "method's ranking, pruned (`Circuit.from_scores`), evaluated exactly by `evaluate_circuit` on the clean "
    "prompts with the edges outside it carrying the corrupted run (resample ablation), on the prompts it was "
    "found on."
)


def _median_time(call, repeats: int):
    """(what the last call returned, the median wall time of `repeats` calls)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def auto_circuit_rows(args: argparse.Namespace) -> list[dict]:
    """Time to a circuit on the GPT-2-small shape (with `--tiny`, the tiny one): this library's EAP,
    EAP-IG and learned masks (warm-started from EAP-IG) against auto-circuit's learned masks
    (subnetwork probing, tree patching), where auto-circuit imports (it needs TransformerLens'
    HookedTransformer, which TransformerLens 4 removed); otherwise one row saying why not. Each
    ranking's circuits at `AC_SIZES` are evaluated by this library's exact `evaluate_circuit`."""
    try:
        import auto_circuit  # noqa: F401
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError as error:
        return [{"name": "auto-circuit: not installed", "why": f"`import auto_circuit` failed: {error}"}]
    return AutoCircuitDiscovery(args).rows()


class AutoCircuitDiscovery:
    """Two random GPT-2-shaped HookedTransformers with the same weights: this library's methods on one,
    auto-circuit's `subnetwork_probing_prune_scores` on the other (wrapped by its `patchable_model`)."""

    def __init__(self, args: argparse.Namespace):
        from _harness import ANSWERS, SHAPES, hooked_transformer, logit_diff, prompt_pairs
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.utils.graph_utils import patchable_model

        self.args = args
        self.shape = "tiny" if args.tiny else "gpt2"
        size = SHAPES[self.shape]
        self.model = hooked_transformer(size)
        theirs = hooked_transformer(size)
        theirs.load_state_dict(self.model.state_dict())
        theirs.set_use_attn_result(True)
        theirs.set_use_split_qkv_input(True)
        theirs.set_use_hook_mlp_in(True)
        start = time.perf_counter()
        self.patchable = patchable_model(
            theirs, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu")
        )
        self.wrapping = time.perf_counter() - start
        self.orig, self.new = prompt_pairs(size.batch, size.seq_len)
        self.metric = logit_diff(size.batch)
        self.per_prompt = LogitDiff(self.metric.answers, per_prompt=True)
        dataset = PromptDataset(
            self.orig, self.new, [torch.tensor([ANSWERS[0]])] * size.batch, [torch.tensor([ANSWERS[1]])] * size.batch
        )
        self.loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=size.batch)
        self.how = AUTO_CIRCUIT_HOW.format(batch=size.batch, seq_len=size.seq_len, answers=ANSWERS)

    def ours(self) -> list[tuple[str, EdgeScores, float, bool, str]]:
        """(name, scores, seconds, absolute, how) of EAP, EAP-IG and learned masks from EAP-IG (those of
        `--methods`)."""
        args = self.args
        median = f"median of {args.repeats}"
        ig_name = f"EAP-IG ({IG_STEPS} steps)"
        learned_name = f"learned masks ({args.mask_steps} steps, lr {args.learning_rate:g}, from EAP-IG)"

        def scored(method, **options):
            return lambda: attr_edges(self.model, self.orig, self.metric, new_input=self.new, method=method, **options)

        rows = []
        if self.wanted("EAP"):
            eap, eap_time = _median_time(scored("atp"), args.repeats)
            rows.append(("EAP", eap, eap_time, False, f"`attr_edges(method='atp')`, {median}; signed ranking."))
        if not (self.wanted(ig_name) or self.wanted(learned_name)):
            return rows
        ig, ig_time = _median_time(scored("ig", steps=IG_STEPS), args.repeats)
        if self.wanted(ig_name):
            how = f"`attr_edges(method='ig', steps={IG_STEPS})`, {median}; signed ranking."
            rows.append((ig_name, ig, ig_time, False, how))
        if self.wanted(learned_name):
            start = time.perf_counter()
            learned = learn_edge_masks(
                self.model,
                ig,
                self.orig,
                self.per_prompt,
                new_input=self.new,
                absolute=False,
                steps=args.mask_steps,
                density=args.density,
                learning_rate=args.learning_rate,
                max_memory=int(args.max_memory * 2**30),
            )
            learn_time = time.perf_counter() - start
            how = (
                f"EAP-IG's time plus one `learn_edge_masks` call ({learn_time:.1f} s): warm-started from EAP-IG "
                f"(signed), {args.mask_steps} Adam steps of learning rate {args.learning_rate:g}, density "
                f"{args.density:g} (the expected share of kept edges, held there by a shared shift after each step), "
                f"hard-concrete masks, loss the per-prompt squared logit-difference error against the full model; "
                f"`max_memory` {args.max_memory:g} GiB (one pass of all {self.orig.shape[0]} prompts)."
            )
            rows.append((learned_name, learned, ig_time + learn_time, False, how))
        return rows

    def wanted(self, name: str) -> bool:
        return self.args.methods is None or name.startswith(tuple(self.args.methods))

    def theirs(self, graph) -> tuple[str, EdgeScores, float, bool, str]:
        """auto-circuit's subnetwork probing on tree patching (clean input, masks learn which edges to
        ablate), with a circuit-size target of `density` of the edges, its scores mapped onto `graph`."""
        from auto_circuit.prune_algos import subnetwork_probing
        from auto_circuit.types import AblationType

        args = self.args
        circuit_size = max(1, round(args.density * len(graph)))
        with contextlib.ExitStack() as stack:
            if not hasattr(torch.optim, "adam"):
                # auto-circuit 1.0.1 calls `torch.optim.adam.Adam`, a module attribute newer torch deletes
                stack.enter_context(
                    mock.patch.object(torch.optim, "adam", importlib.import_module("torch.optim.adam"), create=True)
                )
            quiet = functools.partial(subnetwork_probing.tqdm, disable=True)  # no progress bar in the output
            stack.enter_context(mock.patch.object(subnetwork_probing, "tqdm", quiet))
            if args.ac_ablation == "resample":
                ablations = subnetwork_probing.batch_src_ablations

                def resample(model, dataloader, ablation_type=None, clean_corrupt=None):
                    return ablations(model, dataloader, AblationType.RESAMPLE, "corrupt")

                stack.enter_context(mock.patch.object(subnetwork_probing, "batch_src_ablations", resample))
            torch.manual_seed(0)  # its masks' noise: torch's global generator, drawn in a set's order
            start = time.perf_counter()
            prune_scores = subnetwork_probing.subnetwork_probing_prune_scores(
                self.patchable,
                self.loader,
                None,
                learning_rate=args.ac_learning_rate,
                epochs=args.mask_steps,
                regularize_lambda=args.ac_lambda,
                mask_fn="hard_concrete",
                circuit_size=circuit_size,
                tree_optimisation=True,
                faithfulness_target=args.ac_target,
            )
            seconds = time.perf_counter() - start
        scores = self.mapped(prune_scores, graph)
        ablation = (
            "the corrupted prompts' activations (resample ablation, as evaluated here: its "
            "`batch_src_ablations` patched to `RESAMPLE`, 'corrupt')"
            if args.ac_ablation == "resample"
            else "its own TOKENWISE_MEAN_CORRUPT (each position's mean over the corrupted prompts)"
        )
        version = importlib.metadata.version("auto-circuit")
        how = (
            f"auto-circuit {version} `subnetwork_probing_prune_scores(patchable_model(..., factorized=True, "
            f"separate_qkv=True), tree_optimisation=True, mask_fn='hard_concrete', circuit_size={circuit_size}, "
            f"faithfulness_target={args.ac_target!r}, epochs={args.mask_steps}, learning_rate={args.ac_learning_rate},"
            f" regularize_lambda={args.ac_lambda})`: one epoch is one Adam step on the {self.orig.shape[0]} prompts; "
            f"masks start at its default (every edge mostly ablated), no warm start; the penalty is "
            f"ReLU(kept - {circuit_size}) / {circuit_size}; ablated edges carry {ablation}. Its time includes its "
            f"clean run and ablation run, not `patchable_model` ({self.wrapping:.2f} s). Its scores (max mask "
            "log-odds minus each edge's) are mapped onto this library's graph by name, edge for edge. Its runs "
            "differ from process to process: it draws the masks' noise in the order of a Python set of its "
            "wrappers (ordered by address), though from a seeded generator."
        )
        name = f"auto-circuit subnetwork probing ({args.mask_steps} epochs, lr {args.ac_learning_rate:g})"
        return (name, scores, seconds, True, how)

    def mapped(self, prune_scores, graph) -> EdgeScores:
        """auto-circuit's prune scores as this library's EdgeScores of `graph` (the same edges, by name)."""
        from circuits import _auto_circuit_name

        by_name = {(edge.src.name, edge.dest.name): edge for edge in self.patchable.edges}
        if len(by_name) != len(graph):
            raise RuntimeError(f"auto-circuit's graph has {len(by_name)} edges, this library's {len(graph)}")
        values = torch.empty(len(graph))
        for index, edge in enumerate(graph):
            theirs = by_name[(_auto_circuit_name(edge.sender), _auto_circuit_name(edge.receiver, receiver=True))]
            values[index] = float(prune_scores[theirs.dest.module_name][theirs.patch_idx])
        return EdgeScores(graph, values, "auto-circuit subnetwork probing", 0.0)

    def measured(self, scores: EdgeScores, absolute: bool) -> dict:
        """The circuits of `scores` at `AC_SIZES`, evaluated exactly in one stacked `evaluate_circuit`
        call with the full and the empty circuit: each one's faithfulness (value - empty) / (full - empty)
        of the mean metric, and its per-prompt error sqrt(mean (value - full)^2 / mean (full - empty)^2)."""
        graph = scores.graph
        circuits = [Circuit.from_scores(scores, size, absolute=absolute) for size in AC_SIZES[self.shape]]
        every = [*circuits, Circuit.full(graph), Circuit.empty(graph)]
        values = evaluate_circuit(self.model, every, self.orig, self.per_prompt, new_input=self.new).as_tensor()
        values = values.reshape(len(every), -1).double()
        full, empty = values[-2], values[-1]
        spread = float(((full - empty) ** 2).mean())
        return {
            "faithfulness": [float((v.mean() - empty.mean()) / (full.mean() - empty.mean())) for v in values[:-2]],
            "error": [float((((v - full) ** 2).mean() / spread) ** 0.5) for v in values[:-2]],
            "edges": [len(circuit) for circuit in circuits],
            "full_minus_empty": float(full.mean() - empty.mean()),
            "per_prompt_spread": spread**0.5,
        }

    def rows(self) -> list[dict]:
        graph = EdgeGraph.of(self.model)
        ranked = self.ours()
        if self.wanted("auto-circuit"):
            ranked.append(self.theirs(graph))
        rows = []
        for name, scores, seconds, absolute, how in ranked:
            rows.append({"name": name, "seconds": seconds, "how": how, **self.measured(scores, absolute)})
        if rows:
            rows[0]["setup"] = self.how + f" {len(graph):,} edges, both libraries' graphs the same edges."
        return rows


def print_auto_circuit_rows(rows: list[dict], tiny: bool = False) -> None:
    sizes, threads = AC_SIZES["tiny" if tiny else "gpt2"], torch.get_num_threads()
    print(
        f"\ntorch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}; TransformerLens "
        f"{importlib.metadata.version('transformer-lens')}"
    )
    if not rows:
        return
    if "seconds" not in rows[0]:
        print(f"\n| method | time to circuit |\n|---|---|\n| {rows[0]['name']} | - |\n\n1. {rows[0]['why']}")
        return
    headers = " | ".join(f"{size:.1%}" for size in sizes)
    print(
        f"\nFaithfulness (edges kept after pruning), and per-prompt error, at each size\n\n| method | time to "
        f"circuit | {headers} | error at {headers.replace(' | ', ' / ')} |\n|---|---|{'---|' * len(sizes)}---|"
    )
    for row in rows:
        cells = " | ".join(f"{f:.3f} ({n:,})" for f, n in zip(row["faithfulness"], row["edges"]))
        errors = " / ".join(f"{e:.3f}" for e in row["error"])
        print(f"| {row['name']} | {row['seconds']:.1f} s | {cells} | {errors} |")
    print(
        f"\n|full - empty| of the mean metric: {abs(rows[0]['full_minus_empty']):.3g}; per prompt (root mean "
        f"square): {rows[0]['per_prompt_spread']:.3g}. {rows[0]['setup']}\n"
    )
    print("\n".join(f"{index}. {row['name']}: {row['how']}" for index, row in enumerate(rows, 1)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if "methods" in args.sections:
        print_rows(run(args))
    if "auto_circuit" in args.sections:
        print_auto_circuit_rows(auto_circuit_rows(args), args.tiny)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
