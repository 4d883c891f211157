"""Model flags the per-head hooks need, switched on for a call and restored; and hook placement quirks."""

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import PatchingError
from .devices import model_device

_SPLIT_INPUTS_COPY_THE_STREAM: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Per model: whether its per-head q/k/v input hooks, once switched on, are copies of the stream
(None where they cannot be switched on)."""

SPLIT_INPUTS_NOT_COPIES = (
    "This model's TransformerLens adapter lists per-head q/k/v input hooks (use_split_qkv_input), but they do "
    "not hold each head's own copy of the residual stream: they hold the stream after the block's norm (as "
    "Bloom's bridge does) or never fire (as MPT's), so a sender's write cannot be added there. Patch 'q', 'k' "
    "or 'v' (the projections' outputs) instead, or path_patch into them (it then runs the model to get them); "
    "circuit evaluation and attr_edges, which edit or read each head's own input, cannot run on this model."
)


def resid_mid_feeds_only_the_mlp(model) -> bool:
    """Whether a change at `hook_resid_mid` must also be added to `hook_resid_post` by hand.

    TransformerLens 4.3 bridges hook `blocks.L.hook_resid_mid` at the input of the second
    LayerNorm (or, in blocks without one before the MLP, such as OLMo-2's, at the MLP's input),
    so a patch there reaches the MLP but not the residual stream that continues to
    `hook_resid_post`. HookedTransformer's resid_mid is the residual stream itself.
    """
    hook_dict = model.hook_dict
    resid_mid = hook_dict.get("blocks.0.hook_resid_mid")
    return resid_mid is not None and any(
        resid_mid is hook_dict.get(name) for name in ("blocks.0.ln2.hook_in", "blocks.0.mlp.hook_in")
    )


_FLAG_FOR_SUFFIX = {
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "attn.hook_result": "use_attn_result",
    "hook_mlp_in": "use_hook_mlp_in",
}


def flags_for(names) -> set[str]:
    """The model flags that hooks `names` need switched on."""
    return {flag for name in names for suffix, flag in _FLAG_FOR_SUFFIX.items() if name.endswith(suffix)}


@contextmanager
def model_flags(model, flags: set[str]) -> Iterator[None]:
    """Switch `flags` on (e.g. `use_split_qkv_input`) and restore their values afterwards."""
    previous = {flag: bool(getattr(model.cfg, flag, False)) for flag in flags}
    changed = []
    if "use_split_qkv_input" in flags and not split_inputs_copy_the_stream(model):
        raise PatchingError(SPLIT_INPUTS_NOT_COPIES)
    try:
        for flag in sorted(flags):
            if previous[flag]:
                continue
            if flag == "use_split_qkv_input" and getattr(model.cfg, "use_attn_in", False):
                raise PatchingError(
                    "Per-head q/k/v input hooks need use_split_qkv_input, but this model has use_attn_in "
                    "switched on and the two are exclusive. Call model.set_use_attn_in(False) first."
                )
            try:
                getattr(model, f"set_{flag}")(True)
            except NotImplementedError as error:
                raise PatchingError(
                    f"This needs {flag}, which this model does not support ({error}). "
                    "TransformerBridge.boot_native models lack the per-head input hooks: "
                    "use TransformerBridge.boot_transformers."
                ) from None
            changed.append(flag)
        yield
    finally:
        for flag in reversed(changed):
            getattr(model, f"set_{flag}")(False)


def supports_split_qkv_input(model) -> bool:
    """Whether the model can fork per-head q/k/v inputs that copy the residual stream
    (TransformerBridge.boot_native cannot fork them; Bloom's bridge forks them after the norm)."""
    return _split_inputs(model) is True


def split_inputs_copy_the_stream(model) -> bool:
    """Whether each head's q/k/v input hook, once switched on, holds its own copy of the residual
    stream entering the block (True where the flag cannot be switched on at all, for `model_flags`
    to refuse)."""
    return _split_inputs(model) is not False


def _split_inputs(model) -> bool | None:
    """None where `use_split_qkv_input` cannot be switched on, else whether the per-head inputs
    copy the residual stream: probed once per model, on two tokens."""
    if model not in _SPLIT_INPUTS_COPY_THE_STREAM:
        _SPLIT_INPUTS_COPY_THE_STREAM[model] = _probe_split_inputs(model)
    return _SPLIT_INPUTS_COPY_THE_STREAM[model]


def _probe_split_inputs(model) -> bool | None:
    was_on = bool(getattr(model.cfg, "use_split_qkv_input", False))
    if not was_on:
        try:
            model.set_use_split_qkv_input(True)
        except (NotImplementedError, ValueError):
            return None
    seen = {}
    tokens = torch.zeros((1, 2), dtype=torch.long, device=model_device(model))
    record = [(name, lambda x, hook, name=name: seen.setdefault(name, x.detach())) for name in PROBED]
    try:
        if not set(PROBED) <= set(model.hook_dict):
            return True
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=record)
    finally:
        if not was_on:
            model.set_use_split_qkv_input(False)
    if len(seen) < 2:
        return False
    heads, stream = seen[PROBED[0]], seen[PROBED[1]]
    return heads.shape[:2] == stream.shape[:2] and torch.equal(heads[:, :, 0].to(stream), stream)


PROBED = ("blocks.0.hook_q_input", "blocks.0.hook_resid_pre")
"""A head's own query input and the residual stream it must be a copy of."""


@contextmanager
def quiet_norm_edits() -> Iterator[None]:
    """Without TransformerLens 4's warning that a forward hook edited a norm's `hook_scale`: RelP's
    rule holds the scale constant so on purpose (the bridge then recomputes the norm from its hooked
    scale, equal to Hugging Face's output up to rounding)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        yield
