"""Circuit discovery on a tracr-compiled model, whose compiled weights are the ground truth.

The program is tracr's `make_sort(tokens, tokens, max_seq_len=5, min_key=1)` over {1, 2, 3}
(`scripts/compile_tracr.py`): MLP 0 makes unique keys (token + index / 5), head 1.0 and MLP 1
count the smaller keys (selector width: the target position), head 2.0 moves each token to its
target position. Layer 0 has no attention and layer 2 no MLP: their weights are zero.

Ground truth, from the weights and tracr's labels of the residual stream's directions:
- An edge s -> r is structural when r's read matrix overlaps s's write matrix:
  ||R^T S|| > 1e-3 (overlaps are exactly 0 or at least 1), with S = [W_E^T W_pos^T] for the
  embeddings, W_O[h]^T for a head, W_out^T for an MLP and R = W_Q[h], W_K[h], W_V[h], W_in or W_U.
- Which directions depend on the input comes from the program, not from any run of it: RASP's own
  evaluator gives each SOp's value at each position of all 243 inputs (`sop_values`), and a
  direction "sop:value" depends on the input where the SOp takes that value on some inputs and
  not on others at the same position; tracr's selector-width helper direction
  "sop_selector_width_attn_output" (1 / (width + 1)) where the SOp does; "one" never. So
  "indices:*", "tokens:BOS", "tokens:compiler_pad" and "target_pos_3:5" (a count of smaller
  keys never reaches 5 among 5 tokens) are constant. The test checks this split against
  tracr's own residual streams with margins no processor's rounding comes near.
- The true circuit is the structural edges that overlap through input-dependent directions:
  ||R^T P S|| > 1e-3, P the projection onto them. The other structural edges (the selector's
  BOS and "one" reads, the aggregate's index query) carry constants: removing one changes nothing.

Each true edge's effect is also predicted from the program itself (`program_delta`: the sort
computed with the edge's intermediate taken from the corrupted input), independently of any
model run. Scores count as zero below FLOAT_NOISE (1e-3): true edges' exact and IG scores are
at least 1, and decoys' are 0, so no processor's rounding decides a test. Runs on TransformerLens 2
only, and needs the tracr environment (TLP_TRACR_PYTHON).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests.helpers import TL_MAJOR
from tests.oracles import tracr_model
from transformer_lens_patching import (
    Circuit,
    Edge,
    EdgeGraph,
    GraphNode,
    attr_edges,
    evaluate_circuit,
    exact_edge_scores,
    learn_edge_masks,
)

if TL_MAJOR >= 4:
    pytest.skip(
        "TransformerLens 4 has no HookedTransformer, and boot_native bridges have no per-head input hooks, "
        "which circuit evaluation needs: the tracr circuit test runs on TransformerLens 2.",
        allow_module_level=True,
    )

SELECTOR_WIDTH_HELPER = "_selector_width_attn_output"
"""The suffix of the direction in which tracr's selector width writes 1 / (width + 1)."""
FLOAT_NOISE = 1e-3
"""Above any rounding of float32 arithmetic on these values, on any processor."""
MOVES = 0.5
"""Every input-dependent direction moves at least this much: one-hot values, or 1 / (width + 1)."""
CLEAN = [(1, 1, 2, 1, 3), (1, 1, 1, 2, 3)]
CORRUPTED = [(3, 3, 1, 2, 2), (3, 3, 3, 3, 2)]
EMBED, LOGITS = GraphNode("embed"), GraphNode("logits")


def head(layer: int, part: str | None = None) -> GraphNode:
    return GraphNode("head", layer, head=0, input=part)


EXPECTED_TRUE = {
    "embed->mlp0": Edge(EMBED, GraphNode("mlp", 0)),
    "mlp0->h1q": Edge(GraphNode("mlp", 0), head(1, "q")),
    "mlp0->h1k": Edge(GraphNode("mlp", 0), head(1, "k")),
    "h1->mlp1": Edge(head(1), GraphNode("mlp", 1)),
    "mlp1->h2k": Edge(GraphNode("mlp", 1), head(2, "k")),
    "embed->h2v": Edge(EMBED, head(2, "v")),
    "h2->logits": Edge(head(2), LOGITS),
}
"""The circuit as read off the program (the weights must give the same)."""


