//! Style training on the starter model: a short run on generated `stripes` pictures
//! lowers the loss, changes what the model paints, resumes exactly after a stop, and
//! writes adapters that load back in both layouts with their training record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use atelier_engine::lora::{ActiveLora, BlockWeights, LoraAdapter, LoraFormat};
use atelier_engine::model::load_safetensors;
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
use atelier_engine::starter::styles::{write_dataset, PictureStyle};
use atelier_engine::style::dataset::{prepare, scan};
use atelier_engine::style::train::{train_style, StyleEvent, StyleTrainConfig};
use atelier_engine::train::curves::CsvLog;
use atelier_engine::Error;
use candle_core::Device;

fn starter() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter")
}

fn losses(run: &Path) -> Vec<f64> {
    let (cols, rows) = CsvLog::read(&run.join("loss.csv")).unwrap();
    let i = cols.iter().position(|c| c == "loss").unwrap();
    rows.into_iter().map(|(_, v)| v[i]).collect()
}

#[test]
fn a_short_style_run_learns_resumes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    write_dataset(PictureStyle::Stripes, &data_dir, 8, 1).unwrap();
    let report = scan(&data_dir, "stripes", 64, 5).unwrap();
    let data = prepare(&report).unwrap();
    let sd = StableDiffusion::load(&starter(), &Device::Cpu).unwrap();

    let mut cfg = StyleTrainConfig::new("stripes", "stripes", 40);
    cfg.rank = 4;
    cfg.alpha = 4.0;
    cfg.optim.lr = 3e-3;
    cfg.checkpoint_every = 10;
    cfg.sample_every = 40;
    cfg.sample_prompts = vec!["a red circle on a blue background, stripes style".into()];
    cfg.base_model_hash = sd.model_hash().to_string();
    cfg.dataset_hash = data.hash.clone();

    let straight = dir.path().join("straight");
    let mut samples = Vec::new();
    let out = train_style(&sd, &data, &cfg, &straight, &mut |ev| {
        if let StyleEvent::Samples { path, .. } = ev {
            samples.push(path.clone());
        }
        true
    })
    .expect("training");
    assert_eq!(samples.len(), 2, "samples before training and at the end: {samples:?}");
    assert!(straight.join("loss.png").is_file());
    let l = losses(&straight);
    assert_eq!(l.len(), 40);
    // The per-step loss is noisy (random timesteps); the fixed-timestep fit is not.
    eprintln!("dataset fit loss: base {:.5}, adapter {:.5}", out.fit_before, out.fit_after);
    assert!(out.fit_after < 0.95 * out.fit_before, "loss did not fall: {} -> {}", out.fit_before, out.fit_after);
    assert!(straight.join("fit.json").is_file());

    // Both files load, agree, and carry the record.
    let kohya = Arc::new(LoraAdapter::load(&out.kohya).unwrap());
    let diffusers = Arc::new(LoraAdapter::load(&out.diffusers).unwrap());
    assert_eq!((kohya.format, diffusers.format), (LoraFormat::Kohya, LoraFormat::Diffusers));
    assert_eq!(kohya.modules.len(), diffusers.modules.len());
    assert!(kohya.modules.iter().all(|m| m.scale == 1.0) && diffusers.modules.iter().all(|m| m.scale == 1.0));
    for a in [&kohya, &diffusers] {
        assert_eq!(a.metadata.get("atelier_trigger").map(String::as_str), Some("stripes"));
        assert_eq!(a.metadata.get("atelier_dataset_hash"), Some(&data.hash));
        assert_eq!(a.metadata.get("atelier_base_model_hash").map(String::as_str), Some(sd.model_hash()));
    }

    // The adapter changes the picture; the same picture comes from either file.
    let render = |loras: Vec<ActiveLora>| {
        let p = GenerateParams { prompt: "a red circle on a blue background, stripes style".into(), seed: 7, loras, ..Default::default() };
        sd.generate(&p, &mut |_| true).unwrap().images.remove(0)
    };
    let active = |a: &Arc<LoraAdapter>| vec![ActiveLora { lora: sd.bind_lora(a).unwrap(), weight: 1.0, blocks: BlockWeights::default() }];
    let (base, with_k, with_d) = (render(vec![]), render(active(&kohya)), render(active(&diffusers)));
    let diff = |a: &image::RgbImage, b: &image::RgbImage| a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64;
    eprintln!("mean |pixel change| with the adapter: {:.2}", diff(&base, &with_k));
    assert!(diff(&base, &with_k) > 2.0, "the adapter changes the output");
    assert_eq!(with_k, with_d, "kohya and diffusers files give the same image");

    // Stop at step 15, resume: the same adapter as the straight run.
    let resumed = dir.path().join("resumed");
    let r = train_style(&sd, &data, &cfg, &resumed, &mut |ev| !matches!(ev, StyleEvent::Step { step: 15, .. }));
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    let out2 = train_style(&sd, &data, &cfg, &resumed, &mut |_| true).expect("resumed");
    let a = load_safetensors(&out.kohya, &Device::Cpu).unwrap();
    let b = load_safetensors(&out2.kohya, &Device::Cpu).unwrap();
    for (k, t) in &a {
        let d = (t - &b[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k} differs after resuming");
    }
    assert_eq!(losses(&resumed), l, "the loss log continues without gaps");

    // Other settings on the same folder are refused.
    let mut other = cfg.clone();
    other.rank = 8;
    let err = train_style(&sd, &data, &other, &resumed, &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("other settings"), "{err}");
}
