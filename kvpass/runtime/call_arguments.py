"""A module call's arguments by parameter name, for forward pre-hooks that read or replace some.

Hugging Face modules are called with a mix of positional and keyword arguments, and most
forwards take `**kwargs`; hooks that patch pruning installs bind the call to the forward's
signature, change what they need by name, and hand the call back in a form the forward takes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def bind_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name; those a `**kwargs` parameter collects are listed by their own names.

    Example:
        >>> bind_call(torch.nn.Linear(2, 2), (torch.zeros(2),), {})["input"].shape
        torch.Size([2])
    """
    parameters = inspect.signature(module.forward).parameters
    arguments = dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    for name, parameter in parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def call_with(module: torch.nn.Module, arguments: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for a forward pre-hook to return: positional-only parameters (and `*args`)
    positionally, everything else by keyword."""
    arguments = dict(arguments)
    positional: list[Any] = []
    for name, parameter in inspect.signature(module.forward).parameters.items():
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY and name in arguments:
            positional.append(arguments.pop(name))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            positional.extend(arguments.pop(name, ()))
    return tuple(positional), arguments
