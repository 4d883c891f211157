"""GPU benchmark: this library against TransformerLens' patching helpers and the prior art's
two-pass path patching, on one GPU, in one process.

    python benchmarks/gpu.py                         # GPT-2-small shape (float32), Llama-3.1-8B shape (bfloat16)
    python benchmarks/gpu.py --models gpt2           # the GPT-2-small shape only
    python benchmarks/gpu.py --llama-rows z,block,path-mlps,path-direct   # every row on the 8B shape too
    python benchmarks/gpu.py --tiny                  # tiny shapes on the CPU, one repeat: a smoke test (seconds)

Both models have random weights: a GPT-2-small-shaped model (12 layers, 12 heads, d_model
768, vocabulary 50257) in float32 and a Llama-3.1-8B-shaped one (32 layers, 32 heads, 8
key/value heads, d_model 4096, d_mlp 14336, vocabulary 128256) in bfloat16, built on the GPU
(a TransformerBridge on TransformerLens 4, a HookedTransformer on TransformerLens 2). The
inputs are 64 prompt pairs of 15 random tokens (the length of an IOI prompt), orig and new
differing at 3 positions; the metric is the logit difference of the two tokens at the first
changed position, at the last position. The GPT-2 rows use a batch of 8 prompts (the
TransformerLens comparison's batch), the 8B rows all 64.

Every time is the median wall time over the repeats, after one warm-up run, with
`torch.cuda.synchronize()` before and after; peak memory is `torch.cuda.max_memory_allocated`
during the call on CUDA (the whole process: weights and caches included), the peak resident
size on the CPU. Each row also compares the two sides' values (largest difference over the
baseline's largest value) and the script exits 1 where they differ by more than the
tolerance of the model's dtype (`TOLERANCE`).
"""

import argparse
import gc
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from _harness import (
    SHAPES,
    Row,
    Shape,
    build,
    comma_separated,
    gib,
    parse,
    parser,
    print_table,
    seconds,
    speed_up,
    timed,
)

from transformer_lens_patching import IterNode, LogitDiff, Node, act_patch, path_patch

N_PROMPTS = 64
CHANGED = (2, 4, 10)
"""The positions where the new prompts differ from the orig ones (the names of an IOI prompt)."""
ROWS = ("z", "block", "path-mlps", "path-direct")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""The largest difference of the two sides' values, over the baseline's largest value, by dtype:
float32 keeps about 7 significant digits, bfloat16 about 3, and the two sides batch and sum
in different orders."""
H100_MEMORY = 81559 << 20
"""An H100's memory (80 GB HBM3; 81,559 MiB as `nvidia-smi` shows it)."""
H100_BYTES = 78 << 30
"""The 8B z sweep's target: its peak reserved memory, at most an H100's 79.6 GiB less about 1.5 GiB
for the CUDA context and kernels."""
GPT2_TARGET = 10.0
"""The z sweep's target speed-up over TransformerLens on the GPT-2-small shape at batch 8."""


@dataclass(frozen=True)
class Setting:
    label: str
    shape: Shape
    baseline_cells: int | None
    """At most this many cells of each baseline run (timed and extrapolated); None: every cell."""


def llama(n_layers: int, n_heads: int, n_kv_heads: int, d_model: int, d_mlp: int, vocab: int, prompts: int) -> Shape:
    """A Llama-family shape with grouped-query attention, in bfloat16."""
    return Shape(
        n_layers, n_heads, d_model, d_mlp, vocab, prompts, family="llama", n_kv_heads=n_kv_heads, dtype=torch.bfloat16
    )


MODELS = {
    "gpt2": Setting("GPT-2-small shape", SHAPES["gpt2"], None),
    "llama8b": Setting("Llama-3.1-8B shape", llama(32, 32, 8, 4096, 14336, 128256, N_PROMPTS), 64),
}
TINY = {
    "gpt2": Setting("GPT-2 shape, tiny", Shape(2, 2, 32, 128, vocab=1000), None),
    "llama8b": Setting("Llama shape, tiny", llama(2, 4, 2, 32, 64, 1000, 16), 4),
}
"""`--tiny`: the same code on shapes that run in seconds on one CPU core (every baseline of the
Llama shape sampled, as on the 8B one)."""


