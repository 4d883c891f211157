"""A metric's outputs: calling it on each variant, reading its values as tensors, naming their dims.

A metric may declare the dims of what it returns (`metric.dims`, e.g. `("batch",)` for one
value per prompt); the library's metric objects do. For a metric that does not, a dim of
its output is called `batch` only when it behaves like one: the metric is called once
more, on a copy of its input in which only the first prompt is perturbed, and the dim is
per prompt if no other prompt's entry changes. A length that happens to equal the number
of prompts is not enough.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import _tl
from ..errors import PatchingError

BATCH = "batch"
"""The name of a per-prompt dim of a metric's output."""
OUTPUT = "output"
"""The name of the dim that indexes the values of a metric returning a tuple or list."""


def declared_dims(metric) -> tuple[str, ...] | None:
    """The dims `metric` says its output has (its `dims` attribute), or None."""
    dims = getattr(metric, "dims", None)
    if dims is None:
        return None
    if not isinstance(dims, (tuple, list)) or not all(isinstance(dim, str) for dim in dims):
        raise PatchingError(f"A metric's dims must be a tuple of dim names, e.g. ('batch',); got {dims!r}.")
    return tuple(dims)


def as_tensor(value) -> Tensor:
    """A metric's return value (a number, a tensor, or a tuple or list of them) as one tensor;
    a tuple or list is stacked along a new first dim."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        parts = [as_tensor(part) for part in value]
        shapes = {tuple(part.shape) for part in parts}
        if len(shapes) > 1:
            kind = type(value).__name__
            raise PatchingError(f"The metric returned a {kind} of values of different shapes: {sorted(shapes)}.")
        return torch.stack([part.to(parts[0].device) for part in parts])
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise PatchingError(f"The metric returned {type(value).__name__}, which is not a number or tensor.") from error


class MetricCalls:
    """Calls a metric on each variant's logits, selected logits or cache, and names the dims
    of its output from the first value it returns.

    Logits in half precision (float16, bfloat16) are upcast to float32 first, so that a metric
    computes in float32 on any model; a cache is passed as it is (activations in the model's
    dtype).

    >>> calls = MetricCalls(lambda logits: logits[:, -1, 0], batch=3)
    >>> value = calls(torch.randn(3, 4, 5))
    >>> calls.dims
    ('batch',)
    """

    def __init__(self, metric: Callable, batch: int, selected: bool = False, model=None):
        self._call = metric.measure_selected if selected else metric
        self._batch = batch
        self._model = model
        self.dims: tuple[str, ...] | None = declared_dims(metric)
        """The dims of every value the metric returns; None until it is first called."""

    def __call__(self, metric_input):
        if isinstance(metric_input, Tensor) and metric_input.dtype in _tl.HALF_DTYPES:
            metric_input = metric_input.float()
        value = self._call(metric_input)
        if self.dims is None:
            self.dims = self._dims_of(value, metric_input)
        return value

    def _dims_of(self, value, metric_input) -> tuple[str, ...]:
        tensor = as_tensor(value).detach()
        leading = (OUTPUT,) if isinstance(value, (tuple, list)) else ()
        own = tensor.shape[len(leading) :]
        candidates = [axis for axis, size in enumerate(own) if size == self._batch]
        per_prompt = self._per_prompt_axis(tensor, len(leading), candidates, metric_input) if candidates else None
        names = [BATCH if axis == per_prompt else f"metric_{axis}" for axis in range(len(own))]
        return (*leading, *names)

    def _per_prompt_axis(self, tensor: Tensor, offset: int, candidates: Sequence[int], metric_input) -> int | None:
        """The first of `candidates` along which only the first prompt's entry changes when
        only the first prompt's input does (one more call of the metric)."""
        if self._batch == 1:
            return candidates[0]
        with torch.no_grad():
            again = as_tensor(self._call(_first_prompt_perturbed(metric_input, self._batch, self._model))).detach()
        if again.shape != tensor.shape:
            return None
        for axis in candidates:
            others = slice(1, None)
            index = (slice(None),) * (offset + axis) + (others,)
            if torch.equal(again[index], tensor[index]):
                return axis
        return None


def _first_prompt_perturbed(metric_input, batch: int, model):
    """A copy of a metric's input (logits, selected logits or a cache) with random noise added
    to the first prompt's values."""
    generator = torch.Generator().manual_seed(0)

    def perturbed(tensor: Tensor) -> Tensor:
        if not tensor.is_floating_point() or tensor.ndim == 0 or tensor.shape[0] != batch:
            return tensor
        noise = torch.randn(tensor[0].shape, generator=generator).to(tensor.device, tensor.dtype)
        copy = tensor.clone()
        copy[0] += noise * (tensor[0].float().std().nan_to_num(0.0) + 1.0).to(tensor.dtype)
        return copy

    if isinstance(metric_input, Tensor):
        return perturbed(metric_input)
    tensors = _tl.cache_items(metric_input)
    return _tl.make_cache({name: perturbed(tensor) for name, tensor in tensors.items()}, model)
