//! The text encoder exported to Core ML: coremltools' MIL loader accepts it and the numpy
//! evaluator gives the engine's `last_hidden_state` on the starter model.

mod coreml_support;

use std::path::PathBuf;

use atelier_engine::attention::AttentionKind;
use atelier_engine::clip::{ClipConfig, ClipTextModel};
use atelier_engine::coreml::compress::Compression;
use atelier_engine::coreml::mil::{model_spec, Dt, FnBuilder, Target};
use atelier_engine::coreml::package::PackageWriter;
use atelier_engine::coreml::{text_encoder, Weights};
use atelier_engine::model::read_config;
use candle_core::{DType, Device, Tensor};

fn starter() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter")
}

fn export(dir: &std::path::Path, precision: Dt, compression: Option<Compression>, target: Target) -> PathBuf {
    let cfg: ClipConfig = read_config(&starter().join("text_encoder/config.json")).unwrap();
    let w = Weights::load(&starter().join("text_encoder/model.safetensors")).unwrap();
    let path = dir.join(format!("TextEncoder-{precision:?}-{}.mlpackage", compression.is_some()));
    let mut pkg = PackageWriter::create(&path).unwrap();
    let mut f = FnBuilder::new(pkg.weights(), precision, compression, target);
    text_encoder::build(&mut f, &cfg, &w).unwrap();
    let spec = model_spec(target, vec![("main".into(), f.finish())], &Default::default(), Default::default(), "test").unwrap();
    pkg.finish(&spec).unwrap();
    path
}

#[test]
fn text_encoder_matches_the_engine() {
    let Some(python) = coreml_support::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg: ClipConfig = read_config(&starter().join("text_encoder/config.json")).unwrap();
    let weights = atelier_engine::model::load_safetensors(&starter().join("text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    let model = ClipTextModel::new(&cfg, candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap();
    // "a red circle" padded with the end token, as the tokenizer gives it.
    let mut ids = vec![49406u32, 320, 736, 7117, 49407];
    ids.resize(77, 49407);
    let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
    let want = model.forward(&ids, AttentionKind::Original).unwrap().last_hidden_state;
    let input = ids.to_dtype(DType::F32).unwrap();

    let f32_pkg = export(dir.path(), Dt::F32, None, Target::Ios16);
    let f16_pkg = export(dir.path(), Dt::F16, None, Target::Ios17);
    let pal_pkg = export(dir.path(), Dt::F16, Some(Compression::Palettize { bits: 6, group_size: None }), Target::Ios16);
    let report = coreml_support::validate(&python, &[&f32_pkg, &f16_pkg, &pal_pkg]);
    assert_eq!(report.matches("ok").count(), 3, "{report}");

    let run = |pkg: &std::path::Path| coreml_support::run(&python, pkg, &[("input_ids", &input)], None).remove("last_hidden_state").expect("last_hidden_state");
    let e32 = coreml_support::max_abs_diff(&run(&f32_pkg), &want);
    let e16 = coreml_support::max_abs_diff(&run(&f16_pkg), &want);
    let epal = coreml_support::max_abs_diff(&run(&pal_pkg), &want);
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    eprintln!("text encoder max |Δ|: fp32 {e32:.2e}, fp16 {e16:.2e}, 6-bit palettized {epal:.2e} (outputs up to {scale:.2})");
    assert!(e32 <= 1e-4, "fp32 export differs from the engine by {e32}");
    assert!(e16 <= 2e-2 * scale.max(1.0), "fp16 export differs by {e16}");
    assert!(epal > e16 * 0.5 && epal < 0.5 * scale, "6-bit palettization error {epal} should be measurable and bounded");
}
