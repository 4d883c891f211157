"""Run many patched variants of one batch, several per forward pass, within a memory budget."""

from collections.abc import Callable

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
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PatchingError(f"batch_size must be a positive int (variants per forward pass), got {batch_size!r}.")
        return min(batch_size, max(n_variants, 1))
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if budget <= 0:
        raise PatchingError(f"max_memory must be a positive number of bytes, got {max_memory!r}.")
    batch, seq_len = tokens.shape
    floats_per_token = shape.d_vocab + 6 * shape.d_model + 3 * shape.d_mlp + 3 * shape.n_heads * seq_len
    per_variant = 4 * batch * seq_len * floats_per_token
    return max(1, min(n_variants, budget // per_variant))


def run_variants(
    model,
    tokens: torch.Tensor,
    n_variants: int,
    add_steps: AddSteps,
    metric: Callable | None,
    chunk: int,
    apply_metric_to_cache: bool = False,
    description: str | None = None,
) -> list:
    """Run every variant and return the metric of each (or Nones when `metric` is None).

    Variants are stacked `chunk` at a time along the batch axis. With
    `apply_metric_to_cache`, the metric receives each variant's ActivationCache instead of
    its logits.
    """
    batch = tokens.shape[0]
    carries = _tl.resid_mid_carries(model)
    outputs: list = []
    bar = tqdm(total=n_variants, desc=description, leave=False) if description else None
    try:
        for start in range(0, n_variants, chunk):
            count = min(chunk, n_variants - start)
            program = PatchProgram(batch, carries)
            for offset in range(count):
                add_steps(program, start + offset, offset * batch)
            stacked = tokens.repeat(count, 1) if count > 1 else tokens
            with applied(model, program):
                if apply_metric_to_cache:
                    _, cache = _tl.run_with_cache(model, stacked)
                    tensors = _tl.cache_items(cache)
                else:
                    logits = _tl.forward_logits(model, stacked)
            for offset in range(count):
                rows = slice(offset * batch, (offset + 1) * batch)
                if metric is None:
                    outputs.append(None)
                elif apply_metric_to_cache:
                    sliced = {name: t[rows] if t.ndim and t.shape[0] == count * batch else t for name, t in tensors.items()}
                    outputs.append(metric(_tl.make_cache(sliced, model)))
                else:
                    outputs.append(metric(logits[rows]))
            if bar is not None:
                bar.update(count)
    finally:
        if bar is not None:
            bar.close()
    return outputs
