"""Where patched-in values come from: a cache of another run, or zeros.

A cache is checked when the plan is made (names, shapes, dtypes, devices) and placed when the
plan runs: each activation it gives is moved, once, to the device the model computes that
activation on, and cast to the model's dtype (`placed`).
"""

import difflib
from collections.abc import Callable, Iterable, Mapping

import torch

from .. import _tl
from ..errors import PatchingError
from .components import lookup


class ActivationSource:
    """Patch values by hook name, each shaped like one batch of the orig run.

    `tensors` is None for zero ablation.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None, batch: int):
        self._tensors = tensors
        self.batch = batch

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The activations by hook name (empty for zero ablation)."""
        return self._tensors or {}

    def value(self, hook_name: str) -> torch.Tensor | float:
        """The activation at `hook_name` (a tensor with `batch` rows), or 0.0 for zero ablation."""
        if self._tensors is None:
            return 0.0
        tensor = self._tensors[hook_name]
        if tensor.shape[0] == 1 and self.batch != 1:
            tensor = tensor.expand(self.batch, *tensor.shape[1:])
        return tensor

    def rows(self, rows: slice) -> "ActivationSource":
        """The values of the prompts `rows` only (a chunk of the batch)."""
        batch = len(range(*rows.indices(self.batch)))
        if self._tensors is None:
            return ActivationSource(None, batch)
        tensors = {name: t[rows] if t.ndim and t.shape[0] == self.batch else t for name, t in self._tensors.items()}
        return ActivationSource(tensors, batch)

    def tensor_like(self, hook_name: str, like: torch.Tensor) -> torch.Tensor:
        """The activation as a tensor, with zeros shaped like `like` for zero ablation."""
        value = self.value(hook_name)
        return torch.zeros_like(like) if isinstance(value, float) else value


def _position_axes(hook_name: str) -> tuple[int, ...]:
    component, _ = lookup(hook_name)
    return (2, 3) if component.name in ("pattern", "attn_scores") else (1,)


def check_cache(cache, hook_names: Iterable[str], tokens_shape: torch.Size, what: str) -> Mapping[str, torch.Tensor]:
    """Check that `cache` holds every hook in `hook_names` as a floating-point tensor with
    values (not on the meta device), the orig run's positions and a batch of the same size
    (or 1). Its device and floating dtype may be any: `placed` moves and casts it."""
    batch, seq_len = tokens_shape
    tensors = _tl.cache_items(cache)
    for name in hook_names:
        if name not in tensors:
            close = difflib.get_close_matches(name, list(tensors), n=1)
            hint = f" Closest cached name: {close[0]!r}." if close else ""
            raise PatchingError(
                f"{what} has no activation {name!r}, which this patch needs.{hint} Pass a cache from "
                f"model.run_with_cache(...) without a names_filter that drops it, or pass the input instead."
            )
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise PatchingError(f"{what}[{name!r}] is a {type(tensor).__name__}, expected a tensor.")
        _check_values(tensor, f"{what}[{name!r}]")
        for axis in _position_axes(name):
            if tensor.ndim <= axis or tensor.shape[axis] != seq_len:
                raise PatchingError(
                    f"{what}[{name!r}] has shape {tuple(tensor.shape)}: it comes from prompts of length "
                    f"{tensor.shape[axis] if tensor.ndim > axis else '?'}, but the orig input has length {seq_len}. "
                    "Both runs must have the same length, so that positions line up."
                )
        size = tensor.shape[0]
        if size not in (batch, 1):
            raise PatchingError(
                f"{what}[{name!r}] has batch size {size}, but the orig input has {batch} prompts: "
                f"expected {batch} (or 1, to use the same values for every prompt)."
            )
    return tensors


def _check_values(tensor: torch.Tensor, what: str) -> None:
    """Raise unless `tensor` holds floating-point values that can be moved to the model."""
    if tensor.is_meta:
        raise PatchingError(
            f"{what} is on the meta device: it has a shape but no values, so nothing can be patched in from it. "
            "Pass a cache recorded on a real device (e.g. from model.run_with_cache)."
        )
    if not tensor.is_floating_point():
        raise PatchingError(
            f"{what} has dtype {tensor.dtype}: expected floating-point activations (any float dtype: they are cast "
            "to the model's)."
        )


