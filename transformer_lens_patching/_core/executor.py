"""Run one stacked forward pass of a plan: many patched variants of one batch at once."""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import _tl
from .._stats import PromptForm
from .components import residual_hooks
from .measure import MetricCalls
from .memory import release_freed_memory
from .plan import Block, Pass, Session, SessionFactory
from .program import PatchProgram, applied, resid_mid_carries
from .selection import LogitReader, selection_of

AddSteps = Callable[[PatchProgram, int, int], None]
"""`add_steps(program, variant, row_start)` adds one variant's edits at rows `row_start:`."""


def logit_reader(model, metric, tokens: torch.Tensor, d_vocab: int, apply_metric_to_cache: bool) -> LogitReader | None:
    """A reader of the logits `metric` selects, or None when it reads them all (a plain
    function), reads a cache, or hooks on the model's output expect full logits."""
    selection = selection_of(metric)
    if selection is None or apply_metric_to_cache or _tl.output_hooked(model):
        return None
    return LogitReader(model, selection, tokens, d_vocab)


class OrigResiduals:
    """The orig run's residual stream entering each layer (layer n_layers: the final residual
    stream), taken from `known` activations or from one cached run on first use.

    A patched forward pass whose first edit is at layer l starts there from these values:
    the layers before l would compute exactly them again.
    """

    def __init__(self, model, tokens: torch.Tensor, known: Mapping[str, torch.Tensor] | None = None):
        self._model = model
        self._tokens = tokens
        self._known = dict(known or {})
        self._names = residual_hooks(model.cfg.n_layers)

    def __call__(self, layer: int) -> torch.Tensor:
        if self._names[layer] not in self._known:
            _, cache = _tl.run_with_cache(self._model, self._tokens, self._names)
            self._known.update(_tl.cache_items(cache))
        return self._known[self._names[layer]]


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[tqdm | None]:
    """A progress bar over `total` cells, labelled `label` (None for no cells), closed on exit."""
    if total == 0:
        yield None
        return
    with tqdm(total=total, desc=label, leave=False) as bar:
        yield bar


@dataclass
class Executor:
    """Runs the passes of one call: the model, the orig tokens, and how each pass is measured.

    With a `reader`, measured passes stop at the final residual stream and the metric
    receives only the logits it selects; with `apply_metric_to_cache`, it receives each
    variant's ActivationCache (and passes start at layer 0). `full_graph` runs every pass
    from layer 0, so that gradients reach every layer. `replaced_attention` lists layers
    whose attention is not computed: every variant of a pass fills their `hook_attn_out`.
    `cache_names_filter` restricts the hooks cached for a metric that reads the cache.
    """

    model: object
    tokens: torch.Tensor
    residuals: OrigResiduals
    calls: MetricCalls
    reader: LogitReader | None = None
    apply_metric_to_cache: bool = False
    full_graph: bool = False
    progress: tqdm | None = None
    cache_names_filter: Callable[[str], bool] | None = None

    def __post_init__(self):
        self._carries = resid_mid_carries(self.model)
        self._n_layers = self.model.cfg.n_layers
        self._final_residual = residual_hooks(self._n_layers)[-1]

    def run(
        self,
        pass_: Pass,
        add_steps: AddSteps,
        *,
        measured: bool = True,
        stop_when_recorded: bool = False,
        replaced_attention: frozenset[int] = frozenset(),
    ) -> list:
        """Run the variants of `pass_` stacked along the batch and return the metric of each
        (Nones when not `measured`: the pass only records)."""
        model, tokens, n_layers = self.model, self.tokens, self._n_layers
        batch, count = tokens.shape[0], len(pass_.variants)
        cache_metric = measured and self.apply_metric_to_cache
        first = 0 if self.full_graph or cache_metric else pass_.start_layer
        read = measured and self.reader is not None and not cache_metric
        program = PatchProgram(batch, self._carries, first, stop_when_recorded)
        for offset, variant in enumerate(pass_.variants):
            add_steps(program, variant, offset * batch)
        if read and first < n_layers:
            program.stop_at(self._final_residual)
        stacked = tokens.repeat(count, 1) if count > 1 else tokens
        replaced = {layer for layer in replaced_attention if layer >= first}
        entering = self.residuals(first).repeat(count, 1, 1) if first else None
        logits = tensors = None
        with applied(model, program), _tl.attention_replaced(model, replaced):
            if cache_metric:
                _, cache = _tl.run_with_cache(model, stacked, names_filter=self.cache_names_filter)
                tensors = _tl.cache_items(cache)
            elif first == n_layers:
                residual = program.enter(first, entering)
                logits = self.reader(residual) if read else _tl.unembed(model, residual)
            elif first == 0:
                logits = _tl.forward_logits(model, stacked)
            else:
                logits = _tl.forward_logits(model, program.enter(first, entering), first)
        if read and first < n_layers:
            logits = self.reader.read(program.stopped_with, logits)
        release_freed_memory(tokens.device)
        if not measured:
            return [None] * count
        outputs = []
        for offset in range(count):
            rows = slice(offset * batch, (offset + 1) * batch)
            if tensors is not None:
                sliced = {name: t[rows] if t.ndim and t.shape[0] == count * batch else t for name, t in tensors.items()}
                outputs.append(self.calls(_tl.make_cache(sliced, model)))
            else:
                outputs.append(self.calls(logits[rows]))
        if self.progress is not None:
            self.progress.update(count)
        return outputs

    def unpatched(self, block: Block) -> dict[int, object]:
        """The metric of the orig run, once, for every cell of an `unpatched_block`."""
        (pass_,) = block.passes
        value = self.run(pass_, _no_steps)[0]
        if self.progress is not None:
            self.progress.update(len(block.cells) - 1)
        return dict.fromkeys(block.cells, value)


