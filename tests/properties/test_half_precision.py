"""Half-precision models on every engine: a bfloat16 (and float16) copy of a float32 model gives
results that agree with the float32 ones within `TOLERANCES`, in float32; patching from an
identical cache changes nothing, exactly; what a metric receives is float32.

The half-precision models are built by the same seeded constructors as the float32 ones (the
same weights, checked) and then cast with `.to(dtype)`.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_inputs
from tests.oracles import models
from transformer_lens_patching import (
    Circuit,
    EdgeGraph,
    EdgeScores,
    IterNode,
    Node,
    PatchResult,
    act_patch,
    attr_edges,
    attr_patch,
    attr_path_patch,
    calibrate,
    evaluate_circuit,
    faithfulness_curve,
    mean_ablation_cache,
    path_patch,
)
from transformer_lens_patching.metrics import LogitDiff, LogitsAt, TokenProbability

TOLERANCES = {torch.bfloat16: 5e-2, torch.float16: 6e-3}
"""The largest |half - float32| difference of an engine's results, as a fraction of the float32
result's scale (its largest absolute value). bfloat16 keeps 8 significant bits (unit roundoff
2^-8, 0.4%), float16 11 (2^-11, 8 times less); a logit difference cancels most of its logits'
digits, so the results carry several roundoffs. Measured on these models (TransformerLens 4
and 2): at most 3.1e-2 in bfloat16 and 3.4e-3 in float16."""

MODELS = {"gpt2": lambda tok: models.gpt2_like(n_layers=4, tok=tok), "gqa": models.llama_gqa}
ANSWERS = torch.tensor([[5, 6], [17, 3], [6, 5]])
DTYPES = [torch.bfloat16, torch.float16]


def _runs_in(dtype) -> bool:
    """Whether this CPU computes a small model's forward pass in `dtype`."""
    try:
        layer = torch.nn.Linear(4, 4).to(dtype)
        torch.nn.functional.layer_norm(layer(torch.ones(2, 4, dtype=dtype)), (4,))
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module")
def built(tok):
    """(name, dtype) -> the model in that dtype, made once."""
    made: dict = {}

    def model(name: str, dtype: torch.dtype):
        if dtype != torch.float32 and not _runs_in(dtype):
            pytest.skip(f"this CPU's torch does not compute in {dtype}")
        if (name, dtype) not in made:
            made[name, dtype] = MODELS[name](tok).to(dtype)
        return made[name, dtype]

    return model


def _circuits(graph: EdgeGraph, scores: EdgeScores) -> list[Circuit]:
    return [Circuit.from_scores(scores, n) for n in (10, 50, 200)] + [Circuit.full(graph), Circuit.empty(graph)]


def engine_results(model, scores: EdgeScores) -> dict:
    """Every engine's result on `model`, each as it is returned; circuits from the float32 `scores`."""
    orig, new = make_inputs(model)
    metric = LogitDiff(ANSWERS)
    last = model.cfg.n_layers - 1
    heads, logits = IterNode("z"), Node("resid_post", last)
    return {
        "act_patch": act_patch(model, orig, IterNode(["z", "resid_pre", "mlp_out"]), metric, new_input=new),
        "act_patch, plain metric": act_patch(model, orig, heads, lambda x: x[:, -1, 5] - x[:, -1, 6], new_input=new),
        "path_patch, two passes": path_patch(model, orig, new, heads, logits, metric),
        "path_patch, one pass": path_patch(model, orig, new, heads, logits, metric, direct_includes_mlps=False),
        "attr_patch atp": attr_patch(model, orig, IterNode(["z", "mlp_out"]), metric, new_input=new),
        "attr_patch ig": attr_patch(model, orig, heads, metric, new_input=new, method="ig", steps=3),
        "attr_patch atp*": attr_patch(model, orig, IterNode(["k", "q"]), metric, new_input=new, method="atp*"),
        "attr_edges": attr_edges(model, orig, metric, new_input=new),
        "attr_edges ig": attr_edges(model, orig, metric, new_input=new, method="ig", steps=3),
        "attr_path_patch": attr_path_patch(model, orig, new, heads, logits, metric),
        "evaluate_circuit": evaluate_circuit(model, _circuits(scores.graph, scores), orig, metric, new_input=new),
        "faithfulness_curve": faithfulness_curve(model, scores, orig, metric, new_input=new, sizes=(10, 50, 200)),
    }


