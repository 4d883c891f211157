"""What the benchmarks share: timing and peak memory, the rows they return and their Markdown table,
the options every script takes, and the random models and prompts they measure.

Importing it sets `HF_HUB_OFFLINE` and `TRANSFORMERS_OFFLINE` (unless set): nothing is downloaded.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import itertools
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from transformer_lens_patching import LogitDiff
from transformer_lens_patching._core.memory import release_freed_memory

TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])
CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss() -> int:
    """This process's resident size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The peak memory of the code inside. On CUDA the allocator's peaks of allocated (`peak`) and of
    reserved bytes (reset at entry); on the CPU the resident size, sampled every millisecond, with
    `release` after the garbage is collected and the memory freed earlier is handed back to the
    system (so that it is not reused unseen; this takes a fraction of a second). `increase` is the
    peak above the level at entry."""

    def __init__(self, device: torch.device = CPU, release: bool = True):
        self.device, self.release = device, release
        self.base = self.peak = self.reserved = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if self.release:
                gc.collect()
                release_freed_memory(self.device)
            self.base = self.peak = rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self._running = False
            self._thread.join()
            self.peak = self.reserved = max(self.peak, rss())

    @property
    def increase(self) -> int:
        return self.peak - self.base


@dataclass
class Timing:
    seconds: float
    """The median wall time of one call."""
    result: object
    """What the last call returned."""
    peaks: list[PeakMemory]
    """Each call's peak memory, where it was measured."""


def timed(
    function: Callable[[], object],
    repeats: int,
    *,
    device: torch.device = CPU,
    warm_up: Callable[[], object] | None = None,
    memory: bool = False,
    release: bool = True,
    grad: bool = True,
) -> Timing:
    """Call `function` `repeats` times, after one call of `warm_up` (if given), and time each call
    (on CUDA, synchronised before and after); with `memory`, measure each call's
    `PeakMemory(device, release)`; with `grad` False, everything runs under `torch.no_grad()`."""
    times, peaks = [], []
    with contextlib.nullcontext() if grad else torch.no_grad():
        if warm_up is not None:
            warm_up()
            synchronize(device)
        for _ in range(repeats):
            with PeakMemory(device, release) if memory else contextlib.nullcontext() as peak:
                synchronize(device)
                start = time.perf_counter()
                result = function()
                synchronize(device)
                times.append(time.perf_counter() - start)
            if memory:
                peaks.append(peak)
    return Timing(statistics.median(times), result, peaks)


@dataclass
class Row:
    """One measurement, as data: this library's figure against a baseline's, and what is checked of it."""

    name: str
    ours: float | None
    """Seconds (a median), or bytes where `unit` is "B"; None where not measured."""
    baseline: float | None
    unit: str = "s"
    how: str = ""
    """How it was measured: a numbered note under the table."""
    bound: float | None = None
    """The least `ratio` for seconds, the largest for bytes; None where none is set."""
    gap: float | None = None
    """The largest difference of the two sides' values, relative (each script says to what)."""
    tolerance: float | None = None
    """The largest `gap` at which the two sides agree; None where it is not checked."""
    group: str = ""
    """The title of the table the row is printed in (a model, say)."""
    details: dict[str, object] = field(default_factory=dict)
    """The script's own figures, for its own columns."""

    @property
    def ratio(self) -> float | None:
        """baseline / ours for seconds (a speed-up), ours / baseline for bytes (a share of a limit)."""
        if self.ours is None or self.baseline is None:
            return None
        return self.baseline / self.ours if self.unit == "s" else self.ours / self.baseline

    @property
    def passed(self) -> bool | None:
        """Whether `ratio` keeps to `bound`; None where there is no bound."""
        if self.bound is None or self.ratio is None:
            return None
        return self.ratio >= self.bound if self.unit == "s" else self.ratio <= self.bound

    @property
    def agrees(self) -> bool | None:
        """Whether the two sides' values agree to `tolerance`; None where that is not checked."""
        if self.gap is None or self.tolerance is None:
            return None
        return self.gap <= self.tolerance


Columns = Mapping[str, Callable[[Row], str]]
"""A table's columns: each header and how a row's cell reads."""


def print_table(rows: Sequence[Row], columns: Columns) -> None:
    """The rows in Markdown, one table per group (its title above it), each followed by the
    numbered notes of its rows that say how they were measured."""
    for group, grouped in itertools.groupby(rows, key=lambda row: row.group):
        table = list(grouped)
        if group:
            print(f"\n{group}")
        print(f"\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
        for row in table:
            print(f"| {' | '.join(cell(row) for cell in columns.values())} |")
        notes = [f"{index}. {row.name}: {row.how}" for index, row in enumerate(table, 1) if row.how]
        if notes:
            print("\n" + "\n".join(notes))


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g} s" if value < 1000 else f"{value:,.0f} s"


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def amount(value: float | None, unit: str) -> str:
    """Seconds, or bytes in MiB."""
    return seconds(value) if unit == "s" else mib(value)


