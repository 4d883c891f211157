"""What the job records: the heads a step picks, and each step with its results' error bars."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import transformer_lens_patching as tlp

from ...results import PatchResult
from .circuit_step import CircuitFinding
from .uncertainty import Uncertainty


@dataclass(frozen=True)
class TopHead:
    """A head picked from a step's results, with its effect and, where the result keeps its
    per-prompt values, the effect's standard error, confidence interval and p-value."""

    layer: int
    head: int
    value: float
    stderr: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    significant: bool | None = None
    """Whether the effect is significant after FDR control (None: not tested)."""

    def __str__(self) -> str:
        spread = "" if self.stderr is None else f" ± {self.stderr:.1%}"
        return f"{self.layer}.{self.head} ({self.value:+.1%}{spread})"


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
    uncertainty: dict[str, Uncertainty] = field(default_factory=dict)
    """Each result's error bars (results computed without per-prompt values have none)."""
    not_significant: dict[str, int] = field(default_factory=dict)
    """For each role: the heads whose effect reached `min_effect` (with the role's sign) but was
    not significant, so were not named."""


def _candidates(result: PatchResult, sign: int, min_effect: float) -> list[tuple[int, float]]:
    """(flat index, value) of the heads of a (layer, head) result with an effect of `sign` at
    least `min_effect` in size, the largest first."""
    flat = result.permute_dims("layer", "head").as_tensor().flatten() * sign
    order = flat.argsort(descending=True, stable=True)
    return [(int(i), float(flat[i]) * sign) for i in order if flat[i] > 0 and flat[i] >= min_effect]


def _permuted(values: torch.Tensor | None, result: PatchResult) -> torch.Tensor | None:
    """`values` of `result`'s shape, flattened in (layer, head) order."""
    if values is None:
        return None
    order = [result.dims.index("layer"), result.dims.index("head")]
    return values.permute(order).flatten()


def top_heads(
    result: PatchResult, k: int, sign: int, min_effect: float = 0.0, uncertainty: Uncertainty | None = None
) -> list[TopHead]:
    """The `k` heads of a (layer, head) result with the largest effect of `sign` (-1: most
    negative first; +1: most positive first); heads with no effect of that sign, or with
    an effect smaller than `min_effect` in size, are left out, and so, given the result's
    `uncertainty`, are heads whose effect is not significant.

    >>> import torch
    >>> r = PatchResult(torch.tensor([[0.0, -0.5], [0.2, -0.1]]), ("layer", "head"))
    >>> [str(h) for h in top_heads(r, 2, -1)]
    ['0.1 (-50.0%)', '1.1 (-10.0%)']
    >>> [str(h) for h in top_heads(r, 2, -1, min_effect=0.2)]
    ['0.1 (-50.0%)']
    """
    layers, heads = result.coords["layer"], result.coords["head"]
    parts = uncertainty or Uncertainty(0, "", None, None, None)
    stderr, low, high, p_values, significant = (
        _permuted(values, result)
        for values in (parts.stderr, parts.ci_low, parts.ci_high, parts.p_values, parts.significant)
    )

    def at(values: torch.Tensor | None, index: int):
        return None if values is None else values[index].item()

    picked = [
        TopHead(
            layers[index // len(heads)],
            heads[index % len(heads)],
            value,
            at(stderr, index),
            at(low, index),
            at(high, index),
            at(p_values, index),
            at(significant, index),
        )
        for index, value in _candidates(result, sign, min_effect)
        if significant is None or bool(significant[index])
    ]
    return picked[:k]


def not_significant(result: PatchResult, sign: int, min_effect: float, uncertainty: Uncertainty | None) -> int:
    """How many heads of a (layer, head) result have an effect of `sign` at least `min_effect` in
    size that is not significant (0 where significance was not tested)."""
    if uncertainty is None or uncertainty.significant is None:
        return 0
    significant = _permuted(uncertainty.significant, result)
    return sum(not bool(significant[index]) for index, _ in _candidates(result, sign, min_effect))
