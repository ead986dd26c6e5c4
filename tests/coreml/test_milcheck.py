"""Tests of milcheck: the numpy MIL evaluator against hand-computed values, the validator
against good and corrupted packages, and an end-to-end package run.

Run: ``python -m unittest discover tests/coreml`` with a Python that has coremltools 9.0,
numpy, scipy and safetensors (``cargo xtask test`` makes one under target/services).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import milcheck  # noqa: E402  (also silences coremltools' import chatter)

with milcheck._quiet():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types

HERE = Path(__file__).resolve().parent
IOS16, IOS17, IOS18 = ct.target.iOS16, ct.target.iOS17, ct.target.iOS18


def evaluate(build, inputs, target=IOS16):
    """Builds a one-function PyMIL program whose inputs are named and typed after ``inputs``
    with ``build(*input_vars)`` and runs it with milcheck's evaluator (no coremltools passes;
    coremltools' value inference is not used)."""
    dtypes = {np.dtype(np.float16): types.fp16, np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32}
    placeholders = {
        name: mb.placeholder(shape=np.shape(v), dtype=dtypes[np.asarray(v).dtype]) for name, v in inputs.items()
    }
    with milcheck._quiet():
        with Function(placeholders, opset_version=target) as func:
            outs = build(*func.inputs.values())
            func.set_outputs(list(outs) if isinstance(outs, (list, tuple)) else [outs])
    return list(milcheck.Evaluator(func).run(inputs).values())


def one(build, target=IOS16, **inputs):
    return evaluate(build, inputs, target)[0]


def f32(*a):
    return np.array(a, dtype=np.float32)


