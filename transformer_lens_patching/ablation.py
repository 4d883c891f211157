"""Ablation caches built from an ActivationCache: zeros, or means over the batch or over groups."""

from collections.abc import Sequence

import torch

from . import _tl
from .errors import PatchingError


def zero_ablation_cache(cache):
    """An ActivationCache like `cache` with every activation set to zero.

    Same as passing `new_cache="zero"`, but usable anywhere a cache is.

    >>> zeros = zero_ablation_cache(cache)  # doctest: +SKIP
    >>> act_patch(model, tokens, Node("z", 9, head=9), metric, new_cache=zeros)  # doctest: +SKIP
    """
    tensors = {name: torch.zeros_like(t) for name, t in _tl.cache_items(cache).items()}
    return _tl.make_cache(tensors, cache.model)


def _group_rows(groups, batch: int) -> list[torch.Tensor]:
    labels = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(labels) != batch:
        raise PatchingError(f"groups has {len(labels)} labels, but the cache has {batch} prompts: expected one label per prompt.")
    rows: dict = {}
    for row, label in enumerate(labels):
        rows.setdefault(label, []).append(row)
    return [torch.tensor(r) for r in rows.values()]


def mean_ablation_cache(cache, groups: Sequence | torch.Tensor | None = None):
    """An ActivationCache like `cache` with every activation replaced by its mean over prompts.

    Args:
        cache: An ActivationCache, e.g. of a reference dataset (the IOI paper uses ABC prompts).
        groups: One label per prompt (e.g. the template of each prompt). Each prompt then gets
            the mean over the prompts of its own group. Default: one group.

    Returns:
        An ActivationCache with the same names and shapes, to pass as `new_cache`.

    >>> _, abc_cache = model.run_with_cache(abc_tokens)  # doctest: +SKIP
    >>> means = mean_ablation_cache(abc_cache, groups=templates)  # doctest: +SKIP
    """
    tensors = _tl.cache_items(cache)
    batch = next(iter(tensors.values())).shape[0] if tensors else 0
    row_groups = [torch.arange(batch)] if groups is None else _group_rows(groups, batch)
    out = {}
    for name, tensor in tensors.items():
        if tensor.ndim == 0 or tensor.shape[0] != batch or not tensor.is_floating_point():
            out[name] = tensor
            continue
        mean = torch.empty_like(tensor)
        for rows in row_groups:
            rows = rows.to(tensor.device)
            mean[rows] = tensor[rows].mean(dim=0, keepdim=True).to(tensor.dtype)
        out[name] = mean
    return _tl.make_cache(out, cache.model)