@dataclass
class Inputs:
    orig: torch.Tensor
    new: torch.Tensor
    answers: torch.Tensor
    """(prompts, 2): the orig and the new token at the first changed position."""


def inputs(shape: Shape, device: torch.device) -> Inputs:
    """`shape.batch` prompt pairs of random tokens, differing at `CHANGED`."""
    generator = torch.Generator().manual_seed(0)
    span = shape.vocab - 100
    orig = torch.randint(100, shape.vocab, (shape.batch, shape.seq_len), generator=generator)
    new = orig.clone()
    shift = torch.randint(1, span, (shape.batch, len(CHANGED)), generator=generator)
    new[:, CHANGED] = 100 + (orig[:, CHANGED] - 100 + shift) % span
    answers = torch.stack([orig[:, CHANGED[0]], new[:, CHANGED[0]]], dim=1)
    return Inputs(orig.to(device), new.to(device), answers)


def logit_diff_function(answers: torch.Tensor) -> Callable:
    """The metric as a plain function of the full logits, in float32, for the baselines; `answers`
    on the model's device (a copy from the host per call would wait for the GPU each time)."""
    right, wrong = answers[:, 0], answers[:, 1]

    def metric(logits):
        rows = torch.arange(logits.shape[0], device=logits.device)
        return (logits[rows, -1, right] - logits[rows, -1, wrong]).float().mean()

    return metric


@dataclass
class Measured:
    seconds: float
    allocated: int
    reserved: int
    values: torch.Tensor
    """The values of the last run, flattened, float64 on the CPU."""


def measured(
    run: Callable[[], torch.Tensor], repeats: int, device: torch.device, warm_up: Callable[[], object]
) -> Measured:
    """The median seconds of `run` over `repeats` runs, without gradients, after one `warm_up` run;
    the peak memory over the runs, and the last run's values."""
    timing = timed(run, repeats, device=device, warm_up=warm_up, memory=True, release=False, grad=False)
    values = torch.as_tensor(timing.result).detach().to("cpu", torch.float64).flatten()
    allocated = max(peak.peak for peak in timing.peaks)
    return Measured(timing.seconds, allocated, max(peak.reserved for peak in timing.peaks), values)


def sample(n_cells: int, cap: int | None) -> list[int]:
    """`cap` cells of `n_cells`, evenly spaced (every cell of a baseline costs the same); all without a cap."""
    if cap is None or cap >= n_cells:
        return list(range(n_cells))
    return sorted({round(index * (n_cells - 1) / (cap - 1)) for index in range(cap)}) if cap > 1 else [0]


@dataclass
class Baseline:
    """One baseline of a row: `run(cells)` gives the values of those cells (indices into the row's
    flattened cells, in order), running one or two forward passes per cell."""

    n_cells: int
    run: Callable[[list[int]], torch.Tensor]


@dataclass
class Case:
    key: str
    name: str
    ours: Callable[[], torch.Tensor]
    """This library's sweep: the values of every cell, flattened."""
    baseline: Baseline


def index_frame(cells: list[int], sizes: Sequence[int], columns: Sequence[str]):
    """The TransformerLens helpers' `index_df` of the flattened `cells` of a grid of `sizes`."""
    import pandas as pd

    rows = [[int(value) for value in torch.unravel_index(torch.tensor(cell), tuple(sizes))] for cell in cells]
    return pd.DataFrame(rows, columns=list(columns))