class OpTests(unittest.TestCase):
    def close(self, got, want, tol=1e-6):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=tol, atol=tol)

    # ---- conv -----------------------------------------------------------------------
    def test_conv_valid_3x3_on_4x4(self):
        x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        w = np.ones((1, 1, 3, 3), np.float32)
        # Window sums: rows/cols 0-2 -> 0+1+2+4+5+6+8+9+10 = 45; shifted right +9 -> 54;
        # shifted down +36 -> 81, 90. Bias 1 added.
        got = one(lambda x: mb.conv(x=x, weight=w, bias=f32(1), pad_type="valid"), x=x)
        self.close(got, [[[[46, 55], [82, 91]]]])

    def test_conv_same_stride2_pads_after(self):
        x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        w = np.ones((1, 1, 3, 3), np.float32)
        # out = ceil(4/2) = 2; total pad = (2-1)*2 + 3 - 4 = 1, all of it after (bottom/right).
        # (0,0): 45; (0,1): cols 2,3 of rows 0-2 = 2+3+6+7+10+11 = 39;
        # (1,0): rows 2,3 cols 0-2 = 8+9+10+12+13+14 = 66; (1,1): 10+11+14+15 = 50.
        got = one(lambda x: mb.conv(x=x, weight=w, pad_type="same", strides=[2, 2]), x=x)
        self.close(got, [[[[45, 39], [66, 50]]]])

    def test_conv_custom_pad_groups_dilation(self):
        x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        w = np.ones((1, 1, 3, 3), np.float32)
        got = one(lambda x: mb.conv(x=x, weight=w, pad_type="custom", pad=[1, 1, 1, 1]), x=x)
        self.assertEqual(got.shape, (1, 1, 4, 4))
        self.close(got[0, 0, 0, 0], 0 + 1 + 4 + 5)
        self.close(got[0, 0, 3, 3], 10 + 11 + 14 + 15)
        # groups=2: each channel scaled by its own 1x1 kernel.
        x2 = np.stack([np.ones((2, 2)), 2 * np.ones((2, 2))])[None].astype(np.float32)
        w2 = np.array([2.0, 3.0], np.float32).reshape(2, 1, 1, 1)
        got = one(lambda x: mb.conv(x=x, weight=w2, groups=2), x=x2)
        self.close(got[0, :, 0, 0], [2, 6])
        # dilation 2 with a 2x2 kernel of ones on a 5x5 ramp: x[0,0]+x[0,2]+x[2,0]+x[2,2] = 24.
        x3 = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
        got = one(lambda x: mb.conv(x=x, weight=np.ones((1, 1, 2, 2), np.float32), dilations=[2, 2]), x=x3)
        self.assertEqual(got.shape, (1, 1, 3, 3))
        self.close(got[0, 0, 0, 0], 24)
        self.close(got[0, 0, 2, 2], 12 + 14 + 22 + 24)

    def test_conv_multi_channel(self):
        # 2 input channels, 2 output channels, 1x1 kernels: a channel mixing matrix.
        x = np.array([1.0, 10.0], np.float32).reshape(1, 2, 1, 1)
        w = np.array([[1, 2], [3, 4]], np.float32).reshape(2, 2, 1, 1)
        self.close(one(lambda x: mb.conv(x=x, weight=w), x=x)[0, :, 0, 0], [21, 43])

    # ---- linear algebra -------------------------------------------------------------
    def test_linear_and_matmul(self):
        x = f32(1, 2)[None]  # [1, 2]
        w = np.array([[1, 0], [1, 1], [2, -1]], np.float32)  # [3, 2]
        self.close(one(lambda x: mb.linear(x=x, weight=w, bias=f32(0, 0, 10)), x=x), [[1, 3, 10]])
        a = np.array([[[1, 2], [3, 4]], [[0, 1], [1, 0]]], np.float32)  # [2, 2, 2]
        b = np.array([[1, 1], [0, 2]], np.float32)  # broadcast over batch
        got = one(lambda a: mb.matmul(x=a, y=b, transpose_y=True), a=a)
        # a[0] @ b.T = [[1*1+2*1, 1*0+2*2], [3+4, 0+8]] = [[3, 4], [7, 8]]; a[1] @ b.T = [[1, 2], [1, 0]]
        self.close(got, [[[3, 4], [7, 8]], [[1, 2], [1, 0]]])
        got = one(lambda a: mb.matmul(x=a, y=b, transpose_x=True), a=a)
        # a[0].T = [[1,3],[2,4]] @ b = [[1, 1+6], [2, 2+8]]
        self.close(got[0], [[1, 7], [2, 10]])

    # ---- elementwise ----------------------------------------------------------------
    def test_elementwise(self):
        x = f32(1, 4, 9)
        self.close(one(lambda x: mb.add(x=x, y=f32(1)), x=x), [2, 5, 10])
        self.close(one(lambda x: mb.sub(x=x, y=f32(1, 1, 1)), x=x), [0, 3, 8])
        self.close(one(lambda x: mb.mul(x=x, y=f32(2)), x=x), [2, 8, 18])
        self.close(one(lambda x: mb.real_div(x=x, y=f32(2)), x=x), [0.5, 2, 4.5])
        self.close(one(lambda x: mb.pow(x=x, y=f32(0.5)), x=x), [1, 2, 3])
        self.close(one(lambda x: mb.sqrt(x=x), x=x), [1, 2, 3])
        self.close(one(lambda x: mb.rsqrt(x=x, epsilon=7.0), x=x), [1 / math.sqrt(8), 1 / math.sqrt(11), 0.25])
        self.close(one(lambda x: mb.exp(x=x), x=f32(0, math.log(3))), [1, 3])
        self.close(one(lambda x: mb.sin(x=x), x=f32(0, math.pi / 2)), [0, 1])
        self.close(one(lambda x: mb.cos(x=x), x=f32(0, math.pi)), [1, -1])
        self.close(one(lambda x: mb.sigmoid(x=x), x=f32(0, math.log(3))), [0.5, 0.75])
        # silu(x) = x * sigmoid(x): silu(ln 3) = ln 3 * 0.75
        self.close(one(lambda x: mb.silu(x=x), x=f32(0, math.log(3))), [0, 0.75 * math.log(3)])

    def test_gelu_modes(self):
        x = f32(-1, 0, 1)
        exact = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in (-1, 0, 1)]
        tanh = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in (-1, 0, 1)]
        sig = [v / (1 + math.exp(-1.702 * v)) for v in (-1, 0, 1)]
        self.close(one(lambda x: mb.gelu(x=x, mode="EXACT"), x=x), exact)
        self.close(one(lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"), x=x), tanh)
        self.close(one(lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"), x=x), sig)
        self.close(exact[2], 0.8413447, 1e-6)  # Phi(1)

    # ---- reductions and normalisation -----------------------------------------------
    def test_reductions(self):
        x = np.array([[1, 2], [3, 4]], np.float32)
        self.close(one(lambda x: mb.reduce_mean(x=x, axes=[1], keep_dims=True), x=x), [[1.5], [3.5]])
        self.close(one(lambda x: mb.reduce_sum(x=x, axes=[0]), x=x), [4, 6])
        self.close(one(lambda x: mb.reduce_sum(x=x, axes=[-1, 0]), x=x), 10)

    def test_softmax(self):
        self.close(one(lambda x: mb.softmax(x=x, axis=-1), x=f32(0, math.log(2))), [1 / 3, 2 / 3])
        x = np.array([[0, 0], [math.log(3), 0]], np.float32)
        self.close(one(lambda x: mb.softmax(x=x, axis=0), x=x), [[0.25, 0.5], [0.75, 0.5]])

    def test_layer_norm(self):
        # [1, 2, 3, 4]: mean 2.5, variance 1.25.
        x = f32(1, 2, 3, 4)[None]
        eps = 1e-5
        norm = [(v - 2.5) / math.sqrt(1.25 + eps) for v in (1, 2, 3, 4)]
        got = one(lambda x: mb.layer_norm(x=x, axes=[-1], gamma=f32(2, 2, 2, 2), beta=f32(1, 1, 1, 1), epsilon=eps), x=x)
        self.close(got[0], [2 * n + 1 for n in norm])
        # Over two axes, no gamma/beta: [[0, 2], [4, 6]] has mean 3, variance 5.
        y = np.array([[[0, 2], [4, 6]]], np.float32)
        got = one(lambda y: mb.layer_norm(x=y, axes=[1, 2], epsilon=0.0), y=y)
        self.close(got[0], np.array([[-3, -1], [1, 3]]) / math.sqrt(5))

    def test_instance_norm_group_norm_shape(self):
        # Group norm as the exporter writes it: [N, G, C/G*H*W] normalised per (n, g).
        x = np.array([[[1, 2, 3, 4], [2, 4, 6, 8]]], np.float32)  # groups: mean 2.5 var 1.25; mean 5 var 5
        eps = 1e-5
        got = one(lambda x: mb.instance_norm(x=x, gamma=f32(1, 2), beta=f32(0, 1), epsilon=eps), x=x)
        g0 = [(v - 2.5) / math.sqrt(1.25 + eps) for v in (1, 2, 3, 4)]
        g1 = [2 * (v - 5) / math.sqrt(5 + eps) + 1 for v in (2, 4, 6, 8)]
        self.close(got[0], [g0, g1], 1e-5)
        # Rank 4: [1, 1, 2, 2] over H, W.
        x4 = np.array([0, 0, 2, 2], np.float32).reshape(1, 1, 2, 2)  # mean 1, var 1
        self.close(one(lambda x: mb.instance_norm(x=x, epsilon=0.0), x=x4).reshape(-1), [-1, -1, 1, 1])

    # ---- shape ops ------------------------------------------------------------------
    def test_shape_ops(self):
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        self.close(one(lambda x: mb.reshape(x=x, shape=[3, -1]), x=x), [[0, 1], [2, 3], [4, 5]])
        self.close(one(lambda x: mb.reshape(x=x, shape=[0, 3]), x=x), x)
        self.close(one(lambda x: mb.transpose(x=x, perm=[1, 0]), x=x), [[0, 3], [1, 4], [2, 5]])
        self.assertEqual(one(lambda x: mb.expand_dims(x=x, axes=[0, -1]), x=x).shape, (1, 2, 3, 1))
        self.assertEqual(one(lambda x: mb.expand_dims(x=x, axes=[1]), x=x).shape, (2, 1, 3))
        y = np.zeros((1, 2, 1, 3), np.float32)
        self.assertEqual(one(lambda y: mb.squeeze(x=y, axes=[2]), y=y).shape, (1, 2, 3))
        self.assertEqual(one(lambda y: mb.squeeze(x=y), y=y).shape, (2, 3))

    def test_reshape_zero_ios17(self):
        x = np.zeros((2, 50), np.float32)
        self.assertEqual(one(lambda x: mb.reshape(x=x, shape=[1, 0, -1, 0]), target=IOS17, x=x).shape, (1, 1, 2, 50))

    def test_concat_split_slice_gather(self):
        a = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
        b = np.array([[7, 8], [9, 10], [11, 12]], np.float32)
        self.close(one(lambda a, b: mb.concat(values=[a, b], axis=0, interleave=True), a=a, b=b),
                   [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])
        self.close(one(lambda a, b: mb.concat(values=[a, b], axis=1), a=a, b=b),
                   [[1, 2, 7, 8], [3, 4, 9, 10], [5, 6, 11, 12]])
        x = np.arange(10, dtype=np.float32).reshape(1, 10)
        parts = evaluate(lambda x: mb.split(x=x, split_sizes=[3, 7], axis=1), {"x": x})
        self.close(parts[0], [[0, 1, 2]])
        self.close(parts[1], [[3, 4, 5, 6, 7, 8, 9]])
        parts = evaluate(lambda x: mb.split(x=x, num_splits=2, axis=-1), {"x": x})
        self.close(parts[1], [[5, 6, 7, 8, 9]])
        y = np.arange(12, dtype=np.float32).reshape(3, 4)
        got = one(lambda y: mb.slice_by_index(x=y, begin=[1, 0], end=[3, 4], stride=[1, 2]), y=y)
        self.close(got, [[4, 6], [8, 10]])
        # begin_mask on dim 0, end_mask on dim 1, negative begin on dim 1.
        got = one(lambda y: mb.slice_by_index(x=y, begin=[2, -2], end=[1, 0], begin_mask=[True, False],
                                              end_mask=[False, True]), y=y)
        self.close(got, [[2, 3]])
        got = one(lambda y: mb.slice_by_index(x=y, begin=[0, 1], end=[3, 2], squeeze_mask=[False, True]), y=y)
        self.close(got, [1, 5, 9])
        got = one(lambda y: mb.gather(x=y, indices=np.array([2, 0], np.int32), axis=0), y=y)
        self.close(got, [[8, 9, 10, 11], [0, 1, 2, 3]])
        got = one(lambda y: mb.gather(x=y, indices=np.array([[3], [1]], np.int32), axis=1), y=y)
        self.close(got, np.array([[[3], [1]], [[7], [5]], [[11], [9]]]))

    def test_cast_and_upsample(self):
        got = one(lambda x: mb.cast(x=x, dtype="int32"), x=f32(2.7, -2.7, 0.2))
        self.assertEqual(got.dtype, np.int32)
        self.assertEqual(got.tolist(), [2, -2, 0])
        got = one(lambda x: mb.cast(x=x, dtype="fp16"), x=f32(1 / 3))
        self.assertEqual(got.dtype, np.float16)
        self.assertEqual(float(got[0]), float(np.float16(0.33325195)))
        x = np.array([[1, 2], [3, 4]], np.float32).reshape(1, 1, 2, 2)
        got = one(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2), x=x)
        self.close(got[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])

    def test_fp16_ops_compute_in_fp16(self):
        x = np.array([1.0, 2049.0], np.float16)  # 2049 is not representable: rounds to 2048
        got = one(lambda x: mb.add(x=x, y=np.array([1.0, 1.0], np.float16)), x=x)
        self.assertEqual(got.dtype, np.float16)
        # fp16: 2048 + 1 = 2049 rounds to 2048 (ties to even); fp32 would give 2049.
        self.assertEqual(got.tolist(), [2.0, 2048.0])

    # ---- constexpr (compressed weights) ---------------------------------------------
    def test_unpack_bits(self):
        # 2-bit example of the MIL docs: byte0 = i3 i2 i1 i0 = 01 10 11 00, byte1 = xx xx xx 11.
        got = milcheck.unpack_bits(np.array([0b01101100, 0b00000011], np.uint8), 2, 5)
        self.assertEqual(got.tolist(), [0, 3, 2, 1, 3])
        # 6-bit values crossing a byte: 63 then 5 -> byte0 = 0x3F | (5 & 3) << 6, byte1 = 5 >> 2.
        self.assertEqual(milcheck.unpack_bits(np.array([0x7F, 0x01], np.uint8), 6, 2).tolist(), [63, 5])

    def test_lut_to_dense_ios16_packed_4bit(self):
        lut = (np.arange(16) * 0.5).astype(np.float16)
        # indices 1, 2, 15, 0, 7 at 4 bits, low nibble first: 0x21, 0x0F, 0x07.
        packed = np.array([0x21, 0x0F, 0x07], np.uint8)

        def build(x):
            w = mb.constexpr_lut_to_dense(indices=packed, lut=lut, shape=np.array([5], np.uint32))
            return mb.add(x=x, y=w)

        got = one(build, x=np.zeros(5, np.float16))
        self.assertEqual(got.tolist(), [0.5, 1.0, 7.5, 0.0, 3.5])

    def test_lut_to_dense_ios18_grouped(self):
        # Case 1 of the MIL docs: uint2 indices [6, 2], two LUTs over axis 0 (groups of 3 rows).
        indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], np.uint8).reshape(6, 2).astype(types.np_uint2_dtype)
        lut = np.array([1, 5, 9, 13, 2, 10, 18, 26], np.float16).reshape(2, 1, 4, 1)

        def build(x):
            return mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=indices, lut=lut))

        got = one(build, target=IOS18, x=np.zeros((6, 2), np.float16))
        self.assertEqual(got.tolist(), [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])

    def test_lut_to_dense_ios18_vector(self):
        # Case 2.2 of the MIL docs: 1-bit vector palettisation, vectors of 3 along axis 2.
        indices = np.array([0, 0, 1, 0, 1, 1, 0, 0], np.uint8).reshape(2, 2, 2).astype(types.np_uint1_dtype)
        lut = np.array([1, 2, 3, 10, 20, 30], np.float32).reshape(1, 1, 1, 2, 3)

        def build(x):
            return mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=indices, lut=lut, vector_axis=2))

        got = one(build, target=IOS18, x=np.zeros((2, 2, 6), np.float32))
        self.close(got, [[[1, 2, 3, 1, 2, 3], [10, 20, 30, 1, 2, 3]], [[10, 20, 30, 10, 20, 30], [1, 2, 3, 1, 2, 3]]])

    def test_affine_dequantize(self):
        q = np.array([[0, 128, 255], [10, 20, 30]], np.uint8)

        def build(x):
            w = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=np.array([128, 10], np.uint8),
                                               scale=f32(0.5, 2.0), axis=0)
            return mb.add(x=x, y=w)

        # row 0: 0.5 * (q - 128); row 1: 2 * (q - 10)
        self.close(one(build, x=np.zeros((2, 3), np.float32)), [[-64, 0, 63.5], [0, 20, 40]])

    def test_blockwise_shift_scale(self):
        data = np.array([[1, 2, 3, 4], [-1, -2, -3, -4]], np.int8)
        scale = np.array([[2, 10], [1, 1]], np.float32)
        offset = np.array([[1, 0], [0, -4]], np.int8)

        def build(x):
            return mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset))

        # blocks of 2 columns: row 0 -> [2*(1-1), 2*(2-1), 10*3, 10*4]; row 1 -> [-1, -2, 1, 0]
        self.close(one(build, target=IOS18, x=np.zeros((2, 4), np.float32)), [[0, 2, 30, 40], [-1, -2, 1, 0]])

    def test_docstring_lists_every_op(self):
        doc = milcheck.__doc__
        listed = doc[doc.index("Supported ops"):doc.index("Precision:")]
        for name in milcheck.OPS:
            self.assertRegex(listed, rf"\b{name}\b")

    def test_unknown_op_is_named(self):
        with self.assertRaisesRegex(milcheck.UnsupportedOp, "'tanh'"):
            one(lambda x: mb.tanh(x=x), x=f32(1))


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------


