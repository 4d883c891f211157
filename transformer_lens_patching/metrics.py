"""Built-in metrics: what a patched run is measured by.

Any function of the logits is a metric. The metric objects here also say which logits
they read (`selection`: the engines then compute only those) and the dims of what they
return (`dims`, e.g. `("batch",)` for one value per prompt). The engines give every metric
float32 logits, also on half-precision models; the tensors a metric object reads on every
call (its token ids, positions, offsets) are moved to the logits' device once, not per call.
"""

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from . import _tl
from ._core.executor import measured_run
from ._core.measure import BATCH, as_tensor, declared_dims
from ._core.selection import LogitSelection, distinct_token_ids, on_device, selection_of
from ._core.tensor_types import Logits, Tokens
from ._stats import PromptSamples
from .errors import PatchingError
from .results import PatchResult

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

    def per_position(logits: Logits) -> Tensor:
        log_probs = logits[:, :-1].log_softmax(dim=-1)
        targets = on_device(copies, "targets", logits.device, lambda: tokens[:, 1:])
        return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def loss(logits: Logits) -> Tensor:
        losses = per_position(logits)
        return losses if per_token else losses.mean()

    def per_prompt_loss(logits: Logits) -> Tensor:
        return per_position(logits).mean(1)

    loss.dims = (BATCH, "metric_1") if per_token else ()
    per_prompt_loss.dims = (BATCH,)
    if not per_token:
        loss.per_prompt_metric = lambda: per_prompt_loss
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

    def per_prompt_metric(self) -> "SelectionMetric":
        """This metric with one value per prompt (`uncertainty=True` runs it): its mean over
        prompts is this metric. Metrics with a `per_prompt` option have one.

        >>> LogitDiff(torch.tensor([[1, 0]])).per_prompt_metric().dims
        ('batch',)
        """
        if not hasattr(self, "per_prompt"):
            raise PatchingError(f"{self!r} is not a mean over prompts: it has no per-prompt form.")
        form = copy.copy(self)
        form.per_prompt, form.dims = True, (BATCH,)
        return form


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


class KLDivergence(SelectionMetric):
    """A metric: KL(reference || patched) of the next-token distributions, over the whole
    vocabulary, at one or more positions per prompt (their mean), e.g. how far a patch moves
    the model from its clean predictions.

    Cheap: the reference's probabilities are kept at the read positions only, (batch, k,
    d_vocab), with their entropy term; a patched pass computes the final norm and the whole
    unembedding at those positions only, then one log-softmax and one product per position.

    Args:
        reference: The reference run's logits (batch, pos, d_vocab), e.g. `model(clean_tokens)`;
            see `KLDivergence.of`.
        positions: Positions read in each prompt (as `LogitsAt`'s); None: the last position.
        per_prompt: Return one value per prompt instead of the mean.

    >>> reference = torch.zeros(1, 1, 2)
    >>> round(float(KLDivergence(reference)(torch.tensor([[[0.0, 1.0]]]))), 4)
    0.1201
    """

    def __init__(self, reference: Tensor, positions=None, per_prompt: bool = False):
        reference = torch.as_tensor(reference)
        if reference.ndim != 3 or not reference.is_floating_point():
            raise PatchingError(
                f"reference must be logits of shape (batch, pos, d_vocab); got {reference.dtype} of shape "
                f"{tuple(reference.shape)}."
            )
        self.selection = LogitSelection(positions, None, reference.shape[0])
        log_p = self.selection.select(reference.detach()).float().cpu().log_softmax(-1)
        self._p, self._p_log_p = log_p.exp(), (log_p.exp() * log_p).nansum(-1)
        self.per_prompt = per_prompt
        self.dims = (BATCH,) if per_prompt else ()
        self._copies: dict = {}

    @classmethod
    def of(cls, model, reference_input, positions=None, per_prompt: bool = False) -> "KLDivergence":
        """The metric against the model's own run of `reference_input` (text or tokens): one
        forward pass, its logits kept (on the CPU) at the read positions only.

        >>> metric = KLDivergence.of(model, clean_tokens)
        """
        with torch.no_grad():
            logits = _tl.forward_logits(model, _tl.to_tokens(model, reference_input))
        return cls(logits, positions, per_prompt)

    def measure_selected(self, selected: Tensor) -> Tensor:
        _check_rows(selected, self._p.shape[0])
        p = on_device(self._copies, "p", selected.device, lambda: self._p)
        p_log_p = on_device(self._copies, "p_log_p", selected.device, lambda: self._p_log_p)
        kl = (p_log_p - (p * selected.log_softmax(-1)).sum(-1)).mean(-1)
        return kl if self.per_prompt else kl.mean()

    def __repr__(self) -> str:
        prompts, positions = self._p.shape[:2]
        return f"KLDivergence({prompts} prompts, {positions} positions each, per_prompt={self.per_prompt})"