def z_case(model, data: Inputs, new_cache, metric, baseline_metric, budget: dict) -> Case:
    """act_patch IterNode("z") against `get_act_patch_attn_head_out_all_pos`."""
    from transformer_lens import patching

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    helper = patching.get_act_patch_attn_head_out_all_pos

    def theirs(cells: list[int]) -> torch.Tensor:
        if len(cells) == n_layers * n_heads:
            return helper(model, data.orig, new_cache, baseline_metric)
        frame = index_frame(cells, (n_layers, n_heads), ("layer", "head"))
        return helper(model, data.orig, new_cache, baseline_metric, index_axis_names=None, index_df=frame)

    return Case(
        "z",
        'act_patch IterNode("z") vs get_act_patch_attn_head_out_all_pos',
        lambda: (
            act_patch(model, data.orig, IterNode("z"), metric, new_cache=new_cache, **budget)["z"]
            .permute_dims("layer", "head")
            .as_tensor()
        ),
        Baseline(n_layers * n_heads, theirs),
    )


BLOCK = ("resid_pre", "attn_out", "mlp_out")


def block_case(model, data: Inputs, new_cache, metric, baseline_metric, budget: dict) -> Case:
    """act_patch of the block sweep by position against `get_act_patch_block_every` (cells: component,
    layer, position)."""
    from transformer_lens import patching

    n_layers, seq_len = model.cfg.n_layers, data.orig.shape[1]
    helpers = (patching.get_act_patch_resid_pre, patching.get_act_patch_attn_out, patching.get_act_patch_mlp_out)
    per_component = n_layers * seq_len

    def ours() -> torch.Tensor:
        results = act_patch(
            model, data.orig, IterNode(list(BLOCK), seq_pos="each"), metric, new_cache=new_cache, **budget
        )
        return torch.stack([results[name].permute_dims("layer", "seq_pos").as_tensor() for name in BLOCK])

    def theirs(cells: list[int]) -> torch.Tensor:
        if len(cells) == len(BLOCK) * per_component:
            return patching.get_act_patch_block_every(model, data.orig, new_cache, baseline_metric)
        values = []
        for component, helper in enumerate(helpers):
            mine = [cell - component * per_component for cell in cells if cell // per_component == component]
            if mine:
                frame = index_frame(mine, (n_layers, seq_len), ("layer", "pos"))
                values.append(
                    helper(model, data.orig, new_cache, baseline_metric, index_axis_names=None, index_df=frame)
                )
        return torch.cat(values)

    return Case(
        "block",
        'act_patch IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each") vs get_act_patch_block_every',
        ours,
        Baseline(len(BLOCK) * per_component, theirs),
    )


def two_pass_path_patch(model, orig, orig_cache, new_cache, senders, metric, freeze_mlps: bool) -> torch.Tensor:
    """The prior art's path patching from each sender head to the logits: per sender, pass 1 runs the
    orig input with every head's `z` frozen to its orig value but the sender's, which takes its new
    value (with `freeze_mlps`, every MLP's output frozen too; otherwise the MLPs are recomputed),
    and records the final residual stream; pass 2 runs the orig input with the final residual
    stream set to the recorded one, and the metric reads its logits."""
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    values = []
    for layer, head in senders:
        recorded = {}
        model.run_with_hooks(
            orig,
            fwd_hooks=[
                *_frozen_hooks(model, orig_cache, new_cache, layer, head, freeze_mlps),
                (final, partial(_record, into=recorded)),
            ],
        )
        logits = model.run_with_hooks(orig, fwd_hooks=[(final, partial(_replace, value=recorded["resid"]))])
        values.append(metric(logits))
    return torch.stack(values)


def _frozen_hooks(model, orig_cache, new_cache, layer: int, head: int, freeze_mlps: bool) -> list:
    """Pass 1's hooks: every head's `z` set to its orig value, but head `head` of layer `layer`
    to its new one; with `freeze_mlps`, every MLP's output set to its orig value."""

    def freeze_z(activation, hook, frozen):
        out = orig_cache[f"blocks.{frozen}.attn.hook_z"].clone()
        if frozen == layer:
            out[:, :, head] = new_cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
        return out

    def freeze_mlp(activation, hook, frozen):
        return orig_cache[f"blocks.{frozen}.hook_mlp_out"].clone()

    n_layers = model.cfg.n_layers
    hooks = [(f"blocks.{i}.attn.hook_z", partial(freeze_z, frozen=i)) for i in range(n_layers)]
    if freeze_mlps:
        hooks += [(f"blocks.{i}.hook_mlp_out", partial(freeze_mlp, frozen=i)) for i in range(n_layers)]
    return hooks


def _record(activation, hook, into: dict) -> None:
    into["resid"] = activation.clone()


def _replace(activation, hook, value: torch.Tensor) -> torch.Tensor:
    return value


def path_case(model, data: Inputs, caches, metric, baseline_metric, budget: dict, direct_includes_mlps: bool) -> Case:
    """path_patch IterNode("z") -> the final residual stream against the prior art's two passes per sender;
    both given the orig and new caches."""
    orig_cache, new_cache = caches
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    receiver = Node("resid_post", n_layers - 1)
    senders = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]

    def ours() -> torch.Tensor:
        result = path_patch(
            model,
            data.orig,
            None,
            IterNode("z"),
            receiver,
            metric,
            orig_cache=orig_cache,
            new_cache=new_cache,
            direct_includes_mlps=direct_includes_mlps,
            **budget,
        )
        return result["z"].permute_dims("layer", "head").as_tensor()

    def theirs(cells: list[int]) -> torch.Tensor:
        return two_pass_path_patch(
            model,
            data.orig,
            orig_cache,
            new_cache,
            [senders[cell] for cell in cells],
            baseline_metric,
            freeze_mlps=not direct_includes_mlps,
        )

    frozen = "MLPs recomputed" if direct_includes_mlps else "MLPs frozen"
    return Case(
        "path-mlps" if direct_includes_mlps else "path-direct",
        f'path_patch IterNode("z") -> resid_post {n_layers - 1}, direct_includes_mlps={direct_includes_mlps}, '
        f"vs two passes per sender ({frozen})",
        ours,
        Baseline(len(senders), theirs),
    )


