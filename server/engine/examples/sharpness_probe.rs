//! Where does sharpness go? Laplacian variance of training renders (clean / blurry /
//! noisy), of their VAE reconstructions, and of generations with quality words in the
//! prompt or the negative prompt.
//! `cargo run --release -p atelier-engine --example sharpness_probe -- MODEL_DIR [VAE_WEIGHTS]`

use atelier_engine::attention::AttentionKind;
use atelier_engine::model::load_safetensors;
use atelier_engine::pipeline::{image_to_tensor, tensor_to_images, GenerateParams, StableDiffusion};
use atelier_engine::quality::laplacian_variance;
use atelier_engine::scheduler::SchedulerKind;
use atelier_engine::starter::eval::held_out_cases;
use atelier_engine::starter::{model, shapes::World};
use atelier_engine::vae::AutoencoderKL;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let dev = Device::Cpu;
    let vae_path = args.get(2).cloned().unwrap_or_else(|| dir.join("vae/diffusion_pytorch_model.safetensors").display().to_string());
    let vae = AutoencoderKL::new(&model::vae_config(1.0), VarBuilder::from_tensors(load_safetensors(vae_path.as_ref(), &dev)?, DType::F32, &dev))?;
    let world = World::new(777);
    let (mut clean, mut blurry, mut noisy) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..400 {
        let (scene, img) = world.training_sample(i);
        let q = scene.quality;
        if q.low_contrast || (q.blurry && q.noisy) {
            continue;
        }
        let bucket = if q.blurry { &mut blurry } else if q.noisy { &mut noisy } else { &mut clean };
        if bucket.len() < 16 {
            bucket.push(img);
        }
    }
    for (name, imgs) in [("clean", &clean), ("blurry", &blurry), ("noisy", &noisy)] {
        let x = Tensor::cat(&imgs.iter().map(|i| image_to_tensor(i, 64, 64, &dev)).collect::<Result<Vec<_>, _>>()?, 0)?;
        let z = vae.encode(&x, AttentionKind::Original)?.mean;
        let rec = tensor_to_images(&vae.decode(&z, AttentionKind::Original)?)?;
        let a: Vec<f64> = imgs.iter().map(laplacian_variance).collect();
        let b: Vec<f64> = rec.iter().map(laplacian_variance).collect();
        println!("{name:7} n={:2} original {:8.1}  reconstruction {:8.1}", imgs.len(), mean(&a), mean(&b));
    }
    if args.get(2).is_some() {
        return Ok(());
    }
    let sd = StableDiffusion::load(&dir, &dev)?;
    let cases: Vec<_> = held_out_cases(0).into_iter().step_by(9).collect();
    for (suffix, neg) in [("", ""), ("", "blurry"), ("", "noisy"), ("", "blurry, noisy"), (", blurry", ""), (", noisy", "")] {
        let mut s = Vec::new();
        for c in &cases {
            let p = GenerateParams {
                prompt: format!("{}{suffix}", c.prompt),
                negative_prompt: neg.into(),
                steps: 20,
                guidance: 7.5,
                seed: c.seed,
                scheduler: SchedulerKind::DpmPp2mKarras,
                width: 64,
                height: 64,
                ..Default::default()
            };
            let out = sd.generate(&p, &mut |_| true)?;
            s.push(laplacian_variance(&out.images[0]));
        }
        println!("prompt+{suffix:9} neg={neg:14} lapvar {:8.1}", mean(&s));
    }
    Ok(())
}
