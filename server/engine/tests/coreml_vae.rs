//! The Core ML VAE exporters against the engine: the starter model's decoder and encoder
//! (no mid-block attention) and a small SD-1.5-shaped VAE with random weights (mid-block
//! attention, two ResNets per level, legacy attention key names in the encoder) are exported,
//! loaded by coremltools' MIL loader, run by the numpy evaluator, and compared with the
//! engine's `AutoencoderKL` on the same inputs.
//!
//! Tolerances: fp32 packages ≤ 1e-4 max abs (the bound); fp16 packages (weights and
//! activations in fp16, group norms in fp32) ≤ the bounds stated at each check, measured on
//! these models with about 3× headroom; compressed decoders: error reported.

mod coreml_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use atelier_engine::attention::AttentionKind;
use atelier_engine::coreml::blob::BlobWriter;
use atelier_engine::coreml::compress::Compression;
use atelier_engine::coreml::mil::{model_spec, Dt, FnBuilder, Target};
use atelier_engine::coreml::package::PackageWriter;
use atelier_engine::coreml::vae::{self, VaeExport};
use atelier_engine::coreml::Weights;
use atelier_engine::noise::Noise;
use atelier_engine::vae::{AutoencoderKL, VaeConfig};
use atelier_engine::Error;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use coreml_support::{max_abs_diff, python, run, validate};

fn starter_vae() -> (VaeConfig, HashMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter/vae");
    let cfg: VaeConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let map = atelier_engine::model::load_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    (cfg, map)
}

/// SD-1.5's VAE layout (four levels, two ResNets per level, a mid block with single-head
/// attention, quant convs) at a tiny width.
fn sd_like_config() -> VaeConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "scaling_factor": 0.18215
    }))
    .unwrap()
}

/// Seeded random weights for every tensor the engine's `AutoencoderKL` reads: kernels and
/// matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²).
fn random_weights(cfg: &VaeConfig, seed: u64) -> HashMap<String, Tensor> {
    let varmap = candle_nn::VarMap::new();
    AutoencoderKL::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    let mut noise = Noise::new(seed);
    let data = varmap.data().lock().unwrap();
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let dims = data[k].dims().to_vec();
            let r = noise.randn(&dims, &Device::Cpu).unwrap();
            let t = if dims.len() >= 2 {
                let fan_in: usize = dims[1..].iter().product();
                (r / (fan_in as f64).sqrt()).unwrap()
            } else if k.contains("norm") {
                ((r * 0.1).unwrap() + 1.0).unwrap()
            } else {
                (r * 0.1).unwrap()
            };
            (k.clone(), t)
        })
        .collect()
}

fn engine(cfg: &VaeConfig, map: &HashMap<String, Tensor>) -> AutoencoderKL {
    AutoencoderKL::new(cfg, VarBuilder::from_tensors(map.clone(), DType::F32, &Device::Cpu)).unwrap()
}

/// Writes one package with the decoder or the encoder in `precision` (fp16 weights compressed
/// as `compression` says); returns its path.
#[allow(clippy::too_many_arguments)]
fn export(dir: &Path, name: &str, encoder: bool, cfg: &VaeConfig, w: &Weights, opts: &VaeExport, precision: Dt, compression: Option<Compression>, target: Target) -> PathBuf {
    let path = dir.join(format!("{name}.mlpackage"));
    let mut pkg = PackageWriter::create(&path).unwrap();
    let mut f = FnBuilder::new(pkg.weights(), precision, compression, target);
    if encoder {
        vae::build_encoder(&mut f, cfg, w, opts).unwrap();
    } else {
        vae::build_decoder(&mut f, cfg, w, opts).unwrap();
    }
    let func = f.finish();
    if compression.is_some() {
        eprintln!("{name}: {} tensors compressed, weight error ‖W−Ŵ‖/‖W‖ {:.3e}", func.stats.compressed_tensors, func.stats.relative_error());
    }
    let descriptions: HashMap<&str, &str> = vae::DESCRIPTIONS.into_iter().collect();
    let spec = model_spec(target, vec![("main".into(), func)], &descriptions, HashMap::new(), name).unwrap();
    pkg.finish(&spec).unwrap();
    path
}

/// The encoder's exported moments as the engine's distribution: (mean, clamped log-variance).
fn moments(latent: &Tensor, lat: usize) -> (Tensor, Tensor) {
    let mean = latent.narrow(1, 0, lat).unwrap();
    let logvar = latent.narrow(1, lat, lat).unwrap().clamp(-30f32, 20f32).unwrap();
    (mean, logvar)
}

