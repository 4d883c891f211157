"""The prompts a job analyses, whatever task they come from: tokens, answers, labelled positions, texts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...metrics import Accuracy, LogitDiff


@dataclass(frozen=True)
class JobPrompts:
    """Clean/corrupted prompt pairs as every step of the job reads them.

    `positions` are the labelled positions the by-position step patches at, in the order it
    reports them, each a (batch,) tensor of one position per prompt; `end` is where the
    answers are read. The texts are for the report (`answer_key` and `wrong_key` name the
    answers in results.json: "io" and "s" for IOI).
    """

    task: str
    """The task's name in the report's title, e.g. "IOI" or "greater_than"."""
    clean: torch.Tensor
    corrupted: torch.Tensor
    answers: torch.Tensor
    """(batch, 2): the answer's token and the wrong answer's, as `LogitDiff` takes them."""
    choices: torch.Tensor
    """(batch, k): the answer's token, then every wrong answer's, as `Accuracy` takes them."""
    end: torch.Tensor
    positions: dict[str, torch.Tensor]
    clean_texts: tuple[str, ...]
    corrupted_texts: tuple[str, ...]
    answer_texts: tuple[str, ...]
    wrong_texts: tuple[str, ...]
    difference: str = "answer - wrong"
    """The logit difference in words, e.g. "IO - S"."""
    texts_end_with_answer: bool = False
    """Whether each text ends with its answer (IOI's sentences do; the model reads them up to it)."""
    answer_key: str = "answer"
    wrong_key: str = "wrong"

    @property
    def n(self) -> int:
        """The number of prompt pairs."""
        return self.clean.shape[0]

    def logit_diff(self) -> LogitDiff:
        """The logit difference of the answer over the wrong answer at `end`, a mean over the prompts."""
        return LogitDiff(self.answers, self.end)

    def accuracy(self) -> Accuracy:
        """The fraction of prompts whose answer's token scores above every wrong answer's at `end`."""
        return Accuracy(self.choices, self.end)
