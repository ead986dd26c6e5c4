//! SDXL base single-file checkpoints (Stability SGM key layout): `sdxl-tiny.safetensors`
//! converted with sdxl-tiny's configs gives the diffusers folder's four weight files exactly
//! (same keys, dtypes, shapes and bytes), and a config folder of the other family is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atelier_engine::single_file::convert;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

/// Every tensor of a safetensors file: name → (dtype, shape, raw bytes).
fn tensors(path: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors().into_iter().map(|(name, view)| (name, (view.dtype(), view.shape().to_vec(), view.data().to_vec()))).collect()
}

#[test]
fn sdxl_file_reproduces_the_folder_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sdxl-tiny");
    let folder = shared().join("sdxl-tiny/pipeline");
    convert(&shared().join("single-file/sdxl-tiny.safetensors"), &folder, &out).expect("convert");
    for rel in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ] {
        let want = tensors(&folder.join(rel));
        let got = tensors(&out.join(rel));
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{rel}: missing {missing:?}, extra {extra:?}");
        for (name, (dtype, shape, bytes)) in &want {
            let (g_dtype, g_shape, g_bytes) = &got[name];
            assert_eq!((g_dtype, g_shape), (dtype, shape), "{rel} {name}");
            assert!(g_bytes == bytes, "{rel} {name}: same dtype and shape, different bytes");
        }
    }
    // Configs and both tokenizers come from the config folder, byte for byte.
    for rel in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
    ] {
        assert_eq!(std::fs::read(out.join(rel)).unwrap(), std::fs::read(folder.join(rel)).unwrap(), "{rel}");
    }
    // What the engine's loader sees: a whole SDXL folder.
    let files = atelier_engine::model::ModelFiles::locate(&out).expect("locate");
    assert!(files.text_encoder_2.is_some());
    // Nothing but the folder is left beside it (the staging folder was renamed).
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// A config folder of the other family is refused before anything is written, naming both.
#[test]
fn config_of_the_other_family_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    let sd1_config = shared().join("sd-tiny/pipeline");
    let e = convert(&shared().join("single-file/sdxl-tiny.safetensors"), &sd1_config, &out).unwrap_err().to_string();
    assert!(e.contains("sdxl-tiny.safetensors") && e.contains("is an SDXL checkpoint"), "{e}");
    assert!(e.contains(&sd1_config.display().to_string()) && e.contains("SD 1.x model"), "{e}");

    let xl_config = shared().join("sdxl-tiny/pipeline");
    let e = convert(&shared().join("single-file/sd-tiny.safetensors"), &xl_config, &out).unwrap_err().to_string();
    assert!(e.contains("sd-tiny.safetensors") && e.contains("is an SD 1.x checkpoint"), "{e}");
    assert!(e.contains(&xl_config.display().to_string()) && e.contains("SDXL model"), "{e}");

    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing left behind");
}
