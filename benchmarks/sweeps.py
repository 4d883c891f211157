"""Sweep benchmark: this library against TransformerLens 4.3's patching helpers and the
prior art's one-or-two-full-passes-per-node algorithm, measured in one process.

    python benchmarks/sweeps.py                  # GPT-2-small shape (random weights) and SmolLM2-135M
    python benchmarks/sweeps.py --models gpt2    # GPT-2-small shape only
    python benchmarks/sweeps.py --tiny           # one repeat, small model: checks that it runs

For each sweep it prints the median wall time of each method over the repeats and their
ratio next to the arithmetic bound (the multiply-adds of the baseline over the minimum the
sweep needs: a patch at layer l needs only layers l and later), the attention and MLP
layer evaluations performed against that minimum, and the peak memory against one
`run_with_cache` plus the default budget. Each sweep runs twice here: with the metric as
a plain function (the library computes full logits) and as a `LogitDiff` object, which
declares that it reads two logits at the last position (only those are computed); the
baseline is timed once, as it computes full logits either way.
"""

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _harness import (
    ANSWERS,
    SHAPES,
    PeakMemory,
    Row,
    Shape,
    build,
    comma_separated,
    logit_diff,
    machine,
    mib,
    parse,
    parser,
    print_table,
    prompt_pairs,
    seconds,
    timed,
)

from transformer_lens_patching import IterNode, Node, act_patch, path_patch
from transformer_lens_patching._core.memory import DEFAULT_MAX_MEMORY

BATCH, SEQ_LEN = 8, 15
SWEEPS = ("z", "block", "path-logits", "path-q", "neurons")
MODELS = ("gpt2", "smollm2")
TINY = Shape(4, 4, 128, 512)
"""`--tiny`'s model, in place of the GPT-2-small shape."""


class LayerCounter:
    """Counts attention and MLP evaluations, each on one copy of the batch: attention by
    `blocks.L.attn.hook_pattern` (which fires only where attention is computed), MLPs by
    `blocks.L.mlp.hook_post`."""

    def __init__(self, model):
        self.model = model
        self.attention = 0.0
        self.mlp = 0.0
        self.handles = []

    def __enter__(self):
        for layer in range(self.model.cfg.n_layers):
            for name, kind in (
                (f"blocks.{layer}.attn.hook_pattern", "attention"),
                (f"blocks.{layer}.mlp.hook_post", "mlp"),
            ):
                hook_point = self.model.hook_dict[name]
                self.handles.append(
                    hook_point.register_forward_hook(lambda m, i, out, kind=kind: self._count(kind, out))
                )
        return self

    def _count(self, kind: str, output) -> None:
        setattr(self, kind, getattr(self, kind) + output.shape[0] / BATCH)

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@dataclass
class Measured:
    seconds: float
    attention: float
    mlp: float
    memory: int


def measured(function: Callable, repeats: int, model) -> Measured:
    """Median seconds over `repeats` runs without gradients; evaluations and peak memory above start
    of the last run."""

    def counted():
        with LayerCounter(model) as counter:
            function()
        return counter

    timing = timed(counted, repeats, memory=True, grad=False)
    return Measured(timing.seconds, timing.result.attention, timing.result.mlp, timing.peaks[-1].increase)


def prior_art_path_patch(model, orig, new, senders, receivers, metric):
    """The prior art's direct_includes_mlps=True: per sender, a pass with heads frozen, then a
    pass patching the receivers; every pass a full forward on one batch."""
    with torch.no_grad():
        _, orig_cache = model.run_with_cache(orig)
        _, new_cache = model.run_with_cache(new)
    results = []
    for layer, head in senders:
        recorded = {}

        def freeze(act, hook, frozen_layer):
            out = orig_cache[f"blocks.{frozen_layer}.attn.hook_z"].clone()
            if frozen_layer == layer:
                out[:, :, head] = new_cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
            return out

        hooks = [
            (f"blocks.{i}.attn.hook_z", lambda act, hook, i=i: freeze(act, hook, i)) for i in range(model.cfg.n_layers)
        ]
        hooks += [(name, lambda act, hook, name=name: recorded.setdefault(name, act.clone())) for name, _ in receivers]
        with torch.no_grad():
            model.run_with_hooks(orig, fwd_hooks=hooks)

        def patch(act, hook, name, index):
            out = act.clone()
            out[index] = recorded[name][index]
            return out

        patches = [
            (name, lambda act, hook, name=name, index=index: patch(act, hook, name, index)) for name, index in receivers
        ]
        with torch.no_grad():
            results.append(metric(model.run_with_hooks(orig, fwd_hooks=patches)))
    return torch.stack(results)


