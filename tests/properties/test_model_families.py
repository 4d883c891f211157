"""Model families that break assumptions GPT-2 and Llama let hold.

- Logits that are more than the unembedding: Gemma-2's final soft cap (cap * tanh(logits /
  cap)), Granite's division by `logits_scaling`, Cohere's `logit_scale`. Wherever the library
  computes logits itself (a metric object's selected logits, an unembedding-only pass), it must
  give the model's own numbers.
- Mixture-of-experts MLPs (Mixtral, Qwen2-MoE), whose MLP hooks hold the experts' mix, d_model
  wide: neuron nodes are refused, never patched as if that mix were neurons.
- Post-norm blocks (Gemma-2, Gemma-3, OLMo-2) normalise each attention and MLP output before
  adding it to the residual stream: the methods that take a sender's write to be linear in its
  output (`attr_path_patch`, edges, circuits) refuse them; activation and attribution patching
  and path patching, which let the model compute, stay exact.

Tiny random models of each family, built offline from their `transformers` config
(TransformerLens 4) or from a HookedTransformer config (TransformerLens 2); the soft cap is set
low (2.0) so that it changes these small logits visibly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import TL_MAJOR, assert_close, make_inputs, raises
from tests.oracles.models import VOCAB, booted_family, post_norm_hooked, tokenizer
from tests.oracles.reference import naive_path_patch
from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    IterNode,
    LogitDiff,
    Node,
    act_patch,
    attr_edges,
    attr_patch,
    attr_path_patch,
    evaluate_circuit,
    path_patch,
)

SOFT_CAP = 2.0
ANSWERS = torch.tensor([[5, 6], [17, 3], [6, 5]])
FAMILIES_TL4 = {
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "final_logit_softcapping": SOFT_CAP, "initializer_range": 0.5},
    ),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0, "initializer_range": 0.5}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25, "initializer_range": 0.5}),
}
MIXTURES_TL4 = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
}
POST_NORMS_TL4 = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"initializer_range": 0.5}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "initializer_range": 0.5}),
}
FAMILIES = list(FAMILIES_TL4) if TL_MAJOR >= 4 else ["soft-capped HookedTransformer"]
MIXTURES = list(MIXTURES_TL4) if TL_MAJOR >= 4 else ["HookedTransformer with 4 experts"]
POST_NORMED = ["gemma2", *POST_NORMS_TL4] if TL_MAJOR >= 4 else ["HookedTransformer with post-norms"]


def build(family: str):
    """A tiny random model of `family`: 2 layers, 4 heads (2 key/value heads), d_model 64."""
    if TL_MAJOR >= 4:
        config_class, model_class, extra = {**FAMILIES_TL4, **MIXTURES_TL4, **POST_NORMS_TL4}[family]
        return booted_family(family, config_class, model_class, **extra)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if family in POST_NORMED:
        return post_norm_hooked()
    if family in MIXTURES:
        config = HookedTransformerConfig(
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_mlp=32,
            d_vocab=VOCAB,
            n_ctx=64,
            act_fn="silu",
            normalization_type="RMS",
            gated_mlp=True,
            num_experts=4,
            experts_per_token=2,
            seed=0,
        )
    else:
        config = HookedTransformerConfig(
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_mlp=128,
            d_vocab=VOCAB,
            n_ctx=64,
            act_fn="gelu_new",
            normalization_type="LN",
            initializer_range=0.5,
            output_logits_soft_cap=SOFT_CAP,
            seed=0,
        )
    return HookedTransformer(config, tokenizer=tokenizer())


def own_run(model, tokens, metric):
    """The model's own cache of `tokens`, and its metric on them."""
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        return cache, metric(model(tokens))


def assert_each_refused(calls, message: str) -> None:
    """Each call raises a PatchingError matching `message`."""
    for call in calls:
        with raises(message):
            call()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    """(family, model)."""
    return request.param, build(request.param)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(100, 2000, (3, 7), generator=torch.Generator().manual_seed(0))


def test_metric_objects_read_the_models_own_logits(family_model, tokens):
    """A LogitDiff (selected logits: final norm, read columns, then the model's output transform)
    patched from the model's own cache equals the logit difference of the model's own logits, and
    equals the same plain function on full logits, for a head, a sweep and an unembedding-only pass."""
    _, model = family_model
    metric = LogitDiff(ANSWERS)
    cache, own = own_run(model, tokens, metric)
    last = model.cfg.n_layers - 1
    for nodes in (Node("z", 0, head=0), Node("resid_post", last)):
        selected = act_patch(model, tokens, nodes, metric, new_cache=cache)
        plain = act_patch(model, tokens, nodes, lambda logits: metric(logits), new_cache=cache)
        assert_close(selected, own)
        assert_close(plain, own)
    sweep = act_patch(model, tokens, IterNode("resid_post"), metric, new_cache=cache)["resid_post"]
    assert_close(sweep.as_tensor(), own.expand(model.cfg.n_layers))


def test_the_output_transform_matters_here(family_model, tokens):
    """The family's transform changes these logits (else the test above could not fail)."""
    family, model = family_model
    with torch.no_grad():
        logits = model(tokens)
        _, cache = model.run_with_cache(tokens)
        last = model.cfg.n_layers - 1
        residual = cache[f"blocks.{last}.hook_resid_post"]
        bare = model.unembed(model.ln_final(residual))
    if family == "cohere":
        pytest.skip("Cohere's logit_scale is folded into the unembedding's weights: the bare unembedding is exact")
    assert (bare - logits).abs().max() > 0.01


