"""How many patched variants one forward pass may stack, and giving freed memory back."""

import ctypes
import ctypes.util
from collections.abc import Iterable

import torch

from .._tl import ModelShape
from ..errors import PatchingError

DEFAULT_MAX_MEMORY = {"cpu": 256 << 20, "accelerator": 2 << 30}
"""Default budget, in bytes, for the activations of one stacked forward pass: on CPUs, and on
accelerators whose free memory is not measured (MPS and others). CUDA: `CUDA_FREE_FRACTION`."""

CUDA_FREE_FRACTION = 0.5
"""On CUDA the default budget is this fraction of the free memory of the model's GPU (of the one
with the least free, where it spans several), measured when the plan is made: the rest is left
for what a call holds besides one pass's stacked activations (the orig and new runs' cached
activations, the kernels' workspace)."""

CPU_PROMPTS_PER_PASS = 128
"""At most this many stacked prompts in one pass on a CPU, unless `batch_size` says
otherwise: larger passes gain nothing there. On GPT-2 small (2 cores), 16 to 128 stacked
prompts of 15 tokens ran at the same speed per prompt, 192 and more 20-25% slower; without
full logits, the memory budget alone would allow about 300."""


def default_max_memory(devices: Iterable[torch.device]) -> int:
    """The default budget of a pass on a model whose parameters are on `devices`.

    On CUDA, `CUDA_FREE_FRACTION` of the least free memory among its GPUs (free to the driver,
    plus what PyTorch's allocator holds unused); on the CPU and other accelerators (MPS), the
    fixed `DEFAULT_MAX_MEMORY`.

    >>> default_max_memory([torch.device("cpu")]) == 256 << 20
    True
    """
    devices = list(devices) or [torch.device("cpu")]
    cuda = [device for device in devices if device.type == "cuda"]
    if cuda:
        return int(CUDA_FREE_FRACTION * min(_cuda_free_memory(device) for device in cuda))
    return DEFAULT_MAX_MEMORY["cpu" if all(device.type == "cpu" for device in devices) else "accelerator"]


def _cuda_free_memory(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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
    extra_floats_per_token: int = 0,
) -> int:
    """How many variants to stack in one forward pass.

    `batch_size` fixes it; a metric that reads each variant's cache gets one variant per
    pass unless `batch_size` says otherwise (a stacked cache holds every activation of
    every variant); otherwise it is as many as fit in `max_memory` bytes, counting each
    stacked copy's largest per-layer activations with the copies hooks make, and its
    logits twice (the unembedding's product and its bias sum are alive together):
    `logits_per_prompt` of them per prompt (default: every position's full vocabulary),
    each value of `shape.element_size` bytes (the model's dtype). On CPUs, at most
    `CPU_PROMPTS_PER_PASS` prompts are stacked. `extra_floats_per_token` counts what a
    method keeps per token and variant besides (circuit evaluation: every sender's output
    change and every per-head input copy). The default `max_memory` is
    `default_max_memory` of the model's devices, measured now.
    """
    check_chunk_args(batch_size, max_memory)
    if batch_size is not None:
        return min(batch_size, max(n_variants, 1))
    if metric_reads_cache:
        return 1
    if max_memory is None:
        max_memory = default_max_memory(shape.devices or (tokens.device,))
    batch, seq_len = tokens.shape
    if logits_per_prompt is None:
        logits_per_prompt = seq_len * shape.d_vocab
    floats_per_token = 6 * shape.d_model + 3 * shape.d_mlp + 3 * shape.n_heads * seq_len + extra_floats_per_token
    per_variant = shape.element_size * batch * (seq_len * floats_per_token + 2 * logits_per_prompt)
    fitting = max_memory // per_variant
    if tokens.device.type == "cpu":
        fitting = min(fitting, CPU_PROMPTS_PER_PASS // batch)
    return max(1, min(n_variants, fitting))


def prompts_per_gradient_pass(
    tokens: torch.Tensor, shape: ModelShape, max_memory: int | None, split_inputs: bool = False
) -> int:
    """How many prompts one forward and backward pass of attribution patching may run.

    The backward pass needs what the forward pass saved: per token and layer, about
    `12 * d_model + 4 * d_mlp` floats and the attention scores and pattern of every head,
    plus the logits and their gradient. With `split_inputs` (per-head q/k/v input hooks,
    as edge attribution uses), each head's own copy of the residual stream, its
    normalisation and its gradient add about `8 * d_model` floats per head and key/value
    head input. Each value has `shape.element_size` bytes; the default `max_memory` is
    `default_max_memory` of the model's devices, measured now. At least one prompt.
    """
    if max_memory is None:
        max_memory = default_max_memory(shape.devices or (tokens.device,))
    seq_len = tokens.shape[1]
    per_layer = 12 * shape.d_model + 4 * shape.d_mlp + 3 * shape.n_heads * seq_len
    if split_inputs:
        per_layer += 8 * shape.d_model * (shape.n_heads + 2 * shape.n_kv_heads)
    per_token = shape.n_layers * per_layer + 3 * shape.d_vocab
    return max(1, max_memory // (shape.element_size * seq_len * per_token))


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory(device: torch.device) -> None:
    """Return the CPU memory freed since the last call to the operating system.

    Passes of different shapes leave glibc's heaps fragmented: activations of a few MB are
    kept there (not in their own mappings) once a larger block has been freed, and the
    pages between live blocks stay resident. On GPT-2 small, the 540-cell block sweep
    peaked at 272 to 577 MiB above its start, depending on what ran before, and at 108 MiB
    when those activations got their own mappings. Trimming after each pass makes the
    peak that of one pass. A no-op on accelerators and where the C library has no
    `malloc_trim` (it is glibc's).
    """
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
