"""Which logits a metric reads (`LogitSelection`), and computing only those (`LogitReader`).

Most patching metrics read a handful of logits: two tokens at one position per prompt for
a logit difference. A metric that says so lets the engines skip the rest of the
unembedding (the final LayerNorm runs only at the read positions, and only the read
columns of W_U are multiplied) and every patch that cannot reach a read position.
"""

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _tl
from ..errors import PatchingError
from .nodes import SeqPos, normalize_seq_pos
from .sites import PatchSite, resolve_positions


@dataclass(frozen=True)
class LogitSelection:
    """The logits a metric reads: the vocabulary columns `token_ids` at `positions`.

    Args:
        positions: Positions read in each prompt, as for a Node's `seq_pos`: an int, a
            (batch,) or (batch, k) sequence or tensor; None reads the last position of
            every prompt.
        token_ids: The distinct token ids read, in increasing order; None reads the whole
            vocabulary (e.g. to normalise probabilities).
        batch: The number of prompts the metric is for; None if it fits any batch.

    >>> selection = LogitSelection(positions=None, token_ids=torch.tensor([3, 7]))
    >>> selection.select(torch.arange(20.0).reshape(1, 2, 10))
    tensor([[[13., 17.]]])
    """

    positions: SeqPos
    token_ids: Tensor | None
    batch: int | None = None
    _copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """What `columns` and `select` need on each device, moved there once."""

    def __post_init__(self):
        object.__setattr__(self, "positions", normalize_seq_pos(self.positions))

    def resolved_positions(self, batch: int, seq_len: int) -> Tensor:
        """The read positions as a (batch, k) tensor of non-negative positions."""
        if self.batch is not None and self.batch != batch:
            raise PatchingError(f"The metric is for {self.batch} prompts, but the input has {batch}.")
        if self.positions is None:
            return torch.full((batch, 1), seq_len - 1, dtype=torch.long)
        return resolve_positions(self.positions, batch, seq_len, "the metric's positions")

    def columns(self, token_ids: Tensor) -> Tensor:
        """Where each of `token_ids` sits along the last axis of the selected logits."""
        if self.token_ids is None:
            return token_ids
        ids = on_device(self._copies, "token_ids", token_ids.device, lambda: self.token_ids)
        return torch.searchsorted(ids, token_ids.contiguous())

    def select(self, logits: Tensor) -> Tensor:
        """The selected entries of full logits (batch, pos, d_vocab), as (batch, k, n_tokens)."""
        batch, seq_len = logits.shape[:2]
        key = ("positions", batch, seq_len)
        positions = on_device(self._copies, key, logits.device, lambda: self.resolved_positions(batch, seq_len))
        rows = torch.arange(batch, device=logits.device).unsqueeze(1)
        read = logits[rows, positions]
        if self.token_ids is None:
            return read
        return read[..., on_device(self._copies, "token_ids", logits.device, lambda: self.token_ids)]


def on_device(copies: dict, key, device: torch.device, make) -> Tensor:
    """The tensor `make()` gives, on `device`: made and moved the first time `key` is asked for
    there, then kept in `copies`. Metrics call this on every variant: a copy from the CPU each
    time would make the host wait for the device.

    >>> copies = {}
    >>> on_device(copies, "ids", torch.device("cpu"), lambda: torch.tensor([3])) is copies[("ids", torch.device("cpu"))]
    True
    """
    slot = (key, device)
    if slot not in copies:
        copies[slot] = _tl.moved(make(), device)
    return copies[slot]