def _less(timing: Measured, held: int) -> Measured:
    return replace(timing, allocated=timing.allocated - held, reserved=timing.reserved - held)


def _target(case: Case, shape: Shape, ratio: float, reserved: int, tiny: bool, device: torch.device):
    """What the row is to reach, and whether it did (None: nothing to reach, or not checked here)."""
    if case.key != "z":
        return "-", None
    if tiny or device.type != "cuda":
        return "not checked (tiny)" if tiny else "not checked (no GPU)", None
    if shape.family == "gpt2":
        return f"{ratio:.1f}x >= {GPT2_TARGET:.0f}x", ratio >= GPT2_TARGET
    return f"peak reserved {gib(reserved)} <= {gib(H100_BYTES)}, one H100", reserved <= H100_BYTES


def measure(case: Case, shape: Shape, args, cap: int | None, title: str, held: int = 0) -> Row:
    """Time both sides of `case`; the baseline on `sample(n_cells, cap)` cells, its time scaled to all;
    `held` bytes (see `h100_ballast`) taken off the peaks. The row's details: the baseline's seconds
    as run (`measured_seconds`) on `cells_run` of `n_cells` cells, `peak_memory` (ours, baseline),
    `spread_gap` (the largest difference over the spread of the baseline's values, largest - smallest:
    what patching compares), and the `target` and whether it was met (`target_met`)."""
    cells = sample(case.baseline.n_cells, cap)
    ours = _less(measured(case.ours, args.repeats, args.device, warm_up=case.ours), held)
    baseline = measured(
        lambda: case.baseline.run(cells), args.repeats, args.device, warm_up=lambda: case.baseline.run(cells[:1])
    )
    baseline = _less(baseline, held)
    theirs = baseline.values
    difference = (ours.values[cells] - theirs).abs().max()
    baseline_seconds = baseline.seconds * case.baseline.n_cells / len(cells)
    target, met = _target(case, shape, baseline_seconds / ours.seconds, ours.reserved, args.tiny, args.device)
    return Row(
        case.name,
        ours.seconds,
        baseline_seconds,
        gap=float(difference / theirs.abs().max().clamp_min(1e-30)),
        tolerance=TOLERANCE[shape.dtype],
        group=title,
        details={
            "measured_seconds": baseline.seconds,
            "cells_run": len(cells),
            "n_cells": case.baseline.n_cells,
            "peak_memory": (ours.allocated, baseline.allocated),
            "spread_gap": float(difference / (theirs.max() - theirs.min()).clamp_min(1e-30)),
            "target": target,
            "target_met": met,
        },
    )


