"""Devices: inputs and caches on another device or in another dtype than the model are moved and cast
(or refused with a PatchingError), the memory budget follows the device, results come back on the
CPU, no engine waits for the device once per cell, and a model spread over two GPUs gives the
results of one device.

The CPU tests run everywhere; those that need CUDA (one GPU, or two for a model across devices)
skip without it, saying why.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import TL_MAJOR, make_inputs, raises
from tests.oracles import models
from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    IterNode,
    Node,
    PatchResult,
    act_patch,
    attr_edges,
    attr_patch,
    attr_path_patch,
    evaluate_circuit,
    path_patch,
    plan_act_patch,
    plan_path_patch,
)
from transformer_lens_patching._core import memory
from transformer_lens_patching._core.sources import placed
from transformer_lens_patching._tl import ModelShape, model_shape
from transformer_lens_patching.metrics import LogitDiff

ANSWERS = torch.tensor([[5, 6], [17, 3], [6, 5]])
CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA: torch.cuda.is_available() is False on this machine")
needs_two_gpus = pytest.mark.skipif(
    not TWO_GPUS, reason=f"needs two CUDA devices, this machine has {torch.cuda.device_count() if CUDA else 0}"
)


@pytest.fixture(scope="module")
def small(tok):
    """A 4-layer GPT-2-shaped model on the CPU."""
    return models.gpt2_like(n_layers=4, tok=tok)


def _tensors(model, tokens) -> dict[str, torch.Tensor]:
    """Every activation of a run of `tokens`, as a plain dict."""
    _, cache = model.run_with_cache(tokens)
    return dict(cache.items())


def _engines(model, orig, cache: dict) -> dict:
    """A call of every engine that takes `cache` as its new (and, for path patching, orig) cache."""
    metric, last = LogitDiff(ANSWERS), model.cfg.n_layers - 1
    graph = EdgeGraph.of(model)
    return {
        "act_patch": lambda: plan_act_patch(model, orig, IterNode("z"), metric, new_cache=cache),
        "path_patch new_cache": lambda: plan_path_patch(
            model, orig, orig, IterNode("z"), Node("resid_post", last), metric, new_cache=cache
        ),
        "path_patch orig_cache": lambda: plan_path_patch(
            model, orig, orig, IterNode("z"), Node("resid_post", last), metric, orig_cache=cache
        ),
        "attr_patch": lambda: attr_patch(model, orig, IterNode("z"), metric, new_cache=cache),
        "attr_edges": lambda: attr_edges(model, orig, metric, new_cache=cache),
        "attr_path_patch": lambda: attr_path_patch(
            model, orig, None, IterNode("z"), Node("resid_post", last), metric, new_cache=cache
        ),
        "evaluate_circuit": lambda: evaluate_circuit(model, Circuit.empty(graph), orig, metric, new_cache=cache),
    }


ENGINES = [
    "act_patch",
    "path_patch new_cache",
    "path_patch orig_cache",
    "attr_patch",
    "attr_edges",
    "attr_path_patch",
    "evaluate_circuit",
]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cache_on_the_meta_device_is_refused(small, engine):
    """A meta tensor has a shape but no values: refused when the call is planned, by every engine."""
    orig, new = make_inputs(small)
    meta = {name: torch.empty_like(t, device="meta") for name, t in _tensors(small, new).items()}
    with raises(r"is on the meta device: it has a shape but no values"):
        _engines(small, orig, meta)[engine]()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cache_of_integers_is_refused(small, engine):
    orig, new = make_inputs(small)
    integers = {name: t.round().long() for name, t in _tensors(small, new).items()}
    with raises(r"has dtype torch.int64: expected floating-point activations"):
        _engines(small, orig, integers)[engine]()


def test_a_cache_in_another_float_dtype_is_cast_to_the_models(small):
    """float64 values of float32 activations cast back exactly; bfloat16 ones are the rounded values."""
    orig, new = make_inputs(small)
    metric, last = LogitDiff(ANSWERS, per_prompt=True), small.cfg.n_layers - 1
    tensors = _tensors(small, new)
    orig_tensors = _tensors(small, orig)

    def results(cast):
        cache = {name: cast(t) for name, t in tensors.items()}
        orig_cache = {name: cast(t) for name, t in orig_tensors.items()}
        swept = act_patch(small, orig, IterNode(["z", "resid_pre"]), metric, new_cache=cache)
        paths = path_patch(
            small, orig, None, IterNode("z"), Node("resid_post", last), metric, orig_cache=orig_cache, new_cache=cache
        )
        return [swept["z"], swept["resid_pre"], paths["z"]]

    for as_float64, as_is in zip(results(torch.Tensor.double), results(lambda t: t)):
        assert torch.equal(as_float64.as_tensor(), as_is.as_tensor())
    rounded = results(lambda t: t.to(torch.bfloat16).float())
    for as_bfloat16, expected in zip(results(lambda t: t.to(torch.bfloat16)), rounded):
        assert as_bfloat16.as_tensor().dtype == torch.float32
        assert torch.equal(as_bfloat16.as_tensor(), expected.as_tensor())


def test_a_cache_in_place_is_used_without_a_copy(small):
    orig, _ = make_inputs(small)
    tensors = _tensors(small, orig)
    names = ["blocks.0.attn.hook_z", "blocks.2.hook_resid_pre"]
    kept = placed(small, tensors, names)
    assert set(kept) == set(names) and all(kept[name] is tensors[name] for name in names)
    wide = placed(small, {name: tensors[name].double() for name in names}, names)
    assert all(wide[name].dtype == torch.float32 and torch.equal(wide[name], tensors[name]) for name in names)


def test_tokens_on_the_meta_device_are_refused(small):
    orig, _ = make_inputs(small)
    with raises(r"token input is on the meta device"):
        plan_act_patch(small, orig.to("meta"), IterNode("z"), LogitDiff(ANSWERS), new_cache="zero")


def test_a_model_with_a_parameter_on_the_meta_device_is_refused(tok):
    """An offloaded (or never loaded) layer: refused before anything runs, naming the parameter."""
    model = models.gpt2_like(n_layers=2, tok=tok)
    name, parameter = list(model.named_parameters())[-3]
    module_name, _, attribute = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attribute] = torch.nn.Parameter(
        torch.empty_like(parameter, device="meta"), requires_grad=False
    )
    orig, _ = make_inputs(model)
    with raises(rf"parameter '{name}' is on the meta device"):
        act_patch(model, orig, IterNode("z"), LogitDiff(ANSWERS), new_cache="zero")


def test_model_shape_reads_the_element_size_and_devices(small, tok):
    assert model_shape(small).element_size == 4 and model_shape(small).devices == (torch.device("cpu"),)
    assert model_shape(models.gpt2_like(n_layers=2, tok=tok).to(torch.bfloat16)).element_size == 2


def _shape(element_size: int = 4, devices=()) -> ModelShape:
    return ModelShape(
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        d_model=768,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        has_mlps=True,
        element_size=element_size,
        devices=devices,
    )


def test_the_default_budget_on_cuda_is_a_fraction_of_the_free_memory(monkeypatch):
    """Free memory: the driver's, plus what PyTorch's allocator holds unused; the least free GPU counts."""
    free = {0: 40 << 30, 1: 30 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[device.index], 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 << 30)
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert memory.default_max_memory(gpus[:1]) == int(0.5 * (44 << 30))
    assert memory.default_max_memory(gpus) == int(0.5 * (34 << 30))
    assert memory.default_max_memory([torch.device("mps", 0)]) == 2 << 30
    assert memory.default_max_memory([torch.device("cpu")]) == 256 << 20

    tokens = torch.zeros(8, 15, dtype=torch.long, device="meta")
    per_variant = 4 * 8 * (15 * (6 * 768 + 3 * 3072 + 3 * 12 * 15) + 2 * 15 * 50257)
    fitting = int(0.5 * (34 << 30)) // per_variant
    assert memory.variants_per_pass(10_000, tokens, _shape(devices=tuple(gpus)), None, None) == fitting
    assert memory.variants_per_pass(10_000, tokens, _shape(2, tuple(gpus)), None, None) == 2 * fitting


def test_half_precision_activations_count_half_the_bytes():
    tokens = torch.zeros(4, 15, dtype=torch.long, device="meta")
    budget = 1 << 30
    assert memory.variants_per_pass(10_000, tokens, _shape(2), None, budget) == pytest.approx(
        2 * memory.variants_per_pass(10_000, tokens, _shape(4), None, budget), abs=1
    )
    assert memory.prompts_per_gradient_pass(tokens, _shape(2), budget) == pytest.approx(
        2 * memory.prompts_per_gradient_pass(tokens, _shape(4), budget), abs=1
    )


# One CUDA device


def _flat(result) -> torch.Tensor:
    if isinstance(result, dict):
        return torch.cat([_flat(value) for value in result.values()])
    if isinstance(result, PatchResult):
        result = result.as_tensor()
    if hasattr(result, "scores"):
        result = result.scores
    assert result.device.type == "cpu", "results come back on the CPU"
    return result.flatten().float()


def _every_engine(model, orig, new, cache: dict) -> dict:
    """Every engine on `model`, with CPU tokens and the new run's activations in `cache` (a CPU dict)."""
    metric, last = LogitDiff(ANSWERS), model.cfg.n_layers - 1
    graph = EdgeGraph.of(model)
    circuits = [Circuit.empty(graph), Circuit.full(graph)]
    return {
        "act_patch": act_patch(model, orig, IterNode(["z", "resid_pre", "mlp_out"]), metric, new_cache=cache),
        "act_patch input": act_patch(model, orig, IterNode("z"), metric, new_input=new),
        "path_patch two passes": path_patch(model, orig, new, IterNode("z"), Node("resid_post", last), metric),
        "path_patch one pass": path_patch(
            model,
            orig,
            None,
            IterNode("z"),
            Node("q", last, head=0),
            metric,
            new_cache=cache,
            direct_includes_mlps=False,
        ),
        "attr_patch": attr_patch(model, orig, IterNode(["z", "k"]), metric, new_cache=cache, method="atp*"),
        "attr_patch ig": attr_patch(model, orig, IterNode("z"), metric, new_cache=cache, method="ig", steps=2),
        "attr_edges": attr_edges(model, orig, metric, new_cache=cache),
        "attr_path_patch": attr_path_patch(model, orig, new, IterNode("z"), Node("resid_post", last), metric),
        "evaluate_circuit": evaluate_circuit(model, circuits, orig, metric, new_cache=cache),
    }


