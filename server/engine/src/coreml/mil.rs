//! A builder for MIL programs (Core ML's "ML Program" intermediate language) and the
//! `Model` specification that wraps them, serialized with the protobuf messages of Apple's
//! `MIL.proto` and `Model.proto` (crate `coreml-proto`).
//!
//! What the builder writes follows what coremltools 9.0 writes (facts in
//! `shared/notes/coreml-export.md`):
//! - every op carries a `name` attribute; its parameters (axes, permutations, epsilons,
//!   modes) are separate `const` ops named `{op}_{param}`, bound by name;
//! - constants with 10 or more elements live in `weight.bin` (a `blobFileValue` naming the
//!   offset of the blob's metadata record), smaller ones inline (`immediateValue`; fp16 as
//!   little-endian bytes);
//! - the function `main` declares typed inputs, an opset (`CoreML6`/`7`/`8` for iOS 16/17/18)
//!   and one block whose outputs name the model's outputs.
//!
//! Every op's output type is inferred here (shape rules of the MIL op definitions in
//! coremltools' `mil/ops/defs/iOS15..18`) and written into the proto; coremltools' loader
//! re-runs its own inference and refuses any disagreement, which is what the tests check.
//!
//! Shapes are `Vec<usize>` (no dynamic dimensions: the exporters fix every size).

use std::collections::HashMap;
use std::io::{Seek, Write};

use candle_core::{DType, Tensor};
use coreml_proto::proto as spec;
use coreml_proto::proto::mil_spec as pb;
use half::f16;

use super::blob::{BlobDType, BlobWriter};
use super::compress::{self, Compression};
use crate::error::{Error, Result};

/// MIL tensor element types the exporters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dt {
    F16,
    F32,
    I32,
    I8,
    U8,
    U4,
    U6,
    U32,
    Bool,
    Str,
}

impl Dt {
    fn proto(self) -> pb::DataType {
        match self {
            Dt::F16 => pb::DataType::Float16,
            Dt::F32 => pb::DataType::Float32,
            Dt::I32 => pb::DataType::Int32,
            Dt::I8 => pb::DataType::Int8,
            Dt::U8 => pb::DataType::Uint8,
            Dt::U4 => pb::DataType::Uint4,
            Dt::U6 => pb::DataType::Uint6,
            Dt::U32 => pb::DataType::Uint32,
            Dt::Bool => pb::DataType::Bool,
            Dt::Str => pb::DataType::String,
        }
    }

    /// The `dtype` string MIL's `cast` op takes.
    pub fn mil_name(self) -> &'static str {
        match self {
            Dt::F16 => "fp16",
            Dt::F32 => "fp32",
            Dt::I32 => "int32",
            Dt::I8 => "int8",
            Dt::U8 => "uint8",
            Dt::U4 => "uint4",
            Dt::U6 => "uint6",
            Dt::U32 => "uint32",
            Dt::Bool => "bool",
            Dt::Str => "string",
        }
    }
}

/// A value of the program: its name, element type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Var {
    pub name: String,
    pub dtype: Dt,
    pub shape: Vec<usize>,
}

impl Var {
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The deployment target: decides the specification version and the opset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Ios16,
    Ios17,
    Ios18,
}

impl Target {
    /// `Model.specificationVersion` (7, 8, 9 as coremltools 9.0 writes them).
    pub fn spec_version(self) -> i32 {
        match self {
            Target::Ios16 => 7,
            Target::Ios17 => 8,
            Target::Ios18 => 9,
        }
    }
    /// The function's opset name.
    pub fn opset(self) -> &'static str {
        match self {
            Target::Ios16 => "CoreML6",
            Target::Ios17 => "CoreML7",
            Target::Ios18 => "CoreML8",
        }
    }
    pub fn id(self) -> &'static str {
        match self {
            Target::Ios16 => "ios16",
            Target::Ios17 => "ios17",
            Target::Ios18 => "ios18",
        }
    }
    /// Parses `ios16`, `ios17`, `ios18` (also `macos13/14/15`, the same opsets).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "ios16" | "macos13" => Target::Ios16,
            "ios17" | "macos14" => Target::Ios17,
            "ios18" | "macos15" => Target::Ios18,
            _ => return None,
        })
    }
}

/// A small constant's value, written inline.
#[derive(Debug, Clone)]
pub enum Imm {
    F32(Vec<f32>),
    F16(Vec<f32>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    Bool(bool),
    Str(String),
}

/// Counters of what the weights became, for the export report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WeightStats {
    /// Parameters written (elements).
    pub params: u64,
    /// Tensors stored compressed (palettized or int8).
    pub compressed_tensors: u64,
    /// Sum over compressed tensors of squared reconstruction error, and of squared weights.
    pub error_sq: f64,
    pub weight_sq: f64,
    /// Largest absolute reconstruction error of one weight.
    pub max_abs_error: f64,
}

impl WeightStats {
    /// Adds the reconstruction error of storing `weights` as `stored`.
    fn count(&mut self, weights: &[f32], stored: &[f32]) {
        for (w, d) in weights.iter().zip(stored) {
            let e = f64::from(w - d);
            self.error_sq += e * e;
            self.weight_sq += f64::from(*w) * f64::from(*w);
            self.max_abs_error = self.max_abs_error.max(e.abs());
        }
    }

    /// ‖W − Ŵ‖ / ‖W‖ over the compressed tensors (0 when none are).
    pub fn relative_error(&self) -> f64 {
        if self.weight_sq > 0.0 {
            (self.error_sq / self.weight_sq).sqrt()
        } else {
            0.0
        }
    }
}

/// Builds one MIL function. Ops are appended in order; every method returns the new value.
pub struct FnBuilder<'w, W: Write + Seek> {
    ops: Vec<pb::Operation>,
    inputs: Vec<Var>,
    outputs: Vec<Var>,
    names: HashMap<String, usize>,
    scope: Vec<String>,
    blobs: &'w mut BlobWriter<W>,
    /// The element type of weights and activations (fp16 or fp32).
    pub precision: Dt,
    /// How weight matrices are stored.
    pub compression: Option<Compression>,
    pub target: Target,
    pub stats: WeightStats,
}

