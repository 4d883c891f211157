"""Sweep benchmark: this library against TransformerLens 4.3's patching helpers and the
prior art's one-or-two-full-passes-per-node algorithm, measured in one process.

    python benchmarks/sweeps.py                  # GPT-2-small shape (random weights) and SmolLM2-135M
    python benchmarks/sweeps.py --models gpt2    # GPT-2-small shape only
    python benchmarks/sweeps.py --quick          # one repeat, small model: checks that it runs

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
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from transformer_lens_patching import IterNode, Node, act_patch, path_patch  # noqa: E402
from transformer_lens_patching._core.memory import DEFAULT_MAX_MEMORY  # noqa: E402
from transformer_lens_patching.metrics import LogitDiff  # noqa: E402

BATCH, SEQ_LEN = 8, 15
SWEEPS = ("z", "block", "path-logits", "path-q", "neurons")


def gpt2_small_shape(tokenizer, quick: bool):
    """A random GPT-2-small-shaped TransformerBridge (12 layers, 12 heads, d_model 768)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    size = dict(n_layer=4, n_head=4, n_embd=128) if quick else dict(n_layer=12, n_head=12, n_embd=768)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **size)).eval()
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer, device="cpu")
    model.enable_compatibility_mode()
    return model


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


class PeakMemory:
    """Peak resident memory, above the level at entry, sampled every millisecond. Memory
    the allocator kept from earlier work is handed back first, so that it is not reused
    unseen."""

    def __enter__(self):
        gc.collect()
        _LIBC.malloc_trim(0)
        self.base = self.peak = _rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def increase(self) -> int:
        return self.peak - self.base


_LIBC = ctypes.CDLL("libc.so.6")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measured:
    seconds: float
    attention: float
    mlp: float
    memory: int


def timed(function: Callable, repeats: int, model) -> Measured:
    """Median seconds over `repeats` runs; evaluations and peak memory of the last run."""
    times = []
    for _ in range(repeats):
        with LayerCounter(model) as counter, PeakMemory() as memory:
            start = time.perf_counter()
            with torch.no_grad():
                function()
            times.append(time.perf_counter() - start)
    return Measured(statistics.median(times), counter.attention, counter.mlp, memory.increase)


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


def report(sweep: "Sweep", ours: Measured, selected: Measured, baseline: Measured, model, rwc: int) -> None:
    budget = DEFAULT_MAX_MEMORY["cpu"]
    print(sweep.name)
    for label, measured, minimum in (
        ("ours", ours, sweep.minimum),
        ("ours, LogitDiff object", selected, sweep.selected_minimum),
    ):
        bound = sweep.baseline_work.macs(model) / minimum.macs(model)
        print(
            f"  {label:22s} {measured.seconds:7.2f} s   baseline {baseline.seconds:7.2f} s   speed-up "
            f"{baseline.seconds / measured.seconds:5.2f}x   (arithmetic bound {bound:.2f}x)\n"
            f"    attention / MLP layer evaluations {measured.attention:.0f} / {measured.mlp:.0f} "
            f"(minimum {minimum.attention:.0f} / {minimum.mlp:.0f}); "
            f"peak memory above start {measured.memory / 2**20:.0f} MiB"
        )
    print(
        f"  baseline: attention / MLP layer evaluations {baseline.attention:.0f} / {baseline.mlp:.0f}; peak memory "
        f"{baseline.memory / 2**20:.0f} MiB; memory limit 1.5 x run_with_cache ({rwc / 2**20:.0f} MiB) + budget "
        f"({budget / 2**20:.0f} MiB) = {(1.5 * rwc + budget) / 2**20:.0f} MiB"
    )


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


