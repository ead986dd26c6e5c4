//! LoRA files: the two layouts read to the same adapter, LoCon convolutions match a
//! merged kernel, and files that do not fit the model are refused with a message that
//! names what is wrong. (The fixture's diffusers-computed LoRA cases are in
//! `reference.rs`.)

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use atelier_engine::attention::AttentionKind;
use atelier_engine::lora::{ActiveLora, BlockWeights, Component, LoraAdapter, LoraFormat};
use atelier_engine::model::{load_safetensors, read_config};
use atelier_engine::pipeline::{GenerateParams, StableDiffusion};
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
            assert_eq!(max_diff(m.down().unwrap(), km.down().unwrap()) + max_diff(m.up().unwrap(), km.up().unwrap()), 0.0);
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
    for part in ["lora_down.weight", "lora_up.weight"] {
        sdxl.insert(format!("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.{part}"), good[&format!("{q}.{part}")].clone());
    }
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

    // LyCORIS LoHa keys on a LoRA module.
    let mut loha = good;
    loha.insert(format!("{q}.hada_w1_a"), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
    let msg = refused(loha);
    assert!(msg.contains("LoHa") && msg.contains("mixes") && msg.contains(&format!("{q}.hada_w1_a")), "{msg}");
}

/// Loads `bytes` written to a temporary file.
fn load_bytes(bytes: &[u8]) -> atelier_engine::Result<LoraAdapter> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file.safetensors");
    std::fs::write(&path, bytes).unwrap();
    LoraAdapter::load(&path)
}

#[test]
fn container_damage_is_told_apart() {
    // lora_a_kohya: 140 936 bytes; an 8-byte length, a 28 016-byte header, tensors from 28 024.
    let bytes = std::fs::read(fixtures().join("lora/lora_a_kohya.safetensors")).unwrap();
    assert_eq!(bytes.len(), 140_936);

    // Bytes after the last tensor: the tensors are intact, so the file loads, with a warning.
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0u8; 7]);
    let a = load_bytes(&padded).unwrap();
    assert_eq!(a.modules.len(), 68);
    assert_eq!(
        a.warnings,
        vec!["LoRA file: 7 bytes after the last tensor (file is 140943 bytes, tensors end at 140936): loaded, the extra bytes are ignored".to_string()]
    );
    let plain = adapter("lora_a_kohya.safetensors");
    assert!(plain.warnings.is_empty());
    for (m, p) in a.modules.iter().zip(&plain.modules) {
        assert_eq!((m.file_name(), m.scale, max_diff(m.down().unwrap(), p.down().unwrap())), (p.file_name(), p.scale, 0.0));
    }

    // Cut inside the tensors: the first tensor that runs past the end is named.
    let msg = load_bytes(&bytes[..70_468]).unwrap_err().to_string();
    assert!(
        msg.contains(
            "tensor lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_v.lora_down.weight needs bytes 70136..71160 \
             but the file ends at 70468: truncated — download it again"
        ),
        "{msg}"
    );
    // Cut inside the header.
    let msg = load_bytes(&bytes[..1000]).unwrap_err().to_string();
    assert!(msg.contains("its header needs bytes 8..28024 but the file ends at 1000: truncated"), "{msg}");
    // Shorter than the length field.
    let msg = load_bytes(&bytes[..5]).unwrap_err().to_string();
    assert!(msg.contains("the file is 5 bytes, too short for a safetensors header"), "{msg}");
    // A damaged header (its opening brace overwritten).
    let mut damaged = bytes.clone();
    damaged[8] = b'#';
    let msg = load_bytes(&damaged).unwrap_err().to_string();
    assert!(msg.contains("its header is damaged (bytes 8..28024 are not valid JSON"), "{msg}");
    // Not a safetensors file at all (a zip, as .ckpt files are).
    let msg = load_bytes(b"PK\x03\x04 some zip archive of a pickle").unwrap_err().to_string();
    assert!(msg.contains("not a safetensors file"), "{msg}");
}