def speed_up(ratio: float | None) -> str:
    return "-" if ratio is None else f"**{ratio:,.1f}x**"


def parser(doc: str, tiny: str) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first line of its `doc`, with the options every
    benchmark takes: `--tiny` (described by `tiny`; one repeat) and `--repeats`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=tiny)
    parser.add_argument("--repeats", type=int, default=3, help="the median is over this many runs")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, with one repeat under `--tiny`."""
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    return args


def comma_separated(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: some of `choices`, comma-separated."""

    def parse_list(text: str) -> list[str]:
        items = text.split(",")
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: choose from {', '.join(choices)}")
        return items

    return parse_list


def run_sections(sections: Mapping[str, Callable[[], list[Row]]], names: Sequence[str]) -> list[Row]:
    """The rows of each named section, in order, saying how long each took to measure."""
    rows = []
    for name in names:
        start = time.perf_counter()
        rows += sections[name]()
        print(f"  {name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def machine() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


@dataclass(frozen=True)
class Shape:
    """The shape of a model with random weights, and of the prompts it is measured on."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    vocab: int = 50257
    batch: int = 8
    seq_len: int = 15
    family: str = "gpt2"
    """"gpt2" or "llama"."""
    n_kv_heads: int | None = None
    """Key/value heads, for "llama"."""
    dtype: torch.dtype = torch.float32


SHAPES = {
    "gpt2": Shape(12, 12, 768, 3072),
    "tiny": Shape(2, 2, 32, 128, batch=2, seq_len=6),
}
"""The GPT-2-small shape (12 layers, 12 heads, d_model 768, d_mlp 3072, vocabulary 50257) with 8
prompts of 15 tokens, and the smoke tests' shape."""
ANSWERS = (5, 6)
"""The two tokens whose logit difference at the last position is the metric."""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@cache
def tokenizer():
    """The embedded SmolLM2's tokenizer (offline), which every random model is given."""
    from transformers import AutoTokenizer

    from transformer_lens_patching._embedded import hf_folder

    return AutoTokenizer.from_pretrained(str(hf_folder()))


def hf_model(shape: Shape, device: torch.device = CPU):
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


def bridge(shape: Shape, device: torch.device = CPU):
    """A TransformerBridge of a random model of `shape`. GPT-2 gets HookedTransformer numerics
    (`enable_compatibility_mode()`); Llama only the hook names, without weight processing
    (random weights have nothing to fold, and folding copies every weight)."""
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(
        shape.family, hf_model=hf_model(shape, device), tokenizer=tokenizer(), device=str(device), dtype=shape.dtype
    )
    model.enable_compatibility_mode(no_processing=shape.family == "llama")
    return model


def hooked_transformer(shape: Shape, device: torch.device = CPU):
    """A random HookedTransformer of `shape` (TransformerLens 2; seed 0), created on `device`."""
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


def build(shape: Shape, device: torch.device = CPU):
    """A random model of `shape` (seed 0): a TransformerBridge on TransformerLens 4, a
    HookedTransformer on TransformerLens 2, which has no TransformerBridge."""
    torch.manual_seed(0)
    return bridge(shape, device) if TL_MAJOR >= 4 else hooked_transformer(shape, device)


def prompt_pairs(batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` pairs of prompts of `seq_len` random tokens (ids 100 to 19999), orig and new."""
    generator = torch.Generator().manual_seed(seed)
    orig = torch.randint(100, 20000, (batch, seq_len), generator=generator)
    new = torch.randint(100, 20000, (batch, seq_len), generator=generator)
    return orig, new


def logit_diff(batch: int) -> LogitDiff:
    """The logit difference of `ANSWERS` at the last position, as a metric object."""
    return LogitDiff(torch.tensor([ANSWERS] * batch))


@dataclass
class Setup:
    """A random model, its prompt pairs and the metric, as the measurements see them."""

    model: object
    orig: torch.Tensor
    new: torch.Tensor
    metric: LogitDiff
    orig_cache: object = None
    new_cache: object = None


def setup(shape: Shape, caches: bool = False) -> Setup:
    """`build(shape)` and `shape.batch` prompt pairs; with `caches`, both runs' caches."""
    model = build(shape)
    orig, new = prompt_pairs(shape.batch, shape.seq_len)
    s = Setup(model, orig, new, logit_diff(shape.batch))
    if caches:
        with torch.no_grad():
            s.orig_cache = model.run_with_cache(orig)[1]
            s.new_cache = model.run_with_cache(new)[1]
    return s
