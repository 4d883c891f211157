"""What the library reads off a model: its sizes, device, hooks, weights and mode, and its tokens."""

from dataclasses import dataclass

import torch

from ..errors import PatchingError
from .devices import model_device, model_devices, model_dtype, moved
from .version import TL_MAJOR


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
    element_size: int = 4
    """Bytes per activation value: 4 in float32, 2 in float16 and bfloat16."""
    devices: tuple[torch.device, ...] = ()
    """The devices the model's parameters are on (several where its layers are spread)."""
    n_experts: int = 0
    """Experts per MLP layer of a mixture-of-experts model (0 for a dense model)."""
    parallel_attn_mlp: bool = False
    """Whether each block computes attention and MLP in parallel, both from the block's input."""
    latent_attention: bool = False
    """Whether attention is multi-head latent attention (DeepSeek's MLA), whose per-head
    activations TransformerLens splits by `d_head` rather than by head: their slices are not heads."""
    norm_after_residual: bool = False
    """Whether each block normalises the residual stream after adding to it (post-LN: OpenAI GPT,
    OPT without `do_layer_norm_before`), so that its MLP reads the stream itself."""

    def unit_count(self, unit: str) -> int:
        """How many heads, key/value heads or neurons a layer has."""
        return {"head": self.n_heads, "kv_head": self.n_kv_heads, "neuron": self.d_mlp}[unit]


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
        d_mlp=_mlp_width(model),
        d_vocab=cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab,
        has_mlps=not getattr(cfg, "attn_only", False) and bool(cfg.d_mlp),
        element_size=model_dtype(model).itemsize,
        devices=model_devices(model),
        n_experts=int(getattr(cfg, "num_experts", None) or 0),
        parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
        latent_attention=getattr(_hf_config(model), "kv_lora_rank", None) is not None,
        norm_after_residual=_norm_after_residual(_hf_config(model)),
    )


def _mlp_width(model) -> int:
    """The MLP's hidden width: `cfg.d_mlp`, except where a TransformerLens 4 bridge reads it as
    4 d_model from a Hugging Face config that names the width `ffn_dim` (OPT, XGLM)."""
    width = getattr(_hf_config(model), "ffn_dim", None) if TL_MAJOR >= 4 else None
    return int(width) if width else int(model.cfg.d_mlp or 0)


def _norm_after_residual(config) -> bool:
    """Whether a Hugging Face config describes post-LN blocks (see `ModelShape.norm_after_residual`)."""
    if config is None:
        return False
    return getattr(config, "model_type", None) == "openai-gpt" or getattr(config, "do_layer_norm_before", True) is False


def _hf_config(model):
    """The Hugging Face config of a bridge's model, or None (a HookedTransformer has none)."""
    return getattr(getattr(model, "original_model", None), "config", None)


def post_norms(model) -> tuple[str, ...]:
    """The norms the model applies to each attention or MLP output before adding it to the
    residual stream (Gemma-2 and Gemma-3's, OLMo-2's): "ln1_post", "ln2_post" or none."""
    names = hook_names(model)
    return tuple(norm for norm in ("ln1_post", "ln2_post") if any(n.startswith(f"blocks.0.{norm}.") for n in names))


def block_norm(model, layer: int, which: str):
    """Layer `layer`'s norm `which`: "ln1" or "ln2" (before attention or the MLP), "ln1_post" or
    "ln2_post" (after them, see `post_norms`), called without TransformerLens' hooks (which a
    call inside a forward pass would fire again): a bridge's wrapped `transformers` module, a
    HookedTransformer's own norm."""
    norm = getattr(model.blocks[layer], which)
    return getattr(norm, "original_component", None) or norm


def hook_names(model) -> set[str]:
    """Every hook name the model accepts, aliases included."""
    return set(model.hook_dict)


def text_token_ids(model, text: str, prepend_bos: bool) -> list[int]:
    """The token ids of one text, with or without the model's beginning-of-sequence token."""
    if getattr(model, "tokenizer", None) is None:
        raise PatchingError("This model has no tokenizer: pass token tensors instead of strings.")
    return model.to_tokens(text, prepend_bos=prepend_bos)[0].tolist()


