"""Run many patched variants of one batch, several per forward pass, within a memory budget."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from . import _tl
from ._tl import ModelShape
from .errors import PatchingError
from .hooks import PatchProgram, applied

DEFAULT_MAX_MEMORY = 1 << 30
"""Default budget, in bytes, for the activations of one stacked forward pass."""

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
) -> int:
    """How many variants to stack in one forward pass.

    `batch_size` fixes it; otherwise it is as many as fit in `max_memory` bytes, counting
    the logits and the largest per-layer activations of each stacked copy.
    """
    check_chunk_args(batch_size, max_memory)
    if batch_size is not None:
        return min(batch_size, max(n_variants, 1))
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    batch, seq_len = tokens.shape
    floats_per_token = shape.d_vocab + 6 * shape.d_model + 3 * shape.d_mlp + 3 * shape.n_heads * seq_len
    per_variant = 4 * batch * seq_len * floats_per_token
    return max(1, min(n_variants, budget // per_variant))


class OrigResiduals:
    """The orig run's residual stream entering each layer, from one cached run on first use.

    A patched forward pass whose first edit is at layer l starts there from these values:
    the layers before l would compute exactly them again.
    """

    def __init__(self, model, tokens: torch.Tensor):
        self._model = model
        self._tokens = tokens
        self._by_layer: dict[int, torch.Tensor] | None = None

    def __call__(self, layer: int) -> torch.Tensor:
        if self._by_layer is None:
            names = {f"blocks.{i}.hook_resid_pre": i for i in range(self._model.cfg.n_layers)}
            _, cache = _tl.run_with_cache(self._model, self._tokens, names)
            self._by_layer = {i: _tl.cache_items(cache)[name] for name, i in names.items()}
        return self._by_layer[layer]


@contextmanager
def progress_bar(total: int, description: str, verbose: bool) -> Iterator[tqdm | None]:
    """A progress bar over `total` variants when `verbose` (else None), closed on exit."""
    if not verbose:
        yield None
        return
    with tqdm(total=total, desc=description, leave=False) as bar:
        yield bar


def run_variants(
    model,
    tokens: torch.Tensor,
    n_variants: int,
    add_steps: AddSteps,
    metric: Callable | None,
    chunk: int,
    apply_metric_to_cache: bool = False,
    progress: tqdm | None = None,
    residuals: OrigResiduals | None = None,
) -> list:
    """Run every variant and return the metric of each (or Nones when `metric` is None).

    Variants are stacked `chunk` at a time along the batch axis. With
    `apply_metric_to_cache`, the metric receives each variant's ActivationCache instead of
    its logits. `progress`, if given, is advanced by one per variant measured. With
    `residuals`, each forward pass starts at the first layer its edits touch.
    """
    batch = tokens.shape[0]
    carries = _tl.resid_mid_carries(model)
    outputs: list = []
    for start in range(0, n_variants, chunk):
        count = min(chunk, n_variants - start)
        program = PatchProgram(batch, carries)
        for offset in range(count):
            add_steps(program, start + offset, offset * batch)
        stacked = tokens.repeat(count, 1) if count > 1 else tokens
        first_layer = program.first_layer if residuals is not None and not apply_metric_to_cache else 0
        residual = residuals(first_layer).repeat(count, 1, 1) if first_layer else None
        with applied(model, program):
            if apply_metric_to_cache:
                _, cache = _tl.run_with_cache(model, stacked)
                tensors = _tl.cache_items(cache)
            else:
                logits = _tl.forward_logits(model, stacked, residual, first_layer)
        for offset in range(count):
            rows = slice(offset * batch, (offset + 1) * batch)
            if metric is None:
                outputs.append(None)
            elif apply_metric_to_cache:
                sliced = {name: t[rows] if t.ndim and t.shape[0] == count * batch else t for name, t in tensors.items()}
                outputs.append(metric(_tl.make_cache(sliced, model)))
            else:
                outputs.append(metric(logits[rows]))
        if progress is not None and metric is not None:
            progress.update(count)
    return outputs