@pytest.fixture(scope="module")
def tracr():
    python = tracr_model.tracr_python()
    if python is None:
        pytest.skip(
            "No tracr environment: set TLP_TRACR_PYTHON to the python of a venv with requirements/tracr.txt "
            "(tracr and jax are kept out of the package's own environments)."
        )
    began = time.time()
    path = tracr_model.compiled_npz(python)
    print(f"tracr npz ready in {time.time() - began:.1f}s: {path}")
    return tracr_model.load(path)


@pytest.fixture(scope="module")
def inputs(tracr):
    return tracr.token_ids(CLEAN), tracr.token_ids(CORRUPTED)


def answer_ids(tracr, sequences) -> torch.Tensor:
    """(batch, 5) output ids of each sequence sorted: what tracr computes at positions 1..5."""
    encoding = dict(zip(tracr.arrays["output_values"].tolist(), tracr.arrays["output_ids"].tolist()))
    return torch.tensor([[encoding[v] for v in sorted(row)] for row in sequences])


def correct_logits_metric(answers: torch.Tensor):
    """Linear in the logits: the sum, over prompts and positions 1..5, of the correct class's logit."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 1:].gather(-1, answers.to(logits.device).unsqueeze(-1)).sum()

    return metric


# --- the program, computed directly ---


def sort_keys(tokens) -> list[float]:
    return [value + index / 5 for index, value in enumerate(tokens)]


def selector_width(queries, keys) -> list[int]:
    return [sum(key < query for key in keys) for query in queries]


def aggregate(target, values) -> list[dict]:
    """At each position i, the mean one-hot of the values whose target is i (none: all zero)."""
    out = []
    for i in range(len(values)):
        moved = [values[j] for j in range(len(values)) if target[j] == i]
        out.append({v: moved.count(v) / len(moved) for v in set(moved)})
    return out


def program_delta(name: str, clean, corrupted) -> float:
    """The metric's change when the edge `name` of EXPECTED_TRUE carries the corrupted input's value."""
    keys, other_keys = sort_keys(clean), sort_keys(corrupted)
    target, other_target = selector_width(keys, keys), selector_width(other_keys, other_keys)
    sorted_out = {
        "embed->mlp0": aggregate(other_target, clean),
        "mlp0->h1q": aggregate(selector_width(other_keys, keys), clean),
        "mlp0->h1k": aggregate(selector_width(keys, other_keys), clean),
        "h1->mlp1": aggregate(other_target, clean),
        "mlp1->h2k": aggregate(other_target, clean),
        "embed->h2v": aggregate(target, corrupted),
        "h2->logits": aggregate(other_target, corrupted),
    }[name]
    answers = sorted(clean)
    return sum(out.get(answer, 0.0) for out, answer in zip(sorted_out, answers)) - len(answers)


# --- ground truth from the weights ---


def write_matrix(model, node: GraphNode) -> torch.Tensor:
    """(d_model, k): the directions a sender writes."""
    if node.kind == "embed":
        return torch.cat([model.W_E, model.W_pos]).T.detach()
    if node.kind == "head":
        return model.W_O[node.layer, node.head].T.detach()
    return model.W_out[node.layer].T.detach()


def read_matrix(model, node: GraphNode) -> torch.Tensor:
    """(d_model, k): the directions a receiver reads."""
    if node.kind == "logits":
        return model.W_U.detach()
    if node.kind == "mlp":
        return model.W_in[node.layer].detach()
    return {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[node.input][node.layer, node.head].detach()


def depends_on_input(label: str, values: dict[str, np.ndarray]) -> bool:
    """Whether the residual direction `label` varies over the inputs, by the program's values
    `values` (SOp label -> (inputs, positions) values as text)."""
    if label == "one":
        return False
    if label.endswith(SELECTOR_WIDTH_HELPER):
        sop = values[label.removesuffix(SELECTOR_WIDTH_HELPER)]
        return bool((sop != sop[:1]).any())
    sop, value = label.rsplit(":", 1)
    taken = values[sop] == value
    return bool((taken != taken[:1]).any())


def varying(tracr) -> torch.Tensor:
    """(d_model,) 1 where the direction depends on the input, 0 where it is constant, from the program."""
    values = dict(zip(tracr.arrays["sop_labels"].tolist(), tracr.arrays["sop_values"]))
    return torch.tensor([float(depends_on_input(label, values)) for label in tracr.labels])


def ground_truth(tracr) -> tuple[set[Edge], set[Edge]]:
    """(structural edges, true edges) of the model's edge graph, from its weights."""
    model, mask = tracr.model, varying(tracr)
    structural, true = set(), set()
    for edge in EdgeGraph.of(model):
        read, write = read_matrix(model, edge.receiver), write_matrix(model, edge.sender)
        if torch.linalg.norm(read.T @ write) > FLOAT_NOISE:
            structural.add(edge)
        if torch.linalg.norm(read.T @ (mask[:, None] * write)) > FLOAT_NOISE:
            true.add(edge)
    return structural, true