def pad_token_id(model) -> int:
    """The token that pads shorter prompts: the tokenizer's pad token, else its end-of-text token, else 0."""
    tokenizer = getattr(model, "tokenizer", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def to_tokens(model, model_input) -> torch.Tensor:
    """Tokens for a string, a list of strings or a token tensor, on the model's input device
    (`model_device`): a token tensor on another device is moved there."""
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
        raise PatchingError(
            f"Token input must be an int tensor of shape (batch, pos), got {tuple(tokens.shape)} {tokens.dtype}."
        )
    if 0 in tokens.shape:
        raise PatchingError(
            f"Token input has shape {tuple(tokens.shape)}: expected at least one prompt of at least one token."
        )
    if tokens.is_meta:
        raise PatchingError("The token input is on the meta device: it has a shape but no token ids. Pass real tokens.")
    return moved(tokens, model_device(model))


def w_o(model) -> torch.Tensor:
    """Stacked attention output weights, (layer, head, d_head, d_model), on the input device
    where the layers are spread over several."""
    if TL_MAJOR >= 4:
        return model.W_O
    return _stacked([block.attn.W_O for block in model.blocks], model)


def b_o(model) -> torch.Tensor:
    """Stacked attention output biases, (layer, d_model), on the input device: zeros where the
    attention has none (a TransformerLens 4 bridge of such a model has no `b_O` at all)."""
    return _output_biases(model, "b_O", "W_O", "attn")


def b_out(model) -> torch.Tensor:
    """Stacked MLP output biases, (layer, d_model), on the input device: zeros where the MLPs
    have none."""
    return _output_biases(model, "b_out", "W_out", "mlp")


def _output_biases(model, bias_name: str, weight_name: str, part: str) -> torch.Tensor:
    """A bridge's stacked `bias_name` (zeros shaped as its `weight_name`'s output where it has
    none), or a HookedTransformer's blocks' `part` (attn, mlp) biases stacked."""
    if TL_MAJOR >= 4:
        bias = getattr(model, bias_name, None)
        if bias is None:
            weights = getattr(model, weight_name)
            return torch.zeros(weights.shape[0], weights.shape[-1], dtype=weights.dtype, device=weights.device)
        return bias
    return _stacked([getattr(getattr(block, part), bias_name) for block in model.blocks], model)


def w_out(model) -> torch.Tensor:
    """Stacked MLP output weights, (layer, d_mlp, d_model), on the input device where the
    layers are spread over several."""
    if TL_MAJOR >= 4:
        return model.W_out
    return _stacked([block.mlp.W_out for block in model.blocks], model)


def gated_product_bias(model) -> torch.Tensor | None:
    """(layer, d_mlp): the bias a gated MLP adds after its product `act(gate) * up` (HookedTransformer's
    `b_in`), on the input device; None where nothing is added there (a bridge runs the Hugging Face
    MLP, whose biases sit inside its projections)."""
    if TL_MAJOR >= 4:
        return None
    return _stacked([block.mlp.b_in for block in model.blocks], model)


def _stacked(weights: list[torch.Tensor], model) -> torch.Tensor:
    """HookedTransformer's stacking of per-layer weights, gathered on the input device first
    (its own `W_O` cannot stack layers on different devices)."""
    device = model_device(model)
    return torch.stack([weight.to(device) for weight in weights])


def active_dropout(model) -> list[str]:
    """The dropouts that would act in a forward pass: modules in training mode with p > 0,
    and (in training mode) a Hugging Face attention dropout rate set in the config."""
    active = [
        f"{name} (p={module.p})"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.training and module.p > 0
    ]
    original = getattr(model, "original_model", None)
    rate = getattr(getattr(original, "config", None), "attention_dropout", 0.0)
    if model.training and isinstance(rate, (int, float)) and rate > 0:
        active.append(f"the attention's dropout (config.attention_dropout={rate})")
    return active


def check_deterministic(model) -> None:
    """Raise a PatchingError if dropout is active: stacked variants would then each get
    other random masks, and no two results would be comparable."""
    active = active_dropout(model)
    if active:
        shown = ", ".join(active[:3]) + (f" and {len(active) - 3} more" if len(active) > 3 else "")
        raise PatchingError(
            f"The model is in training mode with dropout active ({shown}): every patched run would drop "
            "different activations, so results would not be comparable. Call model.eval() first "
            "(and model.train() afterwards if you were training)."
        )


def attention_scores_patchable(model) -> bool:
    """Whether an edit at `hook_attn_scores` changes the pattern.

    HookedTransformer and the TransformerLens 4 bridges that compute attention themselves
    (e.g. GPT-2's and Llama's) apply the hook before the softmax. A bridge whose attention
    delegates to the wrapped module (`boot_native`) fires it afterwards, with the weights
    the module returned: there it holds the pattern, and an edit is discarded.
    """
    if TL_MAJOR < 4:
        return True
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return all(type(block.attn).forward is not AttentionBridge.forward for block in model.blocks)
