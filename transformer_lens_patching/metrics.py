"""Built-in metrics, and turning whatever a metric returns into a tensor."""

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import PatchingError
from .tensor_types import Logits, Tokens

Metric = Callable[[Logits], "float | Tensor"]
"""A function of the patched run's logits (or of its ActivationCache, with apply_metric_to_cache)."""


def lm_loss(tokens: Tokens, per_token: bool = False) -> Metric:
    """The model's next-token cross-entropy loss on `tokens`, as a metric.

    Args:
        tokens: The orig tokens (the targets are `tokens[:, 1:]`).
        per_token: Return the loss at every position, shape (batch, pos - 1), instead of the mean.

    >>> import torch
    >>> metric = lm_loss(torch.tensor([[0, 1]]))
    >>> round(float(metric(torch.zeros(1, 2, 4))), 4)  # uniform over 4 tokens: log 4
    1.3863
    """
    if tokens.shape[1] < 2:
        raise PatchingError("The 'loss' metrics need sequences of at least 2 tokens.")

    def loss(logits: Logits) -> Tensor:
        log_probs = logits[:, :-1].log_softmax(dim=-1)
        targets = tokens[:, 1:].to(logits.device)
        per_position = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return per_position if per_token else per_position.mean()

    return loss


def logit_diff(logits: Logits, answers: Tensor, per_prompt: bool = False) -> Tensor:
    """logit(answer) - logit(wrong answer) at the last position.

    Args:
        logits: The model's logits.
        answers: (batch, 2) token ids: the right answer, then the wrong one (IO, S for IOI).
        per_prompt: Return one value per prompt instead of the mean.

    >>> logits = torch.zeros(2, 3, 5); logits[:, -1, 1] = 2.0
    >>> logit_diff(logits, torch.tensor([[1, 0], [0, 1]]), per_prompt=True)
    tensor([ 2., -2.])
    """
    last = logits[:, -1]
    answers = answers.to(last.device)
    diff = last.gather(1, answers[:, :1]).squeeze(1) - last.gather(1, answers[:, 1:]).squeeze(1)
    return diff if per_prompt else diff.mean()


def resolve_metric(metric, tokens: Tensor) -> Metric:
    """A callable metric: `metric` itself, or the LM loss for "loss" / "loss_per_token"."""
    if isinstance(metric, str):
        if metric == "loss":
            return lm_loss(tokens)
        if metric == "loss_per_token":
            return lm_loss(tokens, per_token=True)
        raise PatchingError(f"Unknown metric {metric!r}: expected a callable, 'loss' or 'loss_per_token'.")
    if not callable(metric):
        raise PatchingError(f"patching_metric must be a callable, 'loss' or 'loss_per_token'; got {type(metric).__name__}.")
    return metric


def as_tensor(value) -> Tensor:
    """A metric's return value (float, 0-d or n-d tensor, or a sequence) as a detached tensor."""
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise PatchingError(f"The metric returned {type(value).__name__}, which is not a number or tensor.") from error


def metric_dims(shape: torch.Size, batch: int) -> tuple[str, ...]:
    """Dim names for a metric's output: `batch` first when it is per prompt."""
    if not shape:
        return ()
    first = "batch" if shape[0] == batch else "metric_0"
    return (first, *(f"metric_{i}" for i in range(1, len(shape))))
