"""Built-in metrics: what a patched run is measured by.

Any function of the logits is a metric. The metric objects here also say which logits
they read (`selection`: the engines then compute only those) and the dims of what they
return (`dims`, e.g. `("batch",)` for one value per prompt). The engines give every metric
float32 logits, also on half-precision models; the tensors a metric object reads on every
call (its token ids, positions, offsets) are moved to the logits' device once, not per call.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from . import _tl
from ._core.executor import measured_run
from ._core.measure import BATCH, as_tensor, declared_dims
from ._core.selection import LogitSelection, distinct_token_ids, on_device, selection_of
from ._core.tensor_types import Logits, Tokens
from .errors import PatchingError

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

    copies: dict = {}

    def loss(logits: Logits) -> Tensor:
        log_probs = logits[:, :-1].log_softmax(dim=-1)
        targets = on_device(copies, "targets", logits.device, lambda: tokens[:, 1:])
        per_position = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return per_position if per_token else per_position.mean()

    loss.dims = (BATCH, "metric_1") if per_token else ()
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


class SelectionMetric(ABC):
    """A metric that reads only some logits, and says which: `selection`.

    It is a plain callable on full logits (batch, pos, d_vocab), so it works wherever a
    function does; given one, `act_patch` and `path_patch` compute only the selected
    logits and pass them to `measure_selected`, and skip patches that cannot reach them.
    Subclasses set `selection` and `dims` and define `measure_selected`.
    """

    selection: LogitSelection
    dims: tuple[str, ...] | None = None
    """The dims of what the metric returns (None: found from its first value)."""

    @abstractmethod
    def measure_selected(self, selected: Tensor) -> Tensor:
        """The metric from the selected logits, (batch, k positions, n tokens)."""

    def __call__(self, logits: Logits) -> Tensor:
        return self.measure_selected(self.selection.select(logits))


def _one_position_per_prompt(positions, batch: int | None) -> Tensor | None:
    if positions is None:
        return None
    positions = torch.as_tensor(positions)
    if positions.ndim != 1 or (batch is not None and positions.shape[0] != batch):
        raise PatchingError(
            "positions must hold one position per prompt: expected "
            f"shape ({batch if batch is not None else 'batch'},), "
            f"got {tuple(positions.shape)}."
        )
    return positions


def _check_rows(selected: Tensor, batch: int) -> None:
    if selected.shape[0] != batch:
        raise PatchingError(f"The metric is for {batch} prompts, but the logits are for {selected.shape[0]}.")


class LogitDiff(SelectionMetric):
    """A metric: logit(right answer) - logit(wrong answer), at one position per prompt.

    Args:
        answers: (batch, 2) token ids: the right answer, then the wrong one.
        positions: (batch,) position read in each prompt; None: the last position.
        per_prompt: Return one value per prompt instead of the mean.

    >>> metric = LogitDiff(torch.tensor([[1, 0]]))
    >>> float(metric(torch.tensor([[[0.5, 3.0]]])))
    2.5
    >>> metric.selection.token_ids
    tensor([0, 1])
    """

    def __init__(self, answers: Tensor, positions: Tensor | None = None, per_prompt: bool = False):
        answers = torch.as_tensor(answers)
        if answers.ndim != 2 or answers.shape[1] != 2:
            raise PatchingError(
                f"answers must have shape (batch, 2): the right then the wrong token id of each prompt; "
                f"got shape {tuple(answers.shape)}."
            )
        self.answers, self.per_prompt = answers, per_prompt
        self.positions = _one_position_per_prompt(positions, answers.shape[0])
        ids = distinct_token_ids(answers, "answers")
        self.selection = LogitSelection(self.positions, ids, answers.shape[0])
        self.dims = (BATCH,) if per_prompt else ()
        self._copies: dict = {}

    def measure_selected(self, selected: Tensor) -> Tensor:
        _check_rows(selected, self.answers.shape[0])
        columns = on_device(self._copies, "columns", selected.device, lambda: self.selection.columns(self.answers))
        chosen = selected[:, 0].gather(1, columns)
        diff = chosen[:, 0] - chosen[:, 1]
        return diff if self.per_prompt else diff.mean()

    def __repr__(self) -> str:
        where = "last position" if self.positions is None else "positions given"
        return f"LogitDiff({self.answers.shape[0]} prompts, {where}, per_prompt={self.per_prompt})"


def _per_prompt_tokens(tokens, what: str) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim > 1:
        raise PatchingError(
            f"{what} must be one token id, or one per prompt (batch,); got shape {tuple(tokens.shape)}."
        )
    distinct_token_ids(tokens, what)
    return tokens.long()


class TokenLogit(SelectionMetric):
    """A metric: the logit of one token per prompt (or one for all), at one position per prompt.

    Args:
        tokens: A token id, or (batch,) token ids, one per prompt.
        positions: (batch,) position read in each prompt; None: the last position.
        per_prompt: Return one value per prompt instead of the mean.

    >>> metric = TokenLogit(1)
    >>> float(metric(torch.tensor([[[0.5, 3.0]]])))
    3.0
    """

    def __init__(self, tokens, positions: Tensor | None = None, per_prompt: bool = False):
        self.tokens, self.per_prompt = _per_prompt_tokens(tokens, "tokens"), per_prompt
        batch = len(self.tokens) if self.tokens.ndim else None
        self.positions = _one_position_per_prompt(positions, batch)
        if batch is None and self.positions is not None:
            batch = len(self.positions)
        self.selection = LogitSelection(self.positions, distinct_token_ids(self.tokens, "tokens"), batch)
        self.dims = (BATCH,) if per_prompt else ()
        self._copies: dict = {}

    def _read(self, selected: Tensor) -> Tensor:
        """Each prompt's token's entry at its position, (batch,)."""
        if self.selection.batch is not None:
            _check_rows(selected, self.selection.batch)
        rows = selected.shape[0]
        columns = on_device(
            self._copies,
            ("columns", rows),
            selected.device,
            lambda: self.selection.columns(self.tokens.expand(rows)).unsqueeze(1),
        )
        return selected[:, 0].gather(1, columns).squeeze(1)

    def measure_selected(self, selected: Tensor) -> Tensor:
        value = self._read(selected)
        return value if self.per_prompt else value.mean()

    def __repr__(self) -> str:
        return f"TokenLogit(tokens={self.tokens.tolist()}, per_prompt={self.per_prompt})"


class TokenProbability(TokenLogit):
    """A metric: the probability (or with `log=True`, log-probability) of one token per
    prompt, at one position per prompt. It reads the whole vocabulary at those positions
    (to normalise), but no other position.

    Args:
        tokens: A token id, or (batch,) token ids, one per prompt.
        positions: (batch,) position read in each prompt; None: the last position.
        per_prompt: Return one value per prompt instead of the mean.
        log: Return the log-probability.

    >>> metric = TokenProbability(1)
    >>> round(float(metric(torch.tensor([[[0.0, 0.0]]]))), 4)
    0.5
    """

    def __init__(self, tokens, positions: Tensor | None = None, per_prompt: bool = False, log: bool = False):
        super().__init__(tokens, positions, per_prompt)
        self.log = log
        self.selection = LogitSelection(self.selection.positions, None, self.selection.batch)

    def measure_selected(self, selected: Tensor) -> Tensor:
        log_probs = self._read(selected.log_softmax(dim=-1))
        value = log_probs if self.log else log_probs.exp()
        return value if self.per_prompt else value.mean()

    def __repr__(self) -> str:
        kind = "log-probability" if self.log else "probability"
        return f"TokenProbability({kind}, tokens={self.tokens.tolist()}, per_prompt={self.per_prompt})"


class LogitsAt(SelectionMetric):
    """A metric from the logits of some tokens at some positions, passed through `reduce`.

    Args:
        token_ids: (n,) token ids read in every prompt, or (batch, n), per prompt.
        positions: Positions read in each prompt: an int, (batch,) or (batch, k); None: the
            last position.
        reduce: A function of the selected logits (batch, k, n), in the order given;
            None returns them (a per-prompt result).

    >>> metric = LogitsAt([2, 0], reduce=lambda x: (x[..., 0] - x[..., 1]).mean())
    >>> float(metric(torch.tensor([[[1.0, 5.0, 4.0]]])))
    3.0
    """

    def __init__(self, token_ids, positions=None, reduce: Callable[[Tensor], "Tensor | float"] | None = None):
        ids = torch.as_tensor(token_ids)
        if ids.ndim not in (1, 2):
            raise PatchingError(f"token_ids must have shape (n,) or (batch, n); got {tuple(ids.shape)}.")
        self.token_ids, self.reduce = ids.long(), reduce
        batch = ids.shape[0] if ids.ndim == 2 else None
        self.selection = LogitSelection(positions, distinct_token_ids(ids, "token_ids"), batch)
        self.dims = (BATCH, "metric_1", "metric_2") if reduce is None else None
        self._copies: dict = {}

    def measure_selected(self, selected: Tensor) -> Tensor:
        columns = on_device(self._copies, "columns", selected.device, lambda: self.selection.columns(self.token_ids))
        if columns.ndim == 2:
            _check_rows(selected, columns.shape[0])
            columns = columns.unsqueeze(1).expand(-1, selected.shape[1], -1)
        else:
            columns = columns.expand(*selected.shape[:2], -1)
        logits = selected.gather(2, columns)
        return logits if self.reduce is None else self.reduce(logits)

    def __repr__(self) -> str:
        return f"LogitsAt(token_ids of shape {tuple(self.token_ids.shape)}, reduce={self.reduce!r})"


class NormalisedMetric:
    """A metric rescaled so that two reference runs score fixed values:
    `(base(logits) - offset) / scale`. Build it with `denoising_metric` or `noising_metric`.
    It reads the logits `base` reads (`selection`: None when `base` is a plain function).
    """

    def __init__(self, base: Metric, offset, scale, kind: str):
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if (scale == 0).any():
            raise PatchingError(
                "Cannot normalise the metric: it has the same value on the clean and the corrupted run, "
                "so no change can be expressed as a fraction of their difference."
            )
        self.base, self.offset, self.scale, self.kind = base, torch.as_tensor(offset, dtype=torch.float32), scale, kind
        self.selection = selection_of(base)
        self.dims = declared_dims(base)
        self._copies: dict = {}

    def __call__(self, logits: Logits) -> Tensor:
        return self._normalise(self.base(logits))

    def measure_selected(self, selected: Tensor) -> Tensor:
        """The normalised metric from the logits `selection` picks (see `SelectionMetric`)."""
        return self._normalise(self.base.measure_selected(selected))

    def _normalise(self, value) -> Tensor:
        value = as_tensor(value)
        offset = on_device(self._copies, "offset", value.device, lambda: self.offset)
        return (value - offset) / on_device(self._copies, "scale", value.device, lambda: self.scale)

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
    """`base` on the model's clean and corrupted runs, for `denoising_metric` / `noising_metric`,
    measured as the engines measure it (a metric object from its selected logits, in float32 on
    any model), so that a patch restoring the clean run scores exactly 1.

    >>> clean, corrupted = calibrate(model, LogitDiff(answers), clean_tokens, corrupted_tokens)
    >>> metric = denoising_metric(LogitDiff(answers), clean, corrupted)
    """
    with torch.no_grad():
        return tuple(
            as_tensor(measured_run(model, base, _tl.to_tokens(model, tokens)))
            for tokens in (clean_input, corrupted_input)
        )


__all__ = [
    "LogitDiff",
    "LogitsAt",
    "NormalisedMetric",
    "SelectionMetric",
    "TokenLogit",
    "TokenProbability",
    "calibrate",
    "denoising_metric",
    "lm_loss",
    "logit_diff",
    "noising_metric",
]