def _no_steps(program: PatchProgram, variant: int, row_start: int) -> None:
    """The orig run: nothing to patch."""


@dataclass(frozen=True)
class Runs:
    """The orig run of one call, checked and resolved once (by `prepare_runs` in `_methods.common`):
    the model, the orig tokens, the resolved metric, the reader of the logits it selects, and
    whether it reads each patched run's cache instead. Every method plans from one of these."""

    model: object
    tokens: torch.Tensor
    metric: object
    reader: LogitReader | None
    apply_metric_to_cache: bool = False
    prompt_form: PromptForm | None = None
    """With `uncertainty=True`: `metric` is the per-prompt form of the user's, and this says how
    its values combine into the result."""

    def metric_calls(self) -> MetricCalls:
        """How the executor will call the metric on this call's passes."""
        return metric_calls(self.metric, self.tokens.shape[0], self.reader, self.apply_metric_to_cache, self.model)

    def executor(
        self,
        progress: tqdm | None = None,
        *,
        full_graph: bool = False,
        residuals: OrigResiduals | None = None,
        calls: MetricCalls | None = None,
        cache_names_filter: Callable[[str], bool] | None = None,
    ) -> "Executor":
        """An executor of this call's passes (the orig residuals cached on first use unless given)."""
        return Executor(
            self.model,
            self.tokens,
            residuals if residuals is not None else OrigResiduals(self.model, self.tokens),
            calls if calls is not None else self.metric_calls(),
            self.reader,
            self.apply_metric_to_cache,
            full_graph=full_graph,
            progress=progress,
            cache_names_filter=cache_names_filter,
        )


def executor_session(runs: Runs, flags: set[str], session: Callable[[tqdm | None, bool], Session]) -> SessionFactory:
    """A plan's `start(grad, progress, label)`: checks the model is still deterministic, switches
    on the model `flags` the plan's hooks need and opens a progress bar, then gives the session
    that `session(bar, grad)` makes (the method's own: what each of its passes edits)."""

    @contextmanager
    def start(grad: bool, progress: int, label: str) -> Iterator[Session]:
        _tl.check_deterministic(runs.model)
        with _tl.model_flags(runs.model, flags), progress_bar(progress, label) as bar:
            yield session(bar, grad)

    return start


def metric_calls(metric, batch: int, reader: LogitReader | None, apply_metric_to_cache: bool, model) -> MetricCalls:
    """How the executor calls `metric`: on selected logits where a reader computes them."""
    return MetricCalls(metric, batch, selected=reader is not None and not apply_metric_to_cache, model=model)


def measured_run(model, metric, tokens: torch.Tensor):
    """`metric` on the model's own run of `tokens`, measured exactly as the engines measure an
    unpatched cell: from the logits a metric object selects, or the full logits, in float32."""
    shape = _tl.model_shape(model)
    reader = logit_reader(model, metric, tokens, shape.d_vocab, apply_metric_to_cache=False)
    calls = metric_calls(metric, tokens.shape[0], reader, False, model)
    executor = Executor(model, tokens, OrigResiduals(model, tokens), calls, reader)
    return executor.run(Pass("unpatched", (0,), 0, shape.n_layers), _no_steps)[0]