def token_values(tracr, ids) -> list[list[int]]:
    """The vocabulary values of token ids."""
    names = dict(zip(tracr.arrays["input_ids"].tolist(), tracr.arrays["input_names"].tolist()))
    return [[int(names[i]) for i in row] for row in ids.tolist()]


# --- tests ---


def test_converted_model_reproduces_tracr(tracr):
    """On every full-length input: tracr's residual stream at every stage, and its outputs."""
    arrays = tracr.arrays
    tokens = torch.tensor(arrays["inputs"])
    with torch.no_grad():
        logits, cache = tracr.model.run_with_cache(tokens)
    stages = [cache["blocks.0.hook_resid_pre"]]
    stages += [
        cache[f"blocks.{layer}.hook_resid_{part}"]
        for layer in range(tracr.model.cfg.n_layers)
        for part in ("mid", "post")
    ]
    np.testing.assert_allclose(torch.stack(stages, 1).numpy(), arrays["residuals"], atol=1e-5)
    predicted = logits.argmax(-1)[:, 1:].numpy()
    np.testing.assert_array_equal(predicted, arrays["outputs"][:, 1:])
    values = arrays["output_values"][np.argsort(arrays["output_ids"])]
    decoded = [tuple(values[row]) for row in predicted]
    assert decoded == [tuple(sorted(row)) for row in token_values(tracr, arrays["inputs"][:, 1:])]


def test_program_split_matches_tracr_residuals(tracr):
    """At the program's positions (after BOS), over all 243 inputs and every stage of tracr's own
    residual streams: the directions the program says are constant stay within float noise, and
    every other one moves by at least MOVES somewhere."""
    residuals = tracr.arrays["residuals"][:, :, 1:]
    spread = (residuals.max(0) - residuals.min(0)).max(axis=(0, 1))
    mask = varying(tracr).numpy().astype(bool)
    moved = {label: float(s) for label, s, v in zip(tracr.labels, spread, mask) if not v and s > FLOAT_NOISE}
    assert not moved, f"directions the program says are constant that vary: {moved}"
    still = {label: float(s) for label, s, v in zip(tracr.labels, spread, mask) if v and s < MOVES}
    assert not still, f"directions the program says depend on the input that barely move: {still}"
    assert not mask[tracr.labels.index("target_pos_3:5")] and mask[tracr.labels.index("target_pos_3:4")]


def test_ground_truth_is_the_program(tracr):
    """The weights give the circuit read off the program, and constant-only structural decoys exist."""
    structural, true = ground_truth(tracr)
    assert true == set(EXPECTED_TRUE.values())
    decoys = structural - true
    assert Edge(EMBED, head(1, "v")) in decoys and Edge(EMBED, head(2, "q")) in decoys
    assert len(decoys) == 6, sorted(decoys)