def cases(model, data: Inputs, keys: Sequence[str], args) -> list[Callable[[], Case]]:
    """The rows `keys`, each built when called (the path rows need both full caches)."""
    baseline_metric = logit_diff_function(data.answers.to(data.orig.device))
    metric = LogitDiff(data.answers) if args.metric == "object" else baseline_metric
    budget = {} if args.max_memory_gib is None else {"max_memory": int(args.max_memory_gib * 2**30)}
    act_hooks = {"z": ("attn.hook_z",), "block": tuple(f"hook_{name}" for name in BLOCK)}

    def act_cache(key):
        with torch.no_grad():
            return model.run_with_cache(data.new, names_filter=lambda name: name.endswith(act_hooks[key]))[1]

    def full_caches():
        with torch.no_grad():
            return model.run_with_cache(data.orig)[1], model.run_with_cache(data.new)[1]

    builders = {
        "z": lambda: z_case(model, data, act_cache("z"), metric, baseline_metric, budget),
        "block": lambda: block_case(model, data, act_cache("block"), metric, baseline_metric, budget),
        "path-mlps": lambda: path_case(model, data, full_caches(), metric, baseline_metric, budget, True),
        "path-direct": lambda: path_case(model, data, full_caches(), metric, baseline_metric, budget, False),
    }
    return [builders[key] for key in keys]


NOTES = """\
Ours: this library's call, given the new run's cache (act_patch: only the hooks it patches) or both runs'
caches (path_patch), computed before the timing, as the baselines are. TransformerLens' helpers run one
forward pass per cell, the prior art's path patching two per sender. An extrapolated baseline ran cells
evenly spaced over the sweep, its time scaled by the number of cells. Peak memory: on CUDA the allocator's
peak of allocated bytes during the call (the whole process: weights and caches included), on the CPU the
peak resident size. Values agree: the largest |ours - baseline| over the baseline's largest |value|, on
the cells the baseline ran, against the dtype's tolerance; then the same over the spread of the
baseline's values (largest - smallest), for information."""


def _baseline(row: Row) -> str:
    run, cells = row.details["cells_run"], row.details["n_cells"]
    if run == cells:
        return seconds(row.baseline)
    measured_seconds = seconds(row.details["measured_seconds"])
    return f"{seconds(row.baseline)} (extrapolated from {run} of {cells} cells, {measured_seconds})"


def _target_met(row: Row) -> str:
    target, met = row.details["target"], row.details["target_met"]
    return target if met is None else f"{'yes' if met else '**no**'} ({target})"


def _agree(row: Row) -> str:
    text = f"yes ({row.gap:.1e} <= {row.tolerance:.0e}" if row.agrees else f"**no** ({row.gap:.1e}"
    return text + f"; {row.details['spread_gap']:.1e} of the spread)"


COLUMNS = {
    "row": lambda row: row.name,
    "ours": lambda row: seconds(row.ours),
    "baseline": _baseline,
    "ratio (baseline / ours)": lambda row: speed_up(row.ratio),
    "peak memory, ours / baseline": lambda row: " / ".join(map(gib, row.details["peak_memory"])),
    "target met?": _target_met,
    "values agree": _agree,
}
"""One table per model (the rows' group)."""