/// lora_a_kohya with its keys renamed by `rename` and its alphas set by `alpha`
/// (`None`: alphas removed).
fn variant(rename: impl Fn(&str) -> String, alpha: Option<f32>) -> HashMap<String, Tensor> {
    tensors("lora_a_kohya.safetensors")
        .into_iter()
        .filter_map(|(k, t)| match (k.ends_with(".alpha"), alpha) {
            (true, None) => None,
            (true, Some(a)) => Some((rename(&k), Tensor::new(a, &Device::Cpu).unwrap())),
            (false, _) => Some((rename(&k), t)),
        })
        .collect()
}

#[test]
fn te1_keys_are_the_text_encoder_and_sdxl_files_are_refused_as_sdxl() {
    let sd = model();
    let te1 = LoraAdapter::from_tensors("te1", variant(|k| k.replace("lora_te_", "lora_te1_"), Some(8.0)), BTreeMap::new()).unwrap();
    let te = adapter("lora_a_kohya.safetensors");
    assert_eq!((te1.format, te1.modules.len()), (LoraFormat::Kohya, 68));
    assert_eq!(te1.modules.iter().filter(|m| m.component == Component::TextEncoder).count(), 20);
    for (a, b) in te1.modules.iter().zip(&te.modules) {
        assert_eq!((a.component, a.file_name(), a.scale), (b.component, b.file_name(), b.scale));
    }
    sd.bind_lora(&Arc::new(te1)).expect("a te1 file fits an SD 1.x model");

    let sdxl = "this is an SDXL LoRA";
    let target = "the loaded model is SD 1.x/2.x — use a LoRA made for SD 1.x/2.x";
    // With a second text encoder (kohya and diffusers names).
    let mut te2 = variant(|k| k.replace("lora_te_", "lora_te1_"), Some(8.0));
    let q = te2["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].clone();
    let q_up = te2["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].clone();
    te2.insert("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(), q.clone());
    te2.insert("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".into(), q_up.clone());
    let msg = refused(te2);
    assert!(msg.contains(sdxl) && msg.contains("second text encoder") && msg.contains("lora_te2_text_model") && msg.contains(target), "{msg}");
    let mut d = tensors("lora_a.safetensors");
    d.insert("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight".into(), q.clone());
    d.insert("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight".into(), q_up.clone());
    let msg = refused(d);
    assert!(msg.contains(sdxl) && msg.contains("text_encoder_2.text_model"), "{msg}");
    // SDXL-only UNet parts: deeper transformer stacks, the added embeddings.
    for stem in [
        "lora_unet_down_blocks_2_attentions_0_transformer_blocks_5_attn1_to_q",
        "lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k",
        "lora_unet_add_embedding_linear_1",
    ] {
        let mut f = tensors("lora_a_kohya.safetensors");
        f.insert(format!("{stem}.lora_down.weight"), q.clone());
        f.insert(format!("{stem}.lora_up.weight"), q_up.clone());
        let msg = refused(f);
        assert!(msg.contains(sdxl) && msg.contains(stem), "{msg}");
    }
    // Cross-attention reading SDXL's 2048-wide text features (found when binding).
    let mut wide = tensors("lora_a_kohya.safetensors");
    let k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight";
    wide.insert(k.into(), Tensor::zeros((4, 2048), DType::F32, &Device::Cpu).unwrap());
    let msg = refused(wide);
    assert!(msg.contains(sdxl) && msg.contains("2048-wide") && msg.contains(target), "{msg}");
}

#[test]
fn diffusers_key_spellings_read_to_the_same_adapter() {
    let d = adapter("lora_a.safetensors");
    let meta = d.metadata.clone();
    let base: HashMap<String, Tensor> = tensors("lora_a.safetensors");
    type Rename = Box<dyn Fn(&str) -> String>;
    let spellings: [(&str, Rename); 2] = [
        ("peft wrapper", Box::new(|k: &str| format!("base_model.model.{k}"))),
        (
            "attn procs",
            Box::new(|k: &str| {
                k.replace(".to_q.lora_A.weight", ".processor.to_q_lora.down.weight")
                    .replace(".to_out.0.lora_B.weight", ".processor.to_out_lora.up.weight")
                    .replace(".k_proj.lora_A.weight", ".k_proj.lora_linear_layer.down.weight")
            }),
        ),
    ];
    for (what, f) in spellings {
        let renamed = base.iter().map(|(k, t)| (f(k), t.clone())).collect();
        let a = LoraAdapter::from_tensors("x", renamed, meta.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.modules.len(), d.modules.len(), "{what}");
        for (m, n) in a.modules.iter().zip(&d.modules) {
            assert_eq!((m.file_name(), m.scale, max_diff(m.up().unwrap(), n.up().unwrap())), (n.file_name(), n.scale, 0.0), "{what}");
        }
    }
    // A UNet-only file without the `unet.` prefix (PEFT get_peft_model_state_dict).
    let unet_only: HashMap<String, Tensor> =
        tensors("lora_b.safetensors").into_iter().map(|(k, t)| (k.trim_start_matches("unet.").to_string(), t)).collect();
    let a = LoraAdapter::from_tensors("x", unet_only, BTreeMap::new()).unwrap();
    assert_eq!(a.modules.len(), 48);
    assert!(a.modules.iter().all(|m| m.component == Component::Unet));
}

/// One 16×16 image from the fixture pipeline with `lora` at weight 1 (or none).
fn render(sd: &StableDiffusion, lora: Option<LoraAdapter>) -> (Vec<u8>, Vec<String>) {
    let loras = lora
        .map(|a| vec![ActiveLora { lora: sd.bind_lora(&Arc::new(a)).unwrap(), weight: 1.0, blocks: BlockWeights::default() }])
        .unwrap_or_default();
    let params = GenerateParams {
        prompt: "a red circle".into(),
        steps: 3,
        width: 16,
        height: 16,
        seed: 7,
        loras,
        ..Default::default()
    };
    let out = sd.generate(&params, &mut |_| true).unwrap();
    (out.images[0].as_raw().clone(), out.warnings)
}

#[test]
fn alpha_zero_or_missing_means_alpha_equals_rank() {
    let sd = model();
    let same = |k: &str| k.to_string();
    let zero = LoraAdapter::from_tensors("zero", variant(same, Some(0.0)), BTreeMap::new()).unwrap();
    let rank = LoraAdapter::from_tensors("rank", variant(same, Some(4.0)), BTreeMap::new()).unwrap();
    let none = LoraAdapter::from_tensors("none", variant(same, None), BTreeMap::new()).unwrap();
    for a in [&zero, &rank, &none] {
        assert!(a.modules.iter().all(|m| m.rank() == 4 && m.scale == 1.0), "{}", a.name);
    }
    let (base, _) = render(&sd, None);
    let (with_zero, _) = render(&sd, Some(zero));
    let (with_rank, _) = render(&sd, Some(rank));
    let (with_none, _) = render(&sd, Some(none));
    assert_ne!(with_zero, base, "an alpha-0 adapter changes the picture");
    assert_eq!(with_zero, with_rank);
    assert_eq!(with_none, with_rank);
}

#[test]
fn negative_alpha_loads_inverted_with_a_warning() {
    let a = LoraAdapter::from_tensors("neg", variant(|k| k.to_string(), Some(-2.0)), BTreeMap::new()).unwrap();
    assert!(a.modules.iter().all(|m| m.scale == -0.5));
    assert_eq!(a.warnings.len(), 1);
    assert!(a.warnings[0].starts_with("LoRA neg: 68 module(s) have a negative alpha (e.g. lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.alpha)"), "{:?}", a.warnings);
    // Adapter warnings reach the generation's warnings.
    let (_, warnings) = render(&model(), Some(a));
    assert!(warnings.iter().any(|w| w.contains("negative alpha")), "{warnings:?}");
}

#[test]
fn non_finite_alphas_and_weights_are_refused_by_key() {
    let good = tensors("lora_a_kohya.safetensors");
    let k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q";
    for (suffix, value, shown) in [(".alpha", f32::NAN, "is NaN"), (".alpha", f32::INFINITY, "is inf")] {
        let mut f = good.clone();
        f.insert(format!("{k}{suffix}"), Tensor::new(value, &Device::Cpu).unwrap());
        let msg = refused(f);
        assert!(msg.contains(&format!("alpha {k}.alpha {shown} (not a finite number)")), "{msg}");
    }
    for (suffix, value) in [(".lora_down.weight", f32::NAN), (".lora_up.weight", f32::NEG_INFINITY)] {
        let mut f = good.clone();
        let key = format!("{k}{suffix}");
        let t = f[&key].flatten_all().unwrap();
        let mut v = t.to_vec1::<f32>().unwrap();
        v[5] = value;
        f.insert(key.clone(), Tensor::from_vec(v, good[&key].dims(), &Device::Cpu).unwrap());
        let msg = refused(f);
        assert!(msg.contains(&format!("tensor {key} holds {value} (a non-finite weight)")), "{msg}");
    }
}

#[test]
fn unsupported_formats_are_named() {
    let good = tensors("lora_a_kohya.safetensors");
    let q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q";
    let v = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    for (key, name) in [
        (format!("{q}.dora_scale"), "DoRA"),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector".to_string(), "DoRA"),
        (format!("{q}.on_input"), "(IA)³"),
        // LoHa/LoKr are read (tests/lycoris.rs), except with CP-decomposed conv kernels.
        (format!("{q}.hada_t1"), "LoHa with CP-decomposed"),
        (format!("{q}.lokr_t2"), "LoKr with a CP-decomposed"),
        (format!("{q}.oft_blocks"), "OFT"),
        (format!("{q}.a1.weight"), "GLoRA"),
        (format!("{q}.lora_mid.weight"), "lora_mid"),
    ] {
        let mut f = good.clone();
        f.insert(key.clone(), v.clone());
        let msg = refused(f);
        assert!(msg.contains(name) && msg.contains(&key) && msg.contains("not supported") && msg.contains("plain LoRA"), "{msg}");
    }
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    // The fixture adapters target a 32-wide UNet; the starter model's attention is 64/32 wide
    // with a 64-wide text encoder.
    let starter = StableDiffusion::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter"), &Device::Cpu).unwrap();
    let msg = starter.bind_lora(&Arc::new(adapter("lora_a.safetensors"))).unwrap_err().to_string();
    assert!(msg.contains("lora_a") && (msg.contains("do not fit") || msg.contains("do not exist")), "{msg}");
}

/// The reverse of the SDXL refusal: an SD 1.x LoRA on an SDXL model names both sides.
#[test]
fn an_sd1_lora_on_an_sdxl_model_is_refused_naming_both() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/sdxl-tiny/pipeline");
    let xl = StableDiffusion::load(&dir, &Device::Cpu).expect("sdxl-tiny");
    let msg = xl.bind_lora(&Arc::new(adapter("lora_a_kohya.safetensors"))).expect_err("refused").to_string();
    assert!(msg.contains("one-text-encoder") && msg.contains("32-wide") && msg.contains("SDXL, which reads 40"), "{msg}");
    // The SDXL LoRA of the same fixture binds (and its reference cases match, tests/reference.rs).
    let xl_lora = LoraAdapter::load(&dir.join("../lora/lora_xl_a_kohya.safetensors")).unwrap();
    xl.bind_lora(&Arc::new(xl_lora.clone())).expect("an SDXL LoRA fits");
    let msg = model().bind_lora(&Arc::new(xl_lora)).expect_err("refused on SD 1.x").to_string();
    assert!(msg.contains("this is an SDXL LoRA") && msg.contains("the loaded model is SD 1.x/2.x"), "{msg}");
}
