"""What the IOI analysis records: the heads a step picks, and each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import transformer_lens_patching as tlp

from ...results import PatchResult
from .circuit_step import CircuitFinding


@dataclass(frozen=True)
class TopHead:
    """A head picked from a step's results, with its effect."""

    layer: int
    head: int
    value: float

    def __str__(self) -> str:
        return f"{self.layer}.{self.head} ({self.value:+.1%})"


@dataclass
class Step:
    """One experiment of the analysis: its results, the heads it found and what they mean."""

    key: str
    title: str
    description: str
    results: dict[str, PatchResult]
    top: dict[str, list[TopHead]] = field(default_factory=dict)
    seconds: float = 0.0
    confirmation: tlp.Confirmation | None = None
    """For the neuron step: the strongest neurons by estimate, each patched exactly."""
    circuit: CircuitFinding | None = None
    """For the circuit step: the faithfulness curves and the circuit found."""


def top_heads(result: PatchResult, k: int, sign: int, min_effect: float = 0.0) -> list[TopHead]:
    """The `k` heads of a (layer, head) result with the largest effect of `sign` (-1: most
    negative first; +1: most positive first); heads with no effect of that sign, or with
    an effect smaller than `min_effect` in size, are left out.

    >>> import torch
    >>> r = PatchResult(torch.tensor([[0.0, -0.5], [0.2, -0.1]]), ("layer", "head"))
    >>> [str(h) for h in top_heads(r, 2, -1)]
    ['0.1 (-50.0%)', '1.1 (-10.0%)']
    >>> [str(h) for h in top_heads(r, 2, -1, min_effect=0.2)]
    ['0.1 (-50.0%)']
    """
    values = result.permute_dims("layer", "head").as_tensor() * sign
    flat = values.flatten()
    order = flat.argsort(descending=True)[:k]
    layers, heads = result.coords["layer"], result.coords["head"]
    n_heads = len(heads)
    return [
        TopHead(layers[int(i) // n_heads], heads[int(i) % n_heads], float(flat[i]) * sign)
        for i in order
        if flat[i] > 0 and flat[i] >= min_effect
    ]
