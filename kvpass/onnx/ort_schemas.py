"""onnxruntime's own operators of the standard domain, made known to onnx's checker.

Graphs fused for onnxruntime (its transformer optimizer, onnxscript's `ort_fusions`) hold
`SimplifiedLayerNormalization` and a few other ops that onnxruntime registers in the *standard*
domain although ONNX defines no such op, so `onnx.checker` and strict shape inference reject
them. Registering onnxruntime's schemas of exactly those ops (not one onnx already has) lets
kvpass check and rewrite such graphs; their shapes stay uninferred, as onnx cannot compute them.
"""

from __future__ import annotations

import functools

import onnx.defs

_OPTIONS = {"Single": onnx.defs.OpSchema.FormalParameterOption.Single,
            "Optional": onnx.defs.OpSchema.FormalParameterOption.Optional,
            "Variadic": onnx.defs.OpSchema.FormalParameterOption.Variadic}


@functools.cache
def register_onnxruntime_schemas() -> tuple[str, ...]:
    """Register onnxruntime's standard-domain ops that onnx lacks (once per process); returns their names.

    Example:
        >>> "SimplifiedLayerNormalization" in register_onnxruntime_schemas()
        True
    """
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    added = []
    for schema in get_all_operator_schema():
        if schema.domain != "" or onnx.defs.has(schema.name, ""):
            continue
        onnx.defs.register_schema(onnx.defs.OpSchema(
            schema.name, "", schema.since_version, schema.doc or "",
            inputs=[_parameter(p) for p in schema.inputs], outputs=[_parameter(p) for p in schema.outputs],
            type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in schema.type_constraints],
            attributes=[onnx.defs.OpSchema.Attribute(a.name, onnx.defs.OpSchema.AttrType[a.type.name],
                                                     a.description or "", required=a.required)
                        for a in schema.attributes.values()],
        ))
        added.append(schema.name)
    return tuple(added)


def _parameter(parameter) -> onnx.defs.OpSchema.FormalParameter:
    return onnx.defs.OpSchema.FormalParameter(
        parameter.name, parameter.typeStr, param_option=_OPTIONS[parameter.option.name],
        is_homogeneous=parameter.isHomogeneous)
