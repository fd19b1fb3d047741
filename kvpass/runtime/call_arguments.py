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


MODEL_CACHE_KEYWORDS = ("cache", "past_key_values")
"""The keywords a transformers model, decoder layer or output carries its cache under: `cache` from
transformers 5.24 on, `past_key_values` before (5.24 still takes it, deprecated, until 5.40)."""


def cache_keyword(module: torch.nn.Module, arguments: dict[str, Any] | None = None) -> str:
    """The keyword this call carries its cache under: the one `arguments` already name, else the one
    `module`'s forward names (so kvpass passes a cache the way the installed transformers expects).

    Example:
        >>> class Layer(torch.nn.Module):
        ...     def forward(self, hidden_states, past_key_values=None):
        ...         return hidden_states
        >>> cache_keyword(Layer()), cache_keyword(Layer(), {"cache": object()})
        ('past_key_values', 'cache')
    """
    given = arguments or {}
    named = sorted((name for name in MODEL_CACHE_KEYWORDS if name in given), key=lambda name: given[name] is None)
    if named:  # one holding a cache first; one passed as None is replaced, not joined by the other name
        return named[0]
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in MODEL_CACHE_KEYWORDS if name in parameters), "past_key_values")


def given_cache(arguments: dict[str, Any]) -> Any:
    """The cache a call was given under either keyword (None when it was given none)."""
    return next((arguments[name] for name in MODEL_CACHE_KEYWORDS if arguments.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a model output returns, read under the name it was stored by (reading the old name
    from a 5.24 output would log a deprecation warning)."""
    if isinstance(output, dict):  # transformers' ModelOutput: only the fields that were set are keys,
        # and its `get` and `in` translate (and warn about) the old name, so look at the stored keys only
        return given_cache(dict(output.items()))
    return next((value for name in MODEL_CACHE_KEYWORDS if (value := getattr(output, name, None)) is not None), None)


def cache_argument(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """`cache` as the keyword argument `model` takes it under (spread it into the call: `**cache_argument(...)`)."""
    return {cache_keyword(model): cache}