/// Weight blob file as programs name it.
pub const WEIGHT_FILE: &str = "@model_path/weights/weight.bin";
/// Constants with at least this many elements go to `weight.bin` (as coremltools does).
const BLOB_MIN: usize = 10;
/// Weight tensors smaller than this are never compressed (norms, biases, small convs).
const COMPRESS_MIN: usize = 2048;

fn tensor_type(dtype: Dt, shape: &[usize]) -> pb::ValueType {
    pb::ValueType {
        r#type: Some(pb::value_type::Type::TensorType(pb::TensorType {
            data_type: dtype.proto() as i32,
            rank: shape.len() as i64,
            dimensions: shape
                .iter()
                .map(|&d| pb::Dimension { dimension: Some(pb::dimension::Dimension::Constant(pb::dimension::ConstantDimension { size: d as u64 })) })
                .collect(),
            attributes: HashMap::new(),
        })),
    }
}

fn named(name: &str, dtype: Dt, shape: &[usize]) -> pb::NamedValueType {
    pb::NamedValueType { name: name.to_string(), r#type: Some(tensor_type(dtype, shape)) }
}

fn string_value(s: &str) -> pb::Value {
    immediate(Dt::Str, &[], pb::tensor_value::Value::Strings(pb::tensor_value::RepeatedStrings { values: vec![s.to_string()] }))
}

fn immediate(dtype: Dt, shape: &[usize], v: pb::tensor_value::Value) -> pb::Value {
    pb::Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(dtype, shape)),
        value: Some(pb::value::Value::ImmediateValue(pb::value::ImmediateValue {
            value: Some(pb::value::immediate_value::Value::Tensor(pb::TensorValue { value: Some(v) })),
        })),
    }
}

fn blob_value(dtype: Dt, shape: &[usize], offset: u64) -> pb::Value {
    pb::Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(dtype, shape)),
        value: Some(pb::value::Value::BlobFileValue(pb::value::BlobFileValue { file_name: WEIGHT_FILE.into(), offset })),
    }
}

fn bind(name: &str) -> pb::Argument {
    pb::Argument { arguments: vec![pb::argument::Binding { binding: Some(pb::argument::binding::Binding::Name(name.to_string())) }] }
}

fn bad(message: impl Into<String>) -> Error {
    Error::invalid("model", message)
}

/// Numpy-style broadcast of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

