"""PatchResult: a tensor of sweep results that knows the name and coordinates of each dim."""

from collections.abc import Mapping, Sequence

import torch

from .errors import PatchingError

__all__ = ["PatchResult"]

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

    >>> r = PatchResult(torch.zeros(2, 3), ("layer", "head"), {"layer": (4, 5)})
    >>> r.dims, r.coords["layer"], r.coords["head"]
    (('layer', 'head'), (4, 5), (0, 1, 2))
    >>> r.sel(layer=5).dims
    ('head',)
    """

    dims: tuple[str, ...]
    coords: dict[str, tuple]

    @staticmethod
    def __new__(cls, values: torch.Tensor, dims: Sequence[str], coords: Mapping[str, Sequence] | None = None):
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
        return result

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __reduce_ex__(self, protocol):
        return PatchResult, (self.as_tensor(), self.dims, self.coords)

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
        values, dims, coords = self.as_tensor(), list(self.dims), dict(self.coords)
        for asked, coord in selection.items():
            dim = self.dim_for(asked, dims)
            axis = dims.index(dim) if dim in dims else self._axis(dim)
            if coord not in coords[dim]:
                raise PatchingError(f"{dim}={coord!r} is not in this result; {dim} runs over {list(coords[dim])}.")
            values = values.select(axis, coords[dim].index(coord))
            dims.pop(axis)
            coords.pop(dim)
        return PatchResult(values, dims, coords) if dims else values

    def permute_dims(self, *dims: str) -> "PatchResult":
        """The same result with its dims in the order given, e.g. `permute_dims("layer", "seq_pos")`."""
        dims = tuple(self.dim_for(dim) for dim in dims)
        if sorted(dims) != sorted(self.dims):
            raise PatchingError(f"permute_dims needs each of {self.dims} once, got {dims}.")
        order = [self._axis(dim) for dim in dims]
        return PatchResult(self.as_tensor().permute(order), dims, self.coords)

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
        flat = self.as_tensor().detach().cpu().reshape(-1).numpy()
        return pd.DataFrame({"value": flat}, index=index).reset_index()

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"PatchResult({self.dims_text})\n{self.as_tensor()!r}"
