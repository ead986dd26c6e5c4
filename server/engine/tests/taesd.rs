//! TAESD previews: a decoder made by diffusers (`tests/diffusers/make_taesd_cases.py`, seeded
//! random weights, the standard layer layout at 16 channels) is read from both of its file
//! layouts and reproduces diffusers' `AutoencoderTiny.decode`; the pipeline's step previews
//! use it when its file is in the model's `vae_approx/` folder.

use std::path::PathBuf;

use atelier_engine::model::load_safetensors;
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
use atelier_engine::reference::max_abs_diff;
use atelier_engine::taesd::TinyDecoder;
use candle_core::Device;

fn cases() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/diffusers/taesd")
}

#[test]
fn both_file_layouts_decode_like_diffusers() {
    let case = load_safetensors(&cases().join("taesd_decode.safetensors"), &Device::Cpu).unwrap();
    for file in ["taesd_decoder.safetensors", "diffusion_pytorch_model.safetensors"] {
        let d = TinyDecoder::load(&cases().join(file), &Device::Cpu).unwrap();
        let got = d.decode(&case["latent"]).unwrap();
        assert_eq!(got.dims(), &[1, 3, 64, 96]);
        let diff = max_abs_diff(&got, &case["decoded"]).unwrap();
        eprintln!("{file}: max |diff| {diff:.3e}");
        assert!(diff < 1e-4, "{file}: {diff}");
    }
}

#[test]
fn previews_use_the_decoder_in_vae_approx_and_bad_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    // Found in the model's folder and in the models folder above it.
    let model = tmp.path().join("models/my-model");
    std::fs::create_dir_all(model.join("vae_approx")).unwrap();
    std::fs::copy(cases().join("taesd_decoder.safetensors"), model.join("vae_approx/taesd_decoder.safetensors")).unwrap();
    assert!(TinyDecoder::find(&model, false, &Device::Cpu).unwrap().is_some());
    assert!(TinyDecoder::find(&model, true, &Device::Cpu).unwrap().is_none(), "SDXL wants taesdxl_decoder");
    let sibling = tmp.path().join("models/other");
    std::fs::create_dir_all(&sibling).unwrap();
    std::fs::create_dir_all(tmp.path().join("models/vae_approx")).unwrap();
    std::fs::copy(cases().join("taesd_decoder.safetensors"), tmp.path().join("models/vae_approx/taesd_decoder.safetensors")).unwrap();
    assert!(TinyDecoder::find(&sibling, false, &Device::Cpu).unwrap().is_some());
    // A file that is not a TAESD decoder says so.
    let lora = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/styles/pastel/pastel.safetensors");
    let e = TinyDecoder::load(&lora, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("pastel.safetensors") && e.contains("not a TAESD decoder"), "{e}");

    // The starter model's previews: 8×8 latents give 8×8 approximations, 64×64 TAESD images.
    let starter = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter");
    let mut sd = StableDiffusion::load(&starter, &Device::Cpu).unwrap();
    let params = GenerateParams { prompt: "a red circle".into(), steps: 2, ..Default::default() };
    let sizes = |sd: &StableDiffusion| {
        let mut seen = Vec::new();
        sd.generate(&params, &mut |p| {
            seen.push(p.preview.as_ref().map(|i| i.dimensions()));
            true
        })
        .unwrap();
        seen
    };
    assert_eq!(sizes(&sd), vec![Some((8, 8)); 2]);
    sd.set_preview_decoder(Some(TinyDecoder::load(&cases().join("taesd_decoder.safetensors"), &Device::Cpu).unwrap()));
    assert_eq!(sizes(&sd), vec![Some((64, 64)); 2]);
}
