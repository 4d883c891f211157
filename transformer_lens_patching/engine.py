"""Run many patched variants of one batch, several per forward pass, within a memory budget."""

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import _tl
from ._tl import ModelShape
from .errors import PatchingError
from .hooks import PatchProgram, applied
from .memory import release_freed_memory
from .selection import LogitReader, selection_of

DEFAULT_MAX_MEMORY = {"cpu": 256 << 20, "accelerator": 2 << 30}
"""Default budget, in bytes, for the activations of one stacked forward pass."""

CPU_PROMPTS_PER_PASS = 128
"""At most this many stacked prompts in one pass on a CPU, unless `batch_size` says
otherwise: larger passes gain nothing there. On GPT-2 small (2 cores), 16 to 128 stacked
prompts of 15 tokens ran at the same speed per prompt, 192 and more 20-25% slower; without
full logits, the memory budget alone would allow about 300."""

AddSteps = Callable[[PatchProgram, int, int], None]
"""`add_steps(program, variant, row_start)` adds one variant's edits at rows `row_start:`."""


def check_chunk_args(batch_size: int | None, max_memory: int | None) -> None:
    """Raise a PatchingError for an invalid `batch_size` or `max_memory`."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise PatchingError(f"batch_size must be a positive int (variants per forward pass), got {batch_size!r}.")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0):
        raise PatchingError(f"max_memory must be a positive number of bytes, got {max_memory!r}.")


def variants_per_pass(
    n_variants: int,
    tokens: torch.Tensor,
    shape: ModelShape,
    batch_size: int | None,
    max_memory: int | None,
    metric_reads_cache: bool = False,
    logits_per_prompt: int | None = None,
) -> int:
    """How many variants to stack in one forward pass.

    `batch_size` fixes it; a metric that reads each variant's cache gets one variant per
    pass unless `batch_size` says otherwise (a stacked cache holds every activation of
    every variant); otherwise it is as many as fit in `max_memory` bytes, counting each
    stacked copy's largest per-layer activations with the copies hooks make, and its
    logits twice (the unembedding's product and its bias sum are alive together):
    `logits_per_prompt` of them per prompt (default: every position's full vocabulary).
    On CPUs, at most `CPU_PROMPTS_PER_PASS` prompts are stacked.
    """
    check_chunk_args(batch_size, max_memory)
    if batch_size is not None:
        return min(batch_size, max(n_variants, 1))
    if metric_reads_cache:
        return 1
    if max_memory is None:
        max_memory = DEFAULT_MAX_MEMORY["cpu" if tokens.device.type == "cpu" else "accelerator"]
    batch, seq_len = tokens.shape
    if logits_per_prompt is None:
        logits_per_prompt = seq_len * shape.d_vocab
    floats_per_token = 6 * shape.d_model + 3 * shape.d_mlp + 3 * shape.n_heads * seq_len
    per_variant = 4 * batch * (seq_len * floats_per_token + 2 * logits_per_prompt)
    fitting = max_memory // per_variant
    if tokens.device.type == "cpu":
        fitting = min(fitting, CPU_PROMPTS_PER_PASS // batch)
    return max(1, min(n_variants, fitting))


def logit_reader(model, metric, tokens: torch.Tensor, shape: ModelShape, apply_metric_to_cache: bool) -> LogitReader | None:
    """A reader of the logits `metric` selects, or None when it reads them all (a plain
    function), reads a cache, or hooks on the model's output expect full logits."""
    selection = selection_of(metric)
    if selection is None or apply_metric_to_cache or _tl.output_hooked(model):
        return None
    return LogitReader(model, selection, tokens, shape.d_vocab)


class OrigResiduals:
    """The orig run's residual stream entering each layer (layer n_layers: the final residual
    stream), taken from `known` activations or from one cached run on first use.

    A patched forward pass whose first edit is at layer l starts there from these values:
    the layers before l would compute exactly them again.
    """

    def __init__(self, model, tokens: torch.Tensor, known: Mapping[str, torch.Tensor] | None = None):
        self._model = model
        self._tokens = tokens
        self._known = dict(known or {})

    @staticmethod
    def hook_names(n_layers: int) -> list[str]:
        """The hooks holding the residual stream entering each layer, and the final one."""
        return [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [
            f"blocks.{n_layers - 1}.hook_resid_post"
        ]

    def __call__(self, layer: int) -> torch.Tensor:
        names = self.hook_names(self._model.cfg.n_layers)
        if names[layer] not in self._known:
            _, cache = _tl.run_with_cache(self._model, self._tokens, names)
            self._known.update(_tl.cache_items(cache))
        return self._known[names[layer]]


@contextmanager
def progress_bar(total: int, description: str, verbose: bool) -> Iterator[tqdm | None]:
    """A progress bar over `total` variants when `verbose` (else None), closed on exit."""
    if not verbose:
        yield None
        return
    with tqdm(total=total, desc=description, leave=False) as bar:
        yield bar


@dataclass
class Variants:
    """Patched variants of the orig batch to run.

    `add_steps(program, variant, row_start)` adds one variant's steps at rows
    `row_start:`; `start_layers[variant]` is the first layer its steps need (`n_layers`:
    only the unembedding). `metric` is measured on each variant's logits, or on those a
    `LogitReader` selects (None: the passes only record). `stop_when_recorded` ends each
    pass once its recordings are made. `replaced_attention` lists layers whose attention
    is not computed: every variant fills their `hook_attn_out` from `program.start_layer` on.
    """

    count: int
    add_steps: AddSteps
    start_layers: Sequence[int]
    metric: Callable | None = None
    stop_when_recorded: bool = False
    replaced_attention: frozenset[int] = frozenset()

    @classmethod
    def orig_run(cls, n_layers: int, metric: Callable) -> "Variants":
        """The unpatched orig run, measured from its final residual stream."""
        return cls(1, _no_steps, [n_layers], metric)


def _no_steps(program: PatchProgram, variant: int, row_start: int) -> None:
    """The orig run: nothing to patch."""


def _chunks(variants: Variants, chunk: int, start_late: bool) -> Iterator[tuple[int, list[int]]]:
    """(start layer, variant indices) of each pass: variants that start at the same layer,
    at most `chunk` at a time; all at layer 0 unless passes can `start_late`."""
    by_layer: dict[int, list[int]] = {}
    for index in range(variants.count):
        layer = variants.start_layers[index] if start_late else 0
        by_layer.setdefault(layer, []).append(index)
    for layer in sorted(by_layer):
        indices = by_layer[layer]
        for start in range(0, len(indices), chunk):
            yield layer, indices[start : start + chunk]


def run_variants(
    model,
    tokens: torch.Tensor,
    variants: Variants,
    chunk: int,
    residuals: OrigResiduals,
    apply_metric_to_cache: bool = False,
    progress: tqdm | None = None,
    reader: LogitReader | None = None,
) -> list:
    """Run every variant and return the metric of each (or Nones when there is no metric).

    Variants are stacked up to `chunk` at a time along the batch axis, grouped so that
    each pass starts at its variants' first layer from the orig `residuals`. With
    `apply_metric_to_cache`, the metric receives each variant's ActivationCache instead of
    its logits (and passes start at layer 0). With a `reader`, each pass stops at the
    final residual stream, the reader computes only the logits the metric selects, and
    the metric's `measure_selected` receives them. `progress`, if given, is advanced by
    one per variant measured.
    """
    batch = tokens.shape[0]
    carries = _tl.resid_mid_carries(model)
    start_late = _tl.can_start_late(model) and not apply_metric_to_cache
    n_layers = model.cfg.n_layers
    final_residual = OrigResiduals.hook_names(n_layers)[-1]
    read = reader is not None and variants.metric is not None and not apply_metric_to_cache
    outputs: list = [None] * variants.count
    for first_layer, indices in _chunks(variants, chunk, start_late):
        count = len(indices)
        program = PatchProgram(batch, carries, first_layer, variants.stop_when_recorded)
        for offset, index in enumerate(indices):
            variants.add_steps(program, index, offset * batch)
        if read and first_layer < n_layers:
            program.stop_at(final_residual)
        stacked = tokens.repeat(count, 1) if count > 1 else tokens
        replaced = {layer for layer in variants.replaced_attention if layer >= first_layer}
        entering = residuals(first_layer).repeat(count, 1, 1) if first_layer else None
        logits = tensors = None
        with applied(model, program), _tl.attention_replaced(model, replaced):
            if apply_metric_to_cache:
                _, cache = _tl.run_with_cache(model, stacked)
                tensors = _tl.cache_items(cache)
            elif first_layer == n_layers:
                residual = program.enter(first_layer, entering)
                logits = reader(residual) if read else _tl.unembed(model, residual)
            elif first_layer == 0:
                logits = _tl.forward_logits(model, stacked)
            else:
                logits = _tl.forward_logits(model, program.enter(first_layer, entering), first_layer)
        if read and first_layer < n_layers:
            logits = reader(program.stopped_with)
        release_freed_memory(tokens.device)
        if variants.metric is None:
            continue
        measure = variants.metric.measure_selected if read else variants.metric
        for offset, index in enumerate(indices):
            rows = slice(offset * batch, (offset + 1) * batch)
            if tensors is not None:
                sliced = {name: t[rows] if t.ndim and t.shape[0] == count * batch else t for name, t in tensors.items()}
                outputs[index] = variants.metric(_tl.make_cache(sliced, model))
            else:
                outputs[index] = measure(logits[rows])
        if progress is not None:
            progress.update(count)
    return outputs
