"""Built-in metrics, and turning whatever a metric returns into a tensor."""

from collections.abc import Callable

import torch
from torch import Tensor

from . import _tl
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


def logit_diff(logits: Logits, answers: Tensor, per_prompt: bool = False, positions: Tensor | None = None) -> Tensor:
    """logit(answer) - logit(wrong answer), at the last position or at `positions`.

    Args:
        logits: The model's logits.
        answers: (batch, 2) token ids: the right answer, then the wrong one (IO, S for IOI).
        per_prompt: Return one value per prompt instead of the mean.
        positions: (batch,) position to read in each prompt (e.g. `IOIDataset.word_idx["end"]`
            for right-padded prompts of different lengths); default: the last position.

    >>> logits = torch.zeros(2, 3, 5); logits[:, -1, 1] = 2.0
    >>> logit_diff(logits, torch.tensor([[1, 0], [0, 1]]), per_prompt=True)
    tensor([ 2., -2.])
    >>> logit_diff(logits, torch.tensor([[1, 0], [0, 1]]), positions=torch.tensor([0, 2]), per_prompt=True)
    tensor([ 0., -2.])
    """
    return LogitDiff(answers, positions, per_prompt)(logits)


class LogitDiff:
    """A metric: logit(right answer) - logit(wrong answer), at one position per prompt.

    Args:
        answers: (batch, 2) token ids: the right answer, then the wrong one.
        positions: (batch,) position read in each prompt; None: the last position.
        per_prompt: Return one value per prompt instead of the mean.

    >>> metric = LogitDiff(torch.tensor([[1, 0]]))
    >>> float(metric(torch.tensor([[[0.5, 3.0]]])))
    2.5
    """

    def __init__(self, answers: Tensor, positions: Tensor | None = None, per_prompt: bool = False):
        answers = torch.as_tensor(answers)
        if answers.ndim != 2 or answers.shape[1] != 2:
            raise PatchingError(
                f"answers must have shape (batch, 2): the right then the wrong token id of each prompt; "
                f"got shape {tuple(answers.shape)}."
            )
        if positions is not None:
            positions = torch.as_tensor(positions)
            if positions.shape != answers.shape[:1]:
                raise PatchingError(
                    f"positions must hold one position per prompt: expected shape ({answers.shape[0]},), "
                    f"got {tuple(positions.shape)}."
                )
        self.answers, self.positions, self.per_prompt = answers, positions, per_prompt

    def __call__(self, logits: Logits) -> Tensor:
        batch = logits.shape[0]
        if batch != self.answers.shape[0]:
            raise PatchingError(
                f"The metric has answers for {self.answers.shape[0]} prompts, but the logits are for {batch}."
            )
        if self.positions is None:
            read = logits[:, -1]
        else:
            read = logits[torch.arange(batch, device=logits.device), self.positions.to(logits.device)]
        chosen = read.gather(1, self.answers.to(read.device))
        diff = chosen[:, 0] - chosen[:, 1]
        return diff if self.per_prompt else diff.mean()

    def __repr__(self) -> str:
        where = "last position" if self.positions is None else "positions given"
        return f"LogitDiff({self.answers.shape[0]} prompts, {where}, per_prompt={self.per_prompt})"


class NormalisedMetric:
    """A metric rescaled so that two reference runs score fixed values:
    `(base(logits) - offset) / scale`. Build it with `denoising_metric` or `noising_metric`.
    """

    def __init__(self, base: Metric, offset, scale, kind: str):
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if (scale == 0).any():
            raise PatchingError(
                "Cannot normalise the metric: it has the same value on the clean and the corrupted run, "
                "so no change can be expressed as a fraction of their difference."
            )
        self.base, self.offset, self.scale, self.kind = base, torch.as_tensor(offset, dtype=torch.float32), scale, kind

    def __call__(self, logits: Logits) -> Tensor:
        value = as_tensor(self.base(logits))
        return (value - self.offset.to(value.device)) / self.scale.to(value.device)

    def __repr__(self) -> str:
        return f"{self.kind}_metric({self.base!r}, offset={self.offset.tolist()}, scale={self.scale.tolist()})"


def denoising_metric(base: Metric, clean, corrupted) -> NormalisedMetric:
    """`base` rescaled to 0 on the corrupted run and 1 on the clean run: the fraction of the
    clean behaviour a patch of clean values into the corrupted run restores.

    Args:
        base: A metric, e.g. `LogitDiff(answers)`.
        clean: `base`'s value on the clean run (see `calibrate`).
        corrupted: `base`'s value on the corrupted run.

    >>> metric = denoising_metric(LogitDiff(torch.tensor([[1, 0]])), clean=4.0, corrupted=-2.0)
    >>> float(metric(torch.tensor([[[0.0, 1.0]]])))
    0.5
    """
    return NormalisedMetric(base, corrupted, as_tensor(clean) - as_tensor(corrupted), "denoising")


def noising_metric(base: Metric, clean, corrupted) -> NormalisedMetric:
    """`base` rescaled to 0 on the clean run and -1 on the corrupted run: the fraction of the
    clean behaviour a patch of corrupted values into the clean run destroys (negative).

    Args:
        base: A metric, e.g. `LogitDiff(answers)`.
        clean: `base`'s value on the clean run (see `calibrate`).
        corrupted: `base`'s value on the corrupted run.

    >>> metric = noising_metric(LogitDiff(torch.tensor([[1, 0]])), clean=4.0, corrupted=-2.0)
    >>> float(metric(torch.tensor([[[0.0, 1.0]]])))
    -0.5
    """
    return NormalisedMetric(base, clean, as_tensor(clean) - as_tensor(corrupted), "noising")


def calibrate(model, base: Metric, clean_input: Tokens, corrupted_input: Tokens) -> tuple[Tensor, Tensor]:
    """`base` on the model's clean and corrupted runs, for `denoising_metric` / `noising_metric`.

    >>> clean, corrupted = calibrate(model, LogitDiff(answers), clean_tokens, corrupted_tokens)  # doctest: +SKIP
    >>> metric = denoising_metric(LogitDiff(answers), clean, corrupted)  # doctest: +SKIP
    """
    with torch.no_grad():
        return tuple(as_tensor(base(_tl.forward_logits(model, tokens))) for tokens in (clean_input, corrupted_input))


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