def placed(model, tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors at `names` where the model computes them, moved and cast once.

    A tensor on one of the model's devices stays there; one on another device (a CPU cache of
    a GPU model, another GPU) moves to its hook's device (`_tl.hook_device`: its layer's where
    the model spans several). A tensor of another floating dtype is cast to the model's. A
    tensor already in place is returned as it is, not copied.
    """
    devices, dtype = set(_tl.model_devices(model)), _tl.model_dtype(model)
    result = {}
    for name in names:
        tensor = tensors[name]
        device = tensor.device if tensor.device in devices else _tl.hook_device(model, name)
        result[name] = _tl.moved(tensor, device, dtype)
    return result


def checked_tokens(model, model_input, tokens_shape: torch.Size, what: str) -> torch.Tensor:
    """The tokens of another run's input, checked to have the orig input's shape."""
    tokens = _tl.to_tokens(model, model_input)
    if tokens.shape != tokens_shape:
        raise PatchingError(
            f"{what} has token shape {tuple(tokens.shape)}, but orig_input has {tuple(tokens_shape)}: "
            "both runs must have the same batch size and length, so that positions line up."
        )
    return tokens


def cached_run(model, tokens: torch.Tensor, hook_names: Iterable[str], what: str) -> dict:
    """Run `tokens` and cache only `hook_names`."""
    names = set(hook_names)
    if not names:
        return {}
    _, cache = _tl.run_with_cache(model, tokens, names)
    tensors = dict(_tl.cache_items(cache))
    missing = sorted(names - set(tensors))
    if missing:
        raise PatchingError(
            f"Hook(s) {missing} never fired when running {what}: this model does not compute that activation "
            "(e.g. hook_pos_embed on a model with rotary embeddings)."
        )
    return tensors


def _usable(tensor) -> bool:
    """Whether an optional cache entry can be used (it is then placed like the others)."""
    return isinstance(tensor, torch.Tensor) and not tensor.is_meta and tensor.is_floating_point()


SourceFactory = Callable[[], ActivationSource]
"""Makes a source when a plan runs (running the model if the source is another input)."""


def planned_source(
    model,
    model_input,
    cache,
    hook_names: Iterable[str],
    tokens: torch.Tensor,
    what: str,
    missing: str,
    zero_allowed: bool = True,
    extra: Iterable[str] = (),
) -> tuple[SourceFactory, str]:
    """Check a source of patch values now, and return what makes it later, with a description.

    The source is `cache` (an ActivationCache or dict; "zero" for zeros where
    `zero_allowed`) or a run of `model_input`, which then also caches the `extra` hooks
    (a given cache need not hold them, but those it holds are used). `what` names the cache
    argument ("new_cache"); `missing` is the error when neither is given. A given cache's
    activations are moved to the model's devices and cast to its dtype when the source is made
    (`placed`), once.
    """
    batch = tokens.shape[0]
    input_name = what.replace("_cache", "_input")
    names = set(hook_names)
    if isinstance(cache, str):
        if cache != "zero" or not zero_allowed:
            expected = "an ActivationCache, a dict or 'zero'" if zero_allowed else "an ActivationCache or a dict"
            raise PatchingError(f"{what} must be {expected}; got {cache!r}.")
        return (lambda: ActivationSource(None, batch)), "zeros (zero ablation)"
    if cache is not None:
        tensors = check_cache(cache, names, tokens.shape, what)
        kept = names | {name for name in extra if _usable(tensors.get(name))}
        return (lambda: ActivationSource(placed(model, tensors, kept), batch)), f"{what} ({len(tensors)} activations)"
    if model_input is None:
        raise PatchingError(missing)
    other = checked_tokens(model, model_input, tokens.shape, input_name)
    run_names = names | set(extra)
    return (lambda: ActivationSource(cached_run(model, other, run_names, input_name), batch)), f"a run of {input_name}"