def prior_art_direct_path_patch(model, orig, new, senders, receiver_layer, receiver_heads, metric):
    """The prior art's direct_includes_mlps=False: per sender, one full pass adding
    `(z_new - z_orig) @ W_O` to the receivers' per-head query inputs."""
    with torch.no_grad():
        _, orig_cache = model.run_with_cache(orig)
        _, new_cache = model.run_with_cache(new)
        w_o = model.W_O
    results = []
    model.set_use_split_qkv_input(True)
    try:
        for layer, head in senders:
            z = f"blocks.{layer}.attn.hook_z"
            delta = (new_cache[z] - orig_cache[z])[:, :, head] @ w_o[layer, head]
            active = layer < receiver_layer

            def add(act, hook, delta=delta, active=active):
                out = act.clone()
                if active:
                    out[:, :, receiver_heads] += delta.unsqueeze(2)
                return out

            with torch.no_grad():
                results.append(
                    metric(model.run_with_hooks(orig, fwd_hooks=[(f"blocks.{receiver_layer}.hook_q_input", add)]))
                )
    finally:
        model.set_use_split_qkv_input(False)
    return torch.stack(results)


def one_forward_per_neuron(model, orig, new_cache, layer, neurons, metric):
    name = f"blocks.{layer}.mlp.hook_post"
    results = []
    for neuron in neurons:

        def patch(act, hook, neuron=neuron):
            out = act.clone()
            out[..., neuron] = new_cache[name][..., neuron]
            return out

        with torch.no_grad():
            results.append(metric(model.run_with_hooks(orig, fwd_hooks=[(name, patch)])))
    return torch.stack(results)


def macs_per_token(model) -> tuple[float, float, float]:
    """Multiply-adds per token of one layer's attention (projections; scores ignored), of
    one MLP, and of the unembedding."""
    cfg = model.cfg
    kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    attention = 2 * cfg.d_model * cfg.n_heads * cfg.d_head + 2 * cfg.d_model * kv_heads * cfg.d_head
    mlp = (3 if getattr(cfg, "gated_mlp", False) else 2) * cfg.d_model * cfg.d_mlp
    return attention, mlp, cfg.d_model * cfg.d_vocab


@dataclass
class Work:
    """Layer evaluations (each on one copy of the batch) and unembeddings (full ones, or the
    fraction of one a selected-logits metric needs) of a method."""

    attention: float = 0
    mlp: float = 0
    unembed: float = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.attention + other.attention, self.mlp + other.mlp, self.unembed + other.unembed)

    def macs(self, model) -> float:
        attention, mlp, unembed = macs_per_token(model)
        return self.attention * attention + self.mlp * mlp + self.unembed * unembed


def selected_unembedding(model) -> float:
    """The fraction of a full unembedding that two logits at the last position need."""
    return 2 / model.cfg.d_vocab / SEQ_LEN


def layers_from(model, layer: int, unembed: float = 1) -> Work:
    """Attention and MLP of layers `layer` and later, then `unembed` unembeddings."""
    n = model.cfg.n_layers - layer
    return Work(n, n, unembed)


def full_runs(model, count: int, unembed: float = 1) -> Work:
    """`count` full forward passes (e.g. caching the orig and new runs)."""
    return Work(count * model.cfg.n_layers, count * model.cfg.n_layers, count * unembed)


