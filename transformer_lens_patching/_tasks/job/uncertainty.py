"""The error bars of the job: each result's standard errors and confidence intervals over
the prompts, and for the results of heads their p-values and which heads are significant.

They come from the per-prompt values the library keeps with `uncertainty=True` (no forward pass):
prompts are the unit of replication, so an interval says how much a value would move on another
draw of prompts like these, on this model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...results import PatchResult

CI_LEVEL = 0.95
"""The confidence level of every interval of the analysis."""
CI_RESAMPLES = 2000
"""The bootstrap resamples of each interval (BCa, seeded: the same run gives the same intervals)."""
BOOTSTRAP_CELLS = 10_000
"""Results with more cells than this (the neuron screen's estimates) get Student's t intervals
around their standard errors instead of the bootstrap's, which would take tens of seconds."""
BOOTSTRAP_PROMPTS = 3
"""The fewest prompts the bootstrap intervals are made from: two prompts have only three distinct
resamples, so their intervals are Student's t (one degree of freedom: wide, as they should be)."""
METHOD_WORDS = {"bootstrap": "the BCa bootstrap over prompts", "t": "Student's t"}
"""How the report names each way of making intervals."""
HEAD_DIMS = ("head", "kv_head")
"""A result with one of these dims is tested for significance: its heads are candidates for a role."""


@dataclass(frozen=True)
class Uncertainty:
    """A result's error bars over the prompts, computed once when its step is recorded; each
    tensor has the result's shape.

    Attributes:
        n_prompts: The prompts behind each value.
        ci_method: How the intervals were made: "bootstrap" (BCa) or "t".
        stderr: The standard error of each value (None with one prompt: there is no spread).
        ci_low: The low end of each value's `CI_LEVEL` confidence interval (None with one prompt).
        ci_high: The high end.
        p_values: For a result of heads, each head's two-sided p-value of the sign-flip
            permutation test over prompts that the patch changes nothing (exact up to 12 prompts).
        significant: For a result of heads, whether each head's effect is significant after
            Benjamini-Hochberg control of the false discovery rate over all of the result's heads.
    """

    n_prompts: int
    ci_method: str
    stderr: torch.Tensor | None
    ci_low: torch.Tensor | None
    ci_high: torch.Tensor | None
    p_values: torch.Tensor | None = None
    significant: torch.Tensor | None = None


def uncertainty_of(result: PatchResult, fdr: float) -> Uncertainty | None:
    """The error bars of a result that keeps its per-prompt values (None for one that does not),
    and for a result of heads its p-values and which heads are significant at false discovery rate `fdr`."""
    if getattr(result, "samples", None) is None:
        return None
    n = result.n_prompts
    method = ci_method(n, result.numel())
    stderr = low = high = None
    if n >= 2:
        stderr = _plain(result.stderr)
        low, high = (_plain(bound) for bound in result.ci(CI_LEVEL, method, n_resamples=CI_RESAMPLES))
    p_values = significant = None
    if any(dim in HEAD_DIMS for dim in result.dims):
        p_values = _plain(result.p_values())
        significant = _plain(result.significant(fdr, "fdr_bh"))
    return Uncertainty(n, method, stderr, low, high, p_values, significant)


def ci_method(n_prompts: int, cells: int) -> str:
    """How the intervals of `cells` values over `n_prompts` prompts are made: "bootstrap" (BCa),
    or "t" for many cells (`BOOTSTRAP_CELLS`) or few prompts (`BOOTSTRAP_PROMPTS`)."""
    return "bootstrap" if cells <= BOOTSTRAP_CELLS and n_prompts >= BOOTSTRAP_PROMPTS else "t"


def mean_uncertainty(per_prompt: torch.Tensor) -> Uncertainty:
    """The error bars of the mean of one value per prompt (e.g. the logit differences), as 0-d tensors."""
    mean = PatchResult.from_per_prompt(PatchResult(per_prompt.detach().cpu(), ("batch",)))
    return uncertainty_of(mean, fdr=0.05)


def _plain(values) -> torch.Tensor:
    """A result's values as a plain CPU tensor."""
    return values.as_tensor() if isinstance(values, PatchResult) else torch.as_tensor(values)


def curve_band(curve) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None:
    """A faithfulness curve's standard error and `CI_LEVEL` interval (lows, highs) at each size,
    over the prompts it was measured on; None for a curve without per-prompt values, or of one prompt."""
    if curve.samples is None or curve.samples.n < 2:
        return None
    method = ci_method(curve.samples.n, len(curve.fractions))
    low, high = curve.faithfulness_ci(CI_LEVEL, method, n_resamples=CI_RESAMPLES)
    return curve.faithfulness_stderr, low, high


def smallest_p_value(n_prompts: int) -> float:
    """The smallest two-sided p-value the sign-flip test gives with `n_prompts`: 2 / 2^n, when every
    prompt's change has the same sign (2 of the 2^n sign patterns are then as extreme), exactly up
    to 12 prompts; beyond, about that, and at least 1 / 10001 with its 10,000 random patterns."""
    exact = 2.0 ** (1 - n_prompts)
    return exact if n_prompts <= EXACT_SIGN_FLIPS else max(exact, 1 / (PERMUTATIONS + 1))


EXACT_SIGN_FLIPS = 12
"""Up to this many prompts the library's sign-flip test enumerates every pattern of signs."""
PERMUTATIONS = 10_000
"""The random sign patterns of the test beyond `EXACT_SIGN_FLIPS` prompts (the library's default)."""


def prompts_for_a_lone_head(fdr: float, n_heads: int) -> int | None:
    """The fewest prompts with which one head can be significant on its own after Benjamini-Hochberg
    control over `n_heads` (its p-value at most fdr / n_heads); None if no number of prompts can."""
    for n in range(1, 64):
        if smallest_p_value(n) <= fdr / n_heads:
            return n
    return None