class AnswerLogProb(SelectionMetric):
    """A metric: the log-probability of each prompt's answer of one or more tokens, by teacher
    forcing. The input holds each prompt followed by its answer; the metric sums the answer
    tokens' log-probabilities, each read at the position before it, in the one pass that
    scores any variant (with `probability=True`, the answer's probability: the sum's exp).

    Args:
        answers: (batch, m) token ids of each answer, shorter answers padded with -1.
        starts: (batch,) the position of each answer's first token in the input.
        per_prompt: Return one value per prompt instead of the mean.
        probability: Return exp of the log-probability.

    >>> metric = AnswerLogProb(torch.tensor([[1, 0]]), starts=torch.tensor([1]))
    >>> round(float(metric(torch.zeros(1, 3, 2))), 4)  # two tokens of a uniform 2-way choice
    -1.3863
    """

    def __init__(self, answers, starts, per_prompt: bool = False, probability: bool = False):
        answers, starts = torch.as_tensor(answers).long(), torch.as_tensor(starts).long()
        if answers.ndim != 2 or starts.shape != (answers.shape[0],):
            raise PatchingError(
                f"answers must be (batch, m) token ids and starts (batch,) positions; got shapes "
                f"{tuple(answers.shape)} and {tuple(starts.shape)}."
            )
        valid = answers >= 0
        if not valid[:, 0].all() or (valid[:, 1:] & ~valid[:, :-1]).any():
            raise PatchingError("Each answer needs at least one token, its padding (-1) only at its end.")
        if (starts < 1).any():
            raise PatchingError("An answer cannot start at position 0: its first token is read at the position before.")
        offsets = torch.arange(answers.shape[1])
        lengths = valid.sum(1, keepdim=True)
        read = starts[:, None] - 1 + torch.minimum(offsets[None], lengths - 1)
        self.answers, self.starts, self.valid = answers.clamp(min=0), starts, valid
        self.selection = LogitSelection(read, None, answers.shape[0])
        self.per_prompt, self.probability = per_prompt, probability
        self.dims = (BATCH,) if per_prompt else ()
        self._copies: dict = {}

    @classmethod
    def teacher_forced(cls, model, prompts, answers, per_prompt: bool = False, probability: bool = False):
        """(tokens, metric) for text `prompts` each followed by its `answers` text: the tokens of
        each prompt then its answer, right-padded to one length (a causal model's earlier
        positions do not see the padding), and the metric of those answers.

        >>> tokens, metric = AnswerLogProb.teacher_forced(model, ["1 + 1 ="], [" 2"])
        """
        if isinstance(prompts, str) or isinstance(answers, str) or len(prompts) != len(answers) or not prompts:
            raise PatchingError("teacher_forced needs two lists of texts of one length: prompts and their answers.")
        prompt_ids = [_tl.text_token_ids(model, prompt, prepend_bos=True) for prompt in prompts]
        answer_ids = [_tl.text_token_ids(model, answer, prepend_bos=False) for answer in answers]
        length = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        width = max(len(a) for a in answer_ids)
        pad = _tl.pad_token_id(model)
        tokens = torch.tensor([p + a + [pad] * (length - len(p) - len(a)) for p, a in zip(prompt_ids, answer_ids)])
        padded = torch.tensor([a + [-1] * (width - len(a)) for a in answer_ids])
        metric = cls(padded, torch.tensor([len(p) for p in prompt_ids]), per_prompt, probability)
        return _tl.to_tokens(model, tokens), metric

    def measure_selected(self, selected: Tensor) -> Tensor:
        _check_rows(selected, self.answers.shape[0])
        answers = on_device(self._copies, "answers", selected.device, lambda: self.answers)
        valid = on_device(self._copies, "valid", selected.device, lambda: self.valid)
        log_probs = selected.log_softmax(-1).gather(-1, answers.unsqueeze(-1)).squeeze(-1)
        value = (log_probs * valid).sum(-1)
        value = value.exp() if self.probability else value
        return value if self.per_prompt else value.mean()

    def __repr__(self) -> str:
        kind = "probability" if self.probability else "log-probability"
        return f"AnswerLogProb({kind} of answers of up to {self.answers.shape[1]} tokens, per_prompt={self.per_prompt})"