/// Decoder and encoder of `cfg`/`map` in fp32 and fp16 against the engine, on a seeded
/// random latent and on `image`: fp32 within 1e-4, fp16 within `bounds16` (decoder,
/// encoder). Compressed fp16 decoders (6-bit palettes per 16 output channels on iOS 18, int8
/// on iOS 16) are validated and run, and their error is reported.
fn check_against_engine(label: &str, cfg: &VaeConfig, map: HashMap<String, Tensor>, opts: VaeExport, image: &Tensor, bounds16: (f32, f32)) {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = engine(cfg, &map);
    let w = Weights::from_map(map, format!("{label} VAE"));
    let lat = cfg.latent_channels;
    let z = Noise::new(11).randn(&[1, lat, opts.height, opts.width], &Device::Cpu).unwrap();
    let want_image = model.decode(&z, AttentionKind::Original).unwrap();
    let dist = model.encode(image, AttentionKind::Original).unwrap();

    let mut errors = Vec::new();
    for (precision, tag) in [(Dt::F32, "fp32"), (Dt::F16, "fp16")] {
        let t0 = std::time::Instant::now();
        let dec = export(tmp.path(), &format!("VAEDecoder_{tag}"), false, cfg, &w, &opts, precision, None, Target::Ios16);
        let enc = export(tmp.path(), &format!("VAEEncoder_{tag}"), true, cfg, &w, &opts, precision, None, Target::Ios16);
        let export_s = t0.elapsed().as_secs_f64();
        validate(&py, &[&dec, &enc]);

        let t1 = std::time::Instant::now();
        let out = run(&py, &dec, &[(vae::DECODER_INPUT, &z)], None);
        let got_image = &out[vae::DECODER_OUTPUT];
        assert_eq!(got_image.dims(), want_image.dims());
        let e_dec = max_abs_diff(got_image, &want_image);

        let out = run(&py, &enc, &[(vae::ENCODER_INPUT, image)], None);
        let latent = &out[vae::ENCODER_OUTPUT];
        assert_eq!(latent.dims(), &[1, 2 * lat, opts.height, opts.width]);
        let (mean, logvar) = moments(latent, lat);
        let e_enc = max_abs_diff(&mean, &dist.mean).max(max_abs_diff(&logvar, &dist.logvar));
        eprintln!(
            "{label} {tag}: decoder max abs error {e_dec:.3e} (image range ±{:.2}), encoder {e_enc:.3e}; export {export_s:.2}s, evaluation {:.1}s",
            want_image.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(),
            t1.elapsed().as_secs_f64()
        );
        errors.push((tag, e_dec, e_enc));
    }
    let (_, d32, e32) = errors[0];
    assert!(d32 <= 1e-4, "{label}: fp32 decoder differs from the engine by {d32}");
    assert!(e32 <= 1e-4, "{label}: fp32 encoder differs from the engine by {e32}");
    let (_, d16, e16) = errors[1];
    assert!(d16 <= bounds16.0, "{label}: fp16 decoder differs from the engine by {d16} (bound {})", bounds16.0);
    assert!(e16 <= bounds16.1, "{label}: fp16 encoder differs from the engine by {e16} (bound {})", bounds16.1);

    for (compression, target, tag) in [
        (Compression::Palettize { bits: 6, group_size: Some(16) }, Target::Ios18, "palettized 6-bit (iOS 18, 16 channels per LUT)"),
        (Compression::Int8, Target::Ios16, "int8"),
    ] {
        let dec = export(tmp.path(), "VAEDecoder_compressed", false, cfg, &w, &opts, Dt::F16, Some(compression), target);
        let out = run(&py, &dec, &[(vae::DECODER_INPUT, &z)], None);
        let err = max_abs_diff(&out[vae::DECODER_OUTPUT], &want_image);
        eprintln!("{label} decoder {tag}: max abs error {err:.3e}");
        assert!(err.is_finite() && err < 0.5, "{label} decoder {tag}: error {err}");
    }
}

#[test]
fn starter_vae_exports_match_the_engine() {
    let (cfg, map) = starter_vae();
    assert!(!cfg.mid_block_add_attention, "the starter VAE has no mid-block attention");
    // A non-square size (48×64 pixels) so that height and width cannot be swapped unnoticed.
    let opts = VaeExport::from_image(&cfg, 64, 48).unwrap();
    assert_eq!(opts, VaeExport { height: 6, width: 8 });
    let (_, img) = atelier_engine::starter::shapes::World::new(5).clean_sample(2);
    let image = atelier_engine::pipeline::image_to_tensor(&img, 64, 48, &Device::Cpu).unwrap();
    // fp16 measured: decoder 2.2e-3, encoder 7.2e-3.
    check_against_engine("starter", &cfg, map, opts, &image, (1e-2, 2.5e-2));
}

