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
import contextlib
import gc
import importlib.metadata
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from transformer_lens_patching import IterNode, LogitDiff, Node, act_patch, path_patch

TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])
N_PROMPTS, SEQ_LEN = 64, 15
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
class Shape:
    label: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_mlp: int
    vocab: int
    dtype: torch.dtype
    prompts: int
    baseline_cells: int | None
    """At most this many cells of each baseline run (timed and extrapolated); None: every cell."""


SHAPES = {
    "gpt2": Shape("GPT-2-small shape", "gpt2", 12, 12, 12, 768, 3072, 50257, torch.float32, 8, None),
    "llama8b": Shape("Llama-3.1-8B shape", "llama", 32, 32, 8, 4096, 14336, 128256, torch.bfloat16, N_PROMPTS, 64),
}
TINY = {
    "gpt2": Shape("GPT-2 shape, tiny", "gpt2", 2, 2, 2, 32, 128, 1000, torch.float32, 8, None),
    "llama8b": Shape("Llama shape, tiny", "llama", 2, 4, 2, 32, 64, 1000, torch.bfloat16, 16, 4),
}
"""`--tiny`: the same code on shapes that run in seconds on one CPU core (every baseline of the
Llama shape sampled, as on the 8B one)."""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def hf_model(shape: Shape, device: torch.device):
    """A random Hugging Face model of `shape`, created on `device` in its dtype (no host copy)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if shape.family == "gpt2":
        config = GPT2Config(
            vocab_size=shape.vocab,
            n_positions=1024,
            n_layer=shape.n_layers,
            n_head=shape.n_heads,
            n_embd=shape.d_model,
            n_inner=shape.d_mlp,
        )
        model_class = GPT2LMHeadModel
    else:
        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.d_model,
            intermediate_size=shape.d_mlp,
            num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads,
            num_key_value_heads=shape.n_kv_heads,
            max_position_embeddings=2048,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
        model_class = LlamaForCausalLM
    with default_dtype(shape.dtype), device:
        return model_class(config).eval()


def bridge(shape: Shape, device: torch.device):
    """A TransformerBridge of a random model of `shape`. GPT-2 gets HookedTransformer numerics
    (`enable_compatibility_mode()`); the Llama shape only the hook names, without weight
    processing (random weights have nothing to fold, and folding copies every weight)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from transformer_lens_patching._embedded import hf_folder

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder()))
    model = TransformerBridge.boot_transformers(
        shape.family, hf_model=hf_model(shape, device), tokenizer=tokenizer, device=str(device), dtype=shape.dtype
    )
    model.enable_compatibility_mode(no_processing=shape.family == "llama")
    return model


def hooked_transformer(shape: Shape, device: torch.device):
    """A random HookedTransformer of `shape` (TransformerLens 2), created on `device`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    llama = shape.family == "llama"
    config = HookedTransformerConfig(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        d_head=shape.d_model // shape.n_heads,
        d_mlp=shape.d_mlp,
        d_vocab=shape.vocab,
        n_ctx=1024,
        act_fn="silu" if llama else "gelu_new",
        normalization_type="RMS" if llama else "LN",
        positional_embedding_type="rotary" if llama else "standard",
        gated_mlp=llama,
        n_key_value_heads=shape.n_kv_heads if llama else None,
        rotary_base=500000 if llama else 10000,
        dtype=shape.dtype,
        device=str(device),
        seed=0,
    )
    with device:
        return HookedTransformer(config).eval()


def build(shape: Shape, device: torch.device):
    torch.manual_seed(0)
    return bridge(shape, device) if TL_MAJOR >= 4 else hooked_transformer(shape, device)


@dataclass
class Inputs:
    orig: torch.Tensor
    new: torch.Tensor
    answers: torch.Tensor
    """(prompts, 2): the orig and the new token at the first changed position."""


def inputs(shape: Shape, device: torch.device) -> Inputs:
    """`shape.prompts` prompt pairs of random tokens, differing at `CHANGED`."""
    generator = torch.Generator().manual_seed(0)
    span = shape.vocab - 100
    orig = torch.randint(100, shape.vocab, (shape.prompts, SEQ_LEN), generator=generator)
    new = orig.clone()
    shift = torch.randint(1, span, (shape.prompts, len(CHANGED)), generator=generator)
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The peak memory of the code inside: on CUDA the allocator's peak of allocated and of reserved
    bytes (reset at entry), on the CPU the resident size sampled every millisecond (both peaks)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated = self.reserved = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.allocated = _rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.allocated = max(self.allocated, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self._running = False
            self._thread.join()
            self.reserved = self.allocated = max(self.allocated, _rss())


@dataclass
class Timing:
    seconds: float
    allocated: int
    reserved: int
    values: torch.Tensor
    """The values of the last run, flattened, float64 on the CPU."""


def timed(
    run: Callable[[], torch.Tensor], repeats: int, device: torch.device, warm_up: Callable[[], object] | None = None
) -> Timing:
    """The median seconds of `run` over `repeats` runs, after one warm-up run (`warm_up`, or `run`
    itself); the peak memory over the runs, and the last run's values."""
    with torch.no_grad():
        (warm_up or run)()
        synchronize(device)
        times, allocated, reserved = [], 0, 0
        for _ in range(repeats):
            with PeakMemory(device) as peak:
                synchronize(device)
                start = time.perf_counter()
                values = run()
                synchronize(device)
                times.append(time.perf_counter() - start)
            allocated, reserved = max(allocated, peak.allocated), max(reserved, peak.reserved)
    values = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    return Timing(statistics.median(times), allocated, reserved, values)


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

    n_layers = model.cfg.n_layers
    helpers = (patching.get_act_patch_resid_pre, patching.get_act_patch_attn_out, patching.get_act_patch_mlp_out)
    per_component = n_layers * SEQ_LEN

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
                frame = index_frame(mine, (n_layers, SEQ_LEN), ("layer", "pos"))
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


