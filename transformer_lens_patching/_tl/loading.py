"""Loading models: a local Hugging Face folder, or a model by name from the hub."""

import torch

from ..errors import PatchingError
from .version import TL_MAJOR

if TL_MAJOR >= 4:
    from transformer_lens.model_bridge import TransformerBridge
else:
    from transformer_lens import HookedTransformer


def boot_hf_folder(folder: str, tokenizer, device: str):
    """A TransformerLens model of the HF checkpoint in `folder`, with HookedTransformer numerics
    (folded LayerNorm, centred weights): any architecture TransformerBridge supports on
    TransformerLens 4, Llama-architecture checkpoints only on TransformerLens 2 (others refused)."""
    if TL_MAJOR >= 4:
        model = TransformerBridge.boot_transformers(str(folder), tokenizer=tokenizer, device=device)
        model.enable_compatibility_mode()
        return model
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = AutoConfig.from_pretrained(str(folder)).model_type
    if model_type != "llama":
        raise PatchingError(
            f"{folder} holds a {model_type!r} checkpoint; on TransformerLens 2 a local folder can only be a "
            "Llama-architecture one (its weights are converted as Llama's). Use TransformerLens 4, which boots "
            "every architecture TransformerBridge supports from a folder, or HookedTransformer.from_pretrained with "
            "the model's name."
        )
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
