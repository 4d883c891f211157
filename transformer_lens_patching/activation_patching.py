"""act_patch: run orig, overwrite some activations with values from another run, measure."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _tl
from .engine import (
    OrigResiduals,
    Variants,
    check_chunk_args,
    logit_reader,
    progress_bar,
    run_variants,
    variants_per_pass,
)
from .errors import PatchingError
from .hooks import PatchProgram, entry_layer
from .metrics import resolve_metric
from .nodes import IterNode, Node
from .plan import PatchSite, resolve_spec
from .results import PatchResult, assemble
from .sources import make_source
from .tensor_types import ModelInput, OtherModelInput


def check_hooks_exist(model, names) -> None:
    """Raise a PatchingError naming any hook the model does not have."""
    available = _tl.hook_names(model)
    missing = sorted(set(names) - available)
    if missing:
        raise PatchingError(
            f"This model has no hook {missing[0]!r}. It may not compute that activation "
            "(e.g. attn.hook_result needs use_attn_result, rotary models have no hook_pos_embed)."
        )


def act_patch(
    model,
    orig_input: ModelInput,
    patching_nodes: Node | Sequence[Node] | IterNode,
    patching_metric: Callable | str,
    new_input: OtherModelInput | None = None,
    new_cache=None,
    apply_metric_to_cache: bool = False,
    verbose: bool = False,
    *,
    batch_size: int | None = None,
    max_memory: int | None = None,
) -> "float | Tensor | dict[str, PatchResult]":
    """Activation patching: run `orig_input` with some activations taken from another run.

    Args:
        model: A TransformerLens model (TransformerBridge on TransformerLens 4,
            HookedTransformer on 2).
        orig_input: The run to patch into: a string, a list of strings or tokens (batch, pos).
        patching_nodes: A Node, a list of Nodes (all patched together, one result) or an
            IterNode (one result per node it sweeps over).
        patching_metric: A function of the patched logits (batch, pos, d_vocab) returning a
            float or tensor, or "loss" / "loss_per_token".
        new_input: The run whose activations are patched in (resample ablation).
        new_cache: Instead of `new_input`: an ActivationCache (e.g. from
            `mean_ablation_cache`) or "zero" for zero ablation.
        apply_metric_to_cache: Give the metric the patched run's ActivationCache instead of
            its logits.
        verbose: Show a progress bar.
        batch_size: Patched variants per forward pass (default: as many as fit in `max_memory`).
        max_memory: Bytes of activations one forward pass may use (default 256 MiB on
            CPU, 2 GiB on accelerators).

    Returns:
        For a Node or list of Nodes, what the metric returned. For an IterNode, a dict from
        component name to a PatchResult with dims such as `("layer", "head")` or
        `("seq_pos", "layer")`, plus `"batch"` for a per-prompt metric.

    Raises:
        PatchingError: for any invalid node, input, cache or metric.

    >>> results = act_patch(model, corrupted, IterNode("z"), metric, new_input=clean)  # doctest: +SKIP
    >>> results["z"].dims  # doctest: +SKIP
    ('layer', 'head')
    """
    _tl.check_model(model)
    check_chunk_args(batch_size, max_memory)
    tokens = _tl.to_tokens(model, orig_input)
    batch, seq_len = tokens.shape
    shape = _tl.model_shape(model)
    resolved = resolve_spec(patching_nodes, shape, batch, seq_len, "patching_nodes")
    is_sweep = isinstance(patching_nodes, IterNode)
    cells: list[list[PatchSite]] = [c for sweep in resolved for c in sweep.sites] if is_sweep else [resolved]
    names = {site.hook_name for cell in cells for site in cell}
    check_hooks_exist(model, names)
    metric = resolve_metric(patching_metric, tokens)

    reader = logit_reader(model, metric, tokens, shape, apply_metric_to_cache)
    # Cells that patch only positions after those the metric reads score the unpatched metric.
    live = [i for i, cell in enumerate(cells) if reader is None or not all(map(reader.only_after_reads, cell))]

    with torch.no_grad(), _tl.model_flags(model, _tl.flags_for(names)):
        source = make_source(model, new_input, new_cache, names, tokens)

        def add_steps(program: PatchProgram, variant: int, row_start: int) -> None:
            for site in cells[live[variant]]:
                program.edit(site, row_start, source.value(site.hook_name))

        logits_per_prompt = None if reader is None else reader.floats_per_prompt
        chunk = variants_per_pass(len(live), tokens, shape, batch_size, max_memory, apply_metric_to_cache, logits_per_prompt)
        start_layers = [min(entry_layer(site.hook_name) for site in cells[i]) for i in live]
        variants = Variants(len(live), add_steps, start_layers, metric)
        residuals = OrigResiduals(model, tokens)
        with progress_bar(len(cells), "act_patch", verbose) as progress:
            measured = iter(run_variants(model, tokens, variants, chunk, residuals, apply_metric_to_cache, progress, reader))
            unpatched = None
            if len(live) < len(cells):
                orig_run = Variants.orig_run(shape.n_layers, metric)
                unpatched = run_variants(model, tokens, orig_run, 1, residuals, reader=reader)[0]
                if progress is not None:
                    progress.update(len(cells) - len(live))
            is_live = set(live)
            outputs = [next(measured) if index in is_live else unpatched for index in range(len(cells))]
    return assemble(resolved, outputs, batch) if is_sweep else outputs[0]