ENGINES = [
    "act_patch",
    "act_patch, plain metric",
    "path_patch, two passes",
    "path_patch, one pass",
    "attr_patch atp",
    "attr_patch ig",
    "attr_patch atp*",
    "attr_edges",
    "attr_edges ig",
    "attr_path_patch",
    "evaluate_circuit",
    "faithfulness_curve",
]


def flat(result) -> torch.Tensor:
    """A result as one flat tensor, checked to be float32 wherever it is a tensor."""
    if isinstance(result, dict):
        return torch.cat([flat(value) for value in result.values()])
    if isinstance(result, PatchResult):
        return flat(result.as_tensor())
    if isinstance(result, EdgeScores):
        return flat(result.scores)
    if isinstance(result, torch.Tensor):
        assert result.dtype == torch.float32, f"a result in {result.dtype}, expected float32"
        assert result.device.type == "cpu"
        return result.flatten()
    return torch.tensor([*result.values, result.full, result.empty], dtype=torch.float32)


@pytest.fixture(scope="module")
def results(built):
    """(name, dtype) -> every engine's result, computed once."""
    done: dict = {}

    def of(name: str, dtype: torch.dtype) -> dict:
        if (name, dtype) not in done:
            reference = built(name, torch.float32)
            if dtype == torch.float32:
                orig, new = make_inputs(reference)
                scores = attr_edges(reference, orig, LogitDiff(ANSWERS), new_input=new)
            else:
                scores = of(name, torch.float32)["attr_edges"]
            done[name, dtype] = engine_results(built(name, dtype), scores)
        return done[name, dtype]

    return of


@pytest.mark.parametrize("name", list(MODELS))
def test_half_precision_copies_have_the_same_weights(built, name):
    reference = built(name, torch.float32).state_dict()
    for dtype in DTYPES:
        copy = built(name, dtype).state_dict()
        assert set(copy) == set(reference)
        for key, value in reference.items():
            if value.is_floating_point():
                assert copy[key].dtype == dtype, key
                assert torch.equal(copy[key], value.to(dtype)), key


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_half_precision_agrees_with_float32(results, name, dtype, engine):
    """Within TOLERANCES of the float32 result's scale, and float32 itself; the float32 results
    vary across cells by more than twice the tolerance, so a wrong cell would show."""
    expected = flat(results(name, torch.float32)[engine])
    actual = flat(results(name, dtype)[engine])
    scale = float(expected.abs().max())
    tolerance = TOLERANCES[dtype] * scale
    spread = float((expected - expected.median()).abs().max())
    assert spread > 2 * tolerance, f"the float32 results vary by {spread:.3g}: too little to compare"
    difference = float((actual - expected).abs().max())
    assert difference <= tolerance, (
        f"{engine} in {dtype}: {difference:.3g} > {tolerance:.3g} ({difference / scale:.2e})"
    )


