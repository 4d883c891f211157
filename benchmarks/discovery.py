"""Circuit discovery: the faithfulness each method's circuits reach, and how small a faithful one is.

    python benchmarks/discovery.py           # the embedded SmolLM2, the IOI job's default 8 prompts
    python benchmarks/discovery.py --tiny    # a small random model and random prompts: a smoke test

As the job's circuit step does: the edges are scored on every other prompt (0, 2, 4, ...), the
resample ablation from the corrupted prompts, the raw logit difference. Per method: the time to
its ranking; the smallest of MIB's circuit sizes whose faithfulness reaches 0.8 on the scoring
prompts (signed ranking, as the job picks), with its faithfulness on the held-out prompts
(1, 3, 5, ...); and MIB's CPR and CMD on the held-out prompts. Methods: greedy top-n by EAP,
EAP-IG and RelP, and learned edge masks warm-started from EAP-IG.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from agreement import ioi_setup

from transformer_lens_patching import LogitDiff, attr_edges, faithfulness_curve, learn_edge_masks, mib_faithfulness

TARGET = 0.8
IG_STEPS = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model: a smoke test")
    parser.add_argument("--mask-steps", type=int, default=100, help="learned masks' optimisation steps")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="learned masks' Adam step size")
    parser.add_argument("--density", type=float, default=0.02, help="learned masks' target share of kept edges")
    parser.add_argument(
        "--methods", type=lambda text: text.split(","), default=None, help="only these rows (names' starts)"
    )
    return parser.parse_args(argv)


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


def main(argv=None) -> int:
    print_rows(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
