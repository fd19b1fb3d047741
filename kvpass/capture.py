"""Capture a PyTorch model as one FX graph of ATen ops, the input of every FX pass.

`torch.export` (non-strict) is tried first: it gives a single graph with `nn_module_stack` and fake-tensor
`val` metadata on every node. Models it cannot trace (data-dependent Python control flow, unsupported
builtins) fall back to dynamo, which splits the model at graph breaks; each piece is then traced to ATen
with the same metadata. Both paths return a `GraphModule` whose parameters and buffers are `get_attr`
nodes holding real tensors, so passes can read constant masks by value.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from kvpass.errors import CaptureError

DEFAULT_SEQ_LEN = 8
"""Length of the `input_ids` made up for a model given without example inputs (short keeps export fast)."""


@dataclass
class CapturedGraph:
    """A captured model: the graph, how it was obtained, and why the fallback was used (if it was)."""

    graph_module: torch.fx.GraphModule
    how: str
    """'torch.export', 'concrete trace' or 'dynamo'."""
    note: str = ""


def default_example_inputs(model: torch.nn.Module) -> tuple[tuple, dict[str, Any]]:
    """Example inputs for a transformers model: a short `input_ids` batch with the KV cache turned off.

    Raises CaptureError for models that are not transformers text models: those need `example_inputs`.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):  # multimodal: the language model's config
        config = config.get_text_config(decoder=True)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if not isinstance(vocab, int) or vocab < 2:
        raise CaptureError(
            f"{type(model).__name__} needs example_inputs: kvpass can only make up inputs for "
            "transformers text models (a config, or text config, with vocab_size)"
        )
    input_ids = (torch.arange(DEFAULT_SEQ_LEN) % (vocab - 1) + 1).unsqueeze(0)
    return (input_ids,), {"use_cache": False}


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
            runnable: bool = True) -> CapturedGraph:
    """Capture `model(*args, **kwargs)` in eval mode without gradients, export first, dynamo second.

    A transformers model runs with `use_cache=False` unless the caller says otherwise, whether its
    inputs come positionally or by keyword: the graph is what attention computes, and a cache
    object among the outputs is something neither exporter can return. `runnable=False`: the
    graph is only read, so a concrete trace is tried before dynamo (and instead of an exported
    graph whose shapes depend on data, which cannot be read off)."""
    kwargs = dict(kwargs or {})
    if is_transformers_model(model) and _accepts(model.forward, "use_cache"):
        kwargs = {"use_cache": False, **kwargs}
    with _eval_no_grad(model):
        try:
            exported = torch.export.export(model, tuple(args), kwargs, strict=False).module()
            if runnable or not _data_dependent_shapes(exported):
                return CapturedGraph(exported, "torch.export")
            note = "torch.export's graph has data-dependent shapes"
        except Exception as export_error:  # noqa: BLE001 - any export failure means: try the fallbacks
            note = f"torch.export failed ({type(export_error).__name__}: {_first_line(export_error)})"
        if not runnable:
            try:
                return CapturedGraph(_concrete_trace(model, tuple(args), kwargs), "concrete trace", note)
            except Exception as trace_error:  # noqa: BLE001
                note += f"; the concrete trace failed ({type(trace_error).__name__}: {_first_line(trace_error)})"
        try:
            graph_module = _dynamo_capture(model, tuple(args), kwargs)
        except Exception as dynamo_error:  # noqa: BLE001
            raise CaptureError(
                f"could not capture {type(model).__name__} with the given example_inputs: {note}; "
                f"dynamo failed too ({type(dynamo_error).__name__}: {_first_line(dynamo_error)}). "
                "Check that example_inputs run the model's forward."
            ) from dynamo_error
    return CapturedGraph(graph_module, "dynamo", note)


def _concrete_trace(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """Record the ATen ops of one real call (`make_fx` on real tensors), with module paths relative to
    `model` and placeholders named after the inputs (`input_ids`, `pixel_values`, `args_0`, ...)."""
    paths_and_leaves, spec = torch.utils._pytree.tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in paths_and_leaves]
    tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def call(*tensors: torch.Tensor) -> list:
        inputs = list(leaves)
        for position, tensor in zip(tensor_positions, tensors):
            inputs[position] = tensor
        call_args, call_kwargs = torch.utils._pytree.tree_unflatten(inputs, spec)
        return torch.utils._pytree.tree_leaves(model(*call_args, **call_kwargs))

    call._orig_mod = model  # make_fx records nn_module_stack relative to this module
    graph_module = make_fx(call, tracing_mode="real", record_module_stack=True,
                           _error_on_data_dependent_ops=False)(*(leaves[i] for i in tensor_positions))
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    for node, position in zip(placeholders, tensor_positions):
        node.name = node.target = _input_name(paths_and_leaves[position][0])
    graph_module.recompile()
    return graph_module


def _data_dependent_shapes(graph_module: torch.fx.GraphModule) -> bool:
    """True when some node's shape is a size only known at run time (e.g. after boolean indexing)."""
    for node in graph_module.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and any(free_unbacked_symbols(size) for size in value.shape):
            return True
    return False


def _input_name(path: tuple) -> str:
    """`input_ids` for a keyword input, `args_0` for the first positional one (nested: `args_0_1`)."""
    keys = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path[1:]]
    return "_".join(keys if path[0].idx == 1 else ["args", *keys])


def _dynamo_capture(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """Run the model under dynamo, trace each graph piece to ATen, and hold the pieces in one module.

    With graph breaks there are several pieces; the returned module keeps them as submodules
    `piece_0`, `piece_1`, ... in execution order (passes walk every submodule's graph). It is a
    container for analysis, not a runnable replacement of the model.
    """
    pieces: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        with torch.fx.traceback.preserve_node_meta():
            traced = make_fx(torch.fx.Interpreter(gm).run, tracing_mode="fake", pre_dispatch=True)(*example_inputs)
        pieces.append(traced)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend, fullgraph=False, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    if not pieces:
        raise RuntimeError("dynamo produced no graph")
    if len(pieces) == 1:
        return pieces[0]
    container = torch.fx.Graph()
    container.output(None)
    holder = torch.fx.GraphModule(torch.nn.Module(), container, class_name="CapturedPieces")
    for index, piece in enumerate(pieces):
        holder.add_module(f"piece_{index}", piece)
    return holder


def _accepts(function, keyword: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def is_transformers_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (False when transformers is not installed)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


@contextlib.contextmanager
def _eval_no_grad(model: torch.nn.Module) -> Iterator[None]:
    """Trace the inference graph (no dropout, no autograd), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