def save(prog, path, target=IOS16, precision=None):
    with milcheck._quiet():
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                           compute_precision=precision or ct.precision.FLOAT32)
        model.save(str(path))
    return model


def save_model(model, path):
    with milcheck._quiet():
        model.save(str(path))


def numpy_conv(x, w, b=None):
    """Direct (loop) cross-correlation, valid padding, stride 1: the reference."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1), np.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + kh, j:j + kw], w)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def spec_of(pkg):
    spec = ct.proto.Model_pb2.Model()
    spec.ParseFromString((Path(pkg) / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
    return spec


def write_spec(pkg, spec):
    (Path(pkg) / "Data/com.apple.CoreML/model.mlmodel").write_bytes(spec.SerializeToString())


class PackageTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="milcheck-"))
        rng = np.random.default_rng(7)
        cls.w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
        cls.b = rng.standard_normal(6).astype(np.float32)
        cls.gamma = rng.standard_normal(5).astype(np.float32)
        cls.beta = rng.standard_normal(5).astype(np.float32)
        w, b, gamma, beta = cls.w, cls.b, cls.gamma, cls.beta

        with milcheck._quiet():
            @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 7, 7))], opset_version=IOS16)
            def prog(image):
                y = mb.conv(x=image, weight=w, bias=b, pad_type="valid")
                y = mb.silu(x=y)
                y = mb.softmax(x=y, axis=1)
                return mb.layer_norm(x=y, axes=[-1], gamma=gamma, beta=beta, epsilon=1e-5, name="features")

        cls.prog = prog
        cls.good = cls.tmp / "good.mlpackage"
        save(prog, cls.good)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def reference(self, x):
        y = numpy_conv(x.astype(np.float64), self.w.astype(np.float64), self.b)
        y = y / (1 + np.exp(-y))
        e = np.exp(y - y.max(axis=1, keepdims=True))
        y = e / e.sum(axis=1, keepdims=True)
        m = y.mean(-1, keepdims=True)
        v = ((y - m) ** 2).mean(-1, keepdims=True)
        return (y - m) / np.sqrt(v + 1e-5) * self.gamma + self.beta

    def copy(self, name):
        dst = self.tmp / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.good, dst)
        return dst

    def test_validate_accepts_good_package(self):
        package = milcheck.validate(self.good)
        (report,) = package.reports
        self.assertEqual(report.inputs, ["image fp32[2, 3, 7, 7]"])
        self.assertEqual(report.outputs, ["features fp32[2, 6, 5, 5]"])

    def test_validate_rejects_wrong_declared_output_shape(self):
        bad = self.copy("bad-shape.mlpackage")
        spec = spec_of(bad)
        block = spec.mlProgram.functions["main"].block_specializations["CoreML6"]
        op = [o for o in block.operations if o.type == "layer_norm"][0]
        op.outputs[0].type.tensorType.dimensions[3].constant.size = 4
        write_spec(bad, spec)
        with self.assertRaisesRegex(milcheck.CheckError, "Mismatch between var types"):
            milcheck.validate(bad)

    def test_validate_rejects_description_mismatch(self):
        bad = self.copy("bad-desc.mlpackage")
        spec = spec_of(bad)
        spec.description.output[0].type.multiArrayType.shape[3] = 4
        write_spec(bad, spec)
        with self.assertRaisesRegex(milcheck.CheckError, r"description output features is fp32\[2, 6, 5, 4\]"):
            milcheck.validate(bad)

    def test_validate_rejects_bad_const_type(self):
        bad = self.copy("bad-const.mlpackage")
        spec = spec_of(bad)
        block = spec.mlProgram.functions["main"].block_specializations["CoreML6"]
        const = [o for o in block.operations if o.type == "const" and "weight" in o.outputs[0].name][0]
        const.outputs[0].type.tensorType.dimensions[0].constant.size = 5
        write_spec(bad, spec)
        with self.assertRaisesRegex(milcheck.CheckError, "is declared"):
            milcheck.validate(bad)

    def test_validate_rejects_bad_manifest_and_unknown_op(self):
        bad = self.copy("bad-manifest.mlpackage")
        manifest = json.loads((bad / "Manifest.json").read_text())
        manifest["rootModelIdentifier"] = "nope"
        (bad / "Manifest.json").write_text(json.dumps(manifest))
        with self.assertRaisesRegex(milcheck.CheckError, "rootModelIdentifier"):
            milcheck.validate(bad)
        bad = self.copy("bad-op.mlpackage")
        spec = spec_of(bad)
        block = spec.mlProgram.functions["main"].block_specializations["CoreML6"]
        [o for o in block.operations if o.type == "silu"][0].type = "silux"
        write_spec(bad, spec)
        with self.assertRaisesRegex(milcheck.CheckError, "silux not registered"):
            milcheck.validate(bad)

    def test_run_matches_numpy(self):
        x = np.random.default_rng(1).standard_normal((2, 3, 7, 7)).astype(np.float32)
        got = milcheck.run_package(self.good, {"image": x})
        np.testing.assert_allclose(got["features"], self.reference(x), atol=1e-5, rtol=1e-5)

    def test_cli_run_and_validate(self):
        from safetensors.numpy import load_file, save_file

        x = np.random.default_rng(2).standard_normal((2, 3, 7, 7)).astype(np.float32)
        inputs, out = self.tmp / "in.safetensors", self.tmp / "out.safetensors"
        save_file({"image": x.astype(np.float64)}, str(inputs))  # cast to the declared fp32
        cli = [sys.executable, str(HERE / "milcheck.py")]
        res = subprocess.run(cli + ["run", str(self.good), "--inputs", str(inputs), "--out", str(out)],
                             capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("ok good.mlpackage: ", res.stdout)
        got = load_file(str(out))["features"]
        self.assertEqual(got.dtype, np.float32)
        np.testing.assert_allclose(got, self.reference(x), atol=1e-5, rtol=1e-5)
        bad = self.copy("bad-cli.mlpackage")
        spec = spec_of(bad)
        spec.description.output[0].name = "other"
        write_spec(bad, spec)
        res = subprocess.run(cli + ["validate", str(self.good), str(bad)], capture_output=True, text=True)
        self.assertEqual(res.returncode, 1)
        self.assertIn("description outputs ['other'] do not match", res.stderr)

    def test_fp16_package_shows_fp16_error(self):
        path = self.tmp / "fp16.mlpackage"
        save(self.prog, path, precision=ct.precision.FLOAT16)
        package = milcheck.validate(path)
        types_seen = {op.outputs[0].dtype for op in package.function(None).operations if op.op_type == "conv"}
        self.assertEqual(types_seen, {types.fp16})
        x = np.random.default_rng(3).standard_normal((2, 3, 7, 7)).astype(np.float32)
        got = milcheck.Evaluator(package.function(None)).run({"image": x})["features"]
        err = np.abs(got - self.reference(x)).max()
        self.assertLess(err, 0.05)
        self.assertGreater(err, 1e-5)  # fp16 rounding is visible

    def test_palettized_and_quantized_weights_decompress_exactly(self):
        # Weights with 16 distinct fp16-exact values: 4-bit k-means palettisation is lossless,
        # so the compressed package must give the fp32 reference.
        rng = np.random.default_rng(5)
        w = (rng.integers(-8, 8, size=(8, 4, 3, 3)) / 8).astype(np.float32)

        def make(target):
            with milcheck._quiet():
                @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 5, 5))], opset_version=target)
                def prog(x):
                    return mb.conv(x=x, weight=w, name="y")
            return prog

        x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
        want = numpy_conv(x.astype(np.float64), w.astype(np.float64))
        opt = ct.optimize.coreml
        cases = {
            "lut16": (IOS16, opt.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=1), "constexpr_lut_to_dense"),
            "lut18g": (IOS18, opt.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel",
                                                     group_size=4, weight_threshold=1), "constexpr_lut_to_dense"),
        }
        for name, (target, config, op_type) in cases.items():
            with self.subTest(name):
                with milcheck._quiet():
                    model = save(make(target), self.tmp / f"{name}-src.mlpackage", target=target)
                    model = opt.palettize_weights(model, opt.OptimizationConfig(global_config=config))
                path = self.tmp / f"{name}.mlpackage"
                save_model(model, path)
                func = milcheck.validate(path).function(None)
                self.assertIn(op_type, [op.op_type for op in func.operations])
                got = milcheck.Evaluator(func).run({"x": x})["y"]
                np.testing.assert_allclose(got, want, atol=1e-5)
        # Symmetric int8 with per-channel scale = max|w| / 127 recovers k * scale exactly.
        wq = (rng.integers(-127, 128, size=(8, 4, 3, 3)) * (2.0 ** -7)).astype(np.float32)
        wq[:, 0, 0, 0] = 127 * 2.0 ** -7

        def make_q(target):
            with milcheck._quiet():
                @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 5, 5))], opset_version=target)
                def prog(x):
                    return mb.conv(x=x, weight=wq, name="y")
            return prog

        want = numpy_conv(x.astype(np.float64), wq.astype(np.float64))
        int8 = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=1)
        for target, op_type, cfg in ((IOS16, "constexpr_affine_dequantize", int8),
                                     (IOS18, "constexpr_blockwise_shift_scale", int8)):
            with self.subTest(op_type):
                with milcheck._quiet():
                    model = save(make_q(target), self.tmp / f"{op_type}-src.mlpackage", target=target)
                    model = opt.linear_quantize_weights(model, opt.OptimizationConfig(global_config=cfg))
                path = self.tmp / f"{op_type}.mlpackage"
                save_model(model, path)
                func = milcheck.validate(path).function(None)
                self.assertIn(op_type, [op.op_type for op in func.operations])
                got = milcheck.Evaluator(func).run({"x": x})["y"]
                np.testing.assert_allclose(got, want, atol=1e-5)
        # int4 blocks of 2 input channels (iOS18): values k * 2^-3, |k| <= 7, one 7 per block.
        w4 = (rng.integers(-7, 8, size=(8, 4, 3, 3)) * 0.125).astype(np.float32)
        w4[:, 0::2, 0, 0] = 7 * 0.125
        wq = w4
        want = numpy_conv(x.astype(np.float64), w4.astype(np.float64))
        with milcheck._quiet():
            model = save(make_q(IOS18), self.tmp / "int4-src.mlpackage", target=IOS18)
            cfg = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                              block_size=2, weight_threshold=1)
            model = opt.linear_quantize_weights(model, opt.OptimizationConfig(global_config=cfg))
        save_model(model, self.tmp / "int4.mlpackage")
        func = milcheck.validate(self.tmp / "int4.mlpackage").function(None)
        (op,) = [op for op in func.operations if op.op_type == "constexpr_blockwise_shift_scale"]
        self.assertEqual(op.inputs["data"].dtype, types.int4)
        self.assertEqual(op.inputs["scale"].shape, (8, 2, 1, 1))
        np.testing.assert_allclose(milcheck.Evaluator(func).run({"x": x})["y"], want, atol=1e-5)

    def test_validate_rejects_corrupt_weight_bin(self):
        import struct

        for name, offset, data, message in (
            ("sentinel", 64, b"\0\0\0\0", "Invalid sentinel in blob_metadata"),
            ("dtype", 68, struct.pack("<I", 1), "Metadata data type does not match requested type"),
            ("data-offset", 80, struct.pack("<Q", 96), "blob data offset 96 is not 64-byte aligned"),
        ):
            with self.subTest(name):
                bad = self.copy(f"bad-blob-{name}.mlpackage")
                path = bad / "Data/com.apple.CoreML/weights/weight.bin"
                blob = bytearray(path.read_bytes())
                blob[offset:offset + len(data)] = data
                path.write_bytes(bytes(blob))
                with self.assertRaisesRegex(milcheck.CheckError, message):
                    milcheck.validate(bad)

    def test_multifunction_package(self):
        with milcheck._quiet():
            @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=IOS18)
            def double(x):
                return mb.mul(x=x, y=f32(2, 2), name="y")

            @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=IOS18)
            def plus(x):
                return mb.add(x=x, y=f32(1, 1), name="y")

        a, b = self.tmp / "mf-a.mlpackage", self.tmp / "mf-b.mlpackage"
        save(double, a, target=IOS18)
        save(plus, b, target=IOS18)
        desc = ct.utils.MultiFunctionDescriptor()
        desc.add_function(str(a), src_function_name="main", target_function_name="double")
        desc.add_function(str(b), src_function_name="main", target_function_name="plus")
        desc.default_function_name = "double"
        mf = self.tmp / "mf.mlpackage"
        with milcheck._quiet():
            ct.utils.save_multifunction(desc, str(mf))
        package = milcheck.validate(mf)
        self.assertEqual(sorted(r.name for r in package.reports), ["double", "plus"])
        x = {"x": f32(1, 2)}
        self.assertEqual(milcheck.Evaluator(package.function(None)).run(x)["y"].tolist(), [2, 4])
        self.assertEqual(milcheck.Evaluator(package.function("plus")).run(x)["y"].tolist(), [2, 3])
        # A wrong declared output shape in the second function is caught too.
        spec = spec_of(mf)
        fdesc = [f for f in spec.description.functions if f.name == "plus"][0]
        fdesc.output[0].type.multiArrayType.shape[0] = 3
        write_spec(mf, spec)
        with self.assertRaisesRegex(milcheck.CheckError, r"mf.mlpackage:plus: description output y is fp32\[3\]"):
            milcheck.validate(mf)


if __name__ == "__main__":
    unittest.main()
