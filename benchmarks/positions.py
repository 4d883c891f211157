"""Position-aware circuits: edges kept at some tokens only, against edges kept at every token.

    python benchmarks/positions.py           # the embedded SmolLM2, 8 IOI prompts of one template
    python benchmarks/positions.py --tiny    # a small random model and random prompts: a smoke test

Positions mean the same tokens across prompts only where the prompts share a template, so the
prompts here are the IOI job's kind (its corruption, its seed) drawn from one ABBA template. As
the job's circuit step does, the edges are scored on every other prompt (0, 2, 4, ...) and
faithfulness is held out on the others. Per ranking (EAP-IG on the inputs and on the senders'
activations, each per edge and per (edge, position) pair): the time to its scores; the smallest
size of `SIZES` whose faithfulness reaches 0.8 on the scoring prompts (signed ranking), with the
edges it holds and its held-out faithfulness; and MIB's CPR and CMD on the held-out prompts. The
sizes of position-aware rankings count (edge, position) pairs.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from discovery import halves

from transformer_lens_patching import attr_edges, faithfulness_curve, mib_faithfulness

TARGET = 0.8
SIZES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""MIB's sizes and one below them: a position-aware circuit at MIB's smallest already holds
0.1% of every edge at every position."""
INPUTS, ACTIVATIONS = {"method": "ig", "steps": 5}, {"method": "ig-activations", "steps": 3}
RANKINGS = {
    "EAP-IG (5 steps), edges": INPUTS,
    "EAP-IG (5 steps), edges at positions": {**INPUTS, "per_position": True},
    "EAP-IG on activations (3 steps), edges": ACTIVATIONS,
    "EAP-IG on activations (3 steps), edges at positions": {**ACTIVATIONS, "per_position": True},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model: a smoke test")
    return parser.parse_args(argv)


def one_template(tiny: bool):
    """(model, clean, corrupted, answers, end positions): 8 IOI prompts of one template on the
    embedded SmolLM2, or random prompts (one length) on a small random model."""
    if tiny:
        from agreement import ioi_setup

        return ioi_setup(tiny=True)
    from transformer_lens_patching import load_smollm2
    from transformer_lens_patching.ioi import IOIDataset, IOISettings

    model = load_smollm2()
    settings = IOISettings()
    dataset = IOIDataset(
        "ABBA", 8, tokenizer=model, seed=settings.seed, prepend_bos=settings.prepend_bos, nb_templates=1
    )
    flipped = dataset.flipped(settings.corruption)
    return model, dataset.toks, flipped.toks, dataset.answers, dataset.word_idx["end"]


def run(args: argparse.Namespace) -> list[tuple]:
    torch.manual_seed(0)
    model, clean, corrupted, answers, end = one_template(args.tiny)
    (clean_s, corrupted_s, metric_s), (clean_h, corrupted_h, metric_h) = halves(clean, corrupted, answers, end)
    rows = []
    for name, options in RANKINGS.items():
        start = time.perf_counter()
        scores = attr_edges(model, clean_s, metric_s, new_input=corrupted_s, **options)
        seconds = time.perf_counter() - start
        selection = faithfulness_curve(
            model, scores, clean_s, metric_s, new_input=corrupted_s, sizes=SIZES, absolute=False
        )
        held_out = faithfulness_curve(
            model, scores, clean_h, metric_h, new_input=corrupted_h, sizes=SIZES, absolute=False
        )
        mib = mib_faithfulness(model, scores, clean_h, metric_h, new_input=corrupted_h)
        reaching = [i for i, f in enumerate(selection.faithfulness) if f >= TARGET]
        index = reaching[0] if reaching else None
        units = len(scores.graph) * (clean.shape[1] if options.get("per_position") else 1)
        rows.append(
            (
                name,
                seconds,
                None if index is None else SIZES[index],
                units,
                None if index is None else selection.edge_counts[index],
                None if index is None else held_out.faithfulness[index],
                mib.cpr,
                mib.cmd,
            )
        )
    return rows


def print_rows(rows: list[tuple]) -> None:
    print(
        f"| ranking | time to scores | smallest size with faithfulness >= {TARGET} (scoring half) | edges it holds | "
        "held-out faithfulness there | CPR (held out) | CMD (held out) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, seconds, size, units, edges, held_out, cpr, cmd in rows:
        what = "pairs" if "positions" in name else "edges"
        reached = "none of the sizes" if size is None else f"{size:.2%} of {units:,} {what}"
        kept = "-" if edges is None else f"{edges:,}"
        held = "-" if held_out is None else f"{held_out:.3f}"
        print(f"| {name} | {seconds:.1f} s | {reached} | {kept} | {held} | {cpr:.3f} | {cmd:.3f} |")


def main(argv=None) -> int:
    print_rows(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