def _assert_same(actual: dict, expected: dict, relative: float = 1e-4) -> None:
    for engine, result in expected.items():
        got, want = _flat(actual[engine]), _flat(result)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=relative * scale, msg=engine)


@needs_cuda
def test_every_engine_on_cuda_gives_the_cpu_results_with_cpu_inputs_and_caches(tok):
    reference = models.gpt2_like(n_layers=4, tok=tok)
    orig, new = make_inputs(reference)
    cache = _tensors(reference, new)
    expected = _every_engine(reference, orig, new, cache)
    on_gpu = models.gpt2_like(n_layers=4, tok=tok).to("cuda")
    _assert_same(_every_engine(on_gpu, orig, new, cache), expected)


def _synchronisations(run) -> int:
    """How many times `run()` makes the host wait for the GPU (torch's sync debug mode counts them)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


@needs_cuda
def test_no_engine_waits_for_the_gpu_once_per_cell(tok):
    """The same plan shape with 8 and with 64 cells (one pass each) waits as often: not per cell."""
    model = models.gpt2_like(n_layers=4, tok=tok).to("cuda")
    orig, new = (t.to("cuda") for t in make_inputs(model))
    _, cache = model.run_with_cache(new)
    metric, last = LogitDiff(ANSWERS), model.cfg.n_layers - 1

    def counts(neurons: int) -> list[int]:
        sweep = IterNode("post", layers=[last - 1], neurons=list(range(neurons)))
        act = plan_act_patch(model, orig, sweep, metric, new_cache=cache, batch_size=10_000)
        path = plan_path_patch(
            model,
            orig,
            None,
            sweep,
            Node("resid_post", last),
            metric,
            new_cache=cache,
            direct_includes_mlps=False,
            batch_size=10_000,
        )
        circuits = [
            Circuit.from_scores(attr_edges(model, orig, metric, new_cache=cache), n + 1) for n in range(neurons // 4)
        ]
        runs = [
            act.run,
            path.run,
            lambda: evaluate_circuit(model, circuits, orig, metric, new_cache=cache, batch_size=10_000),
            lambda: attr_patch(model, orig, sweep, metric, new_cache=cache),
        ]
        for run in runs:
            run()  # warm up: first calls may allocate
        return [_synchronisations(run) for run in runs]

    assert counts(8) == counts(64)


@needs_cuda
def test_the_default_budget_on_a_gpu_is_half_its_free_memory(tok):
    model = models.gpt2_like(n_layers=4, tok=tok).to("cuda")
    budget = memory.default_max_memory(model_shape(model).devices)
    free, total = torch.cuda.mem_get_info()
    unused = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert budget == pytest.approx(memory.CUDA_FREE_FRACTION * (free + unused), rel=0.05) and 0 < budget < total


# Two CUDA devices


def _split_bridge(kind: str, tok):
    """A TransformerLens 4 bridge of the weights `models.gpt2_like(n_layers=4)` or `models.llama_gqa()`
    make (the same seeded construction), its Hugging Face model dispatched over cuda:0 and cuda:1
    with accelerate: embeddings and the first half of the layers on one, the rest on the other."""
    from accelerate import dispatch_model
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            n_layer=4, n_head=4, n_embd=64, vocab_size=models.VOCAB, n_positions=64, initializer_range=0.1
        )
        hf = GPT2LMHeadModel(config).eval()
        models._randomize_biases(hf, 1)
        device_map = {
            "transformer.wte": 0,
            "transformer.wpe": 0,
            "transformer.drop": 0,
            "transformer.ln_f": 1,
            "lm_head": 0,
        } | {f"transformer.h.{i}": int(i >= 2) for i in range(4)}
    else:
        config = LlamaConfig(
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            hidden_size=48,
            intermediate_size=96,
            vocab_size=models.VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            initializer_range=0.1,
        )
        hf = LlamaForCausalLM(config).eval()
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1} | {
            f"model.layers.{i}": int(i >= 2) for i in range(4)
        }
    bridge = TransformerBridge.boot_transformers(
        kind if kind == "gpt2" else "llama", hf_model=dispatch_model(hf, device_map=device_map), tokenizer=tok
    )
    if kind != "gpt2":
        bridge.enable_compatibility_mode()
    return bridge


def _split_hooked(model):
    """A TransformerLens 2 model with n_devices=2, its modules where its forward pass expects them."""
    from transformer_lens.utilities import devices

    model.cfg.device, model.cfg.n_devices = "cuda", 2
    for module in (model.embed, getattr(model, "pos_embed", None)):
        if module is not None:
            module.to("cuda:0")
    for index, block in enumerate(model.blocks):
        block.to(devices.get_device_for_block_index(index, model.cfg))
    last = devices.get_device_for_block_index(model.cfg.n_layers - 1, model.cfg)
    for module in (getattr(model, "ln_final", None), model.unembed):
        if module is not None:
            module.to(last)
    return model


MAKERS = {"gpt2": lambda tok: models.gpt2_like(n_layers=4, tok=tok), "gqa": models.llama_gqa}


@needs_two_gpus
@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_model_across_two_gpus_gives_the_single_gpu_results(tok, kind):
    """Every engine on a model whose layers sit on two GPUs, with CPU tokens and a CPU cache, and
    with a cache it recorded itself (spread over both GPUs)."""
    reference = MAKERS[kind](tok).to("cuda:0")
    orig, new = make_inputs(reference)
    cache = {name: t.cpu() for name, t in _tensors(reference, new).items()}
    expected = _every_engine(reference, orig, new, cache)
    split = _split_bridge(kind, tok) if TL_MAJOR >= 4 else _split_hooked(MAKERS[kind](tok))
    assert len(model_shape(split).devices) == 2
    _assert_same(_every_engine(split, orig, new, cache), expected)
    recorded = _tensors(split, new)
    assert {t.device for t in recorded.values()} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    _assert_same(_every_engine(split, orig, new, recorded), expected)