def test_every_true_edge_changes_the_metric():
    """The chosen inputs make every true edge matter, by the program alone."""
    for name, delta in program_deltas().items():
        assert delta <= -1, (name, delta)


def test_exact_scores_recover_the_circuit(tracr, inputs):
    clean, corrupted = inputs
    model, graph = tracr.model, EdgeGraph.of(tracr.model)
    metric = correct_logits_metric(answer_ids(tracr, CLEAN))
    structural, true = ground_truth(tracr)
    exact = exact_edge_scores(model, clean, metric, new_input=corrupted)
    nonzero = {edge for edge in graph if abs(float(exact.score(edge))) > FLOAT_NOISE}
    assert nonzero == true
    decoys = [edge for edge in graph if edge not in true]
    assert max(abs(float(exact.score(edge))) for edge in decoys) < FLOAT_NOISE
    for name, expected in program_deltas().items():
        assert float(exact.score(EXPECTED_TRUE[name])) == pytest.approx(expected, abs=1e-3), name
    assert Circuit.from_scores(exact, len(true)) == Circuit(graph, true)
    assert structural - true, "the graph has structural decoys"


def test_true_circuit_is_faithful(tracr, inputs):
    """The true circuit alone gives the full model's metric; without it, the corrupted run's."""
    clean, corrupted = inputs
    model, graph = tracr.model, EdgeGraph.of(tracr.model)
    metric = correct_logits_metric(answer_ids(tracr, CLEAN))
    _, true = ground_truth(tracr)
    with torch.no_grad():
        full, ablated = float(metric(model(clean))), float(metric(model(corrupted)))
    assert full == pytest.approx(10.0, abs=1e-3)
    circuit = float(evaluate_circuit(model, Circuit(graph, true), clean, metric, new_input=corrupted))
    assert circuit == pytest.approx(full, abs=1e-5)
    decoys = Circuit(graph, [edge for edge in graph if edge not in true])
    without = float(evaluate_circuit(model, decoys, clean, metric, new_input=corrupted))
    assert without == pytest.approx(ablated, abs=1e-5)


def program_deltas() -> dict[str, float]:
    return {name: sum(program_delta(name, c, x) for c, x in zip(CLEAN, CORRUPTED)) for name in EXPECTED_TRUE}


def test_attribution_atp_is_exact_only_on_linear_paths(tracr, inputs):
    """AtP scores every decoy 0, and the two true edges whose path to the metric is linear
    (the aggregate's value, and its output into the logits) exactly; the saturated softmax
    and ReLU steps leave it blind (|score| < 0.01) to the five edges that feed them."""
    clean, corrupted = inputs
    model, graph = tracr.model, EdgeGraph.of(tracr.model)
    _, true = ground_truth(tracr)
    scores = attr_edges(
        model, clean, correct_logits_metric(answer_ids(tracr, CLEAN)), new_input=corrupted, method="atp"
    )
    assert max(abs(float(scores.score(edge))) for edge in graph if edge not in true) < FLOAT_NOISE
    deltas = program_deltas()
    for name, edge in EXPECTED_TRUE.items():
        if name in ("embed->h2v", "h2->logits"):
            assert float(scores.score(edge)) == pytest.approx(deltas[name], abs=1e-3), name
        else:
            assert abs(float(scores.score(edge))) < 0.01, name


def test_attribution_ig_recovers_the_circuit(tracr, inputs):
    """IG scores exactly the true edges nonzero (each with the right sign, the edge into the
    logits exactly), so its top edges are the true circuit."""
    clean, corrupted = inputs
    model, graph = tracr.model, EdgeGraph.of(tracr.model)
    _, true = ground_truth(tracr)
    scores = attr_edges(model, clean, correct_logits_metric(answer_ids(tracr, CLEAN)), new_input=corrupted, method="ig")
    assert {edge for edge in graph if abs(float(scores.score(edge))) > FLOAT_NOISE} == true
    assert max(abs(float(scores.score(edge))) for edge in graph if edge not in true) < FLOAT_NOISE
    assert all(float(scores.score(edge)) < -0.5 for edge in true)
    assert float(scores.score(EXPECTED_TRUE["h2->logits"])) == pytest.approx(program_deltas()["h2->logits"], abs=1e-3)
    assert Circuit.from_scores(scores, len(true)) == Circuit(graph, true)


