"""Every TransformerLens import, and every difference between TransformerLens 4 and 2.

TransformerLens 4 models are `TransformerBridge`s; TransformerLens 2 models are
`HookedTransformer`s. Both expose the same hook names, `hooks()` context manager,
`run_with_cache` and stacked weights; what differs is handled in this subpackage and
nowhere else. The rest of the library calls it as `_tl.<function>`.
"""

from .cache import cache_items, make_cache, run_with_cache
from .devices import (
    HALF_DTYPES,
    check_placed,
    hook_device,
    layer_device,
    model_device,
    model_devices,
    model_dtype,
    moved,
    moved_all,
    norm_device,
    output_device,
    summing_dtype,
)
from .flags import flags_for, model_flags, resid_mid_feeds_only_the_mlp, supports_split_qkv_input
from .forward import (
    attention_replaced,
    can_start_late,
    final_norm,
    forward_logits,
    hooks,
    hooks_that_fire,
    output_hooked,
    output_transform,
    time_layers,
    unembed,
    unembed_columns,
)
from .loading import boot_hf_folder, load_pretrained
from .model import (
    ModelShape,
    active_dropout,
    attention_scores_patchable,
    b_o,
    check_deterministic,
    hook_names,
    model_shape,
    post_norms,
    to_tokens,
    w_o,
    w_out,
)
from .version import CACHE_CLASS, MODEL_CLASSES, TL_MAJOR, TL_VERSION, ActivationCache, check_model

__all__ = [
    "CACHE_CLASS",
    "HALF_DTYPES",
    "MODEL_CLASSES",
    "TL_MAJOR",
    "TL_VERSION",
    "ActivationCache",
    "ModelShape",
    "active_dropout",
    "attention_replaced",
    "attention_scores_patchable",
    "b_o",
    "boot_hf_folder",
    "cache_items",
    "can_start_late",
    "check_deterministic",
    "check_model",
    "check_placed",
    "final_norm",
    "flags_for",
    "forward_logits",
    "hook_device",
    "hook_names",
    "hooks",
    "hooks_that_fire",
    "layer_device",
    "load_pretrained",
    "make_cache",
    "model_device",
    "model_devices",
    "model_dtype",
    "model_flags",
    "model_shape",
    "moved",
    "moved_all",
    "norm_device",
    "output_device",
    "output_hooked",
    "output_transform",
    "post_norms",
    "resid_mid_feeds_only_the_mlp",
    "run_with_cache",
    "summing_dtype",
    "supports_split_qkv_input",
    "time_layers",
    "to_tokens",
    "unembed",
    "unembed_columns",
    "w_o",
    "w_out",
]