def _unpatched(model, tokens, metric) -> torch.Tensor:
    """The plain `metric` of the model's own full logits, upcast: what an unpatched cell scores."""
    with torch.no_grad():
        return metric(model(tokens, return_type="logits").float()).cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_patching_from_an_identical_cache_changes_nothing_exactly(built, name, dtype):
    model = built(name, dtype)
    orig, _ = make_inputs(model)

    def plain(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    expected = _unpatched(model, orig, plain)
    _, cache = model.run_with_cache(orig)
    last = model.cfg.n_layers - 1
    swept = act_patch(
        model, orig, IterNode(["z", "resid_pre", "resid_mid", "mlp_out", "pattern"]), plain, new_cache=cache
    )
    for result in swept.values():
        assert torch.equal(result.as_tensor(), expected.expand_as(result.as_tensor()))
    for direct, receiver in (
        (True, Node("resid_post", last)),
        (True, Node("v", last, head=0)),
        (False, Node("resid_post", last)),
    ):
        result = path_patch(
            model,
            orig,
            None,
            IterNode("z"),
            receiver,
            plain,
            orig_cache=cache,
            new_cache=cache,
            direct_includes_mlps=direct,
        )["z"].as_tensor()
        assert torch.equal(result, expected.expand_as(result)), (direct, receiver)
    for metric in (LogitDiff(ANSWERS, per_prompt=True), TokenProbability(ANSWERS[:, 0], per_prompt=True, log=True)):
        unpatched, _ = calibrate(model, metric, orig, orig)
        result = act_patch(model, orig, IterNode("z"), metric, new_cache=cache)["z"].as_tensor()
        assert torch.equal(result, unpatched.cpu().expand_as(result))
        delta = attr_patch(model, orig, IterNode(["z", "mlp_out"]), metric, new_cache=cache, estimate="delta")
        assert all(torch.equal(r.as_tensor(), torch.zeros_like(r.as_tensor())) for r in delta.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_identical_edges_change_nothing_exactly(built, name):
    """Circuit evaluation and edge attribution switch the per-head input hooks on, and the model
    computes heads from them another way than from its own attention input (so in bfloat16 the
    run differs by about 1e-3): the identical cache is recorded with those hooks on, as they see it."""
    model = built(name, torch.bfloat16)
    orig, _ = make_inputs(model)

    def plain(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        expected = _unpatched(model, orig, plain)
        _, cache = model.run_with_cache(orig)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    graph = EdgeGraph.of(model)
    result = evaluate_circuit(model, [Circuit.empty(graph), Circuit.full(graph)], orig, plain, new_cache=cache)
    assert torch.equal(result.as_tensor(), expected.expand(2, -1))
    scores = attr_edges(model, orig, LogitDiff(ANSWERS), new_cache=cache).scores
    assert scores.shape == (len(graph),) and not scores.any()


@pytest.mark.parametrize("name", list(MODELS))
def test_what_a_metric_receives_in_bfloat16(built, name):
    """A plain function: the model's full logits upcast to float32. A metric object: its selected
    logits, the final norm's bfloat16 output times the read columns of W_U, in float32."""
    model = built(name, torch.bfloat16)
    orig, _ = make_inputs(model)
    _, cache = model.run_with_cache(orig)
    received = []
    act_patch(model, orig, Node("z", 0), lambda logits: received.append(logits) or logits[:, -1, 0], new_cache=cache)
    with torch.no_grad():
        full = model(orig, return_type="logits")
    assert received[0].dtype == torch.float32 and torch.equal(received[0], full.float())

    ids, positions = torch.tensor([[7, 3], [7, 3], [7, 3]]), torch.tensor([[1], [6], [2]])
    read = LogitsAt(ids, positions=positions)
    selected = act_patch(model, orig, Node("z", 0), read, new_cache=cache)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    with torch.no_grad():
        normalised = model.ln_final(final[torch.arange(3)[:, None], positions])
        columns = torch.tensor([3, 7])
        expected = normalised.float() @ model.W_U[:, columns].float() + model.b_U[columns].float()
    assert selected.dtype == torch.float32
    torch.testing.assert_close(selected, expected[..., [1, 0]], rtol=1e-6, atol=1e-6)


def test_mean_ablation_of_a_bfloat16_cache_averages_in_float32(built):
    model = built("gpt2", torch.bfloat16)
    orig, _ = make_inputs(model, batch=6)
    _, cache = model.run_with_cache(orig)
    means = mean_ablation_cache(cache, groups=[0, 1, 0, 1, 0, 1])
    name = "blocks.1.hook_resid_post"
    tensor = cache[name]
    for rows in ([0, 2, 4], [1, 3, 5]):
        expected = tensor[rows].float().mean(0).to(torch.bfloat16)
        assert means[name].dtype == torch.bfloat16
        assert torch.equal(means[name][rows], expected.expand(3, *expected.shape))
