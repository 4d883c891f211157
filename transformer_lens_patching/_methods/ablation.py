"""Ablation caches built from an ActivationCache: zeros, or means over the batch or over groups."""

from collections.abc import Sequence

import torch

from .. import _tl
from ..errors import PatchingError


def zero_ablation_cache(cache):
    """An ActivationCache like `cache` with every activation set to zero.

    Same as passing `new_cache="zero"`, but usable anywhere a cache is.

    >>> zeros = zero_ablation_cache(cache)
    >>> act_patch(model, tokens, Node("z", 2, head=3), metric, new_cache=zeros)  # doctest: +ELLIPSIS
    tensor(...)
    """
    tensors = {name: torch.zeros_like(t) for name, t in _tl.cache_items(cache).items()}
    return _tl.make_cache(tensors, cache.model)


def _is_index_list(group) -> bool:
    """Whether `group` is a list of prompt indices (a tensor, array, list or tuple of ints)."""
    if isinstance(group, (str, bytes)) or not hasattr(group, "__len__"):
        return False
    values = torch.as_tensor(group) if len(group) else torch.zeros(0, dtype=torch.long)
    return values.ndim == 1 and not values.is_floating_point() and values.dtype != torch.bool


def _partition_rows(groups: list, batch: int) -> list[torch.Tensor]:
    """Index lists (e.g. `IOIDataset.groups`) checked to cover every prompt exactly once."""
    rows = [torch.as_tensor(group, dtype=torch.long).flatten() for group in groups]
    seen = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    if seen.numel() and not ((seen >= 0) & (seen < batch)).all():
        bad = seen[(seen < 0) | (seen >= batch)][0].item()
        raise PatchingError(f"groups lists prompt {bad}, but the cache has {batch} prompts (0 to {batch - 1}).")
    counts = torch.bincount(seen, minlength=batch)
    if (counts != 1).any():
        missing, repeated = (counts == 0).nonzero().flatten().tolist(), (counts > 1).nonzero().flatten().tolist()
        problem = (
            f"prompts {missing[:5]} are in no group" if missing else f"prompts {repeated[:5]} are in several groups"
        )
        raise PatchingError(f"groups as lists of prompt indices must put every prompt in exactly one group: {problem}.")
    return rows


def _group_rows(groups, batch: int) -> list[torch.Tensor]:
    """The prompts of each group: from one label per prompt, or from lists of prompt indices."""
    entries = list(groups.tolist() if isinstance(groups, torch.Tensor) and groups.ndim == 1 else groups)
    if entries and all(_is_index_list(entry) for entry in entries):
        return _partition_rows(entries, batch)
    if len(entries) != batch:
        raise PatchingError(
            f"groups has {len(entries)} labels, but the cache has {batch} prompts: expected one label per prompt "
            "(e.g. each prompt's template) or lists of prompt indices (e.g. IOIDataset.groups)."
        )
    rows: dict = {}
    for row, label in enumerate(entries):
        rows.setdefault(label, []).append(row)
    return [torch.tensor(r) for r in rows.values()]


def mean_ablation_cache(cache, groups: Sequence | torch.Tensor | None = None):
    """An ActivationCache like `cache` with every activation replaced by its mean over prompts.

    Args:
        cache: An ActivationCache, e.g. of a reference dataset (the IOI paper uses ABC prompts).
        groups: One label per prompt (e.g. the template of each prompt), or lists of prompt
            indices that put each prompt in one group (e.g. `IOIDataset.groups`). Each prompt
            then gets the mean over the prompts of its own group. Default: one group.

    Returns:
        An ActivationCache with the same names, shapes, devices and dtypes, to pass as
        `new_cache`. Means of half-precision activations are taken in float32.

    >>> _, abc_cache = model.run_with_cache(abc_tokens)
    >>> means = mean_ablation_cache(abc_cache, groups=templates)
    """
    tensors = _tl.cache_items(cache)
    batch = next(iter(tensors.values())).shape[0] if tensors else 0
    row_groups = [torch.arange(batch)] if groups is None else _group_rows(groups, batch)
    on_device: dict[torch.device, list[torch.Tensor]] = {}
    out = {}
    for name, tensor in tensors.items():
        if tensor.ndim == 0 or tensor.shape[0] != batch or not tensor.is_floating_point():
            out[name] = tensor
            continue
        if tensor.device not in on_device:
            on_device[tensor.device] = [rows.to(tensor.device) for rows in row_groups]
        mean, summed_in = torch.empty_like(tensor), _tl.summing_dtype(tensor.dtype)
        for rows in on_device[tensor.device]:
            mean[rows] = tensor[rows].to(summed_in).mean(dim=0, keepdim=True).to(tensor.dtype)
        out[name] = mean
    return _tl.make_cache(out, cache.model)
