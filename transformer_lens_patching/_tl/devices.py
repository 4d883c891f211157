"""Where a model's tensors live and in which dtype: its devices, its layers' and hooks' devices, moving there.

A model sits on one device, or has its layers spread over several (a TransformerLens 4
bridge loaded with a `device_map`, a TransformerLens 2 model with `n_devices > 1`): each
activation then lives on the device of the layer that computes it, the embeddings on the
model's input device and the logits on the unembedding's.
"""

import re

import torch

from ..errors import PatchingError

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The half-precision dtypes: metric values and attribution sums are computed in float32 on such models."""


def summing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums that decide a result run in: float32, or `dtype` if it is wider (float64).

    >>> summing_dtype(torch.bfloat16)
    torch.float32
    """
    return torch.promote_types(dtype, torch.float32)


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def model_device(model) -> torch.device:
    """The device of the model's input: that of its first parameter (the embedding)."""
    return next(model.parameters()).device


def model_devices(model) -> tuple[torch.device, ...]:
    """Every device the model's parameters are on, in the order they first appear."""
    return tuple(dict.fromkeys(parameter.device for parameter in model.parameters()))


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point parameters (its first one's): that of its activations."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _first_parameter_device(module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None) if module is not None else None
    return default if parameter is None else parameter.device


def layer_device(model, layer: int) -> torch.device:
    """The device of layer `layer`'s parameters: where a pass that starts there takes its
    residual stream. Layer `n_layers` is the final norm's (see `output_device`)."""
    if layer >= model.cfg.n_layers:
        return norm_device(model)
    return _first_parameter_device(model.blocks[layer], model_device(model))


def output_device(model) -> torch.device:
    """The device of the unembedding: where the logits are computed."""
    return model.W_U.device


def norm_device(model) -> torch.device:
    """The device of the final norm (the unembedding's for a norm without parameters, or none)."""
    return _first_parameter_device(getattr(model, "ln_final", None), output_device(model))


def hook_device(model, name: str) -> torch.device:
    """The device the activation at hook `name` is expected on: its layer's for `blocks.L.*`,
    the final norm's and unembedding's for theirs, the input device for the embeddings.

    Only a guess where a model spans devices (a block's input hook may fire before the block
    moves it): every edit still moves its value to the activation's device when it runs.
    """
    match = _LAYER.match(name)
    if match:
        return layer_device(model, int(match.group(1)))
    if name.startswith("ln_final."):
        return norm_device(model)
    if name.startswith("unembed."):
        return output_device(model)
    return model_device(model)


def check_placed(model) -> None:
    """Raise a PatchingError if any parameter is on the meta device (an offloaded or not yet
    loaded model): the engines read weights outside the forward pass, so every layer must be on
    a real device."""
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise PatchingError(
            f"The model's parameter {meta!r} is on the meta device (offloaded to CPU or disk by a device_map, "
            "or never loaded): patching reads the weights directly, so every layer must be on a real device. "
            "Load the model without offloading, e.g. with a device_map over GPUs only."
        )


def moved_all(value: object, device: torch.device, detach: bool = False) -> object:
    """`value` with every tensor in it (inside dicts, lists and tuples) on `device`, detached
    if `detach`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return (value.detach() if detach else value).to(device)
    if isinstance(value, dict):
        return {key: moved_all(item, device, detach) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved_all(item, device, detach) for item in value)
    return value


def moved(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` (and in `dtype`): itself when already there. A copy from the CPU does
    not wait for the work queued on the device (it is staged at once)."""
    non_blocking = tensor.device.type == "cpu" and device.type != "cpu"
    return tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
