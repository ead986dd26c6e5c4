//! LoRA files: the two layouts read to the same adapter, LoCon convolutions match a
//! merged kernel, and files that do not fit the model are refused with a message that
//! names what is wrong. (The fixture's diffusers-computed LoRA cases are in
//! `reference.rs`.)

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use atelier_engine::attention::AttentionKind;
use atelier_engine::lora::{ActiveLora, BlockWeights, LoraAdapter, LoraFormat};
use atelier_engine::model::{load_safetensors, read_config};
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::unet::{UNet2DConditionModel, UNetConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/sd-tiny")
}

fn adapter(file: &str) -> LoraAdapter {
    LoraAdapter::load(&fixtures().join("lora").join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn tensors(file: &str) -> HashMap<String, Tensor> {
    load_safetensors(&fixtures().join("lora").join(file), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn model() -> StableDiffusion {
    StableDiffusion::load(&fixtures().join("pipeline"), &Device::Cpu).expect("fixture pipeline")
}

#[test]
fn kohya_and_diffusers_files_read_to_the_same_adapter() {
    for (name, scale, count) in [("lora_a", 2.0, 68), ("lora_b", 1.0, 48)] {
        let k = adapter(&format!("{name}_kohya.safetensors"));
        let d = adapter(&format!("{name}.safetensors"));
        assert_eq!((k.format, d.format), (LoraFormat::Kohya, LoraFormat::Diffusers));
        assert_eq!((k.modules.len(), d.modules.len()), (count, count), "{name}");
        assert_ne!(k.hash, d.hash, "hashes are of the files");
        let by_name: HashMap<(_, String), _> =
            k.modules.iter().map(|m| ((m.component, m.file_name().to_string()), m)).collect();
        for m in &d.modules {
            let km = by_name[&(m.component, m.file_name().replace('.', "_"))];
            // alpha / rank: kohya from the `.alpha` tensors, diffusers from lora_adapter_metadata.
            assert_eq!((m.scale, km.scale), (scale, scale), "{name} {}", m.file_name());
            assert_eq!(max_diff(&m.down, &km.down) + max_diff(&m.up, &km.up), 0.0);
        }
    }
}

#[test]
fn without_alpha_the_scale_is_one() {
    let a = LoraAdapter::from_tensors("bare", tensors("lora_b.safetensors"), BTreeMap::new()).unwrap();
    assert!(a.modules.iter().all(|m| m.scale == 1.0));
}

#[test]
fn locon_convolution_matches_the_merged_kernel() {
    let dir = fixtures().join("pipeline/unet");
    let cfg: UNetConfig = read_config(&dir.join("config.json")).unwrap();
    let mut base = load_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    // A rank-3 LoCon on the first 3×3 resnet convolution (32→32), alpha 1.5.
    let down = Tensor::randn(0f32, 0.2, (3, 32, 3, 3), &dev).unwrap();
    let up = Tensor::randn(0f32, 0.2, (32, 3, 1, 1), &dev).unwrap();
    let stem = "lora_unet_down_blocks_0_resnets_0_conv1";
    let file: HashMap<String, Tensor> = [
        (format!("{stem}.lora_down.weight"), down.clone()),
        (format!("{stem}.lora_up.weight"), up.clone()),
        (format!("{stem}.alpha"), Tensor::new(1.5f32, &dev).unwrap()),
    ]
    .into();
    let adapter = Arc::new(LoraAdapter::from_tensors("locon", file, BTreeMap::new()).unwrap());
    assert_eq!(adapter.modules[0].scale, 0.5);
    let sd = model();
    let active = [ActiveLora { lora: sd.bind_lora(&adapter).unwrap(), weight: -0.8, blocks: BlockWeights::default() }];

    let sample = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (1, 77, 32), &dev).unwrap();
    sd.set_loras(&active);
    let with_adapter = sd.unet().forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    sd.set_loras(&[]);
    let plain = sd.unet().forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    assert!(max_diff(&with_adapter, &plain) > 1e-3, "the adapter changes the output");

    // W' = W + w · s · (up ⊗ down), built by hand into a fresh UNet.
    let key = "down_blocks.0.resnets.0.conv1.weight";
    let delta = up.reshape((32, 3)).unwrap().matmul(&down.reshape((3, 32 * 9)).unwrap()).unwrap();
    let merged = (&base[key] + (delta.reshape((32, 32, 3, 3)).unwrap() * (-0.8 * 0.5)).unwrap()).unwrap();
    base.insert(key.into(), merged);
    let unet = UNet2DConditionModel::new(&cfg, VarBuilder::from_tensors(base, DType::F32, &dev)).unwrap();
    let expected = unet.forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    let d = max_diff(&with_adapter, &expected);
    assert!(d < 1e-4, "LoCon vs merged kernel: {d}");
}

#[test]
fn weights_scale_linearly_and_block_weights_select_blocks() {
    let sd = model();
    let a = Arc::new(adapter("lora_b_kohya.safetensors"));
    let bound = sd.bind_lora(&a).unwrap();
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (1, 77, 32), &dev).unwrap();
    let run = |weight: f64, blocks: BlockWeights| {
        sd.set_loras(&[ActiveLora { lora: bound.clone(), weight, blocks }]);
        let out = sd.unet().forward(&sample, 300.0, &context, AttentionKind::Original).unwrap();
        sd.set_loras(&[]);
        out
    };
    let zero = run(0.0, BlockWeights::default());
    let plain = sd.unet().forward(&sample, 300.0, &context, AttentionKind::Original).unwrap();
    assert_eq!(max_diff(&zero, &plain), 0.0, "weight 0 is the base model");
    let off = run(1.0, BlockWeights { down: 0.0, mid: 0.0, up: 0.0 });
    assert_eq!(max_diff(&off, &plain), 0.0, "all blocks at 0 is the base model");
    let down_only = run(1.0, BlockWeights { down: 1.0, mid: 0.0, up: 0.0 });
    let up_only = run(1.0, BlockWeights { down: 0.0, mid: 0.0, up: 1.0 });
    assert!(max_diff(&down_only, &plain) > 1e-3 && max_diff(&up_only, &plain) > 1e-3 && max_diff(&down_only, &up_only) > 1e-3);
    // Two copies of an adapter at 0.3 and 0.2 equal one at 0.5 (adapters add up, unmerged).
    sd.set_loras(&[
        ActiveLora { lora: bound.clone(), weight: 0.3, blocks: BlockWeights::default() },
        ActiveLora { lora: bound.clone(), weight: 0.2, blocks: BlockWeights::default() },
    ]);
    let sum = sd.unet().forward(&sample, 300.0, &context, AttentionKind::Original).unwrap();
    let half = run(0.5, BlockWeights::default());
    assert!(max_diff(&sum, &half) < 1e-5);
}

fn refused(tensors: HashMap<String, Tensor>) -> String {
    let sd = model();
    match LoraAdapter::from_tensors("bad", tensors, BTreeMap::new()) {
        Err(e) => e.to_string(),
        Ok(a) => sd.bind_lora(&Arc::new(a)).expect_err("a file that does not fit is refused").to_string(),
    }
}

#[test]
fn files_that_do_not_fit_are_refused_by_name() {
    let good = tensors("lora_b_kohya.safetensors");
    let q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";

    // SDXL: keys of its second text encoder.
    let mut sdxl = good.clone();
    sdxl.insert("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(), good[&format!("{q}.lora_down.weight")].clone());
    let msg = refused(sdxl);
    assert!(msg.contains("SDXL"), "{msg}");

    // A layer this model does not have.
    let mut extra = good.clone();
    for part in ["lora_down.weight", "lora_up.weight"] {
        extra.insert(format!("lora_unet_down_blocks_7_attentions_0_proj_in.{part}"), good[&format!("{q}.{part}")].clone());
    }
    let msg = refused(extra);
    assert!(msg.contains("do not exist") && msg.contains("down_blocks_7_attentions_0_proj_in"), "{msg}");

    // A rank-4 pair whose input width is wrong for the layer.
    let mut narrow = good.clone();
    narrow.insert(format!("{q}.lora_down.weight"), Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap());
    let msg = refused(narrow);
    assert!(msg.contains("do not fit") && msg.contains("attn1.to_q") && msg.contains("[4, 16]"), "{msg}");

    // Up and down that are not a pair.
    let mut unpaired = good.clone();
    unpaired.insert(format!("{q}.lora_up.weight"), Tensor::zeros((64, 3), DType::F32, &Device::Cpu).unwrap());
    let msg = refused(unpaired);
    assert!(msg.contains("not a rank-r pair"), "{msg}");

    // Keys that are no LoRA at all.
    let mut junk = good.clone();
    junk.insert("model.diffusion_model.input_blocks.0.0.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let msg = refused(junk);
    assert!(msg.contains("not LoRA weights") && msg.contains("input_blocks"), "{msg}");

    // LyCORIS LoHa.
    let mut loha = good;
    loha.insert(format!("{q}.hada_w1_a"), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
    assert!(refused(loha).contains("LoHa"));
}

#[test]
fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("lora/lora_a.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = LoraAdapter::load(&path).unwrap_err().to_string();
    assert!(msg.contains("not a readable safetensors file"), "{msg}");
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    // The fixture adapters target a 32-wide UNet; the starter model's attention is 64/32 wide
    // with a 64-wide text encoder.
    let starter = StableDiffusion::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter"), &Device::Cpu).unwrap();
    let msg = starter.bind_lora(&Arc::new(adapter("lora_a.safetensors"))).unwrap_err().to_string();
    assert!(msg.contains("lora_a") && (msg.contains("do not fit") || msg.contains("do not exist")), "{msg}");
}
