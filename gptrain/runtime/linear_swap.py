"""Swapping a model's linear layers for inference versions of them (packed, int8) once it is prepared for
decoding: one walk over the model, whatever replaces them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Put make(linear) in place of every nn.Linear of the model for which it gives a module; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and (replacement := make(module)) is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
            count += 1
    return count
