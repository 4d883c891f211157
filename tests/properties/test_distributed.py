"""Sweeps sharded over processes with torch.distributed: two CPU processes in a gloo group
(started by torchrun) give, on every rank, exactly what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import TL_MAJOR, assert_close
from tests.properties import distributed_worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo backend"
)
ONCE_ON_TL2 = pytest.mark.skipif(
    TL_MAJOR >= 4, reason="the engines' sharding runs once, on TransformerLens 2; TransformerLens 4 runs tl-patch"
)

ROOT = Path(__file__).resolve().parents[2]
APPROXIMATE = {"gpt2 attr_patch", "gqa attr_patch"}
"""Attribution with its default chunks: one chunk of 3 prompts in one process, 2 and 1 across
two ranks, so the sums are done in another order (equal to 1e-5); with the same chunks
(`chunked` calls) the results are equal bit for bit."""


def torchrun(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 <args>` from the repository root, on one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    torchrun("-m", "tests.properties.distributed_worker", str(out))
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def one_process() -> dict:
    return distributed_worker.results()


def flat(result, name: str) -> dict[str, torch.Tensor]:
    if isinstance(result, dict):
        return {f"{name}/{key}": value for key, value in result.items()}
    return {name: result}


@ONCE_ON_TL2
def test_every_rank_gets_exactly_the_one_process_result(ranks, one_process):
    assert [saved["world_size"] for saved in ranks] == [2, 2]
    assert set(one_process) == set(ranks[0]["results"]) == set(ranks[1]["results"])
    for name, expected in one_process.items():
        for rank, saved in enumerate(ranks):
            for key, value in flat(saved["results"][name], name).items():
                wanted = flat(expected, name)[key]
                if name in APPROXIMATE:
                    assert_close(value, wanted)
                else:
                    assert torch.equal(value, wanted), (rank, key, (value - wanted).abs().max())


@ONCE_ON_TL2
def test_the_ranks_share_the_passes(ranks):
    """4 circuits, one per pass: each rank runs 2 of the 4 passes. Attribution over 3 prompts,
    one per chunk: every rank runs the new input once, then rank 0 takes chunks 0 and 2 and
    rank 1 chunk 1, two passes per chunk (7 passes in one process)."""
    assert [saved["passes"] for saved in ranks] == [
        {"circuits": 2, "attribution": 5},
        {"circuits": 2, "attribution": 3},
    ]


@ONCE_ON_TL2
def test_ranks_making_different_calls_are_told(ranks):
    for saved in ranks:
        assert "every rank must make the same call, but rank 1 of 2 built a different plan" in saved["mismatched"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tok) -> Path:
    """A random 4-layer GPT-2-shaped Hugging Face model with the SmolLM2 tokenizer, saved to a folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=len(tok), n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def findings(folder: Path) -> dict[str, object]:
    """Every value in results.json's steps by its path, without what depends on timing."""
    leaves: dict[str, object] = {}

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if "seconds" not in key:
                    walk(item, f"{path}/{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")
        else:
            leaves[path] = value

    for step in json.loads((folder / "results.json").read_text())["steps"]:
        walk(step, step["key"])
    return leaves


ATTRIBUTION_STEPS = ("attr_neurons", "circuit")
"""Steps whose estimates come from gradient passes: across 2 ranks their 4 prompts run in 2
chunks (one in one process), so these agree to float rounding; every other step is exact."""


@pytest.mark.skipif(TL_MAJOR < 4, reason="the tl-patch run under torchrun is checked once, on TransformerLens 4")
def test_tl_patch_ioi_under_torchrun_writes_one_report(tmp_path, model_folder):
    options = [
        "ioi",
        "--model",
        str(model_folder),
        "--n-prompts",
        "4",
        "--top-k",
        "2",
        "--top-neurons",
        "4",
        "--circuit-candidates",
        "5",
        "--quiet",
    ]
    shared = torchrun("-m", "transformer_lens_patching", *options, "--out", str(tmp_path / "two"))
    assert shared.stdout.count("Wrote ") == 1 and "; 2 processes" in shared.stdout, shared.stdout
    written = sorted(path.name for path in (tmp_path / "two").iterdir())
    assert written == ["circuit.json", "edge_scores.json", "report.html", "results.csv", "results.json"]
    alone = subprocess.run(
        [sys.executable, "-m", "transformer_lens_patching", *options, "--out", str(tmp_path / "one")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    two, one = findings(tmp_path / "two"), findings(tmp_path / "one")
    assert two.keys() == one.keys()
    for path, value in one.items():
        if path.startswith(ATTRIBUTION_STEPS) and isinstance(value, float):
            assert two[path] == pytest.approx(value, rel=1e-5, abs=1e-6), path
        else:
            assert two[path] == value, path