def act_minimum(model, cell_layers: list[int], unembed: float = 1) -> Work:
    """A patch at layer l needs layers l and later; starting there needs one orig run."""
    return sum((layers_from(model, layer, unembed) for layer in cell_layers), full_runs(model, 1, unembed))


def path_minimum(
    model, sender_layers: list[int], receiver_layer: int | None, mlps_direct: bool, unembed: float = 1
) -> Work:
    """Path patching each sender, with the orig and new runs cached first. Pass 1 needs only
    the MLPs between the sender and the receiver (every head is frozen), pass 2 the layers
    from the receiver on (only the unembedding for the final residual stream); without
    MLPs, one pass from the receiver on. Senders at or after the receiver reach nothing and
    share one unembedding of the orig run."""
    n_layers = model.cfg.n_layers
    start = n_layers if receiver_layer is None else receiver_layer
    work = full_runs(model, 2, unembed) + Work(unembed=unembed if any(layer >= start for layer in sender_layers) else 0)
    for layer in sender_layers:
        if layer < start:
            work += Work(mlp=start - layer if mlps_direct else 0) + layers_from(model, start, unembed)
    return work


@dataclass
class Sweep:
    key: str
    name: str
    ours: Callable[[Callable], object]
    """Runs this library's sweep with the metric given."""
    baseline: Callable
    baseline_work: Work
    minimum: Work
    selected_minimum: Work


def sweeps_of(model, orig, new, new_cache, metric, n_neurons: int) -> list[Sweep]:
    """Every benchmarked sweep on `model`: ours (given a metric), the baseline (with
    `metric`), and their work."""
    from transformer_lens import patching

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    head_layers = [layer for layer in range(n_layers) for _ in range(n_heads)]
    senders = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    block_layers = [layer for _ in range(3) for layer in range(n_layers) for _ in range(SEQ_LEN)]
    block_every = IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each")
    last = n_layers - 1
    final = [(f"blocks.{last}.hook_resid_post", (slice(None),))]
    receiver_layer = min(9, n_layers - 1)
    heads = list(range(min(3, n_heads)))
    receivers = [Node("q", receiver_layer, head=h) for h in heads]
    receiver_hooks = [(f"blocks.{receiver_layer}.attn.hook_q", (slice(None), slice(None), h)) for h in heads]
    layer = n_layers // 2
    neurons = list(range(min(n_neurons, model.cfg.d_mlp)))
    read = selected_unembedding(model)

    def act(cell_layers):
        return act_minimum(model, cell_layers), act_minimum(model, cell_layers, read)

    def path(receiver, direct):
        return path_minimum(model, head_layers, receiver, direct), path_minimum(
            model, head_layers, receiver, direct, read
        )

    q_sweeps = [
        Sweep(
            "path-q",
            f'path_patch IterNode("z") -> q of {len(heads)} '
            f"layer-{receiver_layer} heads, direct_includes_mlps={direct}",
            lambda used, direct=direct: path_patch(
                model, orig, new, IterNode("z"), receivers, used, direct_includes_mlps=direct
            ),
            (lambda: prior_art_path_patch(model, orig, new, senders, receiver_hooks, metric))
            if direct
            else (lambda: prior_art_direct_path_patch(model, orig, new, senders, receiver_layer, heads, metric)),
            full_runs(model, 2 + (2 if direct else 1) * len(senders)),
            *path(receiver_layer, direct),
        )
        for direct in (True, False)
    ]
    return [
        Sweep(
            "z",
            'act_patch IterNode("z") vs get_act_patch_attn_head_out_all_pos',
            lambda used: act_patch(model, orig, IterNode("z"), used, new_cache=new_cache),
            lambda: patching.get_act_patch_attn_head_out_all_pos(model, orig, new_cache, metric),
            full_runs(model, len(head_layers)),
            *act(head_layers),
        ),
        Sweep(
            "block",
            'act_patch IterNode(["resid_pre", "attn_out", "mlp_out"], seq_pos="each") vs get_act_patch_block_every',
            lambda used: act_patch(model, orig, block_every, used, new_cache=new_cache),
            lambda: patching.get_act_patch_block_every(model, orig, new_cache, metric),
            full_runs(model, len(block_layers)),
            *act(block_layers),
        ),
        Sweep(
            "path-logits",
            f'path_patch IterNode("z") -> resid_post {last}, MLPs direct, vs two full passes per sender',
            lambda used: path_patch(model, orig, new, IterNode("z"), Node("resid_post", last), used),
            lambda: prior_art_path_patch(model, orig, new, senders, final, metric),
            full_runs(model, 2 + 2 * len(senders)),
            *path(None, True),
        ),
        *q_sweeps,
        Sweep(
            "neurons",
            f'act_patch IterNode("post", layers=[{layer}]) on {len(neurons)} neurons vs one forward per neuron',
            lambda used: act_patch(
                model, orig, IterNode("post", layers=[layer], neurons=neurons), used, new_cache=new_cache
            ),
            lambda: one_forward_per_neuron(model, orig, new_cache, layer, neurons, metric),
            full_runs(model, len(neurons)),
            *act([layer] * len(neurons)),
        ),
    ]