def distinct_token_ids(token_ids, what: str) -> Tensor:
    """The distinct ids in `token_ids`, in increasing order, checked to be non-negative ints."""
    ids = torch.as_tensor(token_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
        raise PatchingError(
            f"{what} must hold at least one integer token id; got {ids.dtype} of shape {tuple(ids.shape)}."
        )
    if (ids < 0).any():
        raise PatchingError(f"{what} contains the negative token id {ids[ids < 0][0].item()}.")
    return torch.unique(ids.long())


def selection_of(metric) -> LogitSelection | None:
    """The logits `metric` declares it reads, or None (a plain function reads them all)."""
    selection = getattr(metric, "selection", None)
    return selection if isinstance(selection, LogitSelection) else None


class LogitReader:
    """Computes a selection's logits from the final residual stream of stacked variants.

    Only the read positions go through the final LayerNorm, and only the read columns of
    the unembedding are multiplied: for a logit difference on GPT-2 small, about 0.01% of
    the full unembedding's work. The selected logits are float32 whatever the model's dtype:
    the read columns are multiplied in float32 (a few columns: cheap), the whole vocabulary
    in the model's dtype, then upcast. The norm and the product run on their own devices.
    """

    def __init__(self, model, selection: LogitSelection, tokens: Tensor, d_vocab: int):
        batch, seq_len = tokens.shape
        token_ids = selection.token_ids
        if token_ids is not None and token_ids.max().item() >= d_vocab:
            raise PatchingError(
                f"The metric reads token id {token_ids.max().item()}, but the model's vocabulary has {d_vocab} tokens."
            )
        self.positions = selection.resolved_positions(batch, seq_len)
        """(batch, k) positions read in each prompt, on the CPU."""
        self.n_columns = d_vocab if token_ids is None else len(token_ids)
        self.reads_whole_vocabulary = token_ids is None
        self._token_ids = token_ids
        self._model = model
        self._copies: dict = {}
        on_device(self._copies, "positions", tokens.device, lambda: self.positions)
        weight, bias = _tl.unembed_columns(model, token_ids)
        self._weight, self._bias = (weight, bias) if token_ids is None else (weight.float(), bias.float())

    @property
    def floats_per_prompt(self) -> int:
        """Floats of selected logits per prompt (what one variant's logits cost)."""
        return self.positions.shape[1] * self.n_columns

    def __call__(self, residual: Tensor) -> Tensor:
        """Selected logits (rows, k, n_columns) of a final residual stream (rows, pos, d_model)
        whose rows are copies of the batch, one after another."""
        copies = residual.shape[0] // self.positions.shape[0]
        positions = on_device(self._copies, "positions", residual.device, lambda: self.positions).repeat(copies, 1)
        rows = torch.arange(residual.shape[0], device=residual.device).unsqueeze(1)
        normalised = _tl.moved(_tl.final_norm(self._model, residual[rows, positions]), self._weight.device)
        if self.reads_whole_vocabulary:
            dtype = normalised.dtype
            return _tl.output_transform(self._model, normalised @ self._weight.to(dtype) + self._bias.to(dtype)).float()
        return _tl.output_transform(self._model, normalised.float() @ self._weight + self._bias)

    def read(self, stopped: Tensor | None, logits: Tensor | None) -> Tensor:
        """The selected logits of a pass told to stop at the final residual stream: from where it
        stopped (`stopped`), or, where that hook never fires (OpenAI GPT's bridge) and the pass ran
        on to the logits, from its full `logits`."""
        return self(stopped) if stopped is not None else self.from_logits(logits)

    def from_logits(self, logits: Tensor) -> Tensor:
        """The selected logits (rows, k, n_columns) of full logits (rows, pos, d_vocab) whose rows
        are copies of the batch."""
        copies = logits.shape[0] // self.positions.shape[0]
        positions = on_device(self._copies, "positions", logits.device, lambda: self.positions).repeat(copies, 1)
        rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
        read = logits[rows, positions]
        return (read if self._token_ids is None else read[..., self._token_ids.to(logits.device)]).float()

    def rows(self, rows: slice) -> "LogitReader":
        """This reader for the prompts `rows` of its batch (a chunk of them)."""
        part = copy.copy(self)
        part.positions = self.positions[rows]
        part._copies = {slot: positions[rows] for slot, positions in self._copies.items()}
        return part

    def only_after_reads(self, site: PatchSite) -> bool:
        """Whether `site` patches, in every prompt, only positions after every position read
        there: with causal attention, such a patch cannot change what the metric reads."""
        if site.positions is None:
            return False
        return bool((site.positions.min(dim=1).values > self.positions.max(dim=1).values).all())
