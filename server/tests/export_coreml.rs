//! `atelier export coreml` end to end on the starter model: a blend of the shipped styles
//! exported as packages that coremltools' MIL loader type-checks and that the project's
//! numpy evaluator runs to the engine's own numbers with the blend applied; several styles
//! as one multifunction export sharing the base weights; refusals before anything is written.

#[path = "../engine/tests/coreml_support/mod.rs"]
mod coreml_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atelier_engine::attention::AttentionKind;
use atelier_engine::pipeline::StableDiffusion;
use candle_core::{DType, Device, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn atelier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).current_dir(repo()).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: Output) -> String {
    assert!(!out.status.success(), "expected a refusal:\n{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ids() -> Tensor {
    let mut ids = vec![49406u32, 320, 736, 7117, 49407];
    ids.resize(77, 49407);
    Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("atelier_export.json")).unwrap()).unwrap()
}

#[test]
fn a_blended_style_exports_to_packages_that_run_to_the_engines_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = repo().join("models/starter");
    let (lib, data) = (t.join("styles"), t.join("data"));
    let common = ["--model", model.to_str().unwrap(), "--library", lib.to_str().unwrap(), "--data-dir", data.to_str().unwrap()];
    let link = ok(atelier(&[&["blend", "link", "--style", "inkline:0.7", "--style", "pastel:0.5", "--prompt", "a red circle"], &common[..]].concat())).trim().to_string();

    // Bad input first: refused before anything is written.
    let out = t.join("out");
    let e = refused(atelier(&[&["export", "coreml", "--blend", &link, "--out", out.to_str().unwrap(), "--width", "100"], &common[..]].concat()));
    assert!(e.contains("multiple of 8"), "{e}");
    let e = refused(atelier(&[&["export", "coreml", "--style", "inkline", "--style", "pastel", "--out", out.to_str().unwrap(), "--target", "ios17"], &common[..]].concat()));
    assert!(e.contains("ios18"), "{e}");
    let e = refused(atelier(&[&["export", "coreml", "--style", "nosuch", "--out", out.to_str().unwrap()], &common[..]].concat()));
    assert!(e.contains("nosuch") && e.contains("inkline"), "{e}");
    let e = refused(atelier(&[&["export", "coreml", "--palettize", "5", "--out", out.to_str().unwrap()], &common[..]].concat()));
    assert!(e.contains("4, 6 or 8"), "{e}");
    // A LoRA made for another base model (a layer of another width) does not fit.
    let mut other = candle_core::safetensors::load(repo().join("models/styles/inkline/inkline.safetensors"), &Device::Cpu).unwrap();
    let key = other.keys().filter(|k| k.ends_with("lora_down.weight")).min().unwrap().clone();
    let (rank, width) = (other[&key].dims()[0], other[&key].dims()[1]);
    other.insert(key, Tensor::zeros((rank, width + 8), DType::F32, &Device::Cpu).unwrap());
    let foreign = t.join("foreign.safetensors");
    candle_core::safetensors::save(&other, &foreign).unwrap();
    let e = refused(atelier(&[&["export", "coreml", "--lora", &format!("{}:0.8", foreign.display()), "--out", out.to_str().unwrap()], &common[..]].concat()));
    assert!(e.contains("does not fit"), "{e}");
    // An SDXL model is refused as such (the export converts SD 1.x/2.x).
    let xl = repo().join("../shared/fixtures/sdxl-tiny/pipeline");
    let e = refused(atelier(&["export", "coreml", "--model", xl.to_str().unwrap(), "--out", out.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]));
    assert!(e.contains("SDXL"), "{e}");
    assert!(!out.exists(), "a refused export writes nothing");
    assert_eq!(std::fs::read_dir(t).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("partial")).count(), 0);

    let table = ok(atelier(&[&["export", "coreml", "--blend", &link, "--out", out.to_str().unwrap(), "--precision", "fp32", "--attention", "original"], &common[..]].concat()));
    assert!(table.contains("| Unet.mlpackage |") && table.contains("| total |"), "{table}");
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage", "atelier_export.json", "merges.txt", "vocab.json"]);
    let m = manifest(&out);
    assert_eq!(m["format"], "atelier-coreml-export");
    assert_eq!(m["styles"][0]["kind"], "blend");
    assert_eq!(m["styles"][0]["link"], link.as_str());
    let components: Vec<(&str, f64)> = m["styles"][0]["components"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap(), c["weight"].as_f64().unwrap())).collect();
    assert_eq!(components, [("inkline", 0.7), ("pastel", 0.5)]);
    assert_eq!(m["settings"]["width"], 64);
    assert_eq!(std::fs::read(out.join("vocab.json")).unwrap(), std::fs::read(model.join("tokenizer/vocab.json")).unwrap());
    // The packages' sizes in the manifest are the folders' sizes.
    for p in m["packages"].as_array().unwrap() {
        assert_eq!(p["bytes"].as_u64().unwrap(), atelier_engine::coreml::package::dir_size(&out.join(p["path"].as_str().unwrap())));
    }
    // A second export into the same folder is refused: nothing is overwritten.
    let e = refused(atelier(&[&["export", "coreml", "--out", out.to_str().unwrap()], &common[..]].concat()));
    assert!(e.contains("not empty"), "{e}");

    let Some(python) = coreml_support::python() else { return };
    let pkgs: Vec<PathBuf> = ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"].iter().map(|n| out.join(format!("{n}.mlpackage"))).collect();
    let report = coreml_support::validate(&python, &pkgs.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert_eq!(report.lines().filter(|l| l.starts_with("ok")).count(), 4, "{report}");

    // The engine with the same blend attached, on the same inputs.
    let sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    let library = atelier_server::styles::StyleLibrary::new(lib.clone()).with_shipped(repo().join("models/styles"));
    let blend = atelier_blend::decode(&link).unwrap();
    let active = atelier_server::blends::resolve(blend, &library, sd.model_hash()).active(&sd).unwrap();
    sd.set_loras(&active);

    let want = sd.text_encoder().forward(&ids(), AttentionKind::Original).unwrap().last_hidden_state;
    let got = coreml_support::run(&python, &pkgs[0], &[("input_ids", &ids().to_dtype(DType::F32).unwrap())], None).remove("last_hidden_state").unwrap();
    let e_text = coreml_support::max_abs_diff(&got, &want);

    let sample = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 64), &Device::Cpu).unwrap();
    let want = sd.unet().forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    let ehs = context.transpose(1, 2).unwrap().unsqueeze(2).unwrap().contiguous().unwrap();
    let timestep = Tensor::new(&[500f32, 500.0], &Device::Cpu).unwrap();
    let got = coreml_support::run(&python, &pkgs[1], &[("sample", &sample), ("timestep", &timestep), ("encoder_hidden_states", &ehs)], None).remove("noise_pred").unwrap();
    let e_unet = coreml_support::max_abs_diff(&got, &want);
    // Without the blend the engine's numbers are far away: the style really is in the weights.
    sd.set_loras(&[]);
    let plain = sd.unet().forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    let e_plain = coreml_support::max_abs_diff(&got, &plain);

    let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let want = sd.vae().decode(&z, AttentionKind::Original).unwrap();
    let got = coreml_support::run(&python, &pkgs[2], &[("z", &z)], None).remove("image").unwrap();
    let e_vae = coreml_support::max_abs_diff(&got, &want);
    eprintln!("blend export vs engine, max |Δ|: text encoder {e_text:.2e}, UNet {e_unet:.2e} (vs the model without the blend {e_plain:.2e}), VAE decoder {e_vae:.2e}");
    assert!(e_text <= 1e-4 && e_unet <= 1e-4 && e_vae <= 1e-4, "fp32 export differs from the engine");
    assert!(e_plain > 1e-2, "the blend changes the UNet's output ({e_plain})");
}