def test_relevance_patching_sees_what_atp_sees(tracr, inputs):
    """RelP (`method="relp"`): the program has no norm and ReLU MLPs, whose identity rule is their
    gradient, and its attention is saturated, so RelP scores as AtP does: the two linear true edges
    exactly, every decoy 0, and the five edges feeding the softmax and ReLU steps below 0.01 (the
    two into head 1's query and key exactly 0: the pattern is a constant to what feeds it)."""
    clean, corrupted = inputs
    model, graph = tracr.model, EdgeGraph.of(tracr.model)
    _, true = ground_truth(tracr)
    metric = correct_logits_metric(answer_ids(tracr, CLEAN))
    relp = attr_edges(model, clean, metric, new_input=corrupted, method="relp")
    atp = attr_edges(model, clean, metric, new_input=corrupted, method="atp")
    assert max(abs(float(relp.score(edge))) for edge in graph if edge not in true) < FLOAT_NOISE
    deltas = program_deltas()
    for name, edge in EXPECTED_TRUE.items():
        if name in ("embed->h2v", "h2->logits"):
            assert float(relp.score(edge)) == pytest.approx(deltas[name], abs=1e-3), name
        else:
            assert abs(float(relp.score(edge))) < 0.01, name
        if name in ("mlp0->h1q", "mlp0->h1k"):
            assert float(relp.score(edge)) == 0.0, name
        else:
            assert float(relp.score(edge)) == pytest.approx(float(atp.score(edge)), abs=1e-6), name


@pytest.mark.parametrize("start", ["atp", "exact"])
def test_learned_masks_recover_the_circuit(tracr, inputs, start):
    """Learned edge masks (100 steps, a tenth of the graph kept in expectation) keep exactly the true
    circuit first, warm-started from exact scores or from EAP, which is blind to five of its seven
    edges: sampled circuits that hold their partners show those edges' effect."""
    clean, corrupted = inputs
    model, graph = tracr.model, EdgeGraph.of(tracr.model)
    _, true = ground_truth(tracr)
    answers = answer_ids(tracr, CLEAN)
    metric = correct_logits_metric(answers)

    def per_prompt(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 1:].gather(-1, answers.to(logits.device).unsqueeze(-1)).squeeze(-1).sum(-1)

    per_prompt.dims = ("batch",)
    if start == "exact":
        scores = exact_edge_scores(model, clean, metric, new_input=corrupted)
    else:
        scores = attr_edges(model, clean, metric, new_input=corrupted, method="atp")
    learned = learn_edge_masks(model, scores, clean, per_prompt, new_input=corrupted, steps=100, density=0.1)
    assert Circuit.from_scores(learned, len(true)) == Circuit(graph, true)


def test_cached_compile_is_keyed_by_what_decides_it(tmp_path, monkeypatch):
    """Another script, processor or tracr environment gives another cache entry, never a stale one."""
    python = tracr_model.tracr_python()
    if python is None:
        pytest.skip("No tracr environment (TLP_TRACR_PYTHON).")
    key = tracr_model.compile_key(python)
    assert tracr_model.compile_key(python) == key
    edited = tmp_path / "compile_tracr.py"
    edited.write_bytes(tracr_model.SCRIPT.read_bytes() + b"\n# edited\n")
    with monkeypatch.context() as patched:
        patched.setattr(tracr_model, "SCRIPT", edited)
        assert tracr_model.compile_key(python) != key
    with monkeypatch.context() as patched:
        patched.setattr(tracr_model, "processor", lambda: "another processor")
        assert tracr_model.compile_key(python) != key
    with monkeypatch.context() as patched:
        patched.setattr(tracr_model, "ENVIRONMENT", tracr_model.ENVIRONMENT + "; print('jax==0.0.1')")
        assert tracr_model.compile_key(python) != key
