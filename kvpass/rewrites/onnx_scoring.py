"""A method's ranking (and other eviction rules), written once in torch, as ONNX functions.

The torch runtime ranks cached tokens with `kvpass.methods.selection.ranking_scores` (the
method's `score`, head averaging, span pooling, pages, +inf for sinks and the recent window,
-inf for padding). The ONNX rewrite must rank exactly the same way, so instead of a second copy
of that logic in ONNX ops, the torch function itself is exported (`torch.onnx.export`, dynamic
batch, heads and length) and added to the model as a local function the eviction branch calls.
One export per (method, element type, opset) and process: the rewrite of a 30-layer model
exports once.
"""

from __future__ import annotations

import hashlib
import warnings

import onnx_ir as ir
import torch

from kvpass.errors import UnsupportedModelError
from kvpass.methods import Method, Observation
from kvpass.methods.selection import ranking_scores

DOMAIN = "kvpass.scoring"
INPUTS = ("keys", "values", "slots", "stat", "seen", "sinks", "recent")
"""The function's inputs: K, V [B, Hkv, T, D]; slots int32 [B, Hkv, T]; the method's statistic
float32 [B, Hkv, T] (any float tensor of that shape when the method has none); seen, sinks,
recent: int32 scalars."""


class _Ranking(torch.nn.Module):
    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, keys, values, slots, stat, seen, sinks, recent):
        observation = Observation(keys, values, slots, stat, seen, group_size=1)
        return ranking_scores(self.method, observation, sinks, recent)


def ranking_function(method: Method, dtype: ir.DataType, opset: int) -> ir.Function:
    """The ONNX function `kvpass.scoring::rank_<method>` computing `ranking_scores` for `method`.

    Example:
        >>> from kvpass.methods import get_method
        >>> ranking_function(get_method("knorm"), ir.DataType.FLOAT, 18).domain   # doctest: +SKIP
        'kvpass.scoring'
    """
    key = (repr(method), dtype, opset)  # methods are plain dataclasses: their repr is their whole config
    if key not in _EXPORTED:
        _EXPORTED[key] = _export(method, dtype, opset)
    return _EXPORTED[key]


_EXPORTED: dict[tuple, ir.Function] = {}


def _export(method: Method, dtype: ir.DataType, opset: int) -> ir.Function:
    torch_dtype = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                   ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64}[dtype]
    batch, heads, length, dim = 2, 3, 17, 8
    example = (
        torch.randn(batch, heads, length, dim, dtype=torch_dtype), torch.randn(batch, heads, length, dim, dtype=torch_dtype),
        torch.arange(length, dtype=torch.int32).expand(batch, heads, length).contiguous(),
        torch.rand(batch, heads, length), torch.tensor(40, dtype=torch.int32), torch.tensor(4, dtype=torch.int32),
        torch.tensor(8, dtype=torch.int32),
    )
    b, h, t = torch.export.Dim("batch"), torch.export.Dim("heads"), torch.export.Dim("tokens")
    tokens = {0: b, 1: h, 2: t}
    shapes = {"keys": tokens, "values": tokens, "slots": tokens, "stat": tokens, "seen": None, "sinks": None,
              "recent": None}
    try:
        return torch_function(_Ranking(method), example, shapes, INPUTS, f"rank_{method.name}",
                              f"{method!r}/{dtype.name}", opset)
    except Exception as error:  # noqa: BLE001 - a method whose scoring does not trace has no ONNX form
        raise UnsupportedModelError(
            f"method {method.name!r} has no ONNX scoring: its torch scoring does not export "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error


def torch_function(module: torch.nn.Module, example: tuple, dynamic_shapes: dict, input_names, name: str,
                   config: str, opset: int) -> ir.Function:
    """`module` exported (`torch.onnx.export`, `dynamic_shapes` as torch.export takes them) as the
    ONNX function `kvpass.scoring::<name>_<digest of config>`, one output, its weights as Constants.

    Example:
        >>> torch_function(torch.nn.ReLU(), (torch.randn(2),), {"x": {0: torch.export.Dim("n")}}, ["x"],
        ...                "relu", "", 18).name    # doctest: +SKIP
        'relu_da39a3ee5e'
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    opset_version=opset, verbose=False, input_names=list(input_names),
                                    output_names=["output"])
    graph = ir.from_proto(program.model_proto).graph
    constants = [ir.node("Constant", [], {"value": value.const_value}, outputs=[value])
                 for value in graph.initializers.values()]
    graph.initializers.clear()
    nodes = constants + list(graph)
    for node in list(graph):
        graph.remove(node)
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    graph.inputs.clear()
    graph.outputs.clear()
    for value in inputs + outputs:  # a function's signature carries no types or shapes
        value.type, value.shape = None, None
    body = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": opset}, name=name)
    digest = hashlib.sha1(f"{config}/{opset}".encode()).hexdigest()[:10]
    return ir.Function(DOMAIN, f"{name}_{digest}", "", graph=body, attributes=[])
