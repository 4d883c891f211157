"""Uncertainty over prompts: standard errors, intervals and significance from per-prompt values.

Every result of this library is a statistic of the prompts it ran on: a mean of the metric over
prompts, or for the normalised metrics and faithfulness a ratio of such means,
`(mean(v) - mean(o)) / mean(s)` (v the patched metric, o the offset, s the scale, each one
value per prompt). `PromptSamples` keeps those per-prompt values and resamples them together
(a prompt is drawn with its v, o and s), so that the uncertainty of the calibration counts too.
Prompts are the unit of replication; the model is fixed: an interval says how much the result
would move on another draw of prompts from the same distribution, nothing about other models,
seeds or metrics. Everything is computed in float64 on the CPU, from values already measured:
no statistic runs the model.
"""

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PatchingError

CI_METHODS = ("bootstrap", "percentile", "t")
"""How `ci` builds an interval: BCa bootstrap, percentile bootstrap, or Student's t."""
TESTS = ("sign_flip", "t")
"""The tests `p_values` runs: the sign-flip permutation test, or the one-sample t-test."""
CORRECTIONS = ("fdr_bh", "bonferroni", None)
"""How `significant` corrects for testing many cells at once."""
EXACT_SIGN_FLIPS = 12
"""Up to this many prompts, the sign-flip test enumerates every pattern of signs (exact p-values)."""
ROUNDING = 1e-5
"""Per-prompt differences from the unpatched run within this fraction of (1 + |unpatched|) count as
0 in `p_values`: float32 rounding of passes stacked differently, not an effect."""
_CELLS_PER_CHUNK = 4096
_FLOATS_PER_CHUNK = 2**24


