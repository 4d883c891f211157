"""The IOI analysis of the IOI paper and the prior art's notebook, on any model, as data.

`run_ioi(model, settings)` measures the clean and corrupted logit differences, patches
every head and every residual-stream position (denoising), path-patches every head to
the logits (noising), and then follows the circuit back: into the queries of the heads
that step found (the name movers), and into the values of the heads that feed those
queries (the S-inhibition heads). Heads are chosen from the results, never from a list.
It screens every MLP neuron with attribution patching and patches the strongest exactly
(`confirm`): exact sweeps of every neuron would take thousands of times longer. Last, it
scores every edge, evaluates circuits of growing size exactly and picks one
(`circuit_step`).
"""

import contextlib
import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ... import _tl
from ..._core.components import hook_name
from ..._core.nodes import IterNode, Node
from ..._core.plan import PatchPlan
from ..._methods.activation import plan_act_patch
from ..._methods.attribution import attr_patch
from ..._methods.confirmation import Confirmation, confirm
from ..._methods.path import plan_path_patch
from ..._methods.path_rules import nonlinear_writes
from ...errors import PatchingError
from ...metrics import LogitDiff, calibrate, denoising_metric, noising_metric
from ...results import PatchResult
from . import circuit_step
from .circuit_step import CircuitFinding
from .dataset import IOIDataset

WORDS = ("S1", "S1+1", "IO", "punct", "S2", "end")
"""The word positions of the residual-stream sweep."""
HEAD_COMPONENTS = ["z", "q", "k", "v", "pattern"]
"""What the every-head step patches."""
WORD_COMPONENTS = ["resid_pre", "attn_out", "mlp_out"]
"""What the by-word step patches."""
NEURONS = "post"
"""What the neuron step screens: each MLP neuron's activation after the nonlinearity (for a
gated MLP, the gate's activation times the linear branch), the coefficient of the neuron's
output weights, so that it carries everything the neuron writes. `pre` would miss a gated
MLP's linear branch, and its first-order estimate would have to cross the nonlinearity."""
SCREEN_PASSES = 4
"""The neuron screen's work in forward passes of the prompts, for the time estimate: the
clean run patched from, and the corrupted run's forward and backward pass (a backward
costs about two forwards)."""
STEP_KEYS = ("act_heads", "act_words", "path_logits", "path_queries", "path_values", "attr_neurons", "circuit")
"""The steps of the analysis that patch, in the order they run (after the logit differences)."""
STEP_COUNT = 1 + len(STEP_KEYS)
"""Steps as the progress headers count them: the logit differences, then `STEP_KEYS`."""


@dataclass(frozen=True)
class IOISettings:
    """What `run_ioi` runs on.

    Args:
        n_prompts: Number of IOI prompts (the circuit step scores edges on half of them and measures
            faithfulness on the other half).
        seed: Seed of the dataset.
        prompt_type: "mixed", "ABBA" or "BABA".
        prepend_bos: Start every prompt with BOS.
        corruption: How the corrupted prompts are made from the clean ones (an
            `IOIDataset.flipped` rule); the default replaces every name by a random one
            (the IOI paper's ABC dataset).
        top_k: The most heads taken from each step into the next.
        min_effect: The smallest effect a head needs to be listed and taken into the next
            step, as a fraction of the clean - corrupted logit difference (the scale of every
            step's values): heads at noise level are not given a role.
        batch_size: Variants per forward pass (None: automatic).
        top_neurons: The MLP neurons the neuron step patches exactly: those whose effect
            attribution patching estimates largest in size.
        circuit_candidates: The edges the circuit step scores exactly: the strongest by EAP-IG.
        circuit_faithfulness: The faithfulness the circuit step's circuit must reach: it is the
            smallest of MIB's circuit sizes that does, on the best ranking.
    """

    n_prompts: int = 8
    seed: int = 0
    prompt_type: str = "mixed"
    prepend_bos: bool = False
    corruption: str = "ABB->XYZ, BAB->XYZ"
    top_k: int = 3
    min_effect: float = 0.05
    batch_size: int | None = None
    top_neurons: int = 20
    circuit_candidates: int = 50
    circuit_faithfulness: float = 0.8


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
    confirmation: Confirmation | None = None
    """For the neuron step: the strongest neurons by estimate, each patched exactly."""
    circuit: CircuitFinding | None = None
    """For the circuit step: the faithfulness curves and the circuit found."""