def sweep_rows(sweep: Sweep, ours: Measured, selected: Measured, baseline: Measured, model, title: str) -> list[Row]:
    """Ours with the metric as a plain function and as a LogitDiff object, each against the baseline."""
    return [
        Row(
            sweep.name,
            measured.seconds,
            baseline.seconds,
            group=title,
            details={
                "metric": form,
                "bound": sweep.baseline_work.macs(model) / minimum.macs(model),
                "evaluations": (measured.attention, measured.mlp),
                "minimum": (minimum.attention, minimum.mlp),
                "baseline_evaluations": (baseline.attention, baseline.mlp),
                "peak_memory": (measured.memory, baseline.memory),
            },
        )
        for form, measured, minimum in (
            ("plain function", ours, sweep.minimum),
            ("LogitDiff object", selected, sweep.selected_minimum),
        )
    ]


def model_rows(model, label: str, args: argparse.Namespace) -> list[Row]:
    """Time (or with `--memory-only`, only measure the peak memory of) each of `args.sweeps` on `model`."""
    orig, new = prompt_pairs(BATCH, SEQ_LEN)
    with torch.no_grad():
        _, new_cache = model.run_with_cache(new)
        with PeakMemory() as rwc:
            model.run_with_cache(orig)

    def metric(logits):
        return (logits[:, -1, ANSWERS[0]] - logits[:, -1, ANSWERS[1]]).mean()

    metric_object = logit_diff(BATCH)
    cfg = model.cfg
    budget = DEFAULT_MAX_MEMORY["cpu"]
    limit = 1.5 * rwc.increase + budget
    title = (
        f"## {label}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}, batch {BATCH} x {SEQ_LEN}; "
        f"one run_with_cache: {mib(rwc.increase)}; memory limit 1.5 x that + budget ({mib(budget)}) = {mib(limit)}"
    )
    rows = []
    for sweep in sweeps_of(model, orig, new, new_cache, metric, args.neurons):
        if sweep.key not in args.sweeps:
            continue
        start = time.perf_counter()
        if args.memory_only:
            for form, used in (("plain function", metric), ("LogitDiff object", metric_object)):
                with torch.no_grad(), PeakMemory() as peak:
                    sweep.ours(used)
                details = {"metric": form, "run_with_cache": rwc.increase}
                rows.append(Row(sweep.name, peak.increase, limit, unit="B", group=title, details=details))
        else:
            ours = measured(lambda: sweep.ours(metric), args.repeats, model)
            selected = measured(lambda: sweep.ours(metric_object), args.repeats, model)
            baseline = measured(sweep.baseline, args.repeats, model)
            rows += sweep_rows(sweep, ours, selected, baseline, model, title)
        print(f"  {label} {sweep.key}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def memory_at_batch(model, batch: int) -> Row:
    """Peak memory of a sweep at a large batch with default settings, against one run_with_cache."""
    orig, new = prompt_pairs(batch, SEQ_LEN, seed=1)
    layers = [0, model.cfg.n_layers - 1]
    with torch.no_grad():
        with PeakMemory() as rwc:
            model.run_with_cache(orig)
        with PeakMemory() as sweep:
            act_patch(model, orig, IterNode("z", layers=layers), lambda logits: logits[:, -1, 5].mean(), new_input=new)
    return Row(
        f'act_patch IterNode("z", layers={layers})',
        sweep.increase,
        1.5 * rwc.increase + DEFAULT_MAX_MEMORY["cpu"],
        unit="B",
        group=f"## memory at batch {batch} x {SEQ_LEN}, default settings",
        details={"metric": "plain function", "run_with_cache": rwc.increase},
    )


def _evaluations(row: Row) -> str:
    (attention, mlp), (least_attention, least_mlp) = row.details["evaluations"], row.details["minimum"]
    return f"{attention:.0f} / {mlp:.0f} ({least_attention:.0f} / {least_mlp:.0f})"


def _baseline_evaluations(row: Row) -> str:
    attention, mlp = row.details["baseline_evaluations"]
    return f"{attention:.0f} / {mlp:.0f}"


TIME_COLUMNS = {
    "sweep": lambda row: row.name,
    "metric": lambda row: row.details["metric"],
    "ours": lambda row: seconds(row.ours),
    "baseline": lambda row: seconds(row.baseline),
    "speed-up": lambda row: f"**{row.ratio:.2f}x**",
    "arithmetic bound": lambda row: f"{row.details['bound']:.2f}x",
    "attention / MLP layer evaluations (minimum)": _evaluations,
    "baseline's evaluations": _baseline_evaluations,
    "peak memory above start, ours / baseline": lambda row: " / ".join(map(mib, row.details["peak_memory"])),
}
MEMORY_COLUMNS = {
    "sweep": lambda row: row.name,
    "metric": lambda row: row.details["metric"],
    "peak memory above start": lambda row: mib(row.ours),
    "one run_with_cache": lambda row: mib(row.details["run_with_cache"]),
    "limit": lambda row: mib(row.baseline),
}


def parse_args(argv=None) -> argparse.Namespace:
    benchmark = parser(__doc__, "one repeat on a small model, GPT-2 shape only: a smoke test")
    benchmark.add_argument(
        "--models",
        type=comma_separated(MODELS),
        default=list(MODELS),
        help="comma-separated: gpt2 (GPT-2-small shape), smollm2",
    )
    benchmark.add_argument(
        "--sweeps",
        type=comma_separated(SWEEPS),
        default=list(SWEEPS),
        help=f"comma-separated, from: {', '.join(SWEEPS)}",
    )
    benchmark.add_argument("--memory-only", action="store_true", help="only the peak memory of this library's sweeps")
    benchmark.add_argument("--neurons", type=int, default=256, help="neurons in the neuron sweep (3072: all GPT-2's)")
    return parse(benchmark, argv)


def run(args: argparse.Namespace) -> list[Row]:
    """The rows of `args.sweeps` on each of `args.models` (with `--tiny`, a small GPT-2 shape only)."""
    from transformer_lens_patching import load_smollm2

    print(f"{machine()}; median of {args.repeats}")
    rows = []
    if "gpt2" in args.models:
        model = build(TINY if args.tiny else SHAPES["gpt2"])
        rows += model_rows(model, "GPT-2-small shape, random weights", args)
        rows.append(memory_at_batch(model, 64))
    if "smollm2" in args.models and not args.tiny:
        rows += model_rows(load_smollm2(), "SmolLM2-135M", args)
    return rows


def main(argv=None) -> int:
    rows = run(parse_args(argv))
    print_table([row for row in rows if row.unit == "s"], TIME_COLUMNS)
    print_table([row for row in rows if row.unit == "B"], MEMORY_COLUMNS)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    sys.exit(main())
