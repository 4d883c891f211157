"""The main job on the real model: `tl-patch ioi` on SmolLM2-135M, its findings checked
against reference-numbers.md (SmolLM2 section) and against Hugging Face transformers.

It runs once, on TransformerLens 4 (the main job's environment), with the corruption of the
reference's recovery profile: only the second mention of the subject is replaced. Its 4 prompts
keep it short; they are too few for any head to be significant (the sign-flip test's smallest
p-value is then 1/8), so the report names no head, says why, and skips the steps back from the
name movers: what is checked of the heads is that they reach the size floor, and that the
strongest name mover by size is in the circuit.
"""

import json
import os

import pytest
import torch

from tests.helpers import TL_MAJOR
from tl_patch import main

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("TLP_FAST")), reason="TLP_FAST set: SmolLM2 skipped"),
    pytest.mark.skipif(TL_MAJOR < 4, reason="the SmolLM2 report runs once, on TransformerLens 4"),
]

RECOVERY_AT_S2 = {0: 1.00, 5: 1.00, 10: 1.00, 15: 1.00, 20: 0.87, 25: 0.02}
"""reference-numbers.md: resid_pre patched at S2, clean into corrupted, normalised recovery."""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-report")
    status = main(["ioi", "--n-prompts", "4", "--corruption", "ABB->ABC, BAB->BAC", "--out", str(out), "--quiet"])
    assert status == 0
    return out, json.loads((out / "results.json").read_text())