class Accuracy(SelectionMetric):
    """A metric: the fraction of prompts whose right answer has the largest logit, among the
    answers given (the right one, then the wrong ones or distractors), or with
    `among="vocabulary"` among every token. Its gradient is 0 almost everywhere: a metric to
    measure patched runs with, not to attribute (attribution refuses it).

    Args:
        answers: (batch, n) token ids: the right answer, then n - 1 wrong ones (n >= 1).
        positions: (batch,) position read in each prompt; None: the last position.
        per_prompt: Return one value per prompt (1.0 or 0.0) instead of the mean.
        among: "answers" or "vocabulary".

    >>> float(Accuracy(torch.tensor([[1, 0], [0, 1]]))(torch.tensor([[[0.0, 2.0]], [[0.0, 2.0]]])))
    0.5
    """

    differentiable = False

    def __init__(self, answers, positions=None, per_prompt: bool = False, among: str = "answers"):
        answers = torch.as_tensor(answers)
        if answers.ndim != 2 or answers.shape[1] < 1:
            raise PatchingError(
                f"answers must have shape (batch, n), the right answer first; got {tuple(answers.shape)}."
            )
        if among not in ("answers", "vocabulary"):
            raise PatchingError(f"among must be 'answers' or 'vocabulary'; got {among!r}.")
        if among == "answers" and answers.shape[1] < 2:
            raise PatchingError("Accuracy among the answers needs a wrong one too: answers of shape (batch, n >= 2).")
        self.answers, self.per_prompt, self.among = answers.long(), per_prompt, among
        self.positions = _one_position_per_prompt(positions, answers.shape[0])
        ids = distinct_token_ids(answers, "answers") if among == "answers" else None
        self.selection = LogitSelection(self.positions, ids, answers.shape[0])
        self.dims = (BATCH,) if per_prompt else ()
        self._copies: dict = {}

    def measure_selected(self, selected: Tensor) -> Tensor:
        _check_rows(selected, self.answers.shape[0])
        read = selected[:, 0]
        if self.among == "vocabulary":
            right = on_device(self._copies, "right", selected.device, lambda: self.answers[:, :1])
            correct = (read.argmax(-1, keepdim=True) == right).squeeze(1).float()
        else:
            columns = on_device(self._copies, "columns", selected.device, lambda: self.selection.columns(self.answers))
            chosen = read.gather(1, columns)
            correct = (chosen[:, 0] > chosen[:, 1:].max(1).values).float()
        return correct if self.per_prompt else correct.mean()

    def __repr__(self) -> str:
        return f"Accuracy(among the {self.among}, {self.answers.shape[0]} prompts, per_prompt={self.per_prompt})"


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


class PromptMean:
    """A metric that is the mean over prompts of a per-prompt function: calling it gives the
    mean, and `uncertainty=True` runs the function itself, one value per prompt.

    Args:
        per_prompt: A function of the logits (batch, pos, d_vocab) returning (batch,) values.

    >>> metric = PromptMean(lambda logits: logits[:, -1, 0])
    >>> float(metric(torch.tensor([[[1.0]], [[3.0]]])))
    2.0
    """

    dims = ()

    def __init__(self, per_prompt: Callable[[Logits], Tensor]):
        if not callable(per_prompt):
            raise PatchingError(f"PromptMean needs a function of the logits, got {type(per_prompt).__name__}.")
        self.function = per_prompt

    def __call__(self, logits: Logits) -> Tensor:
        return self._values(logits).mean()

    def _values(self, logits: Logits) -> Tensor:
        values = as_tensor(self.function(logits))
        if values.shape != (logits.shape[0],):
            raise PatchingError(
                f"PromptMean's function must return one value per prompt, ({logits.shape[0]},); "
                f"got shape {tuple(values.shape)}."
            )
        return values

    def per_prompt_metric(self) -> Callable[[Logits], Tensor]:
        """The per-prompt function, declaring its `batch` dim."""

        def per_prompt(logits: Logits) -> Tensor:
            return self._values(logits)

        per_prompt.dims = (BATCH,)
        return per_prompt

    def __repr__(self) -> str:
        return f"PromptMean({getattr(self.function, '__qualname__', self.function)!r})"


