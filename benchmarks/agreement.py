"""Agreement of the attribution estimators with exact patching, on the IOI job's prompts.

    python benchmarks/agreement.py           # the embedded SmolLM2, the IOI job's default 8 prompts
    python benchmarks/agreement.py --tiny    # a small random model and random prompts: a smoke test
    python benchmarks/agreement.py --sections edges   # the edges only

Per estimator, the Spearman rank correlation and the top-k overlap (the k strongest by size)
with exact patching:

- nodes: every head's z and every neuron of three layers (the first, the middle and the last),
  denoising as the job's head step does: the corrupted run patched from the clean one, the
  logit difference normalised by `calibrate` (0 corrupted, 1 clean); exact is `act_patch`;
- edges: a random sample of the edge graph scored exactly (`exact_edge_scores`: the clean run
  with that edge alone ablated from the corrupted one), in the circuit step's orientation, the
  raw logit difference; estimates are `attr_edges` of the same runs.

Times are wall times of one call each, on whatever machine runs it.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformer_lens_patching import (
    EdgeGraph,
    IterNode,
    LogitDiff,
    act_patch,
    attr_edges,
    attr_patch,
    calibrate,
    denoising_metric,
    exact_edge_scores,
)

NODE_METHODS = ("atp", "ig", "relp")
EDGE_METHODS = {
    "atp": ("EAP", None),
    "ig": ("EAP-IG", None),
    "relp": ("RelP", None),
    "ig-activations": ("EAP-IG on activations, 3 steps", 3),
}
"""attr_edges' methods: their label and `steps` (None: the default, 10). EAP-IG on activations
takes `1 + groups * (steps - 1)` passes (61 groups on SmolLM2: 123 passes at 3 steps)."""
SECTIONS = ("nodes", "edges")
TOP_K = {"z": 10, "post": 20, "edges": 20}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model: a smoke test")
    parser.add_argument("--edges", type=int, default=300, help="edges scored exactly (a random sample)")
    parser.add_argument("--seed", type=int, default=0, help="the edge sample's seed")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)"
    )
    return parser.parse_args(argv)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Spearman rank correlation of two flat tensors (ties broken by order)."""
    ranks = [
        torch.empty_like(x, dtype=torch.float64).scatter_(0, x.argsort(), torch.arange(len(x), dtype=torch.float64))
        for x in (a, b)
    ]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def top_overlap(estimate: torch.Tensor, exact: torch.Tensor, k: int) -> int:
    """How many of the k strongest cells by exact size are among the k strongest by estimated size."""
    k = min(k, len(exact))
    return len(set(estimate.abs().topk(k).indices.tolist()) & set(exact.abs().topk(k).indices.tolist()))


def ioi_setup(tiny: bool):
    """(model, clean, corrupted, answers, end positions) of the IOI job's default prompts on the
    embedded SmolLM2, or random prompts on a small random model."""
    if tiny:
        from _harness import SHAPES, build, prompt_pairs

        shape = SHAPES["tiny"]
        model = build(shape)
        clean, corrupted = prompt_pairs(shape.batch, shape.seq_len)
        answers = torch.tensor([[5, 6]] * shape.batch)
        return model, clean, corrupted, answers, None
    from transformer_lens_patching import load_smollm2
    from transformer_lens_patching.ioi import IOIDataset, IOISettings

    model = load_smollm2()
    settings = IOISettings()
    dataset = IOIDataset(
        settings.prompt_type, settings.n_prompts, tokenizer=model, seed=settings.seed, prepend_bos=settings.prepend_bos
    )
    flipped = dataset.flipped(settings.corruption)
    return model, dataset.toks, flipped.toks, dataset.answers, dataset.word_idx["end"]


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def node_rows(model, clean, corrupted, metric) -> list[tuple]:
    n_layers = model.cfg.n_layers
    layers = sorted({0, n_layers // 2, n_layers - 1})
    restored = denoising_metric(metric, *calibrate(model, metric, clean, corrupted))
    sweeps = {"z": IterNode("z"), "post": IterNode("post", layers=layers)}
    rows = []
    for name, sweep in sweeps.items():
        exact, exact_time = timed(lambda: act_patch(model, corrupted, sweep, restored, new_input=clean)[name])
        exact = exact.as_tensor().flatten()
        what = "every head's z" if name == "z" else f"every neuron of layers {', '.join(map(str, layers))}"
        rows.append((what, "exact (act_patch)", len(exact), None, None, exact_time))
        for method in NODE_METHODS:
            estimate, estimate_time = timed(
                lambda: attr_patch(model, corrupted, sweep, restored, new_input=clean, method=method)[name]
            )
            estimate = estimate.as_tensor().flatten()
            rows.append(
                (
                    what,
                    method,
                    len(exact),
                    spearman(estimate, exact),
                    top_overlap(estimate, exact, TOP_K[name]),
                    estimate_time,
                )
            )
    return rows


def edge_rows(model, clean, corrupted, metric, n_edges: int, seed: int) -> list[tuple]:
    graph = EdgeGraph.of(model)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(graph), generator=generator)[: min(n_edges, len(graph))].sort().values
    edges = [graph.edges[i] for i in chosen.tolist()]
    exact, exact_time = timed(lambda: exact_edge_scores(model, clean, metric, new_input=corrupted, edges=edges))
    exact_scores = torch.stack([torch.as_tensor(exact.score(edge)) for edge in edges]).float()
    what = f"{len(edges)} random edges of {len(graph):,}"
    rows = [(what, "exact (exact_edge_scores)", len(edges), None, None, exact_time)]
    for method, (label, steps) in EDGE_METHODS.items():
        scores, estimate_time = timed(
            lambda: attr_edges(model, clean, metric, new_input=corrupted, method=method, steps=steps)
        )
        estimate = torch.stack([torch.as_tensor(scores.score(edge)) for edge in edges]).float()
        rows.append(
            (
                what,
                label,
                len(edges),
                spearman(estimate, exact_scores),
                top_overlap(estimate, exact_scores, TOP_K["edges"]),
                estimate_time,
            )
        )
    return rows


def run(args: argparse.Namespace) -> list[tuple]:
    torch.manual_seed(0)
    model, clean, corrupted, answers, end = ioi_setup(args.tiny)
    metric = LogitDiff(answers, end)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}: choose from {', '.join(SECTIONS)}")
    rows = node_rows(model, clean, corrupted, metric) if "nodes" in sections else []
    if "edges" in sections:
        rows += edge_rows(model, clean, corrupted, metric, args.edges, args.seed)
    return rows


def print_rows(rows: list[tuple]) -> None:
    print("| cells | estimator | n | Spearman | top-k overlap | time |")
    print("|---|---|---|---|---|---|")
    for what, method, n, rho, overlap, seconds in rows:
        k = TOP_K["z" if "head" in what else "post" if "neuron" in what else "edges"]
        rho_text = "-" if rho is None else f"{rho:.3f}"
        overlap_text = "-" if overlap is None else f"{overlap}/{min(k, n)}"
        print(f"| {what} | {method} | {n} | {rho_text} | {overlap_text} | {seconds:.1f} s |")


def main(argv=None) -> int:
    print_rows(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
