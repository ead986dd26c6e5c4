"""Check and run Core ML ML Program packages (``.mlpackage``) on Linux.

Core ML itself only runs on Apple platforms. This module gives the Linux side of the
Atelier Core ML exporter two tools:

``validate``
    Reads ``Manifest.json`` and ``Data/com.apple.CoreML/model.mlmodel`` (a
    ``CoreML.Specification.Model`` protobuf; Apple's Model.proto / MIL.proto as shipped in
    coremltools) and rebuilds every function of the ML Program with coremltools' MIL proto
    loader (``coremltools.converters.mil.frontend.milproto.load``). The loader re-runs the
    type and shape inference of every op and compares it with the types declared in the proto,
    and it reads every ``weight.bin`` blob an op points at. On top of that this module checks:
    the Manifest (``rootModelIdentifier`` names an entry whose path is
    ``com.apple.CoreML/model.mlmodel``), the declared type of every const/constexpr op's
    output (the loader only checks non-const ops), the function's opset against the
    specification version, and that the model description (inputs/outputs: names, shapes,
    dtypes; per function for multifunction packages) matches the MIL function's inputs and its
    block outputs.

``run``
    Evaluates one function of a package on real inputs with the numpy evaluator below
    (:class:`Evaluator`), NOT with coremltools' value inference, so Rust tests can compare the
    outputs with the Candle engine's.

Supported ops (the ones the Atelier exporter emits; anything else is an ``UnsupportedOp``
error naming the op). Semantics follow the MIL op definitions of coremltools 9.0
(``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``):

    const, constexpr_lut_to_dense (iOS16: bit-packed uint8 ``indices`` + ``lut`` + ``shape``;
    iOS18: sub-byte ``indices`` + ``lut`` of rank K+2, incl. per-grouped-channel and vector
    LUTs), constexpr_affine_dequantize (iOS16), constexpr_blockwise_shift_scale (iOS18),
    conv (pad_type valid/same/same_lower/custom, strides, dilations, groups, bias), linear,
    matmul, add, sub, mul, real_div, pow, sqrt, rsqrt, exp, sin, cos, reduce_mean,
    reduce_sum, reshape, transpose, expand_dims, squeeze, softmax, layer_norm,
    instance_norm, silu, sigmoid, gelu (EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION),
    concat (axis, interleave), split (num_splits / split_sizes), slice_by_index (begin, end,
    stride, begin/end/squeeze masks), gather (axis, batch_dims=0), cast,
    upsample_nearest_neighbor.

Precision: an op whose output dtype is fp16 computes in float16: elementwise ops run in
numpy float16 (each result rounded to fp16); contractions and reductions (conv, linear,
matmul, reduce_*, softmax, layer_norm, instance_norm) take the fp16 inputs, accumulate in
float32 and round their output to fp16 (as GPU kernels do). fp32 ops compute in float32.

CLI::

    python milcheck.py validate PKG.mlpackage [PKG2.mlpackage ...]
    python milcheck.py run PKG.mlpackage --inputs IN.safetensors --out OUT.safetensors [--function NAME]

``run`` validates first, casts each input tensor (named as the function's inputs) to the
declared dtype, and writes every block output as float32 to ``OUT.safetensors``. Exit status 1
with the error message on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

MODEL_PATH = "com.apple.CoreML/model.mlmodel"
WEIGHTS_DIR = "com.apple.CoreML/weights"


class CheckError(Exception):
    """A package failed validation; the message says what and where."""


class UnsupportedOp(Exception):
    """The evaluator met an op type it does not implement."""


@contextlib.contextmanager
def _quiet():
    """Silence coremltools' import chatter (missing libcoremlpython on Linux, sklearn
    version warnings, progress bars)."""
    err, out = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            yield


with _quiet():
    import coremltools  # noqa: F401  (imported for its side effects: proto modules, logging)
    from coremltools import proto as _proto
    from coremltools.converters.mil.frontend.milproto import load as _milload
    from coremltools.converters.mil.mil import types as _types
    from coremltools.converters.mil.frontend.milproto.helper import proto_to_types as _proto_to_types

logging.getLogger("coremltools").setLevel(logging.ERROR)

# Model.proto ArrayFeatureType.ArrayDataType values.
_ARRAY_DTYPES = {65568: "fp32", 65552: "fp16", 65600: "fp64", 131104: "int32", 131080: "int8"}


# --------------------------------------------------------------------------------------------
# Package reading and validation
# --------------------------------------------------------------------------------------------


@dataclass
class FunctionReport:
    name: str
    ops: int
    inputs: List[str]
    outputs: List[str]


@dataclass
class Package:
    """A validated package: its spec and one loaded PyMIL program per function."""

    path: Path
    spec: object
    programs: Dict[str, object] = field(default_factory=dict)
    reports: List[FunctionReport] = field(default_factory=list)

    def function(self, name: Optional[str]):
        """The PyMIL ``Function`` called ``name`` (default: the description's default
        function, else ``main``)."""
        if name is None:
            name = self.spec.description.defaultFunctionName or "main"
            if name not in self.programs:
                name = next(iter(self.programs))
        if name not in self.programs:
            raise CheckError(f"{self.path.name}: no function {name!r} (functions: {', '.join(self.programs)})")
        return self.programs[name].functions[name]


def _type_str(dtype, shape) -> str:
    return f"{_types.builtin_to_string(dtype)}{list(shape)}"


def read_manifest(pkg: Path) -> Path:
    """Checks ``Manifest.json`` and returns the path of the root model file."""
    manifest = pkg / "Manifest.json"
    if not manifest.is_file():
        raise CheckError(f"{pkg.name}: Manifest.json is missing")
    try:
        doc = json.loads(manifest.read_text())
    except ValueError as e:
        raise CheckError(f"{pkg.name}: Manifest.json is not JSON: {e}") from e
    entries = doc.get("itemInfoEntries")
    root = doc.get("rootModelIdentifier")
    if not isinstance(entries, dict) or root not in entries:
        raise CheckError(f"{pkg.name}: Manifest.json rootModelIdentifier {root!r} names no itemInfoEntries entry")
    path = entries[root].get("path")
    if path != MODEL_PATH:
        raise CheckError(f"{pkg.name}: Manifest.json root entry path is {path!r}, expected {MODEL_PATH!r}")
    for key, entry in entries.items():
        if not (pkg / "Data" / entry.get("path", "")).exists():
            raise CheckError(f"{pkg.name}: Manifest.json entry {key} points at missing Data/{entry.get('path')}")
    model = pkg / "Data" / MODEL_PATH
    if not model.is_file():
        raise CheckError(f"{pkg.name}: Data/{MODEL_PATH} is missing")
    return model


def _single_function_spec(spec, name):
    """A copy of ``spec`` whose program holds only function ``name`` (so each function is
    loaded in its own name scope: the loader shares one name table across functions)."""
    one = copy.deepcopy(spec)
    for other in list(one.mlProgram.functions.keys()):
        if other != name:
            del one.mlProgram.functions[other]
    return one


def _blob_values(block_spec):
    """(op type, parameter, BlobFileValue) for every weight.bin reference in a block."""
    for op in block_spec.operations:
        for key, value in op.attributes.items():
            if value.WhichOneof("value") == "blobFileValue":
                yield f"{op.type} -> {op.outputs[0].name}", key, value.blobFileValue
        for key, arg in op.inputs.items():
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "value" and binding.value.WhichOneof("value") == "blobFileValue":
                    yield f"{op.type} -> {op.outputs[0].name}", key, binding.value.blobFileValue


def _check_blobs(func_spec, weights_dir: Path, where):
    """MIL blob storage layout (coremltools mlmodel/src/MILBlob/Blob/StorageFormat.hpp): every
    blob reference names ``@model_path/weights/<file>`` and points at a 64-byte aligned
    metadata record whose data offset is 64-byte aligned too. (The loader's BlobReader checks
    the sentinel, the storage version and the dtype.)"""
    import struct

    sizes = {}
    for op_type, key, blob in _blob_values(func_spec.block_specializations[func_spec.opset]):
        if not blob.fileName.startswith("@model_path/weights/"):
            raise CheckError(f"{where}: op {op_type}: {key} blob file {blob.fileName!r} is not under @model_path/weights/")
        path = weights_dir / blob.fileName.split("/")[-1]
        if not path.is_file():
            raise CheckError(f"{where}: op {op_type}: {key} blob file {path.name} is missing")
        if blob.offset % 64:
            raise CheckError(f"{where}: op {op_type}: {key} blob offset {blob.offset} is not 64-byte aligned")
        size = sizes.setdefault(path, path.stat().st_size)
        if blob.offset + 64 > size:
            raise CheckError(f"{where}: op {op_type}: {key} blob offset {blob.offset} is past the end of {path.name} ({size} bytes)")
        with open(path, "rb") as f:
            f.seek(blob.offset)
            _sentinel, _dtype, nbytes, data_offset = struct.unpack("<IIQQ", f.read(24))
        if data_offset % 64:
            raise CheckError(f"{where}: op {op_type}: {key} blob data offset {data_offset} is not 64-byte aligned")
        if data_offset + nbytes > size:
            raise CheckError(f"{where}: op {op_type}: {key} blob data ({nbytes} bytes at {data_offset}) runs past the end of {path.name}")


def _check_declared_types(func_spec, func, where):
    """The loader checks the declared output types of non-const ops only; check all."""
    by_name = {}
    for op in func.operations:
        for v in op.outputs:
            by_name[v.name] = v
    opset = func_spec.opset
    for op_spec in func_spec.block_specializations[opset].operations:
        for out in op_spec.outputs:
            var = by_name.get(out.name)
            if var is None:
                raise CheckError(f"{where}: op {op_spec.type} output {out.name} was not produced by the loader")
            declared = _proto_to_types(out.type)
            if not _types.is_compatible_type(var.sym_type, declared):
                if _types.is_tensor(var.sym_type) and _types.is_scalar(declared) and var.sym_type.get_primitive() == declared:
                    continue
                raise CheckError(
                    f"{where}: op {op_spec.type} output {out.name} is declared {_describe(declared)} "
                    f"but computes {_describe(var.sym_type)}"
                )


def _feature_type(feature, where):
    kind = feature.type.WhichOneof("Type")
    if kind != "multiArrayType":
        raise CheckError(f"{where}: feature {feature.name} has type {kind}; only multiArrayType is supported")
    arr = feature.type.multiArrayType
    if arr.WhichOneof("ShapeFlexibility") is not None:
        raise CheckError(f"{where}: feature {feature.name} has a flexible shape; only fixed shapes are supported")
    dtype = _ARRAY_DTYPES.get(arr.dataType)
    if dtype is None:
        raise CheckError(f"{where}: feature {feature.name} has unknown dataType {arr.dataType}")
    return dtype, tuple(int(d) for d in arr.shape)


def _describe(t) -> str:
    if _types.is_tensor(t):
        return _type_str(t.get_primitive(), t.get_shape())
    return _types.builtin_to_string(t)


def _load_function(spec, name, version, weights, where):
    """Runs coremltools' milproto loader on function ``name``; on failure the error names the
    op being loaded (the loader's own messages often do not) and, for a type mismatch, the
    declared and the inferred type."""
    current = {}
    original = _milload._load_operation

    def traced(context, op_spec):
        current["op"], current["context"] = op_spec, context
        return original(context, op_spec)

    _milload._load_operation = traced
    try:
        with _quiet():
            return _milload.load(_single_function_spec(spec, name), specification_version=version, file_weights_dir=weights)
    except Exception as e:
        op = current.get("op")
        at = ""
        if op is not None:
            outs = ", ".join(o.name for o in op.outputs)
            at = f" at op {op.type} -> {outs}"
            if "Mismatch between var types" in str(e):
                for out in op.outputs:
                    var = current["context"].name_to_var.get(out.name)
                    if var is not None:
                        at += f" (declared {_describe(_proto_to_types(out.type))}, inferred {_describe(var.sym_type)})"
        raise CheckError(f"{where}{at}: {type(e).__name__}: {e}") from e
    finally:
        _milload._load_operation = original


def _check_features(features, vars_, kind, where):
    names = [f.name for f in features]
    var_names = [v.name for v in vars_]
    # Core ML binds features by name, so the order may differ; the sets must not.
    if sorted(names) != sorted(var_names) or len(set(names)) != len(names):
        raise CheckError(f"{where}: description {kind}s {names} do not match the MIL function {kind}s {var_names}")
    by_name = {v.name: v for v in vars_}
    for feature in features:
        var = by_name[feature.name]
        dtype, shape = _feature_type(feature, where)
        mil_dtype = _types.builtin_to_string(var.dtype)
        mil_shape = tuple(int(d) for d in var.shape)
        if dtype != mil_dtype or shape != mil_shape:
            raise CheckError(
                f"{where}: description {kind} {feature.name} is {dtype}{list(shape)} "
                f"but the MIL function {kind} is {mil_dtype}{list(mil_shape)}"
            )


def validate(pkg_path) -> Package:
    """Validates one ``.mlpackage`` directory (see the module docstring for the checks).

    Returns the :class:`Package` with each function loaded as PyMIL. Raises
    :class:`CheckError` with the loader's message on any failure.
    """
    pkg = Path(pkg_path)
    if not pkg.is_dir():
        raise CheckError(f"{pkg}: not a directory")
    model_file = read_manifest(pkg)
    spec = _proto.Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf DecodeError
        raise CheckError(f"{pkg.name}: model.mlmodel is not a Model protobuf: {e}") from e
    if spec.WhichOneof("Type") != "mlProgram":
        raise CheckError(f"{pkg.name}: model type is {spec.WhichOneof('Type')}, expected mlProgram")
    version = spec.specificationVersion
    functions = list(spec.mlProgram.functions.keys())
    if not functions:
        raise CheckError(f"{pkg.name}: the ML Program has no function")
    desc = spec.description
    fdescs = {f.name: f for f in desc.functions}
    if fdescs:
        if version < 9:
            raise CheckError(f"{pkg.name}: description.functions needs specificationVersion >= 9, got {version}")
        if set(fdescs) != set(functions):
            raise CheckError(f"{pkg.name}: description.functions {sorted(fdescs)} != program functions {sorted(functions)}")
        if desc.defaultFunctionName not in fdescs:
            raise CheckError(f"{pkg.name}: defaultFunctionName {desc.defaultFunctionName!r} is not a function")
    elif len(functions) > 1:
        raise CheckError(f"{pkg.name}: {len(functions)} functions but no description.functions")

    out = Package(path=pkg, spec=spec)
    weights = str(pkg / "Data" / WEIGHTS_DIR)
    for name in functions:
        where = f"{pkg.name}:{name}"
        func_spec = spec.mlProgram.functions[name]
        opset = func_spec.opset
        if not opset.startswith("CoreML") or not opset[6:].isdigit():
            raise CheckError(f"{where}: unknown opset {opset!r}")
        if int(opset[6:]) + 1 > version:
            raise CheckError(f"{where}: opset {opset} needs specificationVersion >= {int(opset[6:]) + 1}, got {version}")
        prog = _load_function(spec, name, version, weights, where)
        func = prog.functions[name]
        _check_blobs(func_spec, Path(weights), where)
        _check_declared_types(func_spec, func, where)
        if fdescs:
            inputs, outputs = fdescs[name].input, fdescs[name].output
        else:
            inputs, outputs = desc.input, desc.output
        _check_features(inputs, list(func.inputs.values()), "input", where)
        _check_features(outputs, list(func.outputs), "output", where)
        out.programs[name] = prog
        out.reports.append(
            FunctionReport(
                name=name,
                ops=len(func.operations),
                inputs=[f"{v.name} {_type_str(v.dtype, v.shape)}" for v in func.inputs.values()],
                outputs=[f"{v.name} {_type_str(v.dtype, v.shape)}" for v in func.outputs],
            )
        )
    if fdescs and (desc.input or desc.output):  # optional top-level copy of the default's
        _check_features(desc.output, list(out.function(desc.defaultFunctionName).outputs), "output", f"{pkg.name} (default)")
        _check_features(desc.input, list(out.function(desc.defaultFunctionName).inputs.values()), "input", f"{pkg.name} (default)")
    return out


# --------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------


def np_dtype(builtin):
    """numpy dtype for a MIL builtin type (sub-byte types are held unpacked in (u)int8)."""
    if _types.is_sub_byte(builtin):
        return np.int8 if not builtin.is_unsigned() else np.uint8
    return np.dtype(_types.nptype_from_builtin(builtin))


_CAST_DTYPES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_, "int64": np.int64,
}


class Op:
    """An op being evaluated: gives input values by parameter name."""

    def __init__(self, op, values, opset):
        self.op = op
        self._values = values
        self.opset = opset
        out = op.outputs[0]
        self.dtype = np_dtype(out.dtype) if out.dtype is not None else None
        self.fp16 = self.dtype == np.float16

    def has(self, name):
        return self.op.inputs.get(name) is not None

    def get(self, name, default=None):
        var = self.op.inputs.get(name)
        if var is None:
            return default
        if isinstance(var, (tuple, list)):
            return [self._value(v) for v in var]
        return self._value(var)

    def _value(self, var):
        if id(var) in self._values:
            return self._values[id(var)]
        # Inputs that are const vars without an op in the block (rare: defaults built by the
        # Builder). Only const values are taken from PyMIL, never computed ones.
        if var.op is None or var.op.op_type == "const":
            if var.val is None:
                raise RuntimeError(f"input {var.name} has no value")
            return var.val
        raise RuntimeError(f"input {var.name} (from {var.op.op_type}) was not computed before {self.op.name}")

    def x(self, name="x"):
        """A float input in the op's compute dtype."""
        v = np.asarray(self.get(name))
        if self.dtype is not None and np.issubdtype(self.dtype, np.floating):
            return v.astype(self.dtype, copy=False)
        return v

    def x32(self, name="x"):
        """A float input for an accumulating op: rounded to the op dtype, held in float32."""
        return np.asarray(self.x(name)).astype(np.float32)

    def scalar(self, name, default=None):
        v = self.get(name)
        if v is None:
            return default
        v = np.asarray(v)
        return v.item() if v.shape == () else v.reshape(-1)[0].item()

    def ints(self, name, default=None):
        v = self.get(name)
        if v is None:
            return default
        return [int(i) for i in np.asarray(v).reshape(-1)]

    def bools(self, name, default=None):
        v = self.get(name)
        if v is None:
            return default
        return [bool(i) for i in np.asarray(v).reshape(-1)]


def _axis(a, rank):
    return a + rank if a < 0 else a


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Unpacks ``count`` unsigned ``nbits``-bit fields from bytes, filled starting at the
    least significant bit of each byte and running into the next byte (MIL
    constexpr_lut_to_dense iOS16, and MIL blob storage of sub-byte types)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    if bits.size < nbits * count:
        raise ValueError(f"{packed.size} bytes hold fewer than {count} {nbits}-bit values")
    fields = bits[: nbits * count].reshape(count, nbits).astype(np.uint32)
    return (fields << np.arange(nbits, dtype=np.uint32)).sum(axis=1)


def _group_index(shape, lut_group_shape):
    """Open-mesh indices mapping each element of ``shape`` to its LUT/scale block."""
    grids = []
    rank = len(shape)
    for k, (dim, groups) in enumerate(zip(shape, lut_group_shape)):
        block = dim // groups
        g = np.arange(dim) // block
        grids.append(g.reshape([-1 if i == k else 1 for i in range(rank)]))
    return grids


# Each evaluator function takes an Op and returns one array (or a list for multi-output ops).

def _const(o):
    return o.op.outputs[0].val


def _lut_to_dense(o):
    lut = np.asarray(o.get("lut"))
    indices = np.asarray(o.get("indices"))
    if o.has("shape"):  # iOS16 form: packed uint8 indices, 1-D LUT.
        shape = o.ints("shape")
        nbits = int(round(math.log2(lut.shape[0])))
        idx = unpack_bits(indices, nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    # iOS18 form: indices (unpacked by the loader) with the output's rank, lut [*groups, P, V].
    rank = indices.ndim
    groups = lut.shape[:rank]
    grids = _group_index(indices.shape, groups)
    picked = lut[tuple(grids) + (indices.astype(np.int64),)]  # indices.shape + [V]
    vector = lut.shape[-1]
    if vector == 1:
        return picked[..., 0]
    axis = _axis(o.scalar("vector_axis"), rank)
    moved = np.moveaxis(picked, -1, axis + 1)
    out_shape = list(indices.shape)
    out_shape[axis] *= vector
    return moved.reshape(out_shape)


def _affine_dequantize(o):
    q = np.asarray(o.get("quantized_data")).astype(np.float32)
    zp = np.asarray(o.get("zero_point")).astype(np.float32)
    scale = np.asarray(o.get("scale"))
    axis = _axis(o.scalar("axis"), q.ndim)
    bshape = [1] * q.ndim
    if zp.ndim == 1:
        zp = zp.reshape([-1 if i == axis else 1 for i in range(q.ndim)])
    if scale.ndim == 1:
        bshape[axis] = -1
        scale = scale.reshape(bshape)
    return (scale.astype(np.float32) * (q - zp)).astype(scale.dtype)


def _blockwise_shift_scale(o):
    data = np.asarray(o.get("data")).astype(np.float32)
    scale = np.asarray(o.get("scale"))
    grids = _group_index(data.shape, scale.shape)
    s = scale.astype(np.float32)[tuple(grids)]
    if o.has("offset"):
        data = data - np.asarray(o.get("offset")).astype(np.float32)[tuple(grids)]
    return (s * data).astype(scale.dtype)


def _same_pads(in_sizes, kernel, strides, dilations, lower):
    pads = []
    for i, k, s, d in zip(in_sizes, kernel, strides, dilations):
        eff = (k - 1) * d + 1
        total = max(0, (math.ceil(i / s) - 1) * s + eff - i)
        small, big = total // 2, total - total // 2
        pads += [big, small] if lower else [small, big]
    return pads


def _conv(o):
    x = o.x32("x")
    w = o.x32("weight")
    spatial = x.ndim - 2
    kernel = list(w.shape[2:])
    strides = o.ints("strides", [1] * spatial)
    dilations = o.ints("dilations", [1] * spatial)
    groups = int(o.scalar("groups", 1))
    pad_type = o.scalar("pad_type", "valid")
    if pad_type == "valid":
        pads = [0] * (2 * spatial)
    elif pad_type == "custom":
        pads = o.ints("pad", [0] * (2 * spatial))
    elif pad_type in ("same", "same_lower"):
        pads = _same_pads(x.shape[2:], kernel, strides, dilations, pad_type == "same_lower")
    else:
        raise ValueError(f"conv: unknown pad_type {pad_type!r}")
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[2 * i], pads[2 * i + 1]) for i in range(spatial)])
    n, cin = x.shape[:2]
    cout = w.shape[0]
    cin_g, cout_g = cin // groups, cout // groups
    out_sizes = [
        (xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(spatial)
    ]
    p = int(np.prod(out_sizes))
    acc = np.zeros((n, groups, cout_g, p), np.float32)
    wg = w.reshape(groups, cout_g, cin_g, *kernel)
    for kpos in np.ndindex(*kernel):
        sl = tuple(
            slice(kpos[i] * dilations[i], kpos[i] * dilations[i] + (out_sizes[i] - 1) * strides[i] + 1, strides[i])
            for i in range(spatial)
        )
        patch = xp[(slice(None), slice(None)) + sl].reshape(n, groups, cin_g, p)
        acc += np.matmul(wg[(slice(None), slice(None), slice(None)) + kpos][None], patch)
    out = acc.reshape(n, cout, *out_sizes)
    if o.has("bias"):
        out = out + o.x32("bias").reshape([1, cout] + [1] * spatial)
    return out


def _linear(o):
    x, w = o.x32("x"), o.x32("weight")
    y = np.matmul(x, w.T)
    if o.has("bias"):
        y = y + o.x32("bias")
    return y


def _matmul(o):
    x, y = o.x32("x"), o.x32("y")
    if o.scalar("transpose_x", False) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if o.scalar("transpose_y", False) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _binary(fn):
    def run(o):
        return fn(o.x("x"), o.x("y"))
    return run


def _real_div(o):
    return np.true_divide(o.x("x"), o.x("y"))


def _unary(fn):
    def run(o):
        return fn(o.x("x"))
    return run


def _rsqrt(o):
    x = o.x("x")
    eps = np.asarray(o.scalar("epsilon", 1e-12)).astype(x.dtype)
    return np.reciprocal(np.sqrt(x + eps))


def _sigmoid(x):
    one = x.dtype.type(1)
    return one / (one + np.exp(-x))


def _gelu(o):
    x = o.x("x")
    mode = o.scalar("mode", "EXACT")
    t = x.dtype.type
    if mode == "EXACT":
        from scipy.special import erf

        return t(0.5) * x * (t(1) + erf(x / t(math.sqrt(2.0))).astype(x.dtype))
    if mode == "TANH_APPROXIMATION":
        return t(0.5) * x * (t(1) + np.tanh(t(math.sqrt(2.0 / math.pi)) * (x + t(0.044715) * x * x * x)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(t(1.702) * x)
    raise ValueError(f"gelu: unknown mode {mode!r}")


def _reduce(fn):
    def run(o):
        x = o.x32("x")
        axes = o.ints("axes")
        keep = bool(o.scalar("keep_dims", False))
        axis = None if axes is None else tuple(_axis(a, x.ndim) for a in axes)
        return fn(x, axis=axis, keepdims=keep)
    return run


def _reshape(o):
    x = np.asarray(o.get("x"))
    shape = o.ints("shape")
    out = list(shape)
    if 0 in shape:
        if o.opset >= 17:  # iOS17: a 0 matches x's dim counted from the right, else 1.
            for i, s in enumerate(shape):
                if s == 0:
                    j = x.ndim - (len(shape) - i)
                    out[i] = x.shape[j] if j >= 0 else 1
        else:
            if len(shape) != x.ndim:
                raise ValueError("reshape: 0 in shape needs len(shape) == rank(x) before iOS17")
            out = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(out)


def _transpose(o):
    return np.transpose(np.asarray(o.get("x")), o.ints("perm"))


def _expand_dims(o):
    x = np.asarray(o.get("x"))
    out_rank = x.ndim + len(o.ints("axes"))
    axes = sorted(_axis(a, out_rank) for a in o.ints("axes"))
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _squeeze(o):
    x = np.asarray(o.get("x"))
    axes = o.ints("axes")
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_axis(a, x.ndim) for a in axes))


def _softmax(o):
    x = o.x32("x")
    axis = int(o.scalar("axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _layer_norm(o):
    x = o.x32("x")
    axes = o.ints("axes")
    axis = tuple(range(x.ndim)) if axes is None else tuple(_axis(a, x.ndim) for a in axes)
    eps = np.float32(o.scalar("epsilon", 1e-5))
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    # gamma/beta have shape x.shape[axes]; place them on those axes.
    bshape = [x.shape[i] if i in axis else 1 for i in range(x.ndim)]
    if o.has("gamma"):
        y = y * o.x32("gamma").reshape(bshape)
    if o.has("beta"):
        y = y + o.x32("beta").reshape(bshape)
    return y


def _instance_norm(o):
    x = o.x32("x")
    axis = tuple(range(2, x.ndim))
    eps = np.float32(o.scalar("epsilon", 1e-5))
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    bshape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    if o.has("gamma"):
        y = y * o.x32("gamma").reshape(bshape)
    if o.has("beta"):
        y = y + o.x32("beta").reshape(bshape)
    return y


def _concat(o):
    values = [np.asarray(v) for v in o.get("values")]
    axis = _axis(int(o.scalar("axis")), values[0].ndim)
    if o.scalar("interleave", False):
        stacked = np.stack(values, axis=axis + 1)  # [..., d_axis, n, ...]
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _split(o):
    x = np.asarray(o.get("x"))
    axis = _axis(int(o.scalar("axis")), x.ndim)
    sizes = o.ints("split_sizes")
    if sizes is None:
        n = int(o.scalar("num_splits"))
        if x.shape[axis] % n:
            raise ValueError(f"split: dim {x.shape[axis]} not divisible by num_splits {n}")
        sizes = [x.shape[axis] // n] * n
    cuts = np.cumsum(sizes)[:-1]
    return np.split(x, cuts, axis=axis)


def _slice_by_index(o):
    x = np.asarray(o.get("x"))
    r = x.ndim
    begin, end = o.ints("begin"), o.ints("end")
    stride = o.ints("stride", [1] * r)
    bmask = o.bools("begin_mask", [False] * r)
    emask = o.bools("end_mask", [False] * r)
    smask = o.bools("squeeze_mask", [False] * r)
    index = []
    for i in range(r):
        if smask[i]:
            index.append(_axis(begin[i], x.shape[i]))
            continue
        b = None if bmask[i] else begin[i]
        e = None if emask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return x[tuple(index)]


def _gather(o):
    x = np.asarray(o.get("x"))
    idx = np.asarray(o.get("indices")).astype(np.int64)
    if int(o.scalar("batch_dims", 0)) != 0:
        raise UnsupportedOp("gather with batch_dims != 0")
    axis = _axis(int(o.scalar("axis", 0)), x.ndim)
    return np.take(x, idx, axis=axis)


def _cast(o):
    name = o.scalar("dtype")
    if name not in _CAST_DTYPES:
        raise ValueError(f"cast: unknown dtype {name!r}")
    return np.asarray(o.get("x")).astype(_CAST_DTYPES[name])


def _upsample_nearest(o):
    x = o.x("x")
    sh = float(o.scalar("scale_factor_height", 1))
    sw = float(o.scalar("scale_factor_width", 1))
    h, w = x.shape[-2:]
    h2, w2 = int(math.floor(h * sh)), int(math.floor(w * sw))
    rows = np.minimum(np.floor(np.arange(h2) / sh).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(w2) / sw).astype(np.int64), w - 1)
    return x[..., rows[:, None], cols[None, :]]


OPS: Dict[str, Callable] = {
    "const": _const,
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "conv": _conv,
    "linear": _linear,
    "matmul": _matmul,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _real_div,
    "pow": _binary(np.power),
    "sqrt": _unary(np.sqrt),
    "rsqrt": _rsqrt,
    "exp": _unary(np.exp),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reshape": _reshape,
    "transpose": _transpose,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "instance_norm": _instance_norm,
    "silu": _unary(lambda x: x * _sigmoid(x)),
    "sigmoid": _unary(_sigmoid),
    "gelu": _gelu,
    "concat": _concat,
    "split": _split,
    "slice_by_index": _slice_by_index,
    "gather": _gather,
    "cast": _cast,
    "upsample_nearest_neighbor": _upsample_nearest,
}


def _opset_number(func) -> int:
    """15 for iOS15 ... 18 for iOS18 (the function's opset, from the spec version)."""
    target = func.opset_version
    return int(target.value) + 9 if target is not None else 15  # AvailableTarget.iOS15 == 6


class Evaluator:
    """Runs a PyMIL ``Function`` (as the milproto loader builds it) with numpy.

    Walks the function's ops in order; each op's result is computed by this module's code for
    that op (``OPS``), cast to the op's declared output dtype and checked against the declared
    output shape (so an evaluator bug or an exporter shape mistake shows up at the op).
    """

    def __init__(self, func):
        self.func = func
        self.opset = _opset_number(func)

    def run(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Evaluates the function. ``inputs`` maps every function input name to an array of
        its declared shape (cast to the declared dtype here). Returns block outputs by name."""
        values: Dict[int, np.ndarray] = {}
        for name, var in self.func.inputs.items():
            if name not in inputs:
                raise CheckError(f"missing input {name!r} (inputs: {', '.join(self.func.inputs)})")
            arr = np.asarray(inputs[name]).astype(np_dtype(var.dtype))
            if tuple(arr.shape) != tuple(var.shape):
                raise CheckError(f"input {name!r} has shape {list(arr.shape)}, expected {list(var.shape)}")
            values[id(var)] = arr
        extra = set(inputs) - set(self.func.inputs)
        if extra:
            raise CheckError(f"unknown inputs {sorted(extra)} (inputs: {', '.join(self.func.inputs)})")
        with np.errstate(over="ignore", under="ignore"):  # fp16 exp/pow saturate as on device
            return self._run_ops(values)

    def _run_ops(self, values):
        for op in self.func.operations:
            fn = OPS.get(op.op_type)
            if fn is None:
                raise UnsupportedOp(f"op {op.name}: MIL op type {op.op_type!r} is not supported by the milcheck evaluator")
            try:
                result = fn(Op(op, values, self.opset))
            except UnsupportedOp as e:
                raise UnsupportedOp(f"op {op.name} ({op.op_type}): {e}") from e
            except CheckError:
                raise
            except Exception as e:
                raise RuntimeError(f"op {op.name} ({op.op_type}): {type(e).__name__}: {e}") from e
            results = result if isinstance(result, (list, tuple)) else [result]
            if len(results) != len(op.outputs):
                raise RuntimeError(f"op {op.name} ({op.op_type}): {len(results)} results for {len(op.outputs)} outputs")
            for var, val in zip(op.outputs, results):
                if isinstance(val, str):
                    values[id(var)] = val
                    continue
                val = np.asarray(val)
                if var.dtype is not None:
                    val = val.astype(np_dtype(var.dtype), copy=False)
                shape = tuple(var.shape) if _types.is_tensor(var.sym_type) else ()
                if all(isinstance(d, (int, np.integer)) for d in shape) and tuple(val.shape) != shape:
                    raise RuntimeError(
                        f"op {op.name} ({op.op_type}): evaluated shape {list(val.shape)} != declared {list(shape)}"
                    )
                values[id(var)] = val
        return {var.name: values[id(var)] for var in self.func.outputs}


def run_package(pkg_path, inputs: Dict[str, np.ndarray], function: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Validates ``pkg_path`` and evaluates one of its functions on ``inputs``."""
    package = validate(pkg_path)
    return Evaluator(package.function(function)).run(inputs)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _report_line(package: Package) -> List[str]:
    lines = []
    for r in package.reports:
        label = package.path.name if len(package.reports) == 1 else f"{package.path.name}:{r.name}"
        lines.append(f"ok {label}: {r.ops} ops, inputs {', '.join(r.inputs)}, outputs {', '.join(r.outputs)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="milcheck", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="validate .mlpackage folders")
    v.add_argument("packages", nargs="+")
    r = sub.add_parser("run", help="validate, then evaluate a package with the numpy evaluator")
    r.add_argument("package")
    r.add_argument("--inputs", required=True, help="safetensors file with one tensor per model input")
    r.add_argument("--out", required=True, help="safetensors file to write every block output to (float32)")
    r.add_argument("--function", default=None, help="function of a multifunction package (default: the default one)")
    args = parser.parse_args(argv)

    from safetensors.numpy import load_file, save_file

    try:
        if args.command == "validate":
            for pkg in args.packages:
                for line in _report_line(validate(pkg)):
                    print(line)
            return 0
        package = validate(args.package)
        for line in _report_line(package):
            print(line)
        func = package.function(args.function)
        outputs = Evaluator(func).run(load_file(args.inputs))
        tmp = args.out + ".tmp"
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in outputs.items()}, tmp)
        os.replace(tmp, args.out)
        print(f"wrote {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())} to {args.out}")
        return 0
    except (CheckError, UnsupportedOp, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
