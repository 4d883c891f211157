"""Running a path_patch plan: the one-pass and two-pass algorithms, block by block."""

import functools

import torch
from torch import Tensor

from .. import _tl
from .._core.components import COMPONENTS, hook_name
from .._core.executor import Executor, OrigResiduals, Runs
from .._core.plan import Block
from .._core.program import PatchProgram
from .._core.sites import PatchSite
from .._core.sources import ActivationSource, SourceFactory
from .._core.wiring import SenderWrites
from .path_rules import (
    HEAD_INPUTS,
    WHOLE_HEAD_RECEIVERS,
    PathPlan,
    input_base_hook,
    input_site,
    reaches,
    residual_write,
)


class PathPatchSession:
    """Runs the blocks of a path_patch plan; the orig and new caches are made when first needed."""

    def __init__(
        self,
        runs: Runs,
        plan: PathPlan,
        new: SourceFactory,
        orig: SourceFactory,
        cache_names_filter,
        progress,
        grad: bool,
    ):
        self._runs, self._plan, self._new_source, self._orig_source = runs, plan, new, orig
        self._cache_names_filter, self._progress, self._grad = cache_names_filter, progress, grad
        self._shape = _tl.model_shape(runs.model)
        self._calls = runs.metric_calls()
        self._contributions: dict[int, Tensor] = {}

    @property
    def metric_dims(self) -> tuple[str, ...] | None:
        return self._calls.dims

    @functools.cached_property
    def _new(self) -> ActivationSource:
        return self._new_source()

    @functools.cached_property
    def _orig(self) -> ActivationSource:
        return self._orig_source()

    @functools.cached_property
    def _executor(self) -> Executor:
        runs = self._runs
        return runs.executor(
            self._progress,
            full_graph=self._grad,
            residuals=OrigResiduals(runs.model, runs.tokens, self._orig.tensors),
            calls=self._calls,
            cache_names_filter=self._cache_names_filter,
        )

    @functools.cached_property
    def _weights(self) -> SenderWrites:
        return SenderWrites(self._runs.model)

    @functools.cached_property
    def _frozen(self) -> list[tuple[int, str, Tensor]]:
        return [(layer, name, self._orig.value(name)) for layer, name in self._plan.pass_one.frozen]

    def run_block(self, block: Block) -> dict[int, object]:
        if block.passes[0].stage == "unpatched":
            return self._executor.unpatched(block)
        if self._plan.fork:
            (pass_,) = block.passes
            return dict(zip(pass_.variants, self._executor.run(pass_, self._one_pass_steps)))
        return self._two_passes(block)

    def _one_pass_steps(self, program: PatchProgram, cell: int, row_start: int) -> None:
        """Set each receiver's input to orig plus the reaching senders' new - orig."""
        variant, orig = self._plan.variants[cell], self._orig
        for receiver in variant.receivers:
            base = orig.value(input_base_hook(receiver))
            reaching = [self._cached_contribution(s).to(base.device) for s in variant.senders if reaches(s, receiver)]
            delta = torch.stack(reaching).sum(0) if reaching else None
            value = base if delta is None else base + delta
            inputs = HEAD_INPUTS.get(receiver.component.name)
            if inputs is None:
                program.edit(receiver, row_start, value)
            for input_name in inputs or ():
                component = COMPONENTS[input_name]
                count = self._shape.unit_count(component.unit)
                expanded = value.unsqueeze(2).expand(*value.shape[:2], count, value.shape[-1])
                program.edit(input_site(component, receiver), row_start, expanded)

    def _two_passes(self, block: Block) -> dict[int, object]:
        """Pass 1 freezes heads (and MLPs) and records the receivers; pass 2 patches them in.

        Each recording variant starts at its first sender, skips the attention the plan
        replaces and stops once its receivers are recorded.
        """
        variants, plan = self._plan.variants, self._plan.pass_one
        new = self._new
        records: dict[tuple[int, str], Tensor] = {}
        group_of = {cell: group for group, cells in enumerate(block.groups) for cell in cells}

        def pass_one(program: PatchProgram, group: int, row_start: int) -> None:
            cells = block.groups[group]
            receivers = {site.hook_name: site for cell in cells for site in variants[cell].receivers}
            for name, site in receivers.items():
                if site.component.name == "z":
                    program.record(name, row_start, records, (group, name))
            for layer, name, value in self._frozen:
                if layer >= program.start_layer:
                    program.fill(name, row_start, value)
            for site in variants[cells[0]].senders:
                if site.component.name == "z" and site.layer in plan.replaced_attention:
                    attn_out = hook_name("attn_out", site.layer)
                    program.add(attn_out, row_start, self._contribution(site))
                else:
                    program.edit(site, row_start, new.value(site.hook_name))
            for name, site in receivers.items():
                if site.component.name != "z":
                    program.record(name, row_start, records, (group, name))

        def pass_two(program: PatchProgram, cell: int, row_start: int) -> None:
            for site in variants[cell].receivers:
                if site.component.name in WHOLE_HEAD_RECEIVERS:
                    site = site.with_positions_of(None)
                program.edit(site, row_start, records[(group_of[cell], site.hook_name)])

        outputs: dict[int, object] = {}
        for pass_ in block.passes:
            if pass_.stage == "record":
                self._executor.run(
                    pass_, pass_one, measured=False, stop_when_recorded=True, replaced_attention=plan.replaced_attention
                )
            else:
                outputs.update(zip(pass_.variants, self._executor.run(pass_, pass_two)))
        return outputs

    def _cached_contribution(self, site: PatchSite) -> Tensor:
        """`_contribution(site)`, computed once per session (one-pass variants share senders)."""
        if id(site) not in self._contributions:
            self._contributions[id(site)] = self._contribution(site)
        return self._contributions[id(site)]

    def _contribution(self, site: PatchSite) -> Tensor:
        """What `site`'s change from orig to new adds to the residual stream, (batch, pos, d_model)."""
        before = self._orig.value(site.hook_name)
        return residual_write(site, self._new.tensor_like(site.hook_name, before) - before, self._weights)