def run(model, label: str, repeats: int, n_neurons: int, keys: set[str], memory_only: bool) -> None:
    """Time (or with `memory_only`, only measure the peak memory of) each sweep in `keys`."""
    generator = torch.Generator().manual_seed(0)
    orig = torch.randint(100, 20000, (BATCH, SEQ_LEN), generator=generator)
    new = torch.randint(100, 20000, (BATCH, SEQ_LEN), generator=generator)
    with torch.no_grad():
        _, new_cache = model.run_with_cache(new)
        with PeakMemory() as rwc:
            model.run_with_cache(orig)

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 6]).mean()

    metric_object = LogitDiff(torch.tensor([[5, 6]] * BATCH))
    cfg = model.cfg
    print(
        f"\n== {label}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}, batch {BATCH} x {SEQ_LEN}; "
        f"one run_with_cache: {rwc.increase / 2**20:.0f} MiB =="
    )
    limit = 1.5 * rwc.increase + DEFAULT_MAX_MEMORY["cpu"]
    for sweep in sweeps_of(model, orig, new, new_cache, metric, n_neurons):
        if sweep.key not in keys:
            continue
        if memory_only:
            for form, used in (("function", metric), ("LogitDiff object", metric_object)):
                with torch.no_grad(), PeakMemory() as peak:
                    sweep.ours(used)
                print(
                    f"{sweep.name}, metric a {form}\n  peak memory above start: {peak.increase / 2**20:.0f} MiB "
                    f"(limit {limit / 2**20:.0f} MiB)"
                )
        else:
            ours = timed(lambda: sweep.ours(metric), repeats, model)
            selected = timed(lambda: sweep.ours(metric_object), repeats, model)
            baseline = timed(sweep.baseline, repeats, model)
            report(sweep, ours, selected, baseline, model, rwc.increase)


def memory_at_batch(model, batch: int) -> None:
    """Peak memory of a sweep at a large batch with default settings, against one run_with_cache."""
    generator = torch.Generator().manual_seed(1)
    orig = torch.randint(100, 20000, (batch, SEQ_LEN), generator=generator)
    new = torch.randint(100, 20000, (batch, SEQ_LEN), generator=generator)
    layers = [0, model.cfg.n_layers - 1]
    with torch.no_grad():
        with PeakMemory() as rwc:
            model.run_with_cache(orig)
        with PeakMemory() as sweep:
            act_patch(model, orig, IterNode("z", layers=layers), lambda logits: logits[:, -1, 5].mean(), new_input=new)
    limit = 1.5 * rwc.increase + DEFAULT_MAX_MEMORY["cpu"]
    print(
        f'\n== memory at batch {batch} x {SEQ_LEN}, act_patch IterNode("z", layers={layers}), default settings ==\n'
        f"  peak above start: sweep {sweep.increase / 2**20:.0f} "
        f"MiB, one run_with_cache {rwc.increase / 2**20:.0f} MiB, "
        f"limit {limit / 2**20:.0f} MiB"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat on a small model: a smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="gpt2,smollm2", help="comma-separated: gpt2 (GPT-2-small shape), smollm2")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, from: {', '.join(SWEEPS)}")
    parser.add_argument("--memory-only", action="store_true", help="only the peak memory of this library's sweeps")
    parser.add_argument("--neurons", type=int, default=256, help="neurons in the neuron sweep (3072: all of GPT-2's)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from transformer_lens_patching import load_smollm2
    from transformer_lens_patching._embedded import hf_folder

    torch.set_num_threads(os.cpu_count() or 1)
    repeats = 1 if args.quick else args.repeats
    models = args.models.split(",")
    sweeps = set(args.sweeps.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {repeats}")
    if "gpt2" in models:
        model = gpt2_small_shape(AutoTokenizer.from_pretrained(str(hf_folder())), args.quick)
        run(model, "GPT-2-small shape, random weights", repeats, args.neurons, sweeps, args.memory_only)
        memory_at_batch(model, 64)
    if "smollm2" in models and not args.quick:
        run(load_smollm2(), "SmolLM2-135M", repeats, args.neurons, sweeps, args.memory_only)


if __name__ == "__main__":
    sys.exit(main())