def device_text(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
        return f"{properties.name} ({gib(properties.total_memory)}), CUDA {torch.version.cuda}, TF32 matmuls {tf32}"
    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def h100_ballast(shape: Shape, device: torch.device) -> torch.Tensor | None:
    """On a GPU with more memory than an H100, for the 8B shape, an unused tensor of the difference:
    the library's default memory budget is a share of the GPU's free memory, so without it a larger
    GPU would stack more per pass than an H100 and the H100 target would not be tested."""
    if shape.family != "llama" or device.type != "cuda":
        return None
    extra = torch.cuda.get_device_properties(device).total_memory - H100_MEMORY
    return torch.empty(extra, dtype=torch.uint8, device=device) if extra > 0 else None


def model_rows(key: str, setting: Setting, rows: Sequence[str], args) -> list[Row]:
    """Build the model of `setting` on `args.device` and measure `rows` on it, grouped under its title."""
    shape, device = setting.shape, args.device
    start = time.perf_counter()
    ballast = None if args.tiny else h100_ballast(shape, device)
    held = 0 if ballast is None else ballast.numel()
    model = build(shape, device)
    data = inputs(shape, device)
    built = time.perf_counter() - start
    cap = setting.baseline_cells if args.baseline_cells is None else args.baseline_cells
    cfg = model.cfg
    title = (
        f"## {setting.label} ({type(model).__name__}): {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({shape.n_kv_heads or shape.n_heads} key/value), d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, vocabulary "
        f"{cfg.d_vocab}, {str(shape.dtype).removeprefix('torch.')}, {shape.batch} prompts x {shape.seq_len} tokens; "
        f"metric a {'LogitDiff object' if args.metric == 'object' else 'plain function'} for ours, its memory "
        f"budget {'the default' if args.max_memory_gib is None else f'{args.max_memory_gib:g} GiB'}; built in "
        f"{built:.0f} s"
    )
    if held:
        title += (
            f"; {gib(held)} held unused throughout, so that the GPU has an H100's memory (subtracted from the peaks)"
        )
    measured_rows = []
    for make in cases(model, data, rows, args):
        case = make()
        began = time.perf_counter()
        measured_rows.append(measure(case, shape, args, cap, title, held))
        print(f"  {key} {case.key}: measured in {time.perf_counter() - began:.0f} s", flush=True)
        del case
    del model, ballast
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured_rows


def parse_args(argv=None) -> argparse.Namespace:
    benchmark = parser(__doc__, "tiny shapes on the CPU, one repeat: a smoke test")
    benchmark.add_argument("--device", help="cuda or cpu (default: cuda, or cpu with --tiny)")
    benchmark.add_argument(
        "--models",
        type=comma_separated(list(MODELS)),
        default=list(MODELS),
        help=f"comma-separated, from: {', '.join(MODELS)}",
    )
    rows = comma_separated(ROWS)
    benchmark.add_argument("--rows", type=rows, default=list(ROWS), help=f"GPT-2 rows, from: {', '.join(ROWS)}")
    benchmark.add_argument("--llama-rows", type=rows, help="rows on the 8B shape (default: z; every row with --tiny)")
    benchmark.add_argument(
        "--baseline-cells",
        type=int,
        help="run at most this many cells of each baseline and "
        "extrapolate (default: every cell on GPT-2, 64 on the 8B shape)",
    )
    benchmark.add_argument(
        "--metric",
        choices=("object", "function"),
        default="object",
        help="ours: a LogitDiff object (reads two logits) or a function (reads all)",
    )
    benchmark.add_argument("--max-memory-gib", type=float, help="our calls' max_memory (default: the library's)")
    args = parse(benchmark, argv)
    if args.baseline_cells is not None and args.baseline_cells < 1:
        benchmark.error("--baseline-cells: at least 1")
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.llama_rows is None:
        args.llama_rows = list(ROWS) if args.tiny else ["z"]
    return args


def run(args: argparse.Namespace) -> list[Row]:
    """The rows of each of `args.models` (with `--tiny`, of its tiny shape) on `args.device`."""
    settings = TINY if args.tiny else MODELS
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformer-lens", "transformers"))
    print(
        f"device {device_text(args.device)}; torch {torch.__version__}, {versions}; "
        f"median of {args.repeats} after a warm-up run"
    )
    rows = []
    for key in args.models:
        rows += model_rows(key, settings[key], args.rows if key == "gpt2" else args.llama_rows, args)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run with --tiny (tiny shapes on the CPU), or --device cpu for the full shapes.")
        return 2
    rows = run(args)
    print_table(rows, COLUMNS)
    print(f"\n{NOTES}")
    return 0 if all(row.agrees for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