@pytest.mark.parametrize("family", MIXTURES)
def test_mixture_of_experts_has_no_neurons_to_patch(family):
    """Every neuron node (sweep, single, restricted sweep, path sender and receiver, attribution)
    is refused with the reason; the experts' whole output (`mlp_out`) patches, and from the
    model's own cache changes nothing."""
    model = build(family)
    orig, new = make_inputs(model)
    metric = LogitDiff(ANSWERS)
    calls = [
        lambda: act_patch(model, orig, IterNode("post"), metric, new_input=new),
        lambda: act_patch(model, orig, Node("post", 0, neuron=3), metric, new_input=new),
        lambda: act_patch(model, orig, IterNode("post", neurons=[0, 17]), metric, new_input=new),
        lambda: act_patch(model, orig, IterNode("pre"), metric, new_input=new),
        lambda: path_patch(model, orig, new, IterNode("post", layers=[0]), Node("resid_post", 1), metric),
        lambda: path_patch(model, orig, new, IterNode("z", layers=[0]), Node("pre", 1, neuron=2), metric),
        lambda: attr_patch(model, orig, IterNode("post"), metric, new_input=new),
    ]
    assert_each_refused(calls, "is a mixture of experts .4 experts per layer.*Patch 'mlp_out'")
    cache, own = own_run(model, orig, metric)
    unchanged = act_patch(model, orig, IterNode("mlp_out"), metric, new_cache=cache)["mlp_out"]
    assert_close(unchanged.as_tensor(), own.expand(model.cfg.n_layers))


@pytest.mark.parametrize("family", POST_NORMED)
def test_post_norm_blocks_take_every_method(family):
    """A norm after each attention and MLP output: path patching lets the model compute its layers,
    edges and circuits take each head's write through the norm (both exact against literal
    references in tests/methods/test_post_norm.py). Here, on each family: last-layer heads into the
    final stream equal patching those heads; the full circuit is the model's own metric; edges,
    path attribution, activation and attribution patching from the model's own run change nothing."""
    model = build(family)
    orig, new = make_inputs(model)
    metric = LogitDiff(ANSWERS)
    last = model.cfg.n_layers - 1
    paths = path_patch(model, orig, new, IterNode("z", layers=[last]), Node("resid_post", last), metric)["z"]
    heads = act_patch(model, orig, IterNode("z", layers=[last]), metric, new_input=new)["z"]
    assert_close(paths.as_tensor(), heads.as_tensor())
    cache, own = own_run(model, orig, metric)
    assert_close(evaluate_circuit(model, Circuit.full(EdgeGraph.of(model)), orig, metric, new_input=new), own)
    scores = attr_edges(model, orig, metric, new_cache=cache).scores
    assert_close(scores, torch.zeros_like(scores))
    into_logits = attr_path_patch(model, orig, orig, IterNode("z"), Node("resid_post", last), metric)["z"]
    assert_close(into_logits.as_tensor(), own.expand(*into_logits.shape))
    heads = act_patch(model, orig, IterNode("z"), metric, new_cache=cache)["z"]
    assert_close(heads.as_tensor(), own.expand(*heads.shape))
    estimates = attr_patch(model, orig, IterNode("z"), metric, new_cache=cache)["z"]
    assert_close(estimates.as_tensor(), own.expand(*estimates.shape))


@pytest.mark.skipif(TL_MAJOR < 4, reason="Bloom (ALiBi) is booted on TransformerLens 4")
def test_alibi_blocks_are_run_from_the_first_layer():
    """Bloom's blocks take ALiBi biases that a pass starting at a later layer does not give
    them: every pass runs from the first layer, and patches in later layers are exact."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    config = transformers.BloomConfig(n_layer=2, n_head=4, hidden_size=64, vocab_size=VOCAB)
    config.architectures = ["BloomForCausalLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(
            "bloom", hf_model=transformers.BloomForCausalLM(config).eval(), tokenizer=tokenizer(), device="cpu"
        )
        model.enable_compatibility_mode()
    orig, new = make_inputs(model)
    metric = LogitDiff(ANSWERS)
    cache, own = own_run(model, orig, metric)
    for name in ("z", "resid_pre", "mlp_out"):
        unchanged = act_patch(model, orig, IterNode(name), metric, new_cache=cache)[name]
        assert_close(unchanged.as_tensor(), own.expand(*unchanged.shape))
    heads = act_patch(model, orig, IterNode("z", layers=[1]), metric, new_input=new)["z"]
    paths = path_patch(model, orig, new, IterNode("z", layers=[1]), Node("resid_post", 1), metric)["z"]
    assert_close(paths.as_tensor(), heads.as_tensor())
    # Bloom's bridge gives each head its q/k/v input after the block's norm, not a copy of the
    # residual stream: a sender's write cannot be added there, so path patching into queries runs
    # the model to get them (the two-pass algorithm, written literally here), and edges refuse.
    into_query = path_patch(model, orig, new, Node("z", 0, head=1), Node("q", 1, head=2), metric)
    expected = naive_path_patch(model, orig, new, [Node("z", 0, head=1)], [Node("q", 1, head=2)], metric)
    assert_close(into_query, expected)
    refused = "do not hold each head's own copy of the residual stream"
    assert_each_refused(
        [
            lambda: evaluate_circuit(model, Circuit.full(EdgeGraph.of(model)), orig, metric, new_input=new),
            lambda: attr_edges(model, orig, metric, new_input=new),
            lambda: act_patch(model, orig, IterNode("q_input", layers=[0]), metric, new_input=new),
        ],
        refused,
    )