@dataclass
class Row:
    name: str
    ours: Timing
    baseline: Timing
    baseline_seconds: float
    """The baseline's seconds for every cell: measured, or extrapolated from `cells_run`."""
    cells_run: int
    n_cells: int
    gap: float
    """The largest |ours - baseline| over the baseline's largest |value|."""
    spread_gap: float
    """The same over the spread of the baseline's values (largest - smallest): what patching compares."""
    tolerance: float
    target: str
    target_met: bool | None

    @property
    def ratio(self) -> float:
        return self.baseline_seconds / self.ours.seconds

    @property
    def agrees(self) -> bool:
        return self.gap <= self.tolerance


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 1000 else f"{value:,.0f} s"


def _less(timing: Timing, held: int) -> Timing:
    return replace(timing, allocated=timing.allocated - held, reserved=timing.reserved - held)


def measure(
    case: Case, shape: Shape, repeats: int, device: torch.device, cap: int | None, tiny: bool, held: int = 0
) -> Row:
    """Time both sides of `case`; the baseline on `sample(n_cells, cap)` cells, its time scaled to all;
    `held` bytes (see `h100_ballast`) taken off the peaks."""
    cells = sample(case.baseline.n_cells, cap)
    ours = _less(timed(case.ours, repeats, device), held)
    baseline = timed(lambda: case.baseline.run(cells), repeats, device, warm_up=lambda: case.baseline.run(cells[:1]))
    baseline = _less(baseline, held)
    theirs = baseline.values
    difference = (ours.values[cells] - theirs).abs().max()
    gap = float(difference / theirs.abs().max().clamp_min(1e-30))
    spread_gap = float(difference / (theirs.max() - theirs.min()).clamp_min(1e-30))
    row = Row(
        case.name,
        ours,
        baseline,
        baseline.seconds * case.baseline.n_cells / len(cells),
        len(cells),
        case.baseline.n_cells,
        gap,
        spread_gap,
        TOLERANCE[shape.dtype],
        "-",
        None,
    )
    if case.key != "z":
        return row
    if tiny or device.type != "cuda":
        return replace(row, target="not checked (tiny)" if tiny else "not checked (no GPU)")
    if shape.family == "gpt2":
        return replace(row, target=f"{row.ratio:.1f}x >= {GPT2_TARGET:.0f}x", target_met=row.ratio >= GPT2_TARGET)
    return replace(
        row,
        target=f"peak reserved {_gib(ours.reserved)} <= {_gib(H100_BYTES)}, one H100",
        target_met=ours.reserved <= H100_BYTES,
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


def print_table(title: str, rows: list[Row]) -> None:
    """The rows of one model in Markdown."""
    print(
        f"\n{title}\n\n| row | ours | baseline | ratio (baseline / ours) | peak memory, ours / baseline "
        "| target met? | values agree |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        baseline = _seconds(row.baseline_seconds)
        if row.cells_run < row.n_cells:
            baseline += f" (extrapolated from {row.cells_run} of {row.n_cells} cells, {_seconds(row.baseline.seconds)})"
        met = row.target if row.target_met is None else f"{'yes' if row.target_met else '**no**'} ({row.target})"
        agree = f"yes ({row.gap:.1e} <= {row.tolerance:.0e}" if row.agrees else f"**no** ({row.gap:.1e}"
        agree += f"; {row.spread_gap:.1e} of the spread)"
        print(
            f"| {row.name} | {_seconds(row.ours.seconds)} | {baseline} | **{row.ratio:,.1f}x** | "
            f"{_gib(row.ours.allocated)} / {_gib(row.baseline.allocated)} | {met} | {agree} |"
        )


def device_text(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
        return f"{properties.name} ({_gib(properties.total_memory)}), CUDA {torch.version.cuda}, TF32 matmuls {tf32}"
    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def h100_ballast(shape: Shape, device: torch.device) -> torch.Tensor | None:
    """On a GPU with more memory than an H100, for the 8B shape, an unused tensor of the difference:
    the library's default memory budget is a share of the GPU's free memory, so without it a larger
    GPU would stack more per pass than an H100 and the H100 target would not be tested."""
    if shape.family != "llama" or device.type != "cuda":
        return None
    extra = torch.cuda.get_device_properties(device).total_memory - H100_MEMORY
    return torch.empty(extra, dtype=torch.uint8, device=device) if extra > 0 else None


def run_shape(key: str, shape: Shape, rows: Sequence[str], args, device: torch.device) -> list[Row]:
    """Build the model of `shape` on `device` and measure `rows` on it; print its table."""
    start = time.perf_counter()
    ballast = None if args.tiny else h100_ballast(shape, device)
    held = 0 if ballast is None else ballast.numel()
    model = build(shape, device)
    data = inputs(shape, device)
    built = time.perf_counter() - start
    cap = shape.baseline_cells if args.baseline_cells is None else args.baseline_cells
    cfg = model.cfg
    title = (
        f"## {shape.label} ({type(model).__name__}): {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({shape.n_kv_heads} key/value), d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, vocabulary {cfg.d_vocab}, "
        f"{str(shape.dtype).removeprefix('torch.')}, {shape.prompts} prompts x {SEQ_LEN} tokens; metric a "
        f"{'LogitDiff object' if args.metric == 'object' else 'plain function'} for ours, its memory budget "
        f"{'the default' if args.max_memory_gib is None else f'{args.max_memory_gib:g} GiB'}; built in "
        f"{built:.0f} s"
    )
    if held:
        title += (
            f"; {_gib(held)} held unused throughout, so that the GPU has an H100's memory (subtracted from the peaks)"
        )
    measured = []
    for make in cases(model, data, rows, args):
        case = make()
        began = time.perf_counter()
        measured.append(measure(case, shape, args.repeats, device, cap, args.tiny, held))
        print(f"  {key} {case.key}: measured in {time.perf_counter() - began:.0f} s", flush=True)
        del case
    print_table(title, measured)
    del model, ballast
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def rows_arg(text: str) -> list[str]:
    keys = text.split(",")
    unknown = set(keys) - set(ROWS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    return keys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, one repeat: a smoke test")
    parser.add_argument("--device", help="cuda or cpu (default: cuda, or cpu with --tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--models",
        type=lambda text: text.split(","),
        default=list(SHAPES),
        help=f"comma-separated, from: {', '.join(SHAPES)}",
    )
    parser.add_argument("--rows", type=rows_arg, default=list(ROWS), help=f"GPT-2 rows, from: {', '.join(ROWS)}")
    parser.add_argument("--llama-rows", type=rows_arg, help="rows on the 8B shape (default: z; every row with --tiny)")
    parser.add_argument(
        "--baseline-cells",
        type=int,
        help="run at most this many cells of each baseline and "
        "extrapolate (default: every cell on GPT-2, 64 on the 8B shape)",
    )
    parser.add_argument(
        "--metric",
        choices=("object", "function"),
        default="object",
        help="ours: a LogitDiff object (reads two logits) or a function (reads all)",
    )
    parser.add_argument("--max-memory-gib", type=float, help="our calls' max_memory (default: the library's)")
    args = parser.parse_args(argv)
    if not set(args.models) <= set(SHAPES):
        parser.error(f"--models: choose from {', '.join(SHAPES)}")
    if args.baseline_cells is not None and args.baseline_cells < 1:
        parser.error("--baseline-cells: at least 1")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run with --tiny (tiny shapes on the CPU), or --device cpu for the full shapes.")
        return 2
    if args.tiny:
        args.repeats = 1
    if args.llama_rows is None:
        args.llama_rows = list(ROWS) if args.tiny else ["z"]
    shapes = TINY if args.tiny else SHAPES
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformer-lens", "transformers"))
    print(
        f"device {device_text(device)}; torch {torch.__version__}, {versions}; "
        f"median of {args.repeats} after a warm-up run"
    )
    rows = []
    for key in args.models:
        rows += run_shape(key, shapes[key], args.rows if key == "gpt2" else args.llama_rows, args, device)
    print(f"\n{NOTES}")
    return 0 if all(row.agrees for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