@dataclass(frozen=True)
class PromptSamples:
    """The per-prompt values behind a result, and how they combine into it.

    The result is `(mean(values) - mean(offset)) / mean(scale)` over the prompts (the last axis
    of `values`), computed per cell. `offset` and `scale` are one value per prompt (the
    calibration runs of a normalised metric, the empty and full circuits of a faithfulness
    curve), or None for 0 and 1. `baseline` holds the unpatched run's per-prompt values in the
    units of `values` (zeros for results that are changes), the reference of `p_values`;
    None where the call did not measure it.

    >>> samples = PromptSamples(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    >>> samples.estimate(), samples.stderr()
    (tensor([3.], dtype=torch.float64), tensor([1.0801], dtype=torch.float64))
    """

    values: Tensor
    offset: Tensor | None = None
    scale: Tensor | None = None
    baseline: Tensor | None = None

    def __post_init__(self):
        values = torch.as_tensor(self.values).detach().cpu().double()
        if values.ndim == 0:
            raise PatchingError("Per-prompt values need a prompt axis (the last one).")
        object.__setattr__(self, "values", values)
        for name in ("offset", "scale", "baseline"):
            part = getattr(self, name)
            if part is None:
                continue
            part = torch.as_tensor(part).detach().cpu().double()
            if part.shape != (self.n,):
                raise PatchingError(
                    f"PromptSamples' {name} must hold one value per prompt, ({self.n},); got {tuple(part.shape)}."
                )
            object.__setattr__(self, name, part)

    @property
    def n(self) -> int:
        """How many prompts."""
        return self.values.shape[-1]

    @property
    def cell_shape(self) -> tuple[int, ...]:
        """The shape of the result (the values' shape less the prompt axis)."""
        return tuple(self.values.shape[:-1])

    def select(self, axis: int, index: int) -> "PromptSamples":
        """These samples for one index of one of the result's axes."""
        return PromptSamples(self.values.select(axis, index), self.offset, self.scale, self.baseline)

    def permute(self, order) -> "PromptSamples":
        """These samples with the result's axes in `order`."""
        return PromptSamples(self.values.permute(*order, len(order)), self.offset, self.scale, self.baseline)

    def reshape(self, shape) -> "PromptSamples":
        """These samples for the result reshaped to `shape`."""
        return PromptSamples(self.values.reshape(*shape, self.n), self.offset, self.scale, self.baseline)

    def subset(self, prompts) -> "PromptSamples":
        """These samples restricted to some prompts (indices along the prompt axis)."""
        prompts = torch.as_tensor(prompts, dtype=torch.long)

        def pick(part):
            return None if part is None else part[prompts]

        return PromptSamples(self.values[..., prompts], pick(self.offset), pick(self.scale), pick(self.baseline))

    def _parts(self) -> tuple[Tensor, Tensor, Tensor]:
        zeros, ones = torch.zeros(self.n, dtype=torch.float64), torch.ones(self.n, dtype=torch.float64)
        return (
            self.values,
            zeros if self.offset is None else self.offset,
            ones if self.scale is None else self.scale,
        )

    def estimate(self) -> Tensor:
        """The result: `(mean(values) - mean(offset)) / mean(scale)` per cell."""
        values, offset, scale = self._parts()
        return (values.mean(-1) - offset.mean()) / scale.mean()

    def per_prompt(self) -> Tensor:
        """Each prompt's value on the result's scale, `(values - mean(offset)) / mean(scale)`:
        their mean over prompts is the result."""
        values, offset, scale = self._parts()
        return (values - offset.mean()) / scale.mean()

    def influence(self) -> Tensor:
        """Each prompt's linearised contribution to the result (the delta method):
        `(values - offset - estimate * scale) / mean(scale)`; for a plain mean, the values
        less their mean. Their mean is 0 and their spread gives the standard error."""
        values, offset, scale = self._parts()
        estimate = self.estimate().unsqueeze(-1)
        return (values - offset - estimate * scale) / scale.mean()

    def stderr(self) -> Tensor:
        """The standard error of the result: the sample standard deviation of the influence
        values over sqrt(n) (for a plain mean, of the per-prompt values themselves)."""
        self._need(2, "a standard error")
        return self.influence().std(-1, unbiased=True) / math.sqrt(self.n)

    def ci(self, level: float = 0.95, method: str = "bootstrap", n_resamples: int = 2000, seed: int = 0):
        """A two-sided `level` confidence interval per cell, as (low, high).

        `method`: "bootstrap" (BCa: bias-corrected and accelerated percentiles of `n_resamples`
        resamples of the prompts, the acceleration from the jackknife), "percentile" (the
        percentile bootstrap) or "t" (estimate +- Student's t quantile with n - 1 degrees of
        freedom times the standard error). Resamples come from a generator seeded with `seed`.
        Both bootstraps are expanded (Hesterberg 2015): their tail levels are those of a t with
        n - 1 degrees of freedom, scaled by sqrt(n / (n - 1)), which undoes the bootstrap's
        known narrowness on few prompts (a plain 95% bootstrap of 16 prompts covers about 92%);
        no tail is thinner than half a resample (then the interval is the resamples' range).
        """
        _check_level(level)
        if method not in CI_METHODS:
            raise PatchingError(f"method must be one of {', '.join(map(repr, CI_METHODS))}; got {method!r}.")
        self._need(2, "an interval")
        if method == "t":
            estimate, half = self.estimate(), t_quantile(level, self.n - 1) * self.stderr()
            return estimate - half, estimate + half
        _check_count(n_resamples, "n_resamples")
        weights = _resample_weights(self.n, n_resamples, seed)
        alpha = max(_expanded_tail(level, self.n), 0.5 / n_resamples)
        if method == "percentile":
            quantiles = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
            return tuple(self._by_chunk(lambda boot, est, jack: _quantiles(boot, quantiles), weights, 2))
        return tuple(self._by_chunk(lambda boot, est, jack: _bca(boot, est, jack, alpha), weights, 2))

    def _by_chunk(self, bounds, weights: Tensor, count: int):
        """`bounds(bootstrap estimates (cells, R), estimates (cells,), jackknife (cells, n))` over
        chunks of cells, each giving `count` tensors of (cells,), reassembled to the cells' shape."""
        values, offset, scale = self._parts()
        flat = values.reshape(-1, self.n)
        n = self.n
        leave_out = (torch.ones(n, n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64)) / (n - 1)
        parts = [[] for _ in range(count)]
        for start in range(0, flat.shape[0], _CELLS_PER_CHUNK):
            chunk = flat[start : start + _CELLS_PER_CHUNK]
            boot = _weighted_ratio(chunk, offset, scale, weights / n)
            jack = _weighted_ratio(chunk, offset, scale, leave_out)
            est = (chunk.mean(-1) - offset.mean()) / scale.mean()
            for part, bound in zip(parts, bounds(boot, est, jack)):
                part.append(bound)
        return [torch.cat(part).reshape(self.cell_shape) for part in parts]

    def bootstrap(self, n_resamples: int = 2000, seed: int = 0) -> Tensor:
        """The result on `n_resamples` resamples of the prompts, (*cells, n_resamples)."""
        _check_count(n_resamples, "n_resamples")
        weights = _resample_weights(self.n, n_resamples, seed)
        return _weighted_ratio(*self._parts(), weights / self.n)

    def p_values(self, n_permutations: int = 10000, seed: int = 0, test: str = "sign_flip") -> Tensor:
        """Two-sided p-values, per cell, that the patch does not change the metric, from the
        per-prompt differences from the unpatched run (values - baseline).

        "sign_flip": the permutation test whose null is that the differences are symmetric about
        0. With at most `EXACT_SIGN_FLIPS` prompts every pattern of signs is enumerated (exact);
        otherwise `n_permutations` random patterns, p = (hits + 1) / (n + 1). A pattern hits when
        its |mean| is at least the observed one, less a relative 1e-9 for rounding. No exact
        p-value is below 2 / 2**n, no sampled one below 1 / (n_permutations + 1): with few
        prompts and many cells, too coarse to survive a correction. Differences within float32
        rounding of the metric (`ROUNDING`) count as 0.
        "t": the one-sample t-test of mean 0 (n - 1 degrees of freedom), which assumes roughly
        normal differences but whose p-values are not limited so."""
        if self.baseline is None:
            raise PatchingError(
                "This result has no per-prompt values of the unpatched run to test against: significance needs a "
                "result of act_patch, path_patch or an attribution method with uncertainty=True."
            )
        _check_count(n_permutations, "n_permutations")
        if test not in TESTS:
            raise PatchingError(f"test must be one of {', '.join(map(repr, TESTS))}; got {test!r}.")
        differences = (self.values - self.baseline).reshape(-1, self.n)
        rounding = ROUNDING * (1 + self.baseline.abs())
        differences = torch.where(differences.abs() <= rounding, torch.zeros_like(differences), differences)
        if test == "t":
            self._need(2, "a t-test")
            spread = differences.std(-1, unbiased=True) / math.sqrt(self.n)
            statistic = (differences.mean(-1) / spread).abs().nan_to_num(0.0, posinf=math.inf)
            p_values = [1 - _t_inside(float(t), self.n - 1) for t in statistic.tolist()]
            return torch.tensor(p_values, dtype=torch.float64).reshape(self.cell_shape)
        if self.n <= EXACT_SIGN_FLIPS:
            signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=self.n)), dtype=torch.float64)
            exact = True
        else:
            generator = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (n_permutations, self.n), generator=generator).double() * 2 - 1
            exact = False
        pieces, per_chunk = [], max(1, _FLOATS_PER_CHUNK // signs.shape[0])
        for start in range(0, differences.shape[0], per_chunk):
            chunk = differences[start : start + per_chunk]
            observed = chunk.mean(-1, keepdim=True).abs()
            null = (chunk @ signs.T / self.n).abs()
            hits = (null >= observed * (1 - 1e-9)).sum(-1).double()
            pieces.append(hits / signs.shape[0] if exact else (hits + 1) / (signs.shape[0] + 1))
        return torch.cat(pieces).reshape(self.cell_shape)

    def prompts_for(self, half_width: float, level: float = 0.95) -> Tensor:
        """How many prompts a normal-theory interval of `level` would need to be +-`half_width`
        wide, given the spread observed here: ceil((z * sd / half_width)^2), per cell."""
        _check_level(level)
        if not half_width > 0:
            raise PatchingError(f"half_width must be positive, got {half_width!r}.")
        self._need(2, "a spread")
        z = float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
        spread = self.influence().std(-1, unbiased=True)
        return torch.ceil((z * spread / half_width) ** 2)

    def _need(self, count: int, what: str) -> None:
        if self.n < count:
            raise PatchingError(f"{what.capitalize()} needs at least {count} prompts; this result has {self.n}.")


@dataclass(frozen=True)
class PromptForm:
    """How a call with `uncertainty=True` combines its per-prompt values into its result: the
    metric's offset and scale per prompt (None: 0 and 1), from `metrics.prompt_form`."""

    offset: Tensor | None = None
    scale: Tensor | None = None

    def samples(self, values: Tensor, baseline: Tensor | None = None, *, change: bool = False) -> PromptSamples:
        """The samples of per-prompt `values` (prompts last): of the metric, or with `change` of
        its change from the unpatched run (no offset: it cancels)."""
        return PromptSamples(values, None if change else self.offset, self.scale, baseline)


def significant(p_values: Tensor, alpha: float = 0.05, correction: str | None = "fdr_bh") -> Tensor:
    """Which p-values are significant at `alpha` after `correction` over all of them:
    "fdr_bh" (Benjamini-Hochberg: the expected fraction of false discoveries is at most
    alpha), "bonferroni" (the chance of any false discovery is at most alpha) or None.

    >>> significant(torch.tensor([0.001, 0.02, 0.04, 0.3]), 0.05, "fdr_bh").tolist()
    [True, True, False, False]
    """
    if correction not in CORRECTIONS:
        raise PatchingError(f"correction must be one of {', '.join(map(repr, CORRECTIONS))}; got {correction!r}.")
    if not 0 < alpha < 1:
        raise PatchingError(f"alpha must be between 0 and 1, got {alpha!r}.")
    flat = p_values.reshape(-1).double()
    count = flat.numel()
    if correction is None:
        chosen = flat <= alpha
    elif correction == "bonferroni":
        chosen = flat * count <= alpha
    else:
        order = torch.argsort(flat)
        ranks = torch.arange(1, count + 1, dtype=torch.float64)
        passing = flat[order] <= alpha * ranks / count
        largest = int(passing.nonzero().max()) + 1 if passing.any() else 0
        chosen = torch.zeros(count, dtype=torch.bool)
        chosen[order[:largest]] = True
    return chosen.reshape(p_values.shape)


def t_quantile(level: float, df: int) -> float:
    """The `t` with P(|T| <= t) = `level` for Student's t with `df` (a whole number) degrees
    of freedom, by bisection on its exact distribution function.

    >>> round(t_quantile(0.95, 15), 4)
    2.1314
    """
    low, high = 0.0, 1.0
    while _t_inside(high, df) < level:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if _t_inside(middle, df) < level else (low, middle)
    return (low + high) / 2


def _t_inside(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with whole `df` (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    sine, cosine = math.sin(theta), math.cos(theta)
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term, total = cosine, cosine
        for k in range(3, df - 1, 2):
            term *= cosine * cosine * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + sine * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):
        term *= cosine * cosine * (k - 1) / k
        total += term
    return sine * total


def _expanded_tail(level: float, n: int) -> float:
    """The lower tail level of an expanded bootstrap interval of `level` on `n` prompts: the
    normal tail at sqrt(n / (n - 1)) times the t quantile of n - 1 degrees of freedom."""
    z = math.sqrt(n / (n - 1)) * t_quantile(level, n - 1)
    return float(torch.special.ndtr(torch.tensor(-z, dtype=torch.float64)))


def _weighted_ratio(values: Tensor, offset: Tensor, scale: Tensor, means: Tensor) -> Tensor:
    """The result on reweighted prompts, (*cells, R): `(values - offset) / scale` with each mean
    taken under a row of `means` (R, n), rows summing to 1 (a resample's counts over n, or the
    jackknife's leave-one-out means)."""
    return (values @ means.T - means @ offset) / (means @ scale)


def top_k_frequency(strength: Tensor, k: int) -> Tensor:
    """(cells,): the fraction of the columns of `strength` (cells, R), one per resample, in which
    each cell is among the `k` largest (NaN counts as the smallest)."""
    top = torch.topk(torch.nan_to_num(strength.double(), nan=-math.inf), k, dim=0).indices
    counts = torch.zeros(strength.shape[0], dtype=torch.float64)
    counts.scatter_add_(0, top.flatten(), torch.ones(top.numel(), dtype=torch.float64))
    return counts / strength.shape[1]


def _resample_weights(n: int, count: int, seed: int) -> Tensor:
    """(count, n): how many times each prompt is drawn in each resample with replacement."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, n, (count, n), generator=generator)
    weights = torch.zeros(count, n, dtype=torch.float64)
    return weights.scatter_add_(1, drawn, torch.ones(count, n, dtype=torch.float64))


def _quantiles(boot: Tensor, levels: Tensor) -> list[Tensor]:
    return list(torch.quantile(boot, levels, dim=-1))


def _bca(boot: Tensor, estimate: Tensor, jackknife: Tensor, alpha: float) -> list[Tensor]:
    """BCa bounds (Efron 1987) from bootstrap estimates (cells, R), the estimates (cells,) and
    the leave-one-out estimates (cells, n)."""
    resamples = boot.shape[-1]
    below = (boot < estimate.unsqueeze(-1)).double().mean(-1) + 0.5 * (boot == estimate.unsqueeze(-1)).double().mean(-1)
    below = below.clamp(1 / (resamples + 1), resamples / (resamples + 1))
    bias = torch.special.ndtri(below)
    spread = jackknife.mean(-1, keepdim=True) - jackknife
    denominator = 6 * (spread**2).sum(-1) ** 1.5
    acceleration = torch.where(denominator > 0, (spread**3).sum(-1) / denominator, torch.zeros_like(denominator))
    ordered = boot.sort(-1).values
    bounds = []
    for tail in (alpha, 1 - alpha):
        z = float(torch.special.ndtri(torch.tensor(tail, dtype=torch.float64)))
        denominator = 1 - acceleration * (bias + z)
        corrected = torch.special.ndtr(bias + (bias + z) / denominator)
        adjusted = torch.where(denominator > 0, corrected, torch.full_like(corrected, tail))
        position = (adjusted * (resamples - 1)).clamp(0, resamples - 1)
        lower, upper = position.floor().long(), position.ceil().long()
        weight = position - lower
        low_value = ordered.gather(-1, lower.unsqueeze(-1)).squeeze(-1)
        high_value = ordered.gather(-1, upper.unsqueeze(-1)).squeeze(-1)
        bounds.append(low_value + weight * (high_value - low_value))
    return bounds


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise PatchingError(f"level must be between 0 and 1 (e.g. 0.95), got {level!r}.")


def _check_count(count: int, what: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PatchingError(f"{what} must be a whole number of at least 1, got {count!r}.")
