"""Every TransformerLens import, and every difference between TransformerLens 4 and 2.

TransformerLens 4 models are `TransformerBridge`s; TransformerLens 2 models are
`HookedTransformer`s. Both expose the same hook names, `hooks()` context manager,
`run_with_cache` and stacked weights; what differs is handled here and nowhere else.
"""

import importlib.metadata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformer_lens
from transformer_lens import ActivationCache

from .errors import PatchingError

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

if TL_MAJOR >= 4:
    from transformer_lens.model_bridge import TransformerBridge

    MODEL_CLASSES: tuple[type, ...] = (TransformerBridge,)
else:
    from transformer_lens import HookedTransformer

    MODEL_CLASSES = (HookedTransformer,)

__all__ = ["ActivationCache", "MODEL_CLASSES", "TL_MAJOR", "transformer_lens"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a model that validation and sweeps need."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    has_mlps: bool

    def unit_count(self, unit: str) -> int:
        """How many heads, key/value heads or neurons a layer has."""
        return {"head": self.n_heads, "kv_head": self.n_kv_heads, "neuron": self.d_mlp}[unit]


def check_model(model) -> None:
    """Raise a PatchingError unless `model` is a TransformerLens model of this version."""
    if not isinstance(model, MODEL_CLASSES):
        expected = " or ".join(cls.__name__ for cls in MODEL_CLASSES)
        raise PatchingError(
            f"Expected a TransformerLens {TL_VERSION} model ({expected}), got {type(model).__name__}."
        )


def model_shape(model) -> ModelShape:
    """Read the sizes from `model.cfg`."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return ModelShape(
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp or 0,
        d_vocab=cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab,
        has_mlps=not getattr(cfg, "attn_only", False) and bool(cfg.d_mlp),
    )


def model_device(model) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def hook_names(model) -> set[str]:
    """Every hook name the model accepts, aliases included."""
    return set(model.hook_dict)


def to_tokens(model, model_input) -> torch.Tensor:
    """Tokens for a string, a list of strings or a token tensor, on the model's device."""
    if isinstance(model_input, torch.Tensor):
        tokens = model_input
    elif isinstance(model_input, (str, list)):
        if getattr(model, "tokenizer", None) is None:
            raise PatchingError("This model has no tokenizer: pass token tensors instead of strings.")
        tokens = model.to_tokens(model_input)
    else:
        raise PatchingError(
            f"Model input must be a str, a list of str or an int tensor (batch, pos), got {type(model_input).__name__}."
        )
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise PatchingError(f"Token input must be an int tensor of shape (batch, pos), got {tuple(tokens.shape)} {tokens.dtype}.")
    if 0 in tokens.shape:
        raise PatchingError(f"Token input has shape {tuple(tokens.shape)}: expected at least one prompt of at least one token.")
    return tokens.to(model_device(model))


@contextmanager
def hooks(model, fwd_hooks: list) -> Iterator[None]:
    """Add `fwd_hooks` for the duration of the block; remove exactly those afterwards."""
    with model.hooks(fwd_hooks=fwd_hooks, reset_hooks_end=True):
        yield


def resid_mid_carries(model) -> dict[str, str]:
    """Where a change to `hook_resid_mid` must also be added by hand: {resid_mid hook: resid_post hook}.

    TransformerLens 4.3 bridges hook `blocks.L.hook_resid_mid` at the input of the second
    LayerNorm, so a patch there reaches the MLP but not the residual stream that continues
    to `hook_resid_post`. HookedTransformer's resid_mid is the residual stream itself.
    """
    hook_dict = model.hook_dict
    if hook_dict.get("blocks.0.hook_resid_mid") is not hook_dict.get("blocks.0.ln2.hook_in", object()):
        return {}
    return {f"blocks.{layer}.hook_resid_mid": f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)}


def forward_logits(model, model_input: torch.Tensor, start_layer: int = 0) -> torch.Tensor:
    """The model's logits: from tokens, or from `model_input` = the residual stream entering
    `start_layer` (0 < start_layer < n_layers; see `can_start_late`) without computing the
    layers before it."""
    if start_layer == 0:
        return model(model_input, return_type="logits")
    if TL_MAJOR >= 4:
        with _blocks_skipped(model, start_layer):
            return model(model_input, start_at_layer=start_layer)
    return model(model_input, start_at_layer=start_layer)


def unembed(model, residual: torch.Tensor) -> torch.Tensor:
    """Logits from the final residual stream: the final LayerNorm and the unembedding."""
    if TL_MAJOR >= 4:
        return model.unembed(model.ln_final(residual))
    return model(residual, start_at_layer=model.cfg.n_layers)