def test_clean_logit_diffs_match_transformers(report):
    """The per-prompt logit differences, recomputed with the Hugging Face model on each sentence alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformer_lens_patching._embedded import hf_folder

    _, data = report
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder()))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_folder()), dtype=torch.float32).eval()
    expected = []
    for prompt in data["prompts"]:
        ids = tokenizer.encode(prompt["clean"], add_special_tokens=False)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -2]
        io, s = (tokenizer.encode(" " + prompt[key], add_special_tokens=False)[0] for key in ("io", "s"))
        expected.append(float(logits[io] - logits[s]))
    assert data["clean_logit_diff"]["per_prompt"] == pytest.approx(expected, abs=2e-3)


def test_clean_prompts_are_solved(report):
    """reference-numbers.md: clean accuracy 1.00 and mean logit diff 4.86 on hand-made prompts (no BOS)."""
    _, data = report
    per_prompt = data["clean_logit_diff"]["per_prompt"]
    assert all(value > 0 for value in per_prompt)
    assert 3.0 < data["clean_logit_diff"]["mean"] < 7.0
    assert data["corrupted_logit_diff"]["mean"] < data["clean_logit_diff"]["mean"] - 2.0


def test_residual_stream_recovery_profile_at_s2(report):
    """Full recovery up to layer 15, none from layer 25 on. Layer 20 is mid-transition, where
    the value depends on the prompts (the reference's 0.87 comes from other, hand-made ones):
    only its place between the two is checked."""
    _, data = report
    words = next(step for step in data["steps"] if step["key"] == "act_words")["results"]["resid_pre"]
    row = words["values"][words["coords"]["seq_pos"].index("S2")]
    layers = words["coords"]["layer"]
    for layer, expected in RECOVERY_AT_S2.items():
        if layer == 20:
            continue
        assert row[layers.index(layer)] == pytest.approx(expected, abs=0.1), f"layer {layer}"
    assert 0.4 < row[layers.index(20)] <= row[layers.index(15)]


def test_report_has_every_step_with_a_figure(report):
    """Every step runs but the two that follow the name movers, whom 4 prompts cannot name."""
    out, data = report
    assert [step["key"] for step in data["steps"]] == [
        "act_heads",
        "act_words",
        "path_logits",
        "path_queries",
        "path_values",
        "attr_neurons",
        "circuit",
    ]
    ran = [step["key"] for step in data["steps"] if step["results"]]
    assert ran == ["act_heads", "act_words", "path_logits", "attr_neurons"]
    assert data["steps"][3]["description"] == (
        "Skipped: the previous step found no head with a significant effect of at least 5%."
    )
    assert data["steps"][4]["description"] == "Skipped: the previous step was skipped."
    assert "circuit" in data["steps"][-1], "the circuit step ran"
    page = (out / "report.html").read_text()
    assert page.count('class="figure"') == 1 + len(ran) + 2, "the circuit step: curves and graph"
    path_logits = data["steps"][2]
    assert path_logits["top"]["name movers (lower the logit diff)"] == []
    assert path_logits["not_significant"]["name movers (lower the logit diff)"] > 0


def test_every_neuron_is_screened_and_the_strongest_patched_exactly(report):
    """SmolLM2's 30 x 1536 MLP neurons estimated; the default 20 strongest patched exactly, and
    listed in the report."""
    out, data = report
    step = data["steps"][5]
    assert step["results"]["post"]["dims"] == ["layer", "neuron"]
    assert len(step["results"]["post"]["values"]) == 30 and len(step["results"]["post"]["values"][0]) == 1536
    confirmation = step["confirmation"]
    assert confirmation["screened"] == 30 * 1536 and len(confirmation["cells"]) == 20
    assert (
        confirmation["spearman"] is not None
        and 0 <= confirmation["top_k_overlap"] <= confirmation["overlap_size"] == 10
    )
    table = (out / "report.html").read_text().split('id="confirmed-neurons"')[1].split("</table>")[0]
    assert table.count("<tr><td>") == 20


def test_report_says_where_the_weights_come_from_and_what_ran_them(report):
    out, data = report
    assert "Q4_1" in data["model_source"] and "dequantised to float32" in data["model_source"]
    assert data["versions"]["transformer_lens"].startswith("4.") and data["complete"] is True
    assert "dequantised to float32" in (out / "report.html").read_text()


def test_heads_of_both_signs_reach_the_size_floor_but_four_prompts_name_none(report):
    """SmolLM2 has heads whose clean output lowers the logit difference (one at -53% on the
    default prompts) next to those that restore it: both reach --min-effect, and with 4 prompts
    none is significant (no p-value below 1/8), so none is named; the report says why, each
    effect with its error bars."""
    out, data = report
    step = data["steps"][0]
    assert step["top"] == {"restoring heads (z: raise the logit diff)": [], "opposing heads (z: lower it)": []}
    assert all(count > 0 for count in step["not_significant"].values())
    z = step["results"]["z"]
    assert min(p for row in z["p_values"] for p in row) >= 0.125
    assert not any(s for row in z["significant"] for s in row)
    values = [v for row in z["values"] for v in row]
    assert min(values) <= -0.05 and max(values) >= 0.05
    assert all(s >= 0 for row in z["stderr"] for s in row)
    page = (out / "report.html").read_text()
    power = page.split('id="test-power"')[1].split("</p>")[0]
    assert "With 4 prompts no head can be significant" in power and "at least 14 prompts" in power
    assert 'id="prompts-needed"' in page


CIRCUIT_FLOORS = {
    "EAP": (0.50, 0.25),
    "EAP-IG (5 steps)": (0.90, 0.20),
    "EAP-IG, candidates confirmed exactly": (0.90, 0.20),
}
"""(least CPR, most CMD) of each ranking, on the 2 held-out prompts of the report's 4: regression
floors under the values measured on 2026-12-06 (CPR 0.680 / 1.079 / 1.078, CMD 0.132 / 0.104 /
0.106)."""


def test_the_circuit_step_finds_a_faithful_circuit_holding_the_name_movers(report):
    """Edges scored, and the circuit chosen, on prompts 0 and 2; faithfulness measured on 1 and 3;
    three rankings' MIB curves evaluated exactly. The circuit reaches 80% faithfulness on the
    prompts that chose it with at most a tenth of SmolLM2's 70,651 edges, keeps more than half on
    the held-out prompts (0.914 and 0.661 measured on 2026-12-06), and holds the strongest name
    mover by size (the head whose direct path to the logits lowers the logit difference most:
    4 prompts name none). Its edges carry their inclusion over resampled scoring prompts."""
    out, data = report
    found = data["steps"][-1]["circuit"]
    assert (found["scored_on"], found["held_out"]) == ([0, 2], [1, 3])
    for curve in found["curves"]:
        least_cpr, most_cmd = CIRCUIT_FLOORS[curve["ranking"]]
        assert curve["cpr"] >= least_cpr and curve["cmd"] <= most_cmd, curve["ranking"]
        for ranking in ("signed", "absolute"):
            assert curve[ranking]["faithfulness"][-1] == pytest.approx(1.0) and curve[ranking]["edges"][-1] == 70651
    assert found["chosen_faithfulness"] >= 0.8 and found["faithfulness"] >= 0.5
    assert len(found["circuit"]["edges"]) <= 7065
    assert found["named_heads"] == []
    z = data["steps"][2]["results"]["z"]
    _, layer, head = min(
        (v, z["coords"]["layer"][i], z["coords"]["head"][j])
        for i, row in enumerate(z["values"])
        for j, v in enumerate(row)
    )
    assert any(edge.startswith(f"head {layer}.{head} -> ") for edge in found["circuit"]["edges"]), (layer, head)
    assert found["stability"]["n_resamples"] == 50 and 0 < found["stability"]["mean_jaccard"] <= 1
    assert all(0 <= edge["inclusion"] <= 1 for edge in found["circuit_edges"])
    page = (out / "report.html").read_text()
    assert 'id="faithfulness"' in page and 'id="circuit-edges"' in page and 'id="named-heads"' in page
