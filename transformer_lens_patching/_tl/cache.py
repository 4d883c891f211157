"""Caching runs and reading ActivationCaches."""

from collections.abc import Callable, Mapping

import torch
from transformer_lens import ActivationCache

from ..errors import PatchingError


def run_with_cache(
    model,
    tokens: torch.Tensor,
    names: Mapping | set | list | None = None,
    names_filter: Callable[[str], bool] | None = None,
):
    """Return (logits, ActivationCache), caching only `names`, or the names `names_filter`
    accepts, when given."""
    if names is not None:
        wanted = set(names)
        return model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    if names_filter is not None:
        return model.run_with_cache(tokens, names_filter=names_filter)
    return model.run_with_cache(tokens)


def make_cache(tensors: dict[str, torch.Tensor], model) -> ActivationCache:
    """Wrap a dict of activations as an ActivationCache of `model`."""
    return ActivationCache(tensors, model)


def cache_items(cache) -> Mapping[str, torch.Tensor]:
    """The name-to-tensor mapping behind an ActivationCache or a plain dict."""
    if isinstance(cache, ActivationCache):
        return cache.cache_dict
    if isinstance(cache, Mapping):
        return cache
    raise PatchingError(f"Expected an ActivationCache or a dict of tensors, got {type(cache).__name__}.")