#[test]
fn sd_like_vae_with_mid_block_attention_matches_the_engine() {
    let cfg = sd_like_config();
    assert!(cfg.mid_block_add_attention);
    let mut map = random_weights(&cfg, 3);
    // Older checkpoints name the attention projections query/key/value/proj_attn; the engine
    // and the exporter both accept them (here in the encoder; the decoder keeps to_q etc.).
    for (new, old) in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")] {
        for p in ["weight", "bias"] {
            let t = map.remove(&format!("encoder.mid_block.attentions.0.{new}.{p}")).unwrap();
            map.insert(format!("encoder.mid_block.attentions.0.{old}.{p}"), t);
        }
    }
    // The attention matters: without it the engine's decoder gives another image, so an
    // exporter that dropped or garbled it could not stay within 1e-4.
    let z = Noise::new(11).randn(&[1, 4, 4, 6], &Device::Cpu).unwrap();
    let plain = VaeConfig { mid_block_add_attention: false, ..cfg.clone() };
    let with = engine(&cfg, &map).decode(&z, AttentionKind::Original).unwrap();
    let without = engine(&plain, &map).decode(&z, AttentionKind::Original).unwrap();
    assert!(max_abs_diff(&with, &without) > 0.05, "attention changes the image by {}", max_abs_diff(&with, &without));

    let opts = VaeExport { height: 4, width: 6 };
    let image = (Noise::new(9).randn(&[1, 3, 32, 48], &Device::Cpu).unwrap() * 0.5).unwrap().clamp(-1f32, 1f32).unwrap();
    // fp16 measured: decoder 9.9e-3 (image values up to ±4.2), encoder 3.7e-3.
    check_against_engine("SD-like", &cfg, map, opts, &image, (3e-2, 1.2e-2));
}

/// Refusals come before anything is written: the weight file holds no blob afterwards.
#[test]
fn what_cannot_be_exported_is_refused_before_writing() {
    let (cfg, map) = starter_vae();
    let opts = VaeExport { height: 8, width: 8 };
    let attempt = |cfg: &VaeConfig, map: &HashMap<String, Tensor>, encoder: bool, opts: &VaeExport| -> (Error, u32) {
        let mut blobs = BlobWriter::new();
        let w = Weights::from_map(map.clone(), "vae/diffusion_pytorch_model.safetensors");
        let mut f = FnBuilder::new(&mut blobs, Dt::F16, None, Target::Ios16);
        let r = if encoder { vae::build_encoder(&mut f, cfg, &w, opts) } else { vae::build_decoder(&mut f, cfg, &w, opts) };
        let err = r.expect_err("refused");
        let ops = f.finish().op_count();
        assert_eq!(ops, 0, "no op emitted before the refusal");
        (err, blobs.count())
    };
    let message = |e: &Error| e.to_string();

    // A missing tensor (the last one the decoder reads, so a late failure would show).
    let mut missing = map.clone();
    missing.remove("decoder.conv_out.bias");
    let (e, blobs) = attempt(&cfg, &missing, false, &opts);
    assert_eq!(blobs, 0);
    assert!(message(&e).contains("decoder.conv_out.bias"), "{e}");

    // A tensor of the wrong shape.
    let mut wrong = map.clone();
    wrong.insert("encoder.conv_out.weight".into(), Tensor::zeros((8, 64, 1, 1), DType::F32, &Device::Cpu).unwrap());
    let (e, blobs) = attempt(&cfg, &wrong, true, &opts);
    assert_eq!(blobs, 0);
    assert!(message(&e).contains("encoder.conv_out.weight") && message(&e).contains("[8, 64, 3, 3]"), "{e}");

    // An unknown block type.
    let mut odd = cfg.clone();
    odd.up_block_types[1] = "AttnUpDecoderBlock2D".into();
    let (e, _) = attempt(&odd, &map, false, &opts);
    assert!(message(&e).contains("AttnUpDecoderBlock2D"), "{e}");

    // Latents the Swift encoder cannot read (it slices channels 0..<4 and 4..<8).
    let mut wide = cfg.clone();
    wide.latent_channels = 16;
    let (e, _) = attempt(&wide, &map, true, &opts);
    assert!(message(&e).contains("16 latent channels"), "{e}");

    // A zero size, and image sizes that are not multiples of 8.
    let (e, _) = attempt(&cfg, &map, false, &VaeExport { height: 0, width: 8 });
    assert!(message(&e).contains("must be positive"), "{e}");
    let e = VaeExport::from_image(&cfg, 100, 64).unwrap_err();
    assert!(message(&e).contains("multiple of 8"), "{e}");

    // The tensor list the builders follow is exactly what the engine's model reads.
    let w = Weights::from_map(map.clone(), "starter");
    let mut listed: Vec<String> = vae::tensors(true, &cfg, &w, &opts).unwrap().into_iter().chain(vae::tensors(false, &cfg, &w, &opts).unwrap()).map(|(k, _)| k).collect();
    listed.sort();
    let mut all: Vec<String> = map.keys().cloned().collect();
    all.sort();
    assert_eq!(listed, all);
}