fn f32_data(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl<'w, W: Write + Seek> FnBuilder<'w, W> {
    pub fn new(blobs: &'w mut BlobWriter<W>, precision: Dt, compression: Option<Compression>, target: Target) -> Self {
        Self { ops: Vec::new(), inputs: Vec::new(), outputs: Vec::new(), names: HashMap::new(), scope: Vec::new(), blobs, precision, compression, target, stats: WeightStats::default() }
    }

    /// Runs `f` with `name` appended to the op-name prefix (e.g. `down_blocks_0`).
    pub fn scoped<T>(&mut self, name: impl std::fmt::Display, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.scope.push(name.to_string());
        let r = f(self);
        self.scope.pop();
        r
    }

    /// A fresh, unique value name from the current scope and `hint`.
    fn fresh(&mut self, hint: &str) -> String {
        let mut base = self.scope.join("_");
        if !base.is_empty() {
            base.push('_');
        }
        base.push_str(hint);
        let base: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        let n = self.names.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base
        } else {
            format!("{base}_{}", *n - 1)
        }
    }

    fn push_op(&mut self, ty: &str, name: &str, inputs: Vec<(&str, pb::Argument)>, outputs: Vec<pb::NamedValueType>, mut attributes: HashMap<String, pb::Value>) {
        attributes.insert("name".into(), string_value(name));
        self.ops.push(pb::Operation {
            r#type: ty.to_string(),
            inputs: inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            outputs,
            blocks: Vec::new(),
            attributes,
        });
    }

    /// Declares a function input.
    pub fn input(&mut self, name: &str, dtype: Dt, shape: &[usize]) -> Var {
        let v = Var { name: name.to_string(), dtype, shape: shape.to_vec() };
        self.names.insert(name.to_string(), 1);
        self.inputs.push(v.clone());
        v
    }

    /// Marks `v` as a function output named `name` (renaming the op that made it).
    ///
    /// # Errors
    /// When `v` is not made by an op of this function (an input cannot be an output).
    pub fn output(&mut self, v: &Var, name: &str) -> Result<Var> {
        let op = self.ops.iter_mut().rev().find(|op| op.outputs.iter().any(|o| o.name == v.name)).ok_or_else(|| bad(format!("output {name}: {} is not made by an op", v.name)))?;
        for o in &mut op.outputs {
            if o.name == v.name {
                o.name = name.to_string();
            }
        }
        for op in &mut self.ops {
            for arg in op.inputs.values_mut() {
                for b in &mut arg.arguments {
                    if let Some(pb::argument::binding::Binding::Name(n)) = &mut b.binding {
                        if *n == v.name {
                            *n = name.to_string();
                        }
                    }
                }
            }
        }
        let out = Var { name: name.to_string(), ..v.clone() };
        self.outputs.push(out.clone());
        Ok(out)
    }

    /// A constant of `dtype` and `shape` written inline (small) or into the weight file.
    fn constant(&mut self, hint: &str, dtype: Dt, shape: &[usize], value: pb::Value) -> Var {
        let name = self.fresh(hint);
        let attributes = HashMap::from([("val".to_string(), value)]);
        self.push_op("const", &name, vec![], vec![named(&name, dtype, shape)], attributes);
        Var { name, dtype, shape: shape.to_vec() }
    }

    /// A small constant (parameters: axes, shapes, epsilons, modes).
    pub fn imm(&mut self, hint: &str, shape: &[usize], value: Imm) -> Var {
        use pb::tensor_value::Value as TV;
        let (dtype, v) = match value {
            Imm::F32(v) => (Dt::F32, TV::Floats(pb::tensor_value::RepeatedFloats { values: v })),
            Imm::F16(v) => (Dt::F16, TV::Bytes(pb::tensor_value::RepeatedBytes { values: v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect() })),
            Imm::I32(v) => (Dt::I32, TV::Ints(pb::tensor_value::RepeatedInts { values: v })),
            Imm::U32(v) => (Dt::U32, TV::Bytes(pb::tensor_value::RepeatedBytes { values: v.iter().flat_map(|x| x.to_le_bytes()).collect() })),
            Imm::Bool(b) => (Dt::Bool, TV::Bools(pb::tensor_value::RepeatedBools { values: vec![b] })),
            Imm::Str(s) => (Dt::Str, TV::Strings(pb::tensor_value::RepeatedStrings { values: vec![s] })),
        };
        let value = immediate(dtype, shape, v);
        self.constant(hint, dtype, shape, value)
    }

    fn ints(&mut self, hint: &str, v: &[i64]) -> Var {
        self.imm(hint, &[v.len()], Imm::I32(v.iter().map(|&x| x as i32).collect()))
    }
    fn int(&mut self, hint: &str, v: i64) -> Var {
        self.imm(hint, &[], Imm::I32(vec![v as i32]))
    }
    fn boolean(&mut self, hint: &str, v: bool) -> Var {
        self.imm(hint, &[], Imm::Bool(v))
    }
    fn string(&mut self, hint: &str, v: &str) -> Var {
        self.imm(hint, &[], Imm::Str(v.to_string()))
    }

    /// A scalar of `dtype` (fp16 or fp32) for elementwise ops.
    pub fn scalar(&mut self, dtype: Dt, v: f32) -> Var {
        match dtype {
            Dt::F16 => self.imm("s", &[], Imm::F16(vec![v])),
            _ => self.imm("s", &[], Imm::F32(vec![v])),
        }
    }

    /// A float constant of the given data in the function's precision (or `dtype` if
    /// given), shape `shape`: inline below 10 elements, otherwise in the weight file.
    ///
    /// # Errors
    /// The weight file's I/O error.
    pub fn floats(&mut self, hint: &str, data: &[f32], shape: &[usize], dtype: Option<Dt>) -> Result<Var> {
        let dtype = dtype.unwrap_or(self.precision);
        let value = self.float_value(data, shape, dtype)?;
        Ok(self.constant(hint, dtype, shape, value))
    }

    /// The `Value` of float data of `dtype` (fp16 or fp32) and `shape`: inline below 10
    /// elements (fp16 as little-endian bytes, fp32 as floats), otherwise a blob in the weight
    /// file. Shared by `const` ops and the constexpr ops' attributes.
    fn float_value(&mut self, data: &[f32], shape: &[usize], dtype: Dt) -> Result<pb::Value> {
        use pb::tensor_value::Value as TV;
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        if data.len() < BLOB_MIN {
            let v = if dtype == Dt::F16 {
                TV::Bytes(pb::tensor_value::RepeatedBytes { values: data.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect() })
            } else {
                TV::Floats(pb::tensor_value::RepeatedFloats { values: data.to_vec() })
            };
            return Ok(immediate(dtype, shape, v));
        }
        let offset = match dtype {
            Dt::F16 => self.blobs.add_f16(&data.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
            _ => self.blobs.add_f32(data),
        }
        .map_err(|e| Error::Io { path: WEIGHT_FILE.into(), source: e })?;
        Ok(blob_value(dtype, shape, offset))
    }

    /// A model parameter (bias, norm scale, embedding) in the function's precision, never
    /// compressed.
    ///
    /// # Errors
    /// Candle's or the weight file's error.
    pub fn param(&mut self, hint: &str, t: &Tensor) -> Result<Var> {
        let data = f32_data(t)?;
        self.stats.params += data.len() as u64;
        self.rounding(&data);
        self.floats(hint, &data, t.dims(), None)
    }

    /// A weight matrix or convolution kernel: stored as the function's compression says
    /// (palettized through `constexpr_lut_to_dense`, or int8 through
    /// `constexpr_affine_dequantize`) when it has at least 2048 elements, else as
    /// [`FnBuilder::param`]. The value it yields has the function's precision and `t`'s shape.
    ///
    /// # Errors
    /// Candle's or the weight file's error.
    pub fn weight(&mut self, hint: &str, t: &Tensor) -> Result<Var> {
        let shape = t.dims().to_vec();
        let data = f32_data(t)?;
        self.stats.params += data.len() as u64;
        match self.compression {
            Some(c) if data.len() >= COMPRESS_MIN && shape.len() >= 2 => self.compressed(hint, &data, &shape, c),
            _ => {
                self.rounding(&data);
                self.floats(hint, &data, &shape, None)
            }
        }
    }

    /// Counts the error of storing `data` in fp16 (nothing in fp32).
    fn rounding(&mut self, data: &[f32]) {
        if self.precision != Dt::F16 {
            return;
        }
        let stored: Vec<f32> = data.iter().map(|&w| f16::from_f32(w).to_f32()).collect();
        self.stats.count(data, &stored);
    }

    fn add_blob(&mut self, dtype: BlobDType, data: &[u8], padding: u8) -> Result<u64> {
        self.blobs.add(dtype, data, padding).map_err(|e| Error::Io { path: WEIGHT_FILE.into(), source: e })
    }

    fn compressed(&mut self, hint: &str, data: &[f32], shape: &[usize], c: Compression) -> Result<Var> {
        let out_dtype = self.precision;
        let rows = shape[0];
        let (decoded, var) = match c {
            Compression::Palettize { bits, group_size } => {
                let groups = match (self.target, group_size) {
                    (Target::Ios18, Some(g)) if g > 0 && rows % g == 0 => rows / g,
                    _ => 1,
                };
                let lut = compress::palettize(data, bits, groups);
                let decoded = lut.decode();
                let k = 1usize << bits;
                let name = self.fresh(hint);
                let lut_values: Vec<f32> = lut.lut.clone();
                if self.target == Target::Ios18 {
                    let (packed, padding) = compress::pack_bits(&lut.indices, bits);
                    let (idt, bdt) = match bits {
                        4 => (Dt::U4, BlobDType::UInt4),
                        6 => (Dt::U6, BlobDType::UInt6),
                        _ => (Dt::U8, BlobDType::UInt8),
                    };
                    let off = self.add_blob(bdt, &packed, padding)?;
                    let indices = self.constant(&format!("{hint}_indices"), idt, shape, blob_value(idt, shape, off));
                    // LUT shape: [groups, 1, …, 1, 2^bits, 1] (rank = weight rank + 2).
                    let mut lut_shape = vec![1usize; shape.len() + 2];
                    lut_shape[0] = groups;
                    lut_shape[shape.len()] = k;
                    let lut_var = self.floats(&format!("{hint}_lut"), &lut_values, &lut_shape, Some(out_dtype))?;
                    self.push_op(
                        "constexpr_lut_to_dense",
                        &name,
                        vec![("indices", bind(&indices.name)), ("lut", bind(&lut_var.name))],
                        vec![named(&name, out_dtype, shape)],
                        HashMap::new(),
                    );
                } else {
                    let (packed, _) = compress::pack_bits(&lut.indices, bits);
                    let off = self.add_blob(BlobDType::UInt8, &packed, 0)?;
                    let lut_value = self.float_value(&lut_values, &[k], out_dtype)?;
                    use pb::tensor_value::Value as TV;
                    let shape_value = immediate(Dt::U32, &[shape.len()], TV::Bytes(pb::tensor_value::RepeatedBytes { values: shape.iter().flat_map(|&d| (d as u32).to_le_bytes()).collect() }));
                    let attributes = HashMap::from([
                        ("indices".to_string(), blob_value(Dt::U8, &[packed.len()], off)),
                        ("lut".to_string(), lut_value),
                        ("shape".to_string(), shape_value),
                    ]);
                    self.push_op("constexpr_lut_to_dense", &name, vec![], vec![named(&name, out_dtype, shape)], attributes);
                }
                (decoded, Var { name, dtype: out_dtype, shape: shape.to_vec() })
            }
            Compression::Int8 => {
                let q = compress::quantize_int8(data, rows);
                let decoded = q.decode();
                let name = self.fresh(hint);
                let bytes: Vec<u8> = q.values.iter().map(|&v| v as u8).collect();
                let off = self.add_blob(BlobDType::Int8, &bytes, 0)?;
                let scale_value = self.float_value(&q.scales, &[rows], out_dtype)?;
                use pb::tensor_value::Value as TV;
                let zero = vec![0u8; rows];
                let zero_value = if rows >= BLOB_MIN {
                    let off = self.add_blob(BlobDType::Int8, &zero, 0)?;
                    blob_value(Dt::I8, &[rows], off)
                } else {
                    immediate(Dt::I8, &[rows], TV::Bytes(pb::tensor_value::RepeatedBytes { values: zero }))
                };
                let attributes = HashMap::from([
                    ("quantized_data".to_string(), blob_value(Dt::I8, shape, off)),
                    ("zero_point".to_string(), zero_value),
                    ("scale".to_string(), scale_value),
                    ("axis".to_string(), immediate(Dt::I32, &[], TV::Ints(pb::tensor_value::RepeatedInts { values: vec![0] }))),
                ]);
                self.push_op("constexpr_affine_dequantize", &name, vec![], vec![named(&name, out_dtype, shape)], attributes);
                (decoded, Var { name, dtype: out_dtype, shape: shape.to_vec() })
            }
        };
        self.stats.compressed_tensors += 1;
        self.stats.count(data, &decoded);
        Ok(var)
    }

    /// Appends op `ty` with tensor inputs and parameter consts; one output of `dtype`/`shape`.
    fn op(&mut self, ty: &str, hint: &str, inputs: &[(&str, &Var)], dtype: Dt, shape: Vec<usize>) -> Var {
        let name = self.fresh(hint);
        let args = inputs.iter().map(|(k, v)| (*k, bind(&v.name))).collect();
        self.push_op(ty, &name, args, vec![named(&name, dtype, &shape)], HashMap::new());
        Var { name, dtype, shape }
    }

    fn same_dtype(&self, ty: &str, a: &Var, b: &Var) -> Result<()> {
        if a.dtype != b.dtype {
            return Err(bad(format!("{ty}: {} is {:?} but {} is {:?}", a.name, a.dtype, b.name, b.dtype)));
        }
        Ok(())
    }

    fn binary(&mut self, ty: &str, a: &Var, b: &Var) -> Result<Var> {
        self.same_dtype(ty, a, b)?;
        let shape = broadcast(&a.shape, &b.shape).ok_or_else(|| bad(format!("{ty}: shapes {:?} and {:?} do not broadcast", a.shape, b.shape)))?;
        Ok(self.op(ty, ty, &[("x", a), ("y", b)], a.dtype, shape))
    }

    pub fn add(&mut self, a: &Var, b: &Var) -> Result<Var> {
        self.binary("add", a, b)
    }
    pub fn sub(&mut self, a: &Var, b: &Var) -> Result<Var> {
        self.binary("sub", a, b)
    }
    pub fn mul(&mut self, a: &Var, b: &Var) -> Result<Var> {
        self.binary("mul", a, b)
    }
    pub fn div(&mut self, a: &Var, b: &Var) -> Result<Var> {
        self.binary("real_div", a, b)
    }
    /// `x * s` for a scalar `s`.
    pub fn mul_scalar(&mut self, x: &Var, s: f32) -> Result<Var> {
        let s = self.scalar(x.dtype, s);
        self.mul(x, &s)
    }
    /// `x + s` for a scalar `s`.
    pub fn add_scalar(&mut self, x: &Var, s: f32) -> Result<Var> {
        let s = self.scalar(x.dtype, s);
        self.add(x, &s)
    }

    fn unary(&mut self, ty: &str, x: &Var) -> Var {
        self.op(ty, ty, &[("x", x)], x.dtype, x.shape.clone())
    }
    pub fn silu(&mut self, x: &Var) -> Var {
        self.unary("silu", x)
    }
    pub fn sigmoid(&mut self, x: &Var) -> Var {
        self.unary("sigmoid", x)
    }
    pub fn sin(&mut self, x: &Var) -> Var {
        self.unary("sin", x)
    }
    pub fn cos(&mut self, x: &Var) -> Var {
        self.unary("cos", x)
    }
    pub fn exp(&mut self, x: &Var) -> Var {
        self.unary("exp", x)
    }
    /// `1 / sqrt(x + epsilon)`.
    pub fn rsqrt(&mut self, x: &Var, epsilon: f32) -> Var {
        let name = self.fresh("rsqrt");
        let eps = if x.dtype == Dt::F16 { self.imm(&format!("{name}_epsilon"), &[], Imm::F16(vec![epsilon])) } else { self.imm(&format!("{name}_epsilon"), &[], Imm::F32(vec![epsilon])) };
        self.push_op("rsqrt", &name, vec![("x", bind(&x.name)), ("epsilon", bind(&eps.name))], vec![named(&name, x.dtype, &x.shape)], HashMap::new());
        Var { name, dtype: x.dtype, shape: x.shape.clone() }
    }

    /// GELU: `mode` is `EXACT`, `TANH_APPROXIMATION` or `SIGMOID_APPROXIMATION`
    /// (`x·σ(1.702x)`, CLIP's `quick_gelu`).
    pub fn gelu(&mut self, x: &Var, mode: &str) -> Var {
        let name = self.fresh("gelu");
        let m = self.string(&format!("{name}_mode"), mode);
        self.push_op("gelu", &name, vec![("x", bind(&x.name)), ("mode", bind(&m.name))], vec![named(&name, x.dtype, &x.shape)], HashMap::new());
        Var { name, dtype: x.dtype, shape: x.shape.clone() }
    }

    fn norm_axis(rank: usize, axis: i64) -> usize {
        if axis < 0 {
            (rank as i64 + axis) as usize
        } else {
            axis as usize
        }
    }

    /// Mean over `axes`.
    pub fn reduce_mean(&mut self, x: &Var, axes: &[i64], keep_dims: bool) -> Var {
        let name = self.fresh("reduce_mean");
        let a = self.ints(&format!("{name}_axes"), axes);
        let k = self.boolean(&format!("{name}_keep_dims"), keep_dims);
        let axes: Vec<usize> = axes.iter().map(|&a| Self::norm_axis(x.rank(), a)).collect();
        let shape: Vec<usize> = x.shape.iter().enumerate().filter_map(|(i, &d)| if axes.contains(&i) { keep_dims.then_some(1) } else { Some(d) }).collect();
        self.push_op("reduce_mean", &name, vec![("x", bind(&x.name)), ("axes", bind(&a.name)), ("keep_dims", bind(&k.name))], vec![named(&name, x.dtype, &shape)], HashMap::new());
        Var { name, dtype: x.dtype, shape }
    }

    /// Reshape to `shape` (same element count).
    pub fn reshape(&mut self, x: &Var, shape: &[usize]) -> Result<Var> {
        if shape.iter().product::<usize>() != x.numel() {
            return Err(bad(format!("reshape {} {:?} to {:?}", x.name, x.shape, shape)));
        }
        if shape == x.shape.as_slice() {
            return Ok(x.clone());
        }
        let name = self.fresh("reshape");
        let s = self.ints(&format!("{name}_shape"), &shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.push_op("reshape", &name, vec![("x", bind(&x.name)), ("shape", bind(&s.name))], vec![named(&name, x.dtype, shape)], HashMap::new());
        Ok(Var { name, dtype: x.dtype, shape: shape.to_vec() })
    }

    /// Permute axes.
    pub fn transpose(&mut self, x: &Var, perm: &[usize]) -> Var {
        let name = self.fresh("transpose");
        let p = self.ints(&format!("{name}_perm"), &perm.iter().map(|&d| d as i64).collect::<Vec<_>>());
        let shape: Vec<usize> = perm.iter().map(|&i| x.shape[i]).collect();
        self.push_op("transpose", &name, vec![("x", bind(&x.name)), ("perm", bind(&p.name))], vec![named(&name, x.dtype, &shape)], HashMap::new());
        Var { name, dtype: x.dtype, shape }
    }

    /// Softmax along `axis`.
    pub fn softmax(&mut self, x: &Var, axis: i64) -> Var {
        let name = self.fresh("softmax");
        let a = self.int(&format!("{name}_axis"), axis);
        self.push_op("softmax", &name, vec![("x", bind(&x.name)), ("axis", bind(&a.name))], vec![named(&name, x.dtype, &x.shape)], HashMap::new());
        Var { name, dtype: x.dtype, shape: x.shape.clone() }
    }

    /// Layer norm over the last axis with `gamma`, `beta` (shape `(C,)`).
    pub fn layer_norm(&mut self, x: &Var, gamma: &Var, beta: &Var, epsilon: f32) -> Var {
        self.layer_norm_axes(x, &[-1], gamma, beta, epsilon)
    }

    /// Layer norm over `axes` with `gamma`, `beta` of shape `x.shape[axes]` (e.g. axis 1 of
    /// the `(B, C, 1, S)` layout: a norm over channels).
    pub fn layer_norm_axes(&mut self, x: &Var, axes: &[i64], gamma: &Var, beta: &Var, epsilon: f32) -> Var {
        let name = self.fresh("layer_norm");
        let a = self.ints(&format!("{name}_axes"), axes);
        let eps = if x.dtype == Dt::F16 { self.imm(&format!("{name}_epsilon"), &[], Imm::F16(vec![epsilon])) } else { self.imm(&format!("{name}_epsilon"), &[], Imm::F32(vec![epsilon])) };
        self.push_op(
            "layer_norm",
            &name,
            vec![("x", bind(&x.name)), ("axes", bind(&a.name)), ("gamma", bind(&gamma.name)), ("beta", bind(&beta.name)), ("epsilon", bind(&eps.name))],
            vec![named(&name, x.dtype, &x.shape)],
            HashMap::new(),
        );
        Var { name, dtype: x.dtype, shape: x.shape.clone() }
    }

    /// `x @ y` with optional transposes of the last two axes; batch axes broadcast.
    pub fn matmul(&mut self, x: &Var, y: &Var, transpose_x: bool, transpose_y: bool) -> Result<Var> {
        self.same_dtype("matmul", x, y)?;
        let (xr, yr) = (x.rank(), y.rank());
        if xr < 2 || yr < 2 {
            return Err(bad(format!("matmul of rank {xr} and {yr}")));
        }
        let (m, kx) = if transpose_x { (x.shape[xr - 1], x.shape[xr - 2]) } else { (x.shape[xr - 2], x.shape[xr - 1]) };
        let (ky, n) = if transpose_y { (y.shape[yr - 1], y.shape[yr - 2]) } else { (y.shape[yr - 2], y.shape[yr - 1]) };
        if kx != ky {
            return Err(bad(format!("matmul {} {:?} × {} {:?}: inner sizes {kx} ≠ {ky}", x.name, x.shape, y.name, y.shape)));
        }
        let mut shape = broadcast(&x.shape[..xr - 2], &y.shape[..yr - 2]).ok_or_else(|| bad("matmul batch axes do not broadcast"))?;
        shape.extend([m, n]);
        let name = self.fresh("matmul");
        let tx = self.boolean(&format!("{name}_transpose_x"), transpose_x);
        let ty = self.boolean(&format!("{name}_transpose_y"), transpose_y);
        self.push_op(
            "matmul",
            &name,
            vec![("x", bind(&x.name)), ("y", bind(&y.name)), ("transpose_x", bind(&tx.name)), ("transpose_y", bind(&ty.name))],
            vec![named(&name, x.dtype, &shape)],
            HashMap::new(),
        );
        Ok(Var { name, dtype: x.dtype, shape })
    }

    /// `x Wᵀ + b` over the last axis; `weight` is `(out, in)`, `bias` `(out,)`.
    pub fn linear(&mut self, x: &Var, weight: &Var, bias: Option<&Var>) -> Result<Var> {
        let inner = *x.shape.last().ok_or_else(|| bad("linear of a scalar"))?;
        if weight.rank() != 2 || weight.shape[1] != inner {
            return Err(bad(format!("linear {}: input {:?}, weight {:?}", x.name, x.shape, weight.shape)));
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank ≥ 1") = weight.shape[0];
        let name = self.fresh("linear");
        let mut inputs = vec![("x", bind(&x.name)), ("weight", bind(&weight.name))];
        if let Some(b) = bias {
            inputs.push(("bias", bind(&b.name)));
        }
        self.push_op("linear", &name, inputs, vec![named(&name, x.dtype, &shape)], HashMap::new());
        Ok(Var { name, dtype: x.dtype, shape })
    }

    /// 2-D convolution, NCHW; `weight` `(Cout, Cin/groups, kh, kw)`; `pad` is
    /// `[top, bottom, left, right]`.
    pub fn conv(&mut self, x: &Var, weight: &Var, bias: Option<&Var>, strides: [usize; 2], pad: [usize; 4], groups: usize) -> Result<Var> {
        if x.rank() != 4 || weight.rank() != 4 || weight.shape[1] * groups != x.shape[1] {
            return Err(bad(format!("conv {}: input {:?}, weight {:?}, groups {groups}", x.name, x.shape, weight.shape)));
        }
        let (kh, kw) = (weight.shape[2], weight.shape[3]);
        let oh = (x.shape[2] + pad[0] + pad[1] - kh) / strides[0] + 1;
        let ow = (x.shape[3] + pad[2] + pad[3] - kw) / strides[1] + 1;
        let shape = vec![x.shape[0], weight.shape[0], oh, ow];
        let name = self.fresh("conv");
        let pt = self.string(&format!("{name}_pad_type"), "custom");
        let p = self.ints(&format!("{name}_pad"), &pad.map(|v| v as i64));
        let s = self.ints(&format!("{name}_strides"), &strides.map(|v| v as i64));
        let d = self.ints(&format!("{name}_dilations"), &[1, 1]);
        let g = self.int(&format!("{name}_groups"), groups as i64);
        let mut inputs = vec![
            ("x", bind(&x.name)),
            ("weight", bind(&weight.name)),
            ("pad_type", bind(&pt.name)),
            ("pad", bind(&p.name)),
            ("strides", bind(&s.name)),
            ("dilations", bind(&d.name)),
            ("groups", bind(&g.name)),
        ];
        if let Some(b) = bias {
            inputs.push(("bias", bind(&b.name)));
        }
        self.push_op("conv", &name, inputs, vec![named(&name, x.dtype, &shape)], HashMap::new());
        Ok(Var { name, dtype: x.dtype, shape })
    }

    /// Concatenation along `axis`.
    pub fn concat(&mut self, xs: &[&Var], axis: i64) -> Result<Var> {
        let first = xs.first().ok_or_else(|| bad("concat of nothing"))?;
        let ax = Self::norm_axis(first.rank(), axis);
        let mut shape = first.shape.clone();
        shape[ax] = xs.iter().map(|v| v.shape[ax]).sum();
        let name = self.fresh("concat");
        let a = self.int(&format!("{name}_axis"), axis);
        let i = self.boolean(&format!("{name}_interleave"), false);
        let values = pb::Argument {
            arguments: xs.iter().map(|v| pb::argument::Binding { binding: Some(pb::argument::binding::Binding::Name(v.name.clone())) }).collect(),
        };
        self.push_op("concat", &name, vec![("values", values), ("axis", bind(&a.name)), ("interleave", bind(&i.name))], vec![named(&name, first.dtype, &shape)], HashMap::new());
        Ok(Var { name, dtype: first.dtype, shape })
    }

    /// Splits `x` along `axis` into parts of `sizes`.
    pub fn split(&mut self, x: &Var, sizes: &[usize], axis: i64) -> Result<Vec<Var>> {
        let ax = Self::norm_axis(x.rank(), axis);
        if sizes.iter().sum::<usize>() != x.shape[ax] {
            return Err(bad(format!("split {} {:?} into {sizes:?} on axis {axis}", x.name, x.shape)));
        }
        let name = self.fresh("split");
        let s = self.ints(&format!("{name}_split_sizes"), &sizes.iter().map(|&v| v as i64).collect::<Vec<_>>());
        let a = self.int(&format!("{name}_axis"), axis);
        let outs: Vec<Var> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut shape = x.shape.clone();
                shape[ax] = n;
                Var { name: format!("{name}_{i}"), dtype: x.dtype, shape }
            })
            .collect();
        let outputs = outs.iter().map(|v| named(&v.name, v.dtype, &v.shape)).collect();
        self.push_op("split", &name, vec![("x", bind(&x.name)), ("split_sizes", bind(&s.name)), ("axis", bind(&a.name))], outputs, HashMap::new());
        Ok(outs)
    }

    /// `x[begin:end]` on every axis (stride 1).
    pub fn slice(&mut self, x: &Var, begin: &[usize], end: &[usize]) -> Var {
        let name = self.fresh("slice_by_index");
        let b = self.ints(&format!("{name}_begin"), &begin.iter().map(|&v| v as i64).collect::<Vec<_>>());
        let e = self.ints(&format!("{name}_end"), &end.iter().map(|&v| v as i64).collect::<Vec<_>>());
        let shape: Vec<usize> = begin.iter().zip(end).map(|(b, e)| e - b).collect();
        self.push_op("slice_by_index", &name, vec![("x", bind(&x.name)), ("begin", bind(&b.name)), ("end", bind(&e.name))], vec![named(&name, x.dtype, &shape)], HashMap::new());
        Var { name, dtype: x.dtype, shape }
    }

    /// Rows of `table` `(V, C)` picked by integer `indices` (any shape) → `indices.shape + (C,)`.
    pub fn gather(&mut self, table: &Var, indices: &Var) -> Var {
        let name = self.fresh("gather");
        let a = self.int(&format!("{name}_axis"), 0);
        let mut shape = indices.shape.clone();
        shape.extend_from_slice(&table.shape[1..]);
        self.push_op("gather", &name, vec![("x", bind(&table.name)), ("indices", bind(&indices.name)), ("axis", bind(&a.name))], vec![named(&name, table.dtype, &shape)], HashMap::new());
        Var { name, dtype: table.dtype, shape }
    }

    /// Converts `x` to `dtype` (no op when it already is).
    pub fn cast(&mut self, x: &Var, dtype: Dt) -> Var {
        if x.dtype == dtype {
            return x.clone();
        }
        let name = self.fresh("cast");
        let d = self.string(&format!("{name}_dtype"), dtype.mil_name());
        self.push_op("cast", &name, vec![("x", bind(&x.name)), ("dtype", bind(&d.name))], vec![named(&name, dtype, &x.shape)], HashMap::new());
        Var { name, dtype, shape: x.shape.clone() }
    }

    /// Nearest-neighbour upsampling of the last two axes by an integer factor.
    pub fn upsample_nearest(&mut self, x: &Var, factor: usize) -> Var {
        let name = self.fresh("upsample_nearest_neighbor");
        let fh = self.imm(&format!("{name}_scale_factor_height"), &[], Imm::F32(vec![factor as f32]));
        let fw = self.imm(&format!("{name}_scale_factor_width"), &[], Imm::F32(vec![factor as f32]));
        let mut shape = x.shape.clone();
        let r = shape.len();
        shape[r - 2] *= factor;
        shape[r - 1] *= factor;
        self.push_op(
            "upsample_nearest_neighbor",
            &name,
            vec![("x", bind(&x.name)), ("scale_factor_height", bind(&fh.name)), ("scale_factor_width", bind(&fw.name))],
            vec![named(&name, x.dtype, &shape)],
            HashMap::new(),
        );
        Var { name, dtype: x.dtype, shape }
    }

    /// Group normalization of `x` `(B, C, …)` with `groups` groups, then the per-channel
    /// affine `gamma`, `beta` `(C,)` (PyTorch's `GroupNorm`). Computed in fp32 even in an
    /// fp16 program: squared activations of SD models overflow fp16.
    pub fn group_norm(&mut self, x: &Var, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Var> {
        let (b, c) = (x.shape[0], x.shape[1]);
        let rest: usize = x.shape[2..].iter().product();
        if c % groups != 0 {
            return Err(bad(format!("group norm of {c} channels in {groups} groups")));
        }
        let dtype = x.dtype;
        let x32 = self.cast(x, Dt::F32);
        let g = self.reshape(&x32, &[b, groups, (c / groups) * rest])?;
        let mean = self.reduce_mean(&g, &[2], true);
        let centred = self.sub(&g, &mean)?;
        let sq = self.mul(&centred, &centred)?;
        let var = self.reduce_mean(&sq, &[2], true);
        let inv = self.rsqrt(&var, eps);
        let normed = self.mul(&centred, &inv)?;
        let mut shape = vec![b, c];
        shape.extend(std::iter::repeat_n(1, x.rank() - 2));
        let mut param_shape = vec![c];
        param_shape.extend(std::iter::repeat_n(1, x.rank() - 2));
        let back = self.reshape(&normed, &x.shape)?;
        let back = self.cast(&back, dtype);
        let gamma = self.floats("gamma", &f32_data(gamma)?, &param_shape, Some(dtype))?;
        let beta = self.floats("beta", &f32_data(beta)?, &param_shape, Some(dtype))?;
        self.stats.params += 2 * c as u64;
        let scaled = self.mul(&back, &gamma)?;
        self.add(&scaled, &beta)
    }

    /// Adds an axis of size 1 at `axis`.
    pub fn expand_dims(&mut self, x: &Var, axis: usize) -> Result<Var> {
        let mut shape = x.shape.clone();
        shape.insert(axis, 1);
        self.reshape(x, &shape)
    }

    /// The finished function.
    pub fn finish(self) -> Function {
        let block = pb::Block { inputs: vec![], outputs: self.outputs.iter().map(|v| v.name.clone()).collect(), operations: self.ops, attributes: HashMap::new() };
        let opset = self.target.opset().to_string();
        let function = pb::Function {
            inputs: self.inputs.iter().map(|v| named(&v.name, v.dtype, &v.shape)).collect(),
            opset: opset.clone(),
            block_specializations: HashMap::from([(opset, block)]),
            attributes: HashMap::new(),
        };
        Function { proto: function, inputs: self.inputs, outputs: self.outputs, stats: self.stats }
    }
}

/// A finished MIL function with its typed inputs and outputs.
pub struct Function {
    pub proto: pb::Function,
    pub inputs: Vec<Var>,
    pub outputs: Vec<Var>,
    pub stats: WeightStats,
}

impl Function {
    /// Number of ops (consts included).
    pub fn op_count(&self) -> usize {
        self.proto.block_specializations.values().map(|b| b.operations.len()).sum()
    }
}

fn feature(v: &Var, description: &str) -> spec::FeatureDescription {
    let data_type = match v.dtype {
        Dt::F16 => spec::array_feature_type::ArrayDataType::Float16,
        Dt::I32 => spec::array_feature_type::ArrayDataType::Int32,
        _ => spec::array_feature_type::ArrayDataType::Float32,
    };
    spec::FeatureDescription {
        name: v.name.clone(),
        short_description: description.to_string(),
        r#type: Some(spec::FeatureType {
            is_optional: false,
            r#type: Some(spec::feature_type::Type::MultiArrayType(spec::ArrayFeatureType {
                shape: v.shape.iter().map(|&d| d as i64).collect(),
                data_type: data_type as i32,
                shape_flexibility: None,
                default_optional_value: None,
            })),
        }),
    }
}