class NormalisedMetric:
    """A metric rescaled so that two reference runs score fixed values:
    `(base(logits) - offset) / scale`. Build it with `denoising_metric` or `noising_metric`.
    It reads the logits `base` reads (`selection`: None when `base` is a plain function).
    """

    def __init__(self, base: Metric, offset, scale, kind: str, calibration: tuple[Tensor, Tensor] | None = None):
        offset, scale = (value.as_tensor() if isinstance(value, PatchResult) else value for value in (offset, scale))
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if (scale == 0).any():
            raise PatchingError(
                "Cannot normalise the metric: it has the same value on the clean and the corrupted run, "
                "so no change can be expressed as a fraction of their difference."
            )
        self.base, self.offset, self.scale, self.kind = base, torch.as_tensor(offset, dtype=torch.float32), scale, kind
        self.selection = selection_of(base)
        self.dims = declared_dims(base)
        self.differentiable = getattr(base, "differentiable", True)
        self.calibration = calibration
        """(offset, scale) per prompt where the calibration kept them (`calibrate`'s values do):
        `uncertainty=True` then resamples them with the patched values."""
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
    return NormalisedMetric(
        base, corrupted, as_tensor(clean) - as_tensor(corrupted), "denoising", _calibration(clean, corrupted, corrupted)
    )


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
    return NormalisedMetric(
        base, clean, as_tensor(clean) - as_tensor(corrupted), "noising", _calibration(clean, corrupted, clean)
    )


def faithfulness_target(base: Metric, clean, corrupted, normalise: str = "means") -> "NormalisedMetric | PromptMean":
    """MIB's faithfulness of a run, `(base(run) - base(corrupted)) / (base(clean) - base(corrupted))`,
    as a metric to attribute with (`attr_edges`, `attr_patch`): 1 on the clean run, 0 on the
    corrupted one.

    `normalise="means"` is the ratio of the means over the prompts, as MIB's evaluation computes
    it: the same metric as `denoising_metric`, whose gradient is `base`'s divided by the constant
    `clean - corrupted`, so it ranks exactly what `base` ranks (by |score|; every sign flips where
    the clean run scores lower). `normalise="prompts"` is the mean over the prompts of each
    prompt's own faithfulness: each prompt's gradient is divided by its own `clean - corrupted`,
    so prompts on which the two runs differ little weigh more, and rankings can change. It needs
    `calibrate`'s values (which keep each prompt's) and a `base` with a per-prompt form (the metric
    objects here, `PromptMean`), and refuses prompts whose clean and corrupted values are equal.

    Args:
        base: A differentiable metric, e.g. `LogitDiff(answers, positions)`.
        clean: `base`'s value on the clean run (`calibrate`).
        corrupted: `base`'s value on the corrupted run.
        normalise: "means" (MIB's) or "prompts".

    >>> target = faithfulness_target(LogitDiff(torch.tensor([[1, 0]])), clean=4.0, corrupted=-2.0)
    >>> float(target(torch.tensor([[[0.0, 1.0]]])))
    0.5
    """
    if not getattr(base, "differentiable", True):
        raise PatchingError(f"{base!r} has no gradient, so it cannot be a target to attribute with.")
    if normalise == "means":
        return denoising_metric(base, clean, corrupted)
    if normalise != "prompts":
        raise PatchingError(f'normalise must be "means" (MIB\'s faithfulness) or "prompts", got {normalise!r}.')
    calibration = _calibration(clean, corrupted, corrupted)
    per_prompt_metric = getattr(base, "per_prompt_metric", None)
    if calibration is None or per_prompt_metric is None:
        raise PatchingError(
            'normalise="prompts" needs each prompt\'s clean and corrupted values, as calibrate returns them, and a '
            "base metric with a per-prompt form (LogitDiff, TokenLogit, ..., PromptMean); "
            f"got {base!r} with {type(clean).__name__} values."
        )
    offsets, scales = calibration
    if (scales == 0).any():
        equal = [int(i) for i in torch.nonzero(scales == 0).flatten()]
        raise PatchingError(
            f"Prompts {equal} have the same value on the clean and the corrupted run: their faithfulness is "
            'undefined. Drop them, or use normalise="means".'
        )
    per_prompt = per_prompt_metric()
    copies: dict = {}

    def faithfulness(logits: Logits) -> Tensor:
        values = as_tensor(per_prompt(logits))
        if values.shape != offsets.shape:
            raise PatchingError(
                f"The target was calibrated on {offsets.shape[0]} prompts, but the metric gives {tuple(values.shape)} "
                "values: calibrate on the prompts you attribute with."
            )
        offset = on_device(copies, "offset", values.device, lambda: offsets.to(torch.float32))
        return (values - offset) / on_device(copies, "scale", values.device, lambda: scales.to(torch.float32))

    return PromptMean(faithfulness)


