//! The starter-model trainer on a few steps: the loss falls, and a run that is
//! stopped and resumed ends in exactly the same weights as one that was not.

use std::path::Path;

use atelier_engine::model::load_safetensors;
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::starter::train::{resume_point, train_base, InitFrom, Stage, TrainBaseConfig, TrainEvent};
use atelier_engine::train::curves::CsvLog;
use atelier_engine::Error;
use candle_core::Device;

fn tokenizer() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/starter/tokenizer"))
}

fn config() -> TrainBaseConfig {
    TrainBaseConfig::smoke(11, 16, 8)
}

fn column(csv: &Path, name: &str) -> Vec<f64> {
    let (cols, rows) = CsvLog::read(csv).expect("loss csv");
    let i = cols.iter().position(|c| c == name).unwrap_or_else(|| panic!("{name} column in {}", csv.display()));
    rows.into_iter().map(|(_, v)| v[i]).collect()
}

fn losses(csv: &Path) -> Vec<f64> {
    column(csv, "loss")
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn assert_same_weights(a: &Path, b: &Path) {
    for rel in ["vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
        let ta = load_safetensors(&a.join(rel), &Device::Cpu).expect("weights a");
        let tb = load_safetensors(&b.join(rel), &Device::Cpu).expect("weights b");
        assert_eq!(ta.len(), tb.len(), "{rel}");
        for (name, x) in &ta {
            let d = max_abs_diff(x, &tb[name]);
            assert_eq!(d, 0.0, "{rel} {name} differs by {d} after resuming");
        }
    }
}

#[test]
fn loss_falls_and_a_resumed_run_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let cfg = config();
    let summary = train_base(&straight, tokenizer(), &cfg, &Device::Cpu, &mut |_| true).expect("training");
    assert!(summary.scaling_factor.is_finite() && summary.scaling_factor > 0.0);

    // Loss falls: the VAE's reconstruction loss over its first and last steps.
    let vae = losses(&straight.join("training/loss_vae.csv"));
    assert_eq!(vae.len(), 16);
    let first = vae[..4].iter().sum::<f64>() / 4.0;
    let last = vae[12..].iter().sum::<f64>() / 4.0;
    assert!(last < 0.9 * first, "VAE loss did not fall: {first:.4} -> {last:.4}");
    let diff = losses(&straight.join("training/loss_diffusion.csv"));
    assert_eq!(diff.len(), 8);
    assert!(diff[6..].iter().sum::<f64>() < diff[..2].iter().sum::<f64>(), "diffusion loss did not fall: {diff:?}");
    assert!(straight.join("training/loss_vae.png").is_file() && straight.join("training/loss_diffusion.png").is_file());
    assert!(!straight.join("checkpoints").exists(), "checkpoints are removed when the run finishes");

    // The result is an ordinary diffusers folder.
    let sd = StableDiffusion::load(&straight, &Device::Cpu).expect("the trained folder loads");
    assert_eq!(sd.default_size(), 64);

    // Stop in the middle of each stage, then resume with the same command.
    let resumed = dir.path().join("resumed");
    for (stage, at) in [(Stage::Vae, 5), (Stage::Diffusion, 3)] {
        let r = train_base(&resumed, tokenizer(), &cfg, &Device::Cpu, &mut |ev| {
            !matches!(ev, TrainEvent::Step { stage: s, step, .. } if *s == stage && *step == at)
        });
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        assert_eq!(resume_point(&resumed).unwrap(), Some((stage, at)));
    }
    train_base(&resumed, tokenizer(), &cfg, &Device::Cpu, &mut |_| true).expect("resumed training");
    assert_same_weights(&straight, &resumed);
    assert_eq!(losses(&resumed.join("training/loss_diffusion.csv")), diff, "the loss log continues without gaps or repeats");

    // Fine-tuning starts from the trained weights and keeps the VAE.
    let tuned = dir.path().join("tuned");
    let mut fine = TrainBaseConfig::smoke(12, 16, 2);
    fine.init_from = Some(InitFrom::new(&straight).unwrap());
    train_base(&tuned, tokenizer(), &fine, &Device::Cpu, &mut |_| true).expect("fine-tuning");
    assert!(!tuned.join("training/loss_vae.csv").exists(), "the VAE is reused, not retrained");
    let vae_a = load_safetensors(&straight.join("vae/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let vae_b = load_safetensors(&tuned.join("vae/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(vae_a.len(), vae_b.len());
    for (name, t) in &vae_a {
        assert_eq!(max_abs_diff(t, &vae_b[name]), 0.0, "VAE tensor {name} changed although it was kept");
    }
    let tuned_loss = losses(&tuned.join("training/loss_diffusion.csv"));
    eprintln!("diffusion loss: scratch {diff:?}, fine-tuned {tuned_loss:?}");
    assert!(tuned_loss[0] < 0.9 * diff[0], "fine-tuning starts from trained weights: {} vs {}", tuned_loss[0], diff[0]);
    StableDiffusion::load(&tuned, &Device::Cpu).expect("the fine-tuned folder loads");

    // --retrain-vae: the VAE stage runs again, from the init model's VAE, with the edge loss.
    let revae = dir.path().join("revae");
    let mut re = TrainBaseConfig::smoke(13, 2, 1);
    re.vae_edge_weight = 1.0;
    re.init_from = Some(InitFrom::new(&straight).unwrap().retraining_vae(true));
    train_base(&revae, tokenizer(), &re, &Device::Cpu, &mut |_| true).expect("retraining the VAE");
    let csv = revae.join("training/loss_vae.csv");
    let (l1, kl, edge, loss) = (column(&csv, "l1"), column(&csv, "kl"), column(&csv, "edge"), losses(&csv));
    let scratch_l1 = column(&straight.join("training/loss_vae.csv"), "l1");
    assert!(l1[0] < 0.9 * scratch_l1[0], "retraining starts from the trained VAE: L1 {} vs {} from scratch", l1[0], scratch_l1[0]);
    for i in 0..loss.len() {
        let expected = l1[i] + re.vae_kl_weight * kl[i] + edge[i];
        assert!(edge[i] > 0.0 && (loss[i] - expected).abs() < 1e-5, "step {i}: loss {} = L1 + KL + edge {expected}", loss[i]);
    }
    let vae_c = load_safetensors(&revae.join("vae/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    assert!(vae_a.iter().any(|(name, t)| max_abs_diff(t, &vae_c[name]) > 0.0), "the retrained VAE differs from the one it started from");
    StableDiffusion::load(&revae, &Device::Cpu).expect("the folder with a retrained VAE loads");

    // --vae-decoder-only: the encoder (so the latent space and its scale) stays exactly as it was.
    let dec = dir.path().join("decoder");
    let mut d = TrainBaseConfig::smoke(14, 2, 1);
    d.vae_detail_weight = 1.0;
    d.vae_decoder_only = true;
    d.init_from = Some(InitFrom::new(&straight).unwrap().retraining_vae(true));
    train_base(&dec, tokenizer(), &d, &Device::Cpu, &mut |_| true).expect("decoder-only VAE training");
    let vae_d = load_safetensors(&dec.join("vae/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in &vae_a {
        let changed = max_abs_diff(t, &vae_d[name]) > 0.0;
        let decoder = name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
        assert!(changed == decoder || (decoder && !changed && name.contains("norm")), "{name}: changed {changed}");
        if !decoder {
            assert!(!changed, "encoder tensor {name} changed");
        }
    }
    let scale = |p: &Path| std::fs::read_to_string(p.join("vae/config.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&scale(&dec)).unwrap()["scaling_factor"],
        serde_json::from_str::<serde_json::Value>(&scale(&straight)).unwrap()["scaling_factor"]
    );

    // Different settings are refused rather than mixed into the run.
    let mut other = cfg.clone();
    other.seed += 1;
    let err = train_base(&resumed, tokenizer(), &other, &Device::Cpu, &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
}