/// Serializes a `Model` holding an ML Program with the named functions (the first is the
/// default, and the only one unless the target is iOS 18: multifunction models need
/// specification version 9). `descriptions` gives a short description per input/output
/// name; `metadata` becomes the model's user-defined metadata (shown in Xcode).
///
/// # Errors
/// When several functions are given for a target before iOS 18, or their input/output
/// types differ.
pub fn model_spec(target: Target, functions: Vec<(String, Function)>, descriptions: &HashMap<&str, &str>, metadata: HashMap<String, String>, short_description: &str) -> Result<Vec<u8>> {
    use prost::Message;
    let (default_name, first) = functions.first().ok_or_else(|| bad("a model needs a function"))?;
    if functions.len() > 1 && target != Target::Ios18 {
        return Err(Error::invalid("target", "several styles in one package (a multifunction model) need --target ios18"));
    }
    let describe = |v: &Var| feature(v, descriptions.get(v.name.as_str()).copied().unwrap_or(""));
    let inputs: Vec<_> = first.inputs.iter().map(describe).collect();
    let outputs: Vec<_> = first.outputs.iter().map(describe).collect();
    let multi = functions.len() > 1;
    let mut function_descriptions = Vec::new();
    let mut program_functions = HashMap::new();
    for (name, f) in &functions {
        if f.inputs != first.inputs || f.outputs.iter().map(|v| (&v.shape, v.dtype)).ne(first.outputs.iter().map(|v| (&v.shape, v.dtype))) {
            return Err(bad(format!("function {name} has other inputs or outputs than {default_name}")));
        }
        if multi {
            function_descriptions.push(spec::FunctionDescription {
                name: name.clone(),
                input: f.inputs.iter().map(describe).collect(),
                output: f.outputs.iter().map(describe).collect(),
                ..Default::default()
            });
        }
        program_functions.insert(if multi { name.clone() } else { "main".to_string() }, f.proto.clone());
    }
    let description = spec::ModelDescription {
        input: if multi { vec![] } else { inputs },
        output: if multi { vec![] } else { outputs },
        functions: function_descriptions,
        default_function_name: if multi { default_name.clone() } else { String::new() },
        metadata: Some(spec::Metadata {
            short_description: short_description.to_string(),
            author: "Atelier".into(),
            version_string: env!("CARGO_PKG_VERSION").into(),
            user_defined: metadata,
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = spec::Model {
        specification_version: target.spec_version(),
        description: Some(description),
        r#type: Some(spec::model::Type::MlProgram(pb::Program { version: 1, functions: program_functions, doc_string: String::new(), attributes: HashMap::new() })),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_inferred_as_mil_defines_them() {
        let mut blobs = BlobWriter::new();
        let mut f = FnBuilder::new(&mut blobs, Dt::F32, None, Target::Ios16);
        let x = f.input("x", Dt::F32, &[2, 3, 8, 8]);
        let w = f.floats("w", &[0.0; 5 * 3 * 3 * 3], &[5, 3, 3, 3], None).unwrap();
        let y = f.conv(&x, &w, None, [2, 2], [1, 1, 1, 1], 1).unwrap();
        assert_eq!(y.shape, vec![2, 5, 4, 4]);
        let t = f.transpose(&y, &[0, 2, 3, 1]);
        assert_eq!(t.shape, vec![2, 4, 4, 5]);
        let m = f.matmul(&t, &t, false, true).unwrap();
        assert_eq!(m.shape, vec![2, 4, 4, 4]);
        let r = f.reduce_mean(&y, &[-1, 2], false);
        assert_eq!(r.shape, vec![2, 5]);
        let parts = f.split(&y, &[2, 3], 1).unwrap();
        assert_eq!((parts[0].shape[1], parts[1].shape[1]), (2, 3));
        assert!(f.matmul(&t, &t, false, false).is_err(), "inner sizes 5 and 4");
        assert!(f.reshape(&y, &[7]).is_err());
        let o = f.output(&r, "out").unwrap();
        let func = f.finish();
        assert_eq!(func.outputs, vec![o]);
        let block = &func.proto.block_specializations["CoreML6"];
        assert_eq!(block.outputs, vec!["out".to_string()]);
        assert!(block.operations.iter().any(|op| op.outputs[0].name == "out" && op.r#type == "reduce_mean"));
    }
}
