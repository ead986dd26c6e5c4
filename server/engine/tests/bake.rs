//! Baking a two-adapter blend (one negative, one with block weights) on the starter model:
//! the exact file and the merged checkpoint reproduce the runtime blend, the compressed
//! file's reported error is the true Frobenius error and falls to 0 at full rank.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use atelier_engine::attention::AttentionKind;
use atelier_engine::bake::{bake_compressed, bake_exact, save_kohya, save_merged, Baked};
use atelier_engine::lora::{ActiveLora, BlockWeights, LoraAdapter};
use atelier_engine::noise::Noise;
use atelier_engine::pipeline::StableDiffusion;
use candle_core::{Device, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The UNet's noise prediction for a fixed latent, timestep and prompt, with whatever
/// adapters are attached.
fn unet_out(sd: &StableDiffusion) -> Vec<f32> {
    let mut warnings = Vec::new();
    let ctx = sd.encode_prompt("a red circle on a blue background", AttentionKind::Original, &mut warnings).unwrap().context;
    let x = Noise::new(11).randn(&[1, 4, 8, 8], sd.device()).unwrap();
    let t = Tensor::new(&[500f32], sd.device()).unwrap();
    sd.unet().forward_timesteps(&x, &t, &ctx, AttentionKind::Original).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn with_file(sd: &StableDiffusion, baked: &Baked, path: &std::path::Path) -> Vec<f32> {
    save_kohya(baked, &HashMap::from([("atelier_blend".to_string(), "test".to_string())]), path).unwrap();
    let lora = sd.bind_lora(&Arc::new(LoraAdapter::load(path).unwrap())).unwrap();
    sd.set_loras(&[ActiveLora { lora, weight: 1.0, blocks: BlockWeights::default() }]);
    let out = unet_out(sd);
    sd.set_loras(&[]);
    out
}

#[test]
fn baked_blends_match_the_runtime_blend() {
    let sd = StableDiffusion::load(&repo().join("models/starter"), &Device::Cpu).unwrap();
    let load = |n: &str| sd.bind_lora(&Arc::new(LoraAdapter::load(&repo().join(format!("models/styles/{n}/{n}.safetensors"))).unwrap())).unwrap();
    let active = vec![
        ActiveLora { lora: load("inkline"), weight: 0.7, blocks: BlockWeights::default() },
        ActiveLora { lora: load("pastel"), weight: -0.4, blocks: BlockWeights { down: 1.0, mid: 0.5, up: 0.0 } },
    ];
    let base = unet_out(&sd);
    sd.set_loras(&active);
    let runtime = unet_out(&sd);
    sd.set_loras(&[]);
    assert!(max_diff(&base, &runtime) > 1e-2, "the blend changes the output");

    let tmp = tempfile::tempdir().unwrap();
    let exact = bake_exact(&active, sd.lora_slots()).unwrap();
    // Rank 8 + rank 8, except in the up blocks where pastel's block weight is 0.
    for m in &exact.modules {
        let want = if m.name.starts_with("up_blocks") { 8 } else { 16 };
        assert_eq!(m.down.dims()[0], want, "{}", m.name);
    }
    let from_exact = with_file(&sd, &exact, &tmp.path().join("exact.safetensors"));
    let d = max_diff(&runtime, &from_exact);
    assert!(d < 1e-4, "exact bake vs runtime: {d}");

    // Full rank: nothing lost. Rank 2: the reported error is the true one.
    let full = bake_compressed(&active, sd.lora_slots(), 16).unwrap();
    assert!(full.relative_error < 1e-6, "{}", full.relative_error);
    let d = max_diff(&runtime, &with_file(&sd, &full, &tmp.path().join("full.safetensors")));
    assert!(d < 1e-4, "full-rank SVD bake vs runtime: {d}");
    let small = bake_compressed(&active, sd.lora_slots(), 2).unwrap();
    assert!(small.modules.iter().all(|m| m.down.dims()[0] == 2));
    let (mut lost, mut total) = (0f64, 0f64);
    for (e, s) in exact.modules.iter().zip(&small.modules) {
        assert_eq!(e.name, s.name);
        let flat = |t: &Tensor, rows: bool| {
            let n = t.dims()[0];
            if rows { t.reshape((n, ())).unwrap() } else { t.reshape((n, t.elem_count() / n)).unwrap() }
        };
        let dw = flat(&e.up, false).matmul(&flat(&e.down, true)).unwrap();
        let dr = flat(&s.up, false).matmul(&flat(&s.down, true)).unwrap();
        lost += (&dw - &dr).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        total += dw.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    let true_error = (lost / total).sqrt();
    assert!(small.relative_error > 0.01 && small.relative_error < 1.0, "{}", small.relative_error);
    assert!((small.relative_error - true_error).abs() < 1e-3, "reported {} vs measured {true_error}", small.relative_error);
    assert!(small.worst_layer_error >= small.relative_error * 0.999);
    let d_small = max_diff(&runtime, &with_file(&sd, &small, &tmp.path().join("small.safetensors")));
    let d_base = max_diff(&runtime, &base);
    assert!(d_small < d_base, "rank 2 is closer to the blend ({d_small}) than the base model is ({d_base})");

    // The blend merged into a copy of the model: the plain merged model gives the blend.
    let merged_dir = tmp.path().join("merged");
    save_merged(&active, sd.lora_slots(), &repo().join("models/starter"), &merged_dir).unwrap();
    let merged = StableDiffusion::load(&merged_dir, &Device::Cpu).unwrap();
    let d = max_diff(&runtime, &unet_out(&merged));
    assert!(d < 1e-4, "merged checkpoint vs runtime: {d}");
    assert_ne!(merged.model_hash(), sd.model_hash());
    assert!(save_merged(&active, sd.lora_slots(), &repo().join("models/starter"), &merged_dir).is_err(), "never overwrites");
}