def final_norm(model, residual: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm (or RMSNorm) of `residual`, which may hold any subset of positions;
    the identity on models without one."""
    norm = getattr(model, "ln_final", None)
    return residual if norm is None else norm(residual)


def output_hooked(model) -> bool:
    """Whether hooks (e.g. the user's) are attached to the final norm or the unembedding:
    they may expect full logits, so those must then be computed."""
    return any(point.fwd_hooks for name, point in model.hook_dict.items() if name.startswith(("ln_final.", "unembed.")))


def unembed_columns(model, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unembedding's weight (d_model, n) and bias (n,) for `token_ids` (None: all tokens)."""
    weight, bias = model.W_U, model.b_U
    if token_ids is None:
        return weight, bias
    return weight[:, token_ids], bias[token_ids]


def can_start_late(model) -> bool:
    """Whether a forward pass can start at a later layer without running the ones before.

    HookedTransformer can; of TransformerLens 4 bridges, those over a Hugging Face model
    (`boot_transformers`) can, and native ones (`boot_native`) run every block.
    """
    if TL_MAJOR < 4:
        return True
    from transformers import PreTrainedModel

    return isinstance(model.original_model, PreTrainedModel)


@contextmanager
def attention_replaced(model, layers) -> Iterator[None]:
    """Skip the attention of `layers`: each returns zeros, which the `hook_attn_out` hooks
    of whoever replaced it then fill in. Only for models where `can_start_late`."""
    if not layers:
        yield
        return
    attentions = [model.blocks[layer].attn for layer in sorted(layers)]
    for attention in attentions:
        object.__setattr__(attention, "forward", _zero_attention(attention, model.cfg.d_model))
    try:
        yield
    finally:
        for attention in attentions:
            attention.__dict__.pop("forward", None)


def _zero_attention(attention, d_model: int):
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query_input"))
        zeros = hidden.new_zeros(*hidden.shape[:2], d_model)
        if TL_MAJOR >= 4:
            return attention.hook_out(zeros), None
        return zeros

    return forward


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _blocks_skipped(model, count: int) -> Iterator[None]:
    """Make the first `count` blocks return their input unchanged.

    TransformerLens 4.3's `start_at_layer` still runs the blocks before it and then discards
    their output; skipping them is what makes starting late cheaper. The override goes into
    the block's own `__dict__`: the bridge's `__setattr__` would forward it to the wrapped
    Hugging Face module.
    """
    blocks = list(model.blocks)[:count]
    for block in blocks:
        object.__setattr__(block, "forward", _pass_through)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def run_with_cache(model, tokens: torch.Tensor, names: Mapping | set | list | None = None):
    """Return (logits, ActivationCache), caching only `names` when given."""
    if names is None:
        return model.run_with_cache(tokens)
    wanted = set(names)
    return model.run_with_cache(tokens, names_filter=lambda name: name in wanted)


def make_cache(tensors: dict[str, torch.Tensor], model) -> ActivationCache:
    """Wrap a dict of activations as an ActivationCache of `model`."""
    return ActivationCache(tensors, model)


def cache_items(cache) -> Mapping[str, torch.Tensor]:
    """The name-to-tensor mapping behind an ActivationCache or a plain dict."""
    if isinstance(cache, ActivationCache):
        return cache.cache_dict
    if isinstance(cache, Mapping):
        return cache
    raise PatchingError(f"Expected an ActivationCache or a dict of tensors, got {type(cache).__name__}.")


_FLAG_FOR_SUFFIX = {
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "attn.hook_result": "use_attn_result",
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


def w_o(model) -> torch.Tensor:
    """Stacked attention output weights, (layer, head, d_head, d_model)."""
    return model.W_O


def w_out(model) -> torch.Tensor:
    """Stacked MLP output weights, (layer, d_mlp, d_model)."""
    return model.W_out


def boot_hf_folder(folder: str, tokenizer, device: str):
    """A TransformerLens model of the Llama-architecture HF checkpoint in `folder`, with
    HookedTransformer numerics (folded LayerNorm, centred weights)."""
    if TL_MAJOR >= 4:
        model = TransformerBridge.boot_transformers(str(folder), tokenizer=tokenizer, device=device)
        model.enable_compatibility_mode()
        return model
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    cfg_dict = loading.convert_hf_model_config(str(folder))
    cfg_dict["rotary_base"] = hf_model.config.rope_theta
    cfg_dict["tokenizer_name"] = None
    cfg_dict["device"] = device
    model = HookedTransformer(HookedTransformerConfig(**cfg_dict), tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_llama_weights(hf_model, model.cfg),
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    return model.to(device)


def load_pretrained(name: str, device: str):
    """A model by TransformerLens / Hugging Face name (e.g. "gpt2"), from the hub or its cache,
    with HookedTransformer numerics."""
    if TL_MAJOR >= 4:
        model = TransformerBridge.boot_transformers(name, device=device)
        model.enable_compatibility_mode()
        return model
    return HookedTransformer.from_pretrained(name, device=device)
