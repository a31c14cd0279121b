"""Building a module from a factory the user names, and loading its weights without unpickling objects."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidModelError, UsageError


def load_factory(spec: str) -> nn.Module:
    """``package.module:factory`` -> ``factory()``; the current folder is importable, as for ``python -m``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--torch-model '{spec}' is not package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise UsageError(f"cannot import '{module_name}' ({e}); check --torch-model and PYTHONPATH") from None
    except AttributeError:
        raise UsageError(f"'{module_name}' has no '{attr}'; check --torch-model") from None
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise UsageError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a state_dict saved by torch.save, read with
    ``torch.load(weights_only=True)`` (passed explicitly: an environment variable can change the default)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"weights file '{p}' does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidModelError(f"'{p}' is not a valid safetensors file ({e})") from None
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidModelError(f"'{p}' is not a plain state_dict of tensors ({first[:160]}); normswap never "
                                "unpickles objects -- save model.state_dict() or use safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidModelError(f"'{p}' does not hold a state_dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise InvalidModelError(f"the weights in '{path}' do not fit the model ({first}); check --torch-model") from None
