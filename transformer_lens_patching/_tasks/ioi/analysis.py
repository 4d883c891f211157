"""The IOI analysis of the IOI paper and the prior art's notebook, on any model, as data.

`run_ioi(model, settings)` measures the clean and corrupted logit differences, patches
every head and every residual-stream position (denoising), path-patches every head to
the logits (noising), and then follows the circuit back: into the queries of the heads
that step found (the name movers), and into the values of the heads that feed those
queries (the S-inhibition heads). Heads are chosen from the results, never from a list.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ... import _tl
from ..._core.nodes import IterNode, Node
from ..._core.plan import PatchPlan
from ..._methods.activation import act_patch, plan_act_patch
from ..._methods.path import path_patch, plan_path_patch
from ...errors import PatchingError
from ...metrics import LogitDiff, calibrate, denoising_metric, noising_metric
from ...results import PatchResult
from .dataset import IOIDataset

WORDS = ("S1", "S1+1", "IO", "punct", "S2", "end")
"""The word positions of the residual-stream sweep."""
HEAD_COMPONENTS = ["z", "q", "k", "v", "pattern"]
"""What the every-head step patches."""
WORD_COMPONENTS = ["resid_pre", "attn_out", "mlp_out"]
"""What the by-word step patches."""


@dataclass(frozen=True)
class IOISettings:
    """What `run_ioi` runs on.

    Args:
        n_prompts: Number of IOI prompts.
        seed: Seed of the dataset.
        prompt_type: "mixed", "ABBA" or "BABA".
        prepend_bos: Start every prompt with BOS.
        corruption: How the corrupted prompts are made from the clean ones (an
            `IOIDataset.flipped` rule); the default replaces every name by a random one
            (the IOI paper's ABC dataset).
        top_k: Heads taken from each step into the next.
        batch_size: Variants per forward pass (None: automatic).
    """

    n_prompts: int = 8
    seed: int = 0
    prompt_type: str = "mixed"
    prepend_bos: bool = False
    corruption: str = "ABB->XYZ, BAB->XYZ"
    top_k: int = 3
    batch_size: int | None = None


@dataclass(frozen=True)
class TopHead:
    """A head picked from a step's results, with its effect."""

    layer: int
    head: int
    value: float

    def __str__(self) -> str:
        return f"{self.layer}.{self.head} ({self.value:+.1%})"


@dataclass
class Step:
    """One experiment of the analysis: its results, the heads it found and what they mean."""

    key: str
    title: str
    description: str
    results: dict[str, PatchResult]
    top: dict[str, list[TopHead]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class IOIAnalysis:
    """Everything `run_ioi` measured, ready for a report."""

    settings: IOISettings
    model_name: str
    dataset: IOIDataset
    corrupted: IOIDataset
    clean_logit_diff: torch.Tensor
    corrupted_logit_diff: torch.Tensor
    steps: list[Step]
    seconds: float

    def step(self, key: str) -> Step:
        """The step called `key`."""
        for step in self.steps:
            if step.key == key:
                return step
        raise PatchingError(f"No step {key!r}; steps: {[s.key for s in self.steps]}.")


def top_heads(result: PatchResult, k: int, sign: int) -> list[TopHead]:
    """The `k` heads of a (layer, head) result with the largest effect of `sign` (-1: most
    negative first; +1: most positive first); heads with no effect of that sign are left out.

    >>> r = PatchResult(torch.tensor([[0.0, -0.5], [0.2, -0.1]]), ("layer", "head"))
    >>> [str(h) for h in top_heads(r, 2, -1)]
    ['0.1 (-50.0%)', '1.1 (-10.0%)']
    """
    values = result.permute_dims("layer", "head").as_tensor() * sign
    flat = values.flatten()
    order = flat.argsort(descending=True)[:k]
    layers, heads = result.coords["layer"], result.coords["head"]
    n_heads = len(heads)
    return [
        TopHead(layers[int(i) // n_heads], heads[int(i) % n_heads], float(flat[i]) * sign)
        for i in order
        if flat[i] > 0
    ]


def _word_sweep(dataset: IOIDataset, word: str) -> IterNode:
    """The by-word step's sweep at one word of every prompt."""
    return IterNode(WORD_COMPONENTS, seq_pos=dataset.word_idx[word])


def _receiver_nodes(shape, receivers: list[TopHead], component: str) -> list[Node]:
    """`component` of each receiver head: of the key/value head it shares on a grouped-query model."""
    grouped = component in ("k", "v") and shape.n_kv_heads != shape.n_heads
    group = shape.n_heads // shape.n_kv_heads
    return sorted({Node(component, h.layer, head=h.head // group if grouped else h.head) for h in receivers}, key=repr)


def _earlier_heads(receivers: list[TopHead]) -> IterNode:
    """Every head before the last receiver's layer: the senders into the receivers."""
    return IterNode("z", layers=range(max(h.layer for h in receivers)))


def _by_word(model, orig, new, metric, dataset: IOIDataset, **options) -> dict[str, PatchResult]:
    """Residual stream, attention and MLP outputs patched at each word of `WORDS`:
    one (seq_pos, layer) result per component, seq_pos labelled by word."""
    per_word = {
        word: act_patch(model, orig, _word_sweep(dataset, word), metric, new_input=new, **options) for word in WORDS
    }
    results = {}
    for component in WORD_COMPONENTS:
        stacked = torch.stack([per_word[word][component].as_tensor() for word in WORDS])
        layers = per_word[WORDS[0]][component].coords["layer"]
        results[component] = PatchResult(stacked, ("seq_pos", "layer"), {"seq_pos": WORDS, "layer": layers})
    return results


class _Experiment:
    """The model, prompts, metrics and options every step shares, and the steps run so far."""

    def __init__(self, model, dataset: IOIDataset, corrupted: IOIDataset, restored, damaged, options: dict, log):
        self.model, self.shape = model, _tl.model_shape(model)
        self.dataset, self.clean, self.corrupted = dataset, dataset.toks, corrupted.toks
        self.restored, self.damaged = restored, damaged
        self.options, self.log = options, log
        self.steps: list[Step] = []

    def record(self, step: Step, run: Callable[[], dict[str, PatchResult]]) -> Step:
        began = time.perf_counter()
        step.results = run()
        step.seconds = time.perf_counter() - began
        self.steps.append(step)
        return step

    def report(self, step: Step) -> None:
        parts = [f"{name}: {', '.join(map(str, heads)) or 'none'}" for name, heads in step.top.items()]
        self.log(f"{step.title} ({step.seconds:.0f} s): " + "; ".join(parts))

    def heads(self, top_k: int) -> None:
        step = self.record(
            Step("act_heads", "Activation patching: every head",
                 "Each head's output (z), query, key, value and attention pattern, at all positions, patched from "
                 "the clean run into the corrupted run. Values: fraction of the clean logit difference restored.",
                 {}),
            lambda: act_patch(self.model, self.corrupted, IterNode(HEAD_COMPONENTS), self.restored,
                              new_input=self.clean, **self.options),
        )  # fmt: skip
        step.top["restoring heads (z)"] = top_heads(step.results["z"], top_k, +1)
        self.report(step)

    def words(self) -> None:
        self.record(
            Step("act_words", "Activation patching: residual stream, attention and MLP outputs by word",
                 "The residual stream entering each layer, and each layer's attention and MLP output, patched at "
                 "one word of every prompt (S1, the token after it, IO, the punctuation ending the first clause, "
                 "S2 and the end), clean into corrupted. Values: fraction of the clean logit difference restored.",
                 {}),
            lambda: _by_word(self.model, self.corrupted, self.clean, self.restored, self.dataset, **self.options),
        )  # fmt: skip

    def into_logits(self, top_k: int) -> list[TopHead]:
        last = self.shape.n_layers - 1
        step = self.record(
            Step("path_logits", "Path patching: every head -> logits",
                 f"Each head's output, corrupted, reaching the final residual stream (resid_post {last}) only "
                 "directly (other heads frozen, MLPs recomputed), in the clean run. Values: change of the logit "
                 "difference as a fraction of clean - corrupted (0: no effect, -100%: as corrupted).", {}),
            lambda: path_patch(self.model, self.clean, self.corrupted, IterNode("z"), Node("resid_post", last),
                               self.damaged, **self.options),
        )  # fmt: skip
        movers = top_heads(step.results["z"], top_k, -1)
        step.top["name movers (lower the logit diff)"] = movers
        step.top["negative name movers (raise it)"] = top_heads(step.results["z"], top_k, +1)
        self.report(step)
        return movers

    def into_heads(self, receivers: list[TopHead], component: str, key: str, what: str, found: str,
                   top_k: int) -> list[TopHead]:  # fmt: skip
        """Path patching from every earlier head into `component` of the `receivers`; returns
        the heads that lower the logit difference most (none when no receiver has earlier
        heads)."""
        title = f"Path patching: every earlier head -> {what}"
        if not any(head.layer > 0 for head in receivers):
            found_before = ", ".join(f"{h.layer}.{h.head}" for h in receivers) or "none"
            reason = f"Skipped: no head found by the previous step ({found_before}) has earlier heads to receive from."
            self.steps.append(Step(key, title, reason, {}))
            self.log(f"{title}: {reason}")
            return []
        receivers = [head for head in receivers if head.layer > 0]
        nodes = _receiver_nodes(self.shape, receivers, component)
        names = ", ".join(f"{h.layer}.{h.head}" for h in receivers)
        grouped = component in ("k", "v") and self.shape.n_kv_heads != self.shape.n_heads
        note = " (on this grouped-query model, the key/value head each receiver shares)" if grouped else ""
        senders = _earlier_heads(receivers)
        step = self.record(
            Step(key, title,
                 f"Each earlier head's output, corrupted, reaching the {component} of heads {names}{note} only "
                 "directly, in the clean run. Values: change of the logit difference as a fraction of "
                 "clean - corrupted.", {}),
            lambda: path_patch(self.model, self.clean, self.corrupted, senders, nodes, self.damaged, **self.options),
        )  # fmt: skip
        step.top[found] = top_heads(step.results["z"], top_k, -1)
        self.report(step)
        return step.top[found]


def _datasets(model, settings: IOISettings) -> tuple[IOIDataset, IOIDataset]:
    """The clean IOI prompts and their corrupted copies."""
    dataset = IOIDataset(
        settings.prompt_type, settings.n_prompts, tokenizer=model, seed=settings.seed,
        prepend_bos=settings.prepend_bos, device=_tl.model_device(model),
    )  # fmt: skip
    return dataset, dataset.flipped(settings.corruption)


def plan_ioi(model, settings: IOISettings = IOISettings()) -> list[tuple[str, PatchPlan]]:
    """The plan of each patching call `run_ioi` makes, with nothing run (for `tl-patch ioi --dry-run`).

    The later path-patching steps receive at the heads the earlier ones find; they are
    planned here with `top_k` receivers in the last layer, the most work they can take.

    >>> for step, plan in plan_ioi(model):  # doctest: +SKIP
    ...     print(step, plan)
    """
    dataset, corrupted = _datasets(model, settings)
    clean, corrupt, shape = dataset.toks, corrupted.toks, _tl.model_shape(model)
    metric = LogitDiff(dataset.answers, dataset.word_idx["end"])
    options = {"batch_size": settings.batch_size}
    last = shape.n_layers - 1
    every_head = plan_act_patch(model, corrupt, IterNode(HEAD_COMPONENTS), metric, new_input=clean, **options)
    plans = [("act_heads", every_head)]
    plans += [
        (f"act_words at {word}", plan_act_patch(model, corrupt, _word_sweep(dataset, word), metric, new_input=clean,
                                                **options))  # fmt: skip
        for word in WORDS
    ]
    receiver = Node("resid_post", last)
    plans.append(("path_logits", plan_path_patch(model, clean, corrupt, IterNode("z"), receiver, metric, **options)))
    if last > 0:
        heads = [TopHead(last, head, 0.0) for head in range(min(settings.top_k, shape.n_heads))]
        for key, component in (("path_queries", "q"), ("path_values", "v")):
            nodes = _receiver_nodes(shape, heads, component)
            plan = plan_path_patch(model, clean, corrupt, _earlier_heads(heads), nodes, metric, **options)
            plans.append((f"{key} (at most: receivers in the last layer)", plan))
    return plans


def run_ioi(
    model, settings: IOISettings = IOISettings(), model_name: str = "", progress: bool = True, log: Callable = print
) -> IOIAnalysis:
    """Run the IOI analysis on `model`; `log` receives one line per step.

    >>> analysis = run_ioi(load_smollm2(), IOISettings(n_prompts=8))  # doctest: +SKIP
    >>> [str(h) for h in analysis.step("path_logits").top["name movers (lower the logit diff)"]]  # doctest: +SKIP
    """
    start = time.perf_counter()
    dataset, corrupted = _datasets(model, settings)
    logit_diff = LogitDiff(dataset.answers, dataset.word_idx["end"])
    per_prompt = LogitDiff(dataset.answers, dataset.word_idx["end"], per_prompt=True)
    clean_ld, corrupted_ld = calibrate(model, per_prompt, dataset.toks, corrupted.toks)
    log(f"Logit difference (IO - S at the end): clean {clean_ld.mean():.3f}, corrupted {corrupted_ld.mean():.3f}")
    experiment = _Experiment(
        model, dataset, corrupted,
        restored=denoising_metric(logit_diff, clean_ld.mean(), corrupted_ld.mean()),
        damaged=noising_metric(logit_diff, clean_ld.mean(), corrupted_ld.mean()),
        options={"verbose": progress, "batch_size": settings.batch_size}, log=log,
    )  # fmt: skip
    experiment.heads(settings.top_k)
    experiment.words()
    movers = experiment.into_logits(settings.top_k)
    inhibitors = experiment.into_heads(movers, "q", "path_queries", "the name movers' queries", "S-inhibition heads",
                                       settings.top_k)  # fmt: skip
    experiment.into_heads(inhibitors, "v", "path_values", "the S-inhibition heads' values", "heads writing into them",
                          settings.top_k)  # fmt: skip
    return IOIAnalysis(
        settings, model_name, dataset, corrupted, clean_ld.cpu(), corrupted_ld.cpu(), experiment.steps,
        time.perf_counter() - start,
    )  # fmt: skip
