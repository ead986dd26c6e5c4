//! Reconstructs a few shape images with a starter VAE (a `vae/` weights file or a
//! training checkpoint's `model.safetensors`) and writes originals over reconstructions
//! as one PNG, to look at while a run trains:
//! `cargo run -p atelier-engine --example vae_recon -- WEIGHTS OUT.png [STYLE]`
//! (with a picture style name, the shapes are restyled first: can the VAE carry it?)

use atelier_engine::attention::AttentionKind;
use atelier_engine::model::load_safetensors;
use atelier_engine::pipeline::{image_to_tensor, tensor_to_images};
use atelier_engine::sheet::contact_sheet;
use atelier_engine::starter::{model, shapes::World};
use atelier_engine::vae::AutoencoderKL;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3 || args.len() == 4, "usage: vae_recon WEIGHTS OUT.png [STYLE]");
    let style = args.get(3).map(|s| atelier_engine::starter::styles::PictureStyle::from_name(s).expect("a style name"));
    let dev = Device::Cpu;
    let vb = VarBuilder::from_tensors(load_safetensors(args[1].as_ref(), &dev)?, DType::F32, &dev);
    let vae = AutoencoderKL::new(&model::vae_config(1.0), vb)?;
    let world = World::new(12345);
    let originals: Vec<_> = (0..12)
        .map(|i| match style {
            Some(s) => s.apply(&world.clean_sample(i).1),
            None => world.training_sample(i).1,
        })
        .collect();
    let x = Tensor::cat(&originals.iter().map(|i| image_to_tensor(i, 64, 64, &dev)).collect::<Result<Vec<_>, _>>()?, 0)?;
    let z = vae.encode(&x, AttentionKind::Original)?.mean;
    let recon = tensor_to_images(&vae.decode(&z, AttentionKind::Original)?)?;
    let l1 = (vae.decode(&z, AttentionKind::Original)?.clamp(-1f32, 1f32)? - &x)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    println!("mean L1 (of [-1, 1]) on 12 images: {l1:.4}");
    let mut all = originals;
    all.extend(recon);
    contact_sheet(&all, 12).save(&args[2])?;
    Ok(())
}