@dataclass
class IOIAnalysis:
    """Everything `run_ioi` measured, ready for a report; while it runs, the steps done so far."""

    settings: IOISettings
    model_name: str
    dataset: IOIDataset
    corrupted: IOIDataset
    clean_logit_diff: torch.Tensor
    corrupted_logit_diff: torch.Tensor
    steps: list[Step]
    seconds: float
    model_source: str = ""
    """Where the model's weights came from (e.g. the embedded SmolLM2 is a dequantised 4-bit GGUF)."""
    versions: dict[str, str] = field(default_factory=dict)
    """The versions of the library, TransformerLens, torch and Python that ran the analysis."""
    estimated_seconds: float | None = None
    """The time the plans predicted for the patching steps (at most: later steps at their upper bound)."""

    def step(self, key: str) -> Step:
        """The step called `key`."""
        for step in self.steps:
            if step.key == key:
                return step
        raise PatchingError(f"No step {key!r}; steps: {[s.key for s in self.steps]}.")

    @property
    def missing_steps(self) -> list[str]:
        """The steps of `STEP_KEYS` not run (yet): those after an interruption or a failure."""
        done = {step.key for step in self.steps}
        return [key for key in STEP_KEYS if key not in done]


def top_heads(result: PatchResult, k: int, sign: int, min_effect: float = 0.0) -> list[TopHead]:
    """The `k` heads of a (layer, head) result with the largest effect of `sign` (-1: most
    negative first; +1: most positive first); heads with no effect of that sign, or with
    an effect smaller than `min_effect` in size, are left out.

    >>> r = PatchResult(torch.tensor([[0.0, -0.5], [0.2, -0.1]]), ("layer", "head"))
    >>> [str(h) for h in top_heads(r, 2, -1)]
    ['0.1 (-50.0%)', '1.1 (-10.0%)']
    >>> [str(h) for h in top_heads(r, 2, -1, min_effect=0.2)]
    ['0.1 (-50.0%)']
    """
    values = result.permute_dims("layer", "head").as_tensor() * sign
    flat = values.flatten()
    order = flat.argsort(descending=True)[:k]
    layers, heads = result.coords["layer"], result.coords["head"]
    n_heads = len(heads)
    return [
        TopHead(layers[int(i) // n_heads], heads[int(i) % n_heads], float(flat[i]) * sign)
        for i in order
        if flat[i] > 0 and flat[i] >= min_effect
    ]


def _receiver_nodes(shape, receivers: list[TopHead], component: str) -> list[Node]:
    """`component` of each receiver head: of the key/value head it shares on a grouped-query model."""
    grouped = component in ("k", "v") and shape.n_kv_heads != shape.n_heads
    group = shape.n_heads // shape.n_kv_heads
    return sorted({Node(component, h.layer, head=h.head // group if grouped else h.head) for h in receivers}, key=repr)


class _Plans:
    """The patching calls of the analysis as plans: the model, prompts, metric and batch size they share."""

    def __init__(self, model, dataset: IOIDataset, corrupted: IOIDataset, batch_size: int | None):
        self.model, self.shape, self.dataset = model, _tl.model_shape(model), dataset
        self.clean, self.corrupted = dataset.toks, corrupted.toks
        self.options = {"batch_size": batch_size}
        reason = nonlinear_writes(model)
        self.no_paths = None if reason is None else f"Skipped: {reason}; path patching refuses it."
        """Why path patching cannot run on this model (post-norm blocks), or None."""

    def heads(self, metric) -> PatchPlan:
        """Every head's z, q, k, v and pattern, clean into corrupted."""
        return plan_act_patch(
            self.model, self.corrupted, IterNode(HEAD_COMPONENTS), metric, new_input=self.clean, **self.options
        )

    @property
    def word_components(self) -> list[str]:
        """`WORD_COMPONENTS` that the model has (no `mlp_out` without MLPs)."""
        return [name for name in WORD_COMPONENTS if self.shape.has_mlps or name != "mlp_out"]

    def words(self, metric) -> dict[str, PatchPlan]:
        """The residual stream, attention and MLP outputs at each word of `WORDS`, clean into corrupted."""
        return {
            word: plan_act_patch(
                self.model,
                self.corrupted,
                IterNode(self.word_components, seq_pos=self.dataset.word_idx[word]),
                metric,
                new_input=self.clean,
                **self.options,
            )
            for word in WORDS
        }

    def neuron_estimates(self, metric) -> dict[str, PatchResult]:
        """Every MLP neuron, clean into corrupted, estimated by attribution patching (AtP)."""
        return attr_patch(self.model, self.corrupted, IterNode(NEURONS), metric, new_input=self.clean)

    def confirmed_neurons(self, estimates: dict[str, PatchResult], metric, top_k: int, progress) -> Confirmation:
        """The `top_k` neurons of `estimates` with the largest estimated effect, patched exactly."""
        return confirm(
            self.model,
            estimates,
            self.corrupted,
            IterNode(NEURONS),
            metric,
            new_input=self.clean,
            top_k=top_k,
            progress=progress,
            **self.options,
        )

    def upper_bound_confirmation(self, metric, top_k: int) -> PatchPlan:
        """`top_k` neurons in the first layer (at most all of its neurons): the confirmation's
        most work, as each of its passes starts at the first layer it patches."""
        neurons = list(range(min(top_k, self.shape.d_mlp)))
        return plan_act_patch(
            self.model,
            self.corrupted,
            IterNode(NEURONS, layers=[0], neurons=neurons),
            metric,
            new_input=self.clean,
            **self.options,
        )

    def into_logits(self, metric) -> PatchPlan:
        """Every head -> the final residual stream, corrupted into clean."""
        receiver = Node("resid_post", self.shape.n_layers - 1)
        return plan_path_patch(self.model, self.clean, self.corrupted, IterNode("z"), receiver, metric, **self.options)

    def into_heads(self, receivers: list[TopHead], component: str, metric) -> PatchPlan:
        """Every head before the last receiver's layer -> `component` of the receivers."""
        senders = IterNode("z", layers=range(max(h.layer for h in receivers)))
        nodes = _receiver_nodes(self.shape, receivers, component)
        return plan_path_patch(self.model, self.clean, self.corrupted, senders, nodes, metric, **self.options)

    def upper_bound_receivers(self, top_k: int) -> list[TopHead]:
        """`top_k` heads in the last layer: the receivers that give a later path step the most work."""
        last = self.shape.n_layers - 1
        return [TopHead(last, head, 0.0) for head in range(min(top_k, self.shape.n_heads))]


def _all_plans(
    plans: _Plans, metric, top_k: int, top_neurons: int, circuit_candidates: int
) -> list[tuple[str, PatchPlan]]:
    """(step, plan) of every patching call, the later path steps and the neurons' confirmation
    at their upper bound (the neuron and edge screens have no plan: see `SCREEN_PASSES`)."""
    steps = [("act_heads", plans.heads(metric))]
    steps += [(f"act_words at {word}", plan) for word, plan in plans.words(metric).items()]
    if plans.no_paths is None:
        steps.append(("path_logits", plans.into_logits(metric)))
    if plans.no_paths is None and plans.shape.n_layers > 1:
        receivers = plans.upper_bound_receivers(top_k)
        for key, component in (("path_queries", "q"), ("path_values", "v")):
            plan = plans.into_heads(receivers, component, metric)
            steps.append((f"{key} (at most: receivers in the last layer)", plan))
    if _has_neurons(plans.shape):
        plan = plans.upper_bound_confirmation(metric, top_neurons)
        steps.append(("attr_neurons, exact patching of the strongest (at most: neurons in the first layer)", plan))
    if circuit_step.supported(plans.model, plans.clean.shape[0]):
        steps += circuit_step.circuit_plans(
            plans.model, plans.clean, plans.corrupted, metric, circuit_candidates, plans.options["batch_size"]
        )
    return steps


def _by_word(per_word: dict[str, dict[str, PatchResult]]) -> dict[str, PatchResult]:
    """One (seq_pos, layer) result per component from the by-word step's results at each word."""
    results = {}
    for component in per_word[WORDS[0]]:
        stacked = torch.stack([per_word[word][component].as_tensor() for word in WORDS])
        layers = per_word[WORDS[0]][component].coords["layer"]
        results[component] = PatchResult(stacked, ("seq_pos", "layer"), {"seq_pos": WORDS, "layer": layers})
    return results


def _heads_list(heads: list[TopHead]) -> str:
    """'23.3, 29.1'."""
    return ", ".join(f"{h.layer}.{h.head}" for h in heads)


class _Experiment:
    """The plans, the metrics and the analysis so far; each step runs, is recorded and reported."""

    def __init__(
        self, plans: _Plans, analysis: IOIAnalysis, restored, damaged, progress: bool, log, on_step, began: float
    ):
        self.plans, self.analysis = plans, analysis
        self.restored, self.damaged = restored, damaged
        self.progress, self.log, self.on_step = progress, log, on_step
        self.settings = analysis.settings
        self.began = began

    def header(self, what: str) -> str:
        """Log the header of the next step; returns its label for progress bars ("step 2/7")."""
        number = 2 + len(self.analysis.steps)
        self.log(f"step {number}/{STEP_COUNT}: {what}")
        return f"step {number}/{STEP_COUNT}"

    def run(self, plan: PatchPlan, label: str):
        return plan.compute(progress=label if self.progress else False)

    def record(self, step: Step, began: float) -> Step:
        step.seconds = time.perf_counter() - began
        self.analysis.steps.append(step)
        self.analysis.seconds = time.perf_counter() - self.began
        parts = [f"{name}: {', '.join(map(str, heads)) or 'none'}" for name, heads in step.top.items()]
        if step.confirmation is not None:
            parts.append(_confirmation_line(step.confirmation))
        if not step.results:
            self.log(f"  {step.description}")
        else:
            self.log(f"  {step.title} ({step.seconds:.0f} s)" + (": " + "; ".join(parts) if parts else ""))
        if self.on_step is not None:
            self.on_step(self.analysis)
        return step

    def top(self, result: PatchResult, sign: int) -> list[TopHead]:
        return top_heads(result, self.settings.top_k, sign, self.settings.min_effect)

    def heads(self) -> None:
        shape = self.plans.shape
        label = self.header(
            f"activation patching of {', '.join(HEAD_COMPONENTS)} for {shape.n_layers * shape.n_heads} heads"
        )
        began = time.perf_counter()
        step = Step(
            "act_heads",
            "Activation patching: every head",
            "Each head's output (z), query, key, value and attention pattern, at all positions, patched from "
            "the clean run into the corrupted run. Values: fraction of the clean logit difference restored.",
            self.run(self.plans.heads(self.restored), label),
        )
        step.top["restoring heads (z: raise the logit diff)"] = self.top(step.results["z"], +1)
        step.top["opposing heads (z: lower it)"] = self.top(step.results["z"], -1)
        self.record(step, began)

    def words(self) -> None:
        label = self.header(
            f"activation patching of {', '.join(self.plans.word_components)} at {len(WORDS)} words "
            f"({', '.join(WORDS)}) x {self.plans.shape.n_layers} layers"
        )
        began = time.perf_counter()
        per_word = {
            word: self.run(plan, f"{label} at {word}") for word, plan in self.plans.words(self.restored).items()
        }
        self.record(
            Step(
                "act_words",
                "Activation patching: residual stream, attention and MLP outputs by word",
                "The residual stream entering each layer, and each layer's attention and MLP output, patched at "
                "one word of every prompt (S1, the token after it, IO, the punctuation ending the first clause, "
                "S2 and the end), clean into corrupted. Values: fraction of the clean logit difference restored.",
                _by_word(per_word),
            ),
            began,
        )

    def into_logits(self) -> list[TopHead]:
        shape = self.plans.shape
        label = self.header(f"path patching of {shape.n_layers * shape.n_heads} heads -> logits")
        began = time.perf_counter()
        if self.plans.no_paths is not None:
            self.record(Step("path_logits", "Path patching: every head -> logits", self.plans.no_paths, {}), began)
            return []
        step = Step(
            "path_logits",
            "Path patching: every head -> logits",
            f"Each head's output, corrupted, reaching the final residual stream (resid_post "
            f"{shape.n_layers - 1}) only directly (other heads frozen, MLPs recomputed), in the clean run. "
            "Values: change of the logit difference as a fraction of clean - corrupted (0: no effect, "
            "-100%: as corrupted).",
            self.run(self.plans.into_logits(self.damaged), label),
        )
        movers = step.top["name movers (lower the logit diff)"] = self.top(step.results["z"], -1)
        step.top["negative name movers (raise it)"] = self.top(step.results["z"], +1)
        self.record(step, began)
        return movers

    def _skip_reason(self, receivers: list[TopHead]) -> str:
        """Why a path step back from `receivers` (the heads the previous step found) cannot run."""
        if not self.analysis.steps[-1].results:
            return "Skipped: the previous step was skipped."
        if not receivers:
            return (
                f"Skipped: the previous step found no head with an effect of at least {self.settings.min_effect:.0%}."
            )
        return (
            f"Skipped: no head found by the previous step ({_heads_list(receivers)}) has earlier heads to receive from."
        )

    def into_heads(self, receivers: list[TopHead], component: str, key: str, what: str, found: str) -> list[TopHead]:
        """Path patching from every earlier head into `component` of the `receivers`; returns
        the heads that lower the logit difference most (none when no receiver has earlier
        heads)."""
        title = f"Path patching: every earlier head -> {what}"
        reachable = [head for head in receivers if head.layer > 0]
        label = self.header(
            f"path patching of every earlier head -> {what}" + (f" ({_heads_list(reachable)})" if reachable else "")
        )
        began = time.perf_counter()
        if not reachable:
            self.record(Step(key, title, self._skip_reason(receivers), {}), began)
            return []
        grouped = component in ("k", "v") and self.plans.shape.n_kv_heads != self.plans.shape.n_heads
        note = " (on this grouped-query model, the key/value head each receiver shares)" if grouped else ""
        step = Step(
            key,
            title,
            f"Each earlier head's output, corrupted, reaching the {component} of heads "
            f"{_heads_list(reachable)}{note} only directly, in the clean run. Values: change of the logit "
            "difference as a fraction of clean - corrupted.",
            self.run(self.plans.into_heads(reachable, component, self.damaged), label),
        )
        step.top[found] = self.top(step.results["z"], -1)
        self.record(step, began)
        return step.top[found]

    def neurons(self) -> None:
        """Attribution patching of every MLP neuron, then exact patching of the strongest."""
        shape, top_k = self.plans.shape, self.settings.top_neurons
        title = "Attribution patching: every MLP neuron, the strongest patched exactly"
        label = self.header(
            f"attribution patching of {shape.n_layers * shape.d_mlp} MLP neurons, then activation "
            f"patching of the {top_k} strongest"
            if _has_neurons(shape)
            else "attribution patching of MLP neurons"
        )
        began = time.perf_counter()
        if not _has_neurons(shape):
            why = (
                "it is a mixture of experts, whose MLP hooks hold the experts' mix"
                if shape.n_experts
                else "it is attention-only"
            )
            self.record(
                Step("attr_neurons", title, f"Skipped: this model has no MLP neurons to patch ({why}).", {}), began
            )
            return
        estimates = self.plans.neuron_estimates(self.restored)
        confirmation = self.plans.confirmed_neurons(estimates, self.restored, top_k, label if self.progress else False)
        description = (
            f"Each MLP neuron's activation ({NEURONS}: after the nonlinearity, the coefficient of its output weights), "
            "at all positions, patched from the clean run into the corrupted run: estimated for every neuron by "
            "attribution patching (AtP: one forward and one backward pass), then the "
            f"{len(confirmation.cells)} with the largest estimated effect patched exactly (activation patching). "
            "Values: fraction of the clean logit difference restored."
        )
        self.record(Step("attr_neurons", title, description, estimates, confirmation=confirmation), began)

    def circuit(self, logit_diff) -> None:
        """Every edge scored, circuits of growing size evaluated exactly, one picked."""
        settings, graph_size = self.settings, len(circuit_step.EdgeGraph.of(self.plans.model))
        title = "Circuit: every edge scored, circuits evaluated exactly"
        self.header(
            f"edge attribution of {graph_size:,} edges, exact scores of the {settings.circuit_candidates} "
            f"strongest, faithfulness curves of {len(circuit_step.METHODS)} rankings"
        )
        began = time.perf_counter()
        why_not = circuit_step.why_not_supported(self.plans.model, self.plans.clean.shape[0])
        if why_not is not None:
            self.record(Step("circuit", title, f"Skipped: {why_not}.", {}), began)
            return
        finding = circuit_step.find_circuit(
            self.plans.model,
            self.plans.clean,
            self.plans.corrupted,
            logit_diff,
            settings.circuit_candidates,
            settings.circuit_faithfulness,
            self.plans.options["batch_size"],
        )
        description = circuit_step.describe(finding, graph_size)
        self.record(Step("circuit", title, description, {}, circuit=finding), began)


def _confirmation_line(confirmation: Confirmation) -> str:
    """'strongest exactly: L3 N1234 (+4.0%), ...; Spearman 0.85 between estimate and exact, top-10 overlap 8 of 10'."""
    strongest = sorted(confirmation.cells, key=lambda cell: -abs(cell.exact_change))[:3]
    cells = ", ".join(f"L{c.coords['layer']} N{c.coords['neuron']} ({c.exact_change:+.1%})" for c in strongest)
    return (
        f"strongest exactly: {cells}; Spearman {confirmation.spearman:.2f} between estimate and exact, "
        f"top-{confirmation.overlap_size} overlap {confirmation.top_k_overlap} of {confirmation.overlap_size}"
    )


def _datasets(model, settings: IOISettings) -> tuple[IOIDataset, IOIDataset]:
    """The clean IOI prompts and their corrupted copies."""
    dataset = IOIDataset(
        settings.prompt_type,
        settings.n_prompts,
        tokenizer=model,
        seed=settings.seed,
        prepend_bos=settings.prepend_bos,
        device=_tl.model_device(model),
    )
    return dataset, dataset.flipped(settings.corruption)


def plan_ioi(model, settings: IOISettings = IOISettings()) -> list[tuple[str, PatchPlan]]:
    """The plan of each patching call `run_ioi` makes, with nothing run (for `tl-patch ioi --dry-run`).

    The later path-patching steps receive at the heads the earlier ones find; they are
    planned here with `top_k` receivers in the last layer, the most work they can take. The
    neuron step's exact patching is planned with `top_neurons` neurons of the first layer,
    likewise its most work; its attribution screen (one forward and one backward pass) has
    no plan.

    >>> for step, plan in plan_ioi(model):  # doctest: +SKIP
    ...     print(step, plan)
    """
    dataset, corrupted = _datasets(model, settings)
    metric = LogitDiff(dataset.answers, dataset.word_idx["end"])
    return _all_plans(
        _Plans(model, dataset, corrupted, settings.batch_size),
        metric,
        settings.top_k,
        settings.top_neurons,
        settings.circuit_candidates,
    )


def versions() -> dict[str, str]:
    """The versions of what runs the analysis: this library, TransformerLens, torch and Python."""
    try:
        library = importlib.metadata.version("transformer_lens_patching")
    except importlib.metadata.PackageNotFoundError:
        library = "not installed"
    return {
        "transformer_lens_patching": library,
        "transformer_lens": _tl.TL_VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class _EndOfLayers(Exception):
    """Raised at the last layer's output: the timed pass need not unembed."""


def _seconds_per_layer(model, tokens: torch.Tensor, copies: int) -> float:
    """The time one layer takes on one copy of `tokens` when `copies` of them are stacked, as
    the plans stack variants: from the residual stream entering the first layer to the one
    leaving the last (the pass stops there), the median of three passes after one that warms up."""
    n_layers = _tl.model_shape(model).n_layers
    marks: list[float] = []

    def mark(activation, hook):
        if activation.is_cuda:
            torch.cuda.synchronize(activation.device)
        marks.append(time.perf_counter())

    def mark_and_stop(activation, hook):
        mark(activation, hook)
        raise _EndOfLayers

    ends = [(hook_name("resid_pre", 0), mark), (hook_name("resid_post", n_layers - 1), mark_and_stop)]
    stacked = tokens.repeat(copies, 1)
    with torch.no_grad(), _tl.hooks(model, ends):
        for _ in range(4):
            with contextlib.suppress(_EndOfLayers):
                _tl.forward_logits(model, stacked)
    timed = sorted(end - start for start, end in zip(marks[2::2], marks[3::2]))
    return timed[1] / (n_layers * copies)


def run_ioi(
    model,
    settings: IOISettings = IOISettings(),
    model_name: str = "",
    progress: bool = True,
    log: Callable = print,
    *,
    model_source: str = "",
    on_step: Callable[[IOIAnalysis], None] | None = None,
) -> IOIAnalysis:
    """Run the IOI analysis on `model`.

    `log` receives a header line before each step ("step 2/7: activation patching of ..."),
    the estimated time of the whole run (from the plans) and a line of findings after each
    step; progress bars are labelled with their step. `on_step` receives the analysis once the
    logit differences are known and after each step, e.g. to save what is finished; if a step
    fails, what it received last holds every step before.

    >>> analysis = run_ioi(load_smollm2(), IOISettings(n_prompts=8))  # doctest: +SKIP
    >>> [str(h) for h in analysis.step("path_logits").top["name movers (lower the logit diff)"]]  # doctest: +SKIP
    """
    start = time.perf_counter()
    dataset, corrupted = _datasets(model, settings)
    log(f"step 1/{STEP_COUNT}: logit differences of {dataset.N} clean and {dataset.N} corrupted prompts")
    logit_diff = LogitDiff(dataset.answers, dataset.word_idx["end"])
    per_prompt = LogitDiff(dataset.answers, dataset.word_idx["end"], per_prompt=True)
    clean_ld, corrupted_ld = calibrate(model, per_prompt, dataset.toks, corrupted.toks)
    log(f"  Logit difference (IO - S at the end): clean {clean_ld.mean():.3f}, corrupted {corrupted_ld.mean():.3f}")
    plans = _Plans(model, dataset, corrupted, settings.batch_size)
    analysis = IOIAnalysis(
        settings,
        model_name,
        dataset,
        corrupted,
        clean_ld.cpu(),
        corrupted_ld.cpu(),
        [],
        0.0,
        model_source=model_source,
        versions=versions(),
    )
    analysis.estimated_seconds = _estimate(plans, logit_diff, settings, dataset.toks, log)
    experiment = _Experiment(
        plans,
        analysis,
        restored=denoising_metric(logit_diff, clean_ld.mean(), corrupted_ld.mean()),
        damaged=noising_metric(logit_diff, clean_ld.mean(), corrupted_ld.mean()),
        progress=progress,
        log=log,
        on_step=on_step,
        began=start,
    )
    if on_step is not None:
        on_step(analysis)
    experiment.heads()
    experiment.words()
    movers = experiment.into_logits()
    inhibitors = experiment.into_heads(movers, "q", "path_queries", "the name movers' queries", "S-inhibition heads")
    experiment.into_heads(inhibitors, "v", "path_values", "the S-inhibition heads' values", "heads writing into them")
    experiment.neurons()
    experiment.circuit(logit_diff)
    analysis.seconds = time.perf_counter() - start
    return analysis


def _has_neurons(shape: _tl.ModelShape) -> bool:
    """Whether the model has MLP neurons: MLPs that are not a mixture of experts."""
    return shape.has_mlps and not shape.n_experts


def screen_layer_evaluations(model, n_prompts: int) -> int:
    """The neuron and edge screens' work in layer evaluations of all `n_prompts` prompts
    (`SCREEN_PASSES` passes of every layer, and `circuit_step.SCREEN_PASSES` of the edges'
    scoring prompts); none for a step that is skipped (the neuron step on a model without MLPs,
    the circuit step where it cannot run)."""
    shape = _tl.model_shape(model)
    neurons = SCREEN_PASSES if _has_neurons(shape) else 0
    scoring = len(circuit_step.split(n_prompts)[0])
    edges = circuit_step.SCREEN_PASSES * scoring / n_prompts if circuit_step.supported(model, n_prompts) else 0
    return round((neurons + edges) * shape.n_layers)


def _estimate(plans: _Plans, metric, settings: IOISettings, tokens: torch.Tensor, log: Callable) -> float:
    """The patching steps' time: the plans' work in layer evaluations, and the neuron screen's,
    times one layer's measured time (the later path steps and the neurons' exact patching at
    their upper bound); logged, and returned in seconds."""
    steps = _all_plans(plans, metric, settings.top_k, settings.top_neurons, settings.circuit_candidates)
    screens = screen_layer_evaluations(plans.model, plans.clean.shape[0])
    work = sum(plan.layer_evaluations for _, plan in steps) + screens
    stacked = max(plan.variants_per_pass for _, plan in steps)
    per_layer = _seconds_per_layer(plans.model, tokens, stacked)
    seconds = work * per_layer
    log(
        f"  Estimated time of the patching, steps 2-{STEP_COUNT}: "
        f"about {_duration(seconds)} ({work:,} layer evaluations, "
        f"{per_layer * 1000:.2f} ms each as measured with {stacked} variants stacked; the path steps back from the "
        "name movers and the neurons' exact patching at their largest)"
    )
    return seconds


def _duration(seconds: float) -> str:
    """'40 s', '7 min', '1 h 20 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
