"""Model flags the per-head hooks need, switched on for a call and restored; and hook placement quirks."""

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import PatchingError


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
    """Whether the model can fork per-head q/k/v inputs (TransformerBridge.boot_native cannot)."""
    if getattr(model.cfg, "use_split_qkv_input", False):
        return True
    try:
        model.set_use_split_qkv_input(True)
    except (NotImplementedError, ValueError):
        return False
    model.set_use_split_qkv_input(False)
    return True
