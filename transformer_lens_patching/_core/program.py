"""PatchProgram: what to do at each hook point during one forward pass.

A forward pass may run several patched variants of the orig batch at once, stacked along
the batch axis; each variant owns the rows `row_start : row_start + batch`. Every step
writes into a copy of the activation, never into the tensor the model (or anyone else's
hook) produced, and never into a cache it reads from. What a step writes or adds is moved
to the device of the activation at its hook and cast to its dtype (a no-op where the value
is there already), so that a model whose layers sit on several devices is patched alike.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .. import _tl
from ..errors import PatchingError
from .components import hook_name, lookup
from .sites import PatchSite

HookStep = Callable[[torch.Tensor], None]


def entry_layer(name: str) -> int:
    """The first layer a forward pass must run for a step at hook `name` to take effect.

    `blocks.L.*` needs layer L, except `blocks.L.hook_resid_post`: it is the residual stream
    entering layer L + 1, so a pass may start there with the step applied to its input.
    Hooks outside the blocks (embeddings) need the whole pass.
    """
    component, layer = lookup(name)
    if layer is None:
        return 0
    return layer + 1 if component.name == "resid_post" else layer


def resid_mid_carries(model) -> dict[str, str]:
    """Where a change to `hook_resid_mid` must also be added by hand: {resid_mid hook: resid_post
    hook} of every layer on models whose resid_mid hook feeds only the MLP (see
    `_tl.resid_mid_feeds_only_the_mlp`); empty elsewhere."""
    if not _tl.resid_mid_feeds_only_the_mlp(model):
        return {}
    layers = range(model.cfg.n_layers)
    return {hook_name("resid_mid", layer): hook_name("resid_post", layer) for layer in layers}


class StopForward(Exception):
    """Raised from a hook once every recording of a program is made: the rest of the pass is not needed."""


class PatchProgram:
    """Edits and recordings to apply, hook by hook, in the order they were added.

    `start_layer` is the layer the forward pass starts at. `carries` maps a hook to a later
    one that must receive the same change (see `resid_mid_carries`): whatever the steps
    change at the first is added at the second. With `stop_when_recorded`, the pass is
    abandoned (StopForward) as soon as every `record` step has run.
    """

    def __init__(
        self, batch: int, carries: dict[str, str] | None = None, start_layer: int = 0, stop_when_recorded: bool = False
    ):
        self.batch = batch
        self.start_layer = start_layer
        self._steps: dict[str, list[HookStep]] = {}
        self._checked: set[str] = set()
        self._fired: set[str] = set()
        self._carries = carries or {}
        self._carried: dict[str, torch.Tensor] = {}
        self._stop_when_recorded = stop_when_recorded
        self._pending_records = 0
        self._records_at: dict[str, int] = {}
        self._stop_at: str | None = None
        self._gradient_stops: dict[str, torch.Tensor | None] = {}
        self._substituted: set[str] = set()
        self.stopped_with: torch.Tensor | None = None
        """The activation at the `stop_at` hook, once the pass reached it."""

    def _add(self, hook_name: str, step: HookStep, checked: bool = True) -> None:
        self._steps.setdefault(hook_name, []).append(step)
        if checked:
            self._checked.add(hook_name)

    def edit(self, site: PatchSite, row_start: int, value: torch.Tensor | float) -> None:
        """Overwrite `site` in the rows of one variant with `value[site]` (or a constant).

        `value` is shaped like the activation of one batch (rows 0..batch), e.g. a cache entry;
        its slice is moved to the activation's device and cast to its dtype.
        """
        batch = self.batch

        def step(out: torch.Tensor) -> None:
            target = site.index(row_start, batch, out.device)
            if isinstance(value, torch.Tensor):
                out[target] = value[site.index(0, batch, value.device)].to(out.device, out.dtype)
            else:
                out[target] = value

        self._add(site.hook_name, step)

    def fill(self, hook_name: str, row_start: int, value: torch.Tensor) -> None:
        """Overwrite all rows of one variant at `hook_name` with `value` (one batch).

        Fills freeze activations to known values; a fill at a hook the pass never reaches
        (because it stopped earlier) is not an error.
        """
        batch = self.batch

        def step(out: torch.Tensor) -> None:
            out[row_start : row_start + batch] = value.to(out.device, out.dtype)

        self._add(hook_name, step, checked=False)

    def add(self, hook_name: str, row_start: int, value: torch.Tensor) -> None:
        """Add `value` (one batch) to the rows of one variant at `hook_name`."""
        batch = self.batch

        def step(out: torch.Tensor) -> None:
            out[row_start : row_start + batch] += value.to(out.device, out.dtype)

        self._add(hook_name, step)

    def visit(self, hook_name: str, row_start: int, fn: Callable[[torch.Tensor], None]) -> None:
        """Call `fn` on one variant's rows at `hook_name` (a view: `fn` may read them, or change
        them in place). Circuit evaluation reads senders' outputs and edits receivers' inputs so."""
        batch = self.batch

        def step(out: torch.Tensor) -> None:
            fn(out[row_start : row_start + batch])

        self._add(hook_name, step)

    def differentiate(self, hook_name: str, store: dict) -> None:
        """Add zeros that require grad to the activation at `hook_name` and keep them in
        `store[hook_name]`: the gradient of what the pass computes with respect to them is
        its gradient with respect to that activation (attribution patching)."""

        def step(out: torch.Tensor) -> None:
            store[hook_name] = torch.zeros_like(out, requires_grad=True)
            out += store[hook_name]

        self._add(hook_name, step)

    def keep(self, hook_name: str, store: dict, key) -> None:
        """Keep the activation at `hook_name` itself (not a copy, gradient and all) in `store[key]`,
        for a later step's gradient rule (`substitute_gradient`)."""

        def step(out: torch.Tensor) -> None:
            store[key] = out

        self._add(hook_name, step)

    def substitute_gradient(self, hook_name: str, surrogate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Keep the activation's value at `hook_name` but let the gradient flow back through
        `surrogate(value)` instead of the model's own computation: a function of earlier activations
        (`keep`) with the derivatives a propagation rule wants (RelP); only its gradient is added.
        Not at a hook whose gradient is also stopped (the surrogate would let it through)."""
        if hook_name in self._gradient_stops:
            raise PatchingError(f"A gradient rule cannot replace the gradient at {hook_name}, where it is stopped.")
        self._substituted.add(hook_name)

        def step(out: torch.Tensor) -> None:
            replacement = surrogate(out.detach())
            out.detach_()
            out += replacement - replacement.detach()

        self._add(hook_name, step)

    def stop_gradient(self, hook_name: str, mask: torch.Tensor | None = None) -> None:
        """Let no gradient flow back through the activation arriving at `hook_name` (only where
        the boolean `mask`, broadcastable to it, is set); its value is unchanged, and what this
        program's steps add there keeps its gradient. AtP*'s GradDrop drops one layer's
        residual-stream contribution this way. Stops at one hook add up: the gradient stops wherever
        any of them stops it."""
        if hook_name in self._substituted:
            raise PatchingError(f"The gradient at {hook_name} is replaced by a rule's, so it cannot also be stopped.")
        if hook_name in self._gradient_stops:
            previous = self._gradient_stops[hook_name]
            mask = None if previous is None or mask is None else previous | mask
        self._gradient_stops[hook_name] = mask
        self._steps.setdefault(hook_name, [])

    def record(self, hook_name: str, row_start: int, store: dict, key) -> None:
        """Save a copy of one variant's rows at `hook_name` (as they are at this step) in `store[key]`."""
        batch = self.batch

        def step(out: torch.Tensor) -> None:
            store[key] = out[row_start : row_start + batch].clone()

        self._pending_records += 1
        self._records_at[hook_name] = self._records_at.get(hook_name, 0) + 1
        self._add(hook_name, step)

    def stop_at(self, hook_name: str) -> None:
        """End the pass (StopForward) at `hook_name`, after its steps, keeping the activation
        there in `stopped_with`: e.g. the final residual stream, when no logits are needed."""
        self._stop_at = hook_name
        self._steps.setdefault(hook_name, [])

    def enter(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """The residual stream entering `layer` with the steps at `blocks.{layer-1}.hook_resid_post`
        applied; for a pass that starts at `layer`, where that hook never fires."""
        name = hook_name("resid_post", layer - 1)
        steps = self._steps.pop(name, None)
        if steps is None:
            return residual
        self._checked.discard(name)
        return self._hook_fn(name, steps)(residual)

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, hook function) pairs for TransformerLens' `hooks()`."""
        names = list(self._steps)
        names += [self._carries[n] for n in self._steps if n in self._carries and self._carries[n] not in self._steps]
        return [(name, self._hook_fn(name, self._steps.get(name, []))) for name in names]

    def _hook_fn(self, name: str, steps: list[HookStep]) -> Callable:
        carry_to = self._carries.get(name)

        def hook_fn(activation: torch.Tensor, hook=None) -> torch.Tensor:
            out = activation.clone()
            if name in self._gradient_stops:
                mask = self._gradient_stops[name]
                out = out.detach() if mask is None else torch.where(mask.to(out.device), out.detach(), out)
            carried = self._carried.pop(name, None)
            if carried is not None:
                out += carried
            for step in steps:
                step(out)
            self._pending_records -= self._records_at.get(name, 0)
            if carry_to is not None:
                self._carried[carry_to] = out - activation
            self._fired.add(name)
            if name == self._stop_at:
                self.stopped_with = out
                raise StopForward
            if self._stop_when_recorded and self._pending_records == 0:
                raise StopForward
            return out

        return hook_fn

    def check_all_fired(self) -> None:
        """Raise if a hook this program edits or records at never ran (the model does not compute it)."""
        missing = [name for name in self._checked if name not in self._fired]
        if missing:
            raise PatchingError(
                f"Hook(s) {missing} never fired during the forward pass, so nothing was patched there. "
                "This model does not compute that activation (e.g. hook_pos_embed on a model with rotary "
                "embeddings)."
            )


@contextmanager
def applied(model, program: PatchProgram) -> Iterator[None]:
    """Run the block with `program`'s hooks on `model`; remove exactly those hooks afterwards.

    A StopForward raised by the program ends the block early, as a normal exit.
    """
    with _tl.hooks(model, program.fwd_hooks()):
        try:
            yield
        except StopForward:
            pass
    program.check_all_fired()
