"""PatchResult: a tensor of sweep results that knows the name and coordinates of each dim."""

from collections.abc import Mapping, Sequence

import torch

from . import _stats
from ._stats import PromptSamples
from .errors import PatchingError

__all__ = ["PatchResult"]

BATCH = "batch"
"""The name of a per-prompt dim."""
HEAD_DIMS = ("head", "kv_head")
"""The two names of a head dim: `kv_head` where a grouped-query model's k and v have fewer heads."""


class PatchResult(torch.Tensor):
    """A tensor of patching results with named dims, e.g. `("layer", "head")`.

    It is an ordinary tensor for every operation (old code that indexes, plots or scales
    results keeps working; anything computed from it is a plain tensor), plus:

    - `dims`: the name of each dim; `coords`: the layer/head/... each index stands for
      (sweeps restricted with `layers=`/`heads=` have coordinates that are not `range(n)`).
    - `sel(layer=9, head=6)`: select by coordinate value, not index. `head=` and `kv_head=`
      are interchangeable where a result has only one of these dims, so code written for
      `k`/`v` results runs on models with and without grouped-query attention.
    - `permute_dims("head", "layer")`: reorder dims by name.
    - `to_dataframe()`: one row per cell, a column per dim and a `value` column.
    - With `uncertainty=True` (every method takes it), the per-prompt values behind each
      cell: `per_prompt`, `stderr`, `ci(...)`, `p_values(...)`, `significant(...)` and
      `prompts_for(...)`, computed from values already measured (no forward pass). See
      Concepts, "Uncertainty over prompts".

    >>> r = PatchResult(torch.zeros(2, 3), ("layer", "head"), {"layer": (4, 5)})
    >>> r.dims, r.coords["layer"], r.coords["head"]
    (('layer', 'head'), (4, 5), (0, 1, 2))
    >>> r.sel(layer=5).dims
    ('head',)
    """

    dims: tuple[str, ...]
    coords: dict[str, tuple]
    samples: PromptSamples | None
    """The per-prompt values behind the result (None unless computed with `uncertainty=True`)."""

    @staticmethod
    def __new__(
        cls,
        values: torch.Tensor,
        dims: Sequence[str],
        coords: Mapping[str, Sequence] | None = None,
        samples: PromptSamples | None = None,
    ):
        values = torch.as_tensor(values).detach()
        if len(dims) != values.ndim:
            raise PatchingError(f"PatchResult got {len(dims)} dim names {tuple(dims)} for a {values.ndim}-d tensor.")
        result = torch.Tensor._make_subclass(cls, values, False)
        coords = dict(coords or {})
        result.dims = tuple(dims)
        result.coords = {dim: tuple(coords.get(dim, range(size))) for dim, size in zip(result.dims, values.shape)}
        for dim, size in zip(result.dims, values.shape):
            if len(result.coords[dim]) != size:
                raise PatchingError(
                    f"PatchResult coords[{dim!r}] has {len(result.coords[dim])} entries for a dim of size {size}."
                )
        if samples is not None and samples.cell_shape != tuple(values.shape):
            raise PatchingError(
                f"PatchResult's per-prompt values have cells of shape {samples.cell_shape}, "
                f"the result {tuple(values.shape)}."
            )
        result.samples = samples
        return result

    @classmethod
    def from_per_prompt(cls, per_prompt: "PatchResult", *, offset=None, scale=None, baseline=None) -> "PatchResult":
        """The result whose per-prompt values are `per_prompt` (a PatchResult with a `batch` dim):
        each cell's mean over prompts, with uncertainty. For a ratio of means give `offset` and
        `scale` (one value per prompt: the result is `(mean(values) - mean(offset)) / mean(scale)`);
        `baseline` (the unpatched run's per-prompt values) is what `p_values` tests against.

        >>> values = PatchResult(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), ("layer", "batch"))
        >>> result = PatchResult.from_per_prompt(values, baseline=torch.zeros(2))
        >>> result.tolist(), result.dims, result.stderr.tolist()
        ([2.0, 2.0], ('layer',), [1.0, 0.0])
        """
        if not isinstance(per_prompt, PatchResult) or BATCH not in per_prompt.dims:
            dims = getattr(per_prompt, "dims", None)
            raise PatchingError(f"from_per_prompt needs a PatchResult with a {BATCH!r} dim; got dims {dims}.")
        axis = per_prompt.dims.index(BATCH)
        dims = tuple(dim for dim in per_prompt.dims if dim != BATCH)
        samples = PromptSamples(per_prompt.as_tensor().movedim(axis, -1), offset, scale, baseline)
        coords = {dim: per_prompt.coords[dim] for dim in dims}
        return cls(samples.estimate().to(per_prompt.dtype), dims, coords, samples)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __reduce_ex__(self, protocol):
        return PatchResult, (self.as_tensor(), self.dims, self.coords, self.samples)

    def as_tensor(self) -> torch.Tensor:
        """The values as a plain tensor (no copy)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.view(self.shape)

    @property
    def dims_text(self) -> str:
        """The dims and their sizes, e.g. `layer=12, head=12`."""
        return ", ".join(f"{dim}={len(self.coords[dim])}" for dim in self.dims)

    def _axis(self, dim: str) -> int:
        if dim not in self.dims:
            raise PatchingError(f"No dim {dim!r}: this result has dims {self.dims}.")
        return self.dims.index(dim)

    def dim_for(self, name: str, dims: Sequence[str] | None = None) -> str:
        """The dim this result (or `dims`) calls `name`: `name` itself, or for `head` and
        `kv_head` the other one where only that one exists.

        >>> PatchResult(torch.zeros(2, 3), ("layer", "kv_head")).dim_for("head")
        'kv_head'
        """
        dims = self.dims if dims is None else dims
        if name in dims or name not in HEAD_DIMS:
            return name
        other = HEAD_DIMS[1 - HEAD_DIMS.index(name)]
        return other if other in dims else name

    def sel(self, **selection) -> "PatchResult | torch.Tensor":
        """Select by coordinate, e.g. `result.sel(layer=9, head=6)`; a 0-d tensor when no dims are left."""
        values, dims, coords, samples = self.as_tensor(), list(self.dims), dict(self.coords), self.samples
        for asked, coord in selection.items():
            dim = self.dim_for(asked, dims)
            axis = dims.index(dim) if dim in dims else self._axis(dim)
            if coord not in coords[dim]:
                raise PatchingError(f"{dim}={coord!r} is not in this result; {dim} runs over {list(coords[dim])}.")
            values = values.select(axis, coords[dim].index(coord))
            samples = None if samples is None else samples.select(axis, coords[dim].index(coord))
            dims.pop(axis)
            coords.pop(dim)
        return PatchResult(values, dims, coords, samples) if dims or samples is not None else values

    def permute_dims(self, *dims: str) -> "PatchResult":
        """The same result with its dims in the order given, e.g. `permute_dims("layer", "seq_pos")`."""
        dims = tuple(self.dim_for(dim) for dim in dims)
        if sorted(dims) != sorted(self.dims):
            raise PatchingError(f"permute_dims needs each of {self.dims} once, got {dims}.")
        order = [self._axis(dim) for dim in dims]
        samples = None if self.samples is None else self.samples.permute(order)
        return PatchResult(self.as_tensor().permute(order), dims, self.coords, samples)

    def to_dataframe(self, head_column: str | None = None):
        """A pandas DataFrame with one row per cell: a column per dim, then `value`.

        Args:
            head_column: The column name for a head dim, whichever it is called (`head`, or
                `kv_head` for k and v on grouped-query models), so that frames of several
                components concatenate into one head column; by default the dim's own name.

        >>> r = PatchResult(torch.zeros(1, 2), ("layer", "kv_head"))
        >>> list(r.to_dataframe().columns), list(r.to_dataframe(head_column="head").columns)
        (['layer', 'kv_head', 'value'], ['layer', 'head', 'value'])
        """
        try:
            import pandas as pd
        except ImportError as error:
            raise PatchingError("to_dataframe needs pandas: pip install pandas.") from error
        names = [head_column if head_column and dim in HEAD_DIMS else dim for dim in self.dims]
        index = pd.MultiIndex.from_product([list(self.coords[d]) for d in self.dims], names=names)
        columns = {"value": self.as_tensor().detach().cpu().reshape(-1).numpy()}
        if self.samples is not None:
            spread = self.samples.stderr() if self.samples.n > 1 else torch.full(self.shape, float("nan"))
            columns["stderr"] = spread.reshape(-1).numpy()
        return pd.DataFrame(columns, index=index).reset_index()

    def _uncertain(self, what: str) -> PromptSamples:
        if self.samples is None:
            raise PatchingError(
                f"{what} needs the per-prompt values behind this result: compute it with uncertainty=True "
                "(act_patch, path_patch, attr_patch, attr_path_patch, evaluate_circuit all take it), with a metric "
                "that is a mean over prompts."
            )
        return self.samples

    def _like(self, values: torch.Tensor) -> "PatchResult | torch.Tensor":
        values = values.to(self.dtype) if values.is_floating_point() else values
        return PatchResult(values, self.dims, self.coords) if self.dims else values

    @property
    def n_prompts(self) -> int:
        """How many prompts the per-prompt values hold."""
        return self._uncertain("n_prompts").n

    @property
    def per_prompt(self) -> "PatchResult":
        """Each prompt's value on the result's scale, with a last `batch` dim: their mean over
        prompts is the result (for a normalised metric, each prompt's metric normalised by the
        calibration's means)."""
        samples = self._uncertain("per_prompt")
        coords = {**self.coords, BATCH: tuple(range(samples.n))}
        return PatchResult(samples.per_prompt().to(self.dtype), (*self.dims, BATCH), coords)

    @property
    def stderr(self) -> "PatchResult | torch.Tensor":
        """The standard error of each cell over prompts (same dims and coords): for a mean, the
        per-prompt values' sample standard deviation over sqrt(n); for a ratio of means (the
        normalised metrics), the delta method's."""
        return self._like(self._uncertain("stderr").stderr())

    def ci(self, level: float = 0.95, method: str = "bootstrap", *, n_resamples: int = 2000, seed: int = 0):
        """A confidence interval for each cell, as `(low, high)`, two results of this one's dims.

        Args:
            level: The interval's confidence level.
            method: "bootstrap" (BCa: bias-corrected and accelerated), "percentile" (the
                percentile bootstrap) or "t" (Student's t, n - 1 degrees of freedom, around the
                standard error). The bootstraps resample prompts with replacement, a prompt's
                calibration values with it.
            n_resamples: Resamples of the bootstraps.
            seed: Seeds the resamples: the same seed gives the same interval.
        """
        low, high = self._uncertain("ci").ci(level, method, n_resamples, seed)
        return self._like(low), self._like(high)

    def p_values(
        self, *, test: str = "sign_flip", n_permutations: int = 10000, seed: int = 0
    ) -> "PatchResult | torch.Tensor":
        """Each cell's two-sided p-value that patching does not change the metric, from the
        per-prompt differences from the unpatched run: `test="sign_flip"`, a sign-flip
        permutation test (exact up to 12 prompts, never below 2 / 2**n; else `n_permutations`
        random sign patterns seeded with `seed`), or `"t"`, the one-sample t-test."""
        return self._like(self._uncertain("p_values").p_values(n_permutations, seed, test))

    def significant(
        self,
        alpha: float = 0.05,
        correction: str | None = "fdr_bh",
        *,
        test: str = "sign_flip",
        n_permutations: int = 10000,
        seed: int = 0,
    ) -> "PatchResult | torch.Tensor":
        """Which cells change the metric significantly (a bool result of the same dims): their
        `p_values` at level `alpha`, corrected over all cells by "fdr_bh" (Benjamini-Hochberg),
        "bonferroni" or None. Prompts are the unit of replication: the test says the effect
        holds for prompts drawn like these, on this model. `test` as for `p_values`: with few
        prompts and many cells, only the t-test's p-values can be small enough to pass."""
        p_values = self._uncertain("significant").p_values(n_permutations, seed, test)
        return self._like(_stats.significant(p_values, alpha, correction))

    def prompts_for(self, half_width: float, level: float = 0.95) -> "PatchResult | torch.Tensor":
        """How many prompts each cell would need for a normal-theory `level` interval of
        +-`half_width`, at the spread observed here."""
        return self._like(self._uncertain("prompts_for").prompts_for(half_width, level))

    def __repr__(self, *, tensor_contents=None) -> str:
        parts = [self.dims_text] if self.dims else []
        if self.samples is not None:
            parts.append(f"uncertainty from {self.samples.n} prompts")
        return f"PatchResult({'; '.join(parts)})\n{self.as_tensor()!r}"