def _calibration(clean, corrupted, offset) -> tuple[Tensor, Tensor] | None:
    """(offset, scale) per prompt from `calibrate`'s values, or None where they are plain numbers."""
    kept = [getattr(value, "samples", None) for value in (clean, corrupted, offset)]
    if any(samples is None or samples.values.ndim != 1 for samples in kept):
        return None
    clean_values, corrupted_values, offset_values = (samples.values for samples in kept)
    if clean_values.shape != corrupted_values.shape:
        raise PatchingError(
            f"clean and corrupted are calibrated on different numbers of prompts: {clean_values.shape[0]} and "
            f"{corrupted_values.shape[0]}."
        )
    return offset_values, clean_values - corrupted_values


def prompt_form(
    metric, batch: int, needs: str = "uncertainty=True needs"
) -> tuple[Metric, Tensor | None, Tensor | None]:
    """What `uncertainty=True` runs: (a per-prompt form of `metric`, offset, scale), the result being
    `(mean over prompts of the per-prompt values - mean(offset)) / mean(scale)`, offset and scale
    one value per prompt (None: 0 and 1). A metric already returning one value per prompt is its
    own form; a normalised metric is its base's form with the calibration's offset and scale (per
    prompt where `calibrate` kept them, else constants). `needs` starts the errors: who needs the form."""
    dims = declared_dims(metric)
    if dims == (BATCH,):
        return metric, None, None
    if isinstance(metric, NormalisedMetric):
        base, inner_offset, inner_scale = prompt_form(metric.base, batch, needs)
        if inner_offset is not None or inner_scale is not None:
            raise PatchingError("uncertainty=True cannot combine a normalised metric of a normalised metric.")
        if metric.calibration is not None:
            offset, scale = metric.calibration
            if offset.shape != (batch,):
                raise PatchingError(
                    f"The metric was calibrated on {offset.shape[0]} prompts, but orig_input has {batch}: uncertainty "
                    "resamples each prompt with its calibration, so calibrate on the same prompts."
                )
            return base, offset, scale
        if metric.offset.ndim or metric.scale.ndim:
            raise PatchingError(
                f"{needs} a normalised metric whose clean and corrupted values are single numbers "
                f"(or calibrate's values); got offset of shape {tuple(metric.offset.shape)}."
            )
        return base, metric.offset.double().expand(batch), metric.scale.double().expand(batch)
    has_form = not isinstance(metric, SelectionMetric) or hasattr(metric, "per_prompt")
    make = getattr(metric, "per_prompt_metric", None)
    if make is not None and has_form:
        return make(), None, None
    raise PatchingError(
        f"{needs} a metric that is a mean over prompts, with a per-prompt form: a metric object "
        f"(LogitDiff, TokenLogit, TokenProbability, their denoising_metric / noising_metric, 'loss'), a function "
        f"returning one value per prompt that declares it (its .dims = ('batch',)), or PromptMean(function). "
        f"Got {metric!r}, whose dims are {'unknown' if dims is None else dims}."
    )


def calibrate(model, base: Metric, clean_input: Tokens, corrupted_input: Tokens) -> tuple[Tensor, Tensor]:
    """`base` on the model's clean and corrupted runs, for `denoising_metric` / `noising_metric`,
    measured as the engines measure it (a metric object from its selected logits, in float32 on
    any model), so that a patch restoring the clean run scores exactly 1.

    >>> clean, corrupted = calibrate(model, LogitDiff(answers), clean_tokens, corrupted_tokens)
    >>> metric = denoising_metric(LogitDiff(answers), clean, corrupted)
    """
    with torch.no_grad():
        return tuple(
            _calibrated(model, base, _tl.to_tokens(model, tokens)) for tokens in (clean_input, corrupted_input)
        )


def _calibrated(model, base: Metric, tokens: Tensor) -> Tensor:
    """`base` on the model's run of `tokens`; for the metric objects that are a mean over prompts, a
    0-d PatchResult keeping the per-prompt values (the same number: their mean is the metric's)."""
    exact_mean = isinstance(base, PromptMean) or (
        isinstance(base, SelectionMetric) and getattr(base, "per_prompt", None) is False
    )
    if not exact_mean:
        return as_tensor(measured_run(model, base, tokens))
    values = as_tensor(measured_run(model, base.per_prompt_metric(), tokens))
    return PatchResult(values.mean(), (), samples=PromptSamples(values))


__all__ = [
    "Accuracy",
    "AnswerLogProb",
    "KLDivergence",
    "LogitDiff",
    "LogitsAt",
    "NormalisedMetric",
    "PromptMean",
    "SelectionMetric",
    "TokenLogit",
    "TokenProbability",
    "calibrate",
    "denoising_metric",
    "lm_loss",
    "logit_diff",
    "noising_metric",
]
