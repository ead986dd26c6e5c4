//! The shipped starter model and a shipped style, cross-checked against diffusers: the
//! cases in tests/diffusers/cases were computed by diffusers 0.42.1 loading
//! models/starter with `StableDiffusionPipeline.from_pretrained` and the pastel adapter
//! (kohya and diffusers files) with `load_lora_weights` at weight 0.7
//! (tests/diffusers/make_cases.py). Atelier must agree within the fixture tolerance.

use std::path::PathBuf;

use atelier_engine::attention::AttentionKind;
use atelier_engine::model::load_safetensors;
use atelier_engine::reference::{discover, max_abs_diff, ReferenceRunner};
use candle_core::{DType, Device};

#[test]
fn starter_model_and_shipped_style_match_diffusers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let runner = ReferenceRunner::new(&root.join("models/starter"), &Device::Cpu, AttentionKind::Original).unwrap();
    let cases = discover(&root.join("tests/diffusers/cases")).unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["lora_unet_pastel-diffusers", "lora_unet_pastel-kohya", "text_encoder", "unet", "vae_decode"]);
    for case in &cases {
        let got = runner.run(case).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = load_safetensors(&case.tensors_path, &Device::Cpu).unwrap();
        for name in &case.expected {
            let g = got.get(name).unwrap_or_else(|| panic!("{}: the engine produced no {name}", case.name));
            let e = expected.get(name).unwrap_or_else(|| panic!("{}: the case file has no {name}", case.name));
            let d = max_abs_diff(&g.to_dtype(DType::F64).unwrap(), &e.to_dtype(DType::F64).unwrap()).unwrap();
            eprintln!("{:<28} {:<18} max|diff| {d:.3e}", case.name, name);
            assert!(d <= 1e-4, "{} {name}: {d}", case.name);
        }
    }
}