#[test]
fn several_styles_share_the_base_weights_in_multifunction_packages() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = repo().join("models/starter");
    let (lib, data) = (t.join("styles"), t.join("data"));
    let common = ["--model", model.to_str().unwrap(), "--library", lib.to_str().unwrap(), "--data-dir", data.to_str().unwrap()];
    let single = t.join("single");
    let flags = ["--target", "ios18", "--chunk-unet", "--no-vae-encoder", "--palettize", "6", "--palettize-group-size", "16"];
    ok(atelier(&[&["export", "coreml", "--style", "inkline", "--out", single.to_str().unwrap()], &flags[..], &common[..]].concat()));
    let multi = t.join("multi");
    let table = ok(atelier(&[&["export", "coreml", "--include-base", "--style", "inkline", "--style", "pastel:0.8", "--out", multi.to_str().unwrap()], &flags[..], &common[..]].concat()));
    assert!(table.contains("base, inkline, pastel"), "{table}");
    let m = manifest(&multi);
    assert_eq!(m["settings"]["multifunction"], true);
    let functions: Vec<&str> = m["styles"].as_array().unwrap().iter().map(|s| s["function"].as_str().unwrap()).collect();
    assert_eq!(functions, ["base", "inkline", "pastel"]);
    let chunks: Vec<&str> = m["packages"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(chunks, ["TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage", "VAEDecoder.mlpackage"]);
    // Three styles cost far less than three copies: the styled layers are the only new blobs.
    let weights = |dir: &Path, p: &str| std::fs::metadata(dir.join(p).join("Data/com.apple.CoreML/weights/weight.bin")).unwrap().len();
    let one = weights(&single, "UnetChunk1.mlpackage") + weights(&single, "UnetChunk2.mlpackage");
    let three = weights(&multi, "UnetChunk1.mlpackage") + weights(&multi, "UnetChunk2.mlpackage");
    eprintln!("UNet weights (6-bit): one style {one} bytes, three styles in one package {three} bytes");
    // The styles change the UNet's attention layers, the rest is stored once …
    assert!(three < one * 3 * 3 / 4, "the base weights are stored once ({three} vs {one} for one style)");
    // … and the text encoder, which none of them changes, is stored once for all three functions.
    let (te1, te3) = (weights(&single, "TextEncoder.mlpackage"), weights(&multi, "TextEncoder.mlpackage"));
    assert_eq!(te1, te3, "three functions over the same text-encoder weights share every blob");

    let Some(python) = coreml_support::python() else { return };
    let pkgs: Vec<PathBuf> = ["TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder"].iter().map(|n| multi.join(format!("{n}.mlpackage"))).collect();
    let report = coreml_support::validate(&python, &pkgs.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    // One line per function of the styled packages, one for the VAE.
    assert_eq!(report.lines().filter(|l| l.starts_with("ok")).count(), 3 + 3 + 3 + 1, "{report}");
    // The shipped styles adapt the UNet only: run both chunks per function and compare.
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 64), &Device::Cpu).unwrap();
    let ehs = context.transpose(1, 2).unwrap().unsqueeze(2).unwrap().contiguous().unwrap();
    let timestep = Tensor::new(&[500f32, 500.0], &Device::Cpu).unwrap();
    let unet = |f: &str| {
        let mid = coreml_support::run(&python, &pkgs[1], &[("sample", &sample), ("timestep", &timestep), ("encoder_hidden_states", &ehs)], Some(f));
        let mut inputs: Vec<(&str, &Tensor)> = mid.iter().map(|(k, v)| (k.as_str(), v)).collect();
        inputs.push(("encoder_hidden_states", &ehs));
        coreml_support::run(&python, &pkgs[2], &inputs, Some(f)).remove("noise_pred").unwrap()
    };
    let (base, ink) = (unet("base"), unet("inkline"));
    let sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    let want = sd.unet().forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    let e_base = coreml_support::max_abs_diff(&base, &want);
    let apart = coreml_support::max_abs_diff(&base, &ink);
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    eprintln!("multifunction UNet (6-bit, groups of 16): base vs engine {e_base:.2e} (outputs up to {scale:.2}), base vs inkline {apart:.2e}");
    assert!(e_base < 0.5 * scale, "the base function is the base model, within 6-bit error");
    assert!(apart > 1e-2, "the functions hold different weights");
}
