//! LyCORIS LoHa and LoKr adapters: the reference cases in tests/diffusers/lycoris were
//! computed by PEFT 0.21.2 (`LoHaConfig`, `LoKrConfig`, seeded random weights) on the
//! shipped starter model with diffusers 0.42.1, and the adapters written in LyCORIS/kohya
//! naming (tests/diffusers/make_lycoris_cases.py, which also checks that LyCORIS' formula
//! on the saved tensors gives PEFT's merged ΔW). Atelier, applying them unmerged, must
//! agree within 1e-4. Then: how the keys are read, how the scale follows LyCORIS' rules,
//! the unmerged LoKr forms against a merged weight, baking, and refusals that name what
//! is wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use atelier_engine::attention::AttentionKind;
use atelier_engine::layers::{collect_slots, conv2d, AdapterDelta, DeltaWeights, Linear};
use atelier_engine::lora::{ActiveLora, BlockWeights, Component, KronFactor, LoraAdapter, LoraFormat, ModuleWeights};
use atelier_engine::model::load_safetensors;
use atelier_engine::pipeline::StableDiffusion;
use atelier_engine::reference::{discover, max_abs_diff, ReferenceRunner};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cases_dir() -> PathBuf {
    root().join("tests/diffusers/lycoris")
}

fn starter() -> StableDiffusion {
    StableDiffusion::load(&root().join("models/starter"), &Device::Cpu).expect("starter model")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b).unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator, so failures reproduce.
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn loha_and_lokr_cases_match_peft() {
    let runner = ReferenceRunner::new(&root().join("models/starter"), &Device::Cpu, AttentionKind::Original).unwrap();
    let cases = discover(&cases_dir()).unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lora_text_encoder_loha-kohya",
            "lora_text_encoder_loha_w06-kohya",
            "lora_text_encoder_lokr-kohya",
            "lora_text_encoder_lokr_w07neg-kohya",
            "lora_unet_loha-kohya",
            "lora_unet_loha_w06-kohya",
            "lora_unet_lokr-kohya",
            "lora_unet_lokr_w07neg-kohya",
        ],
        "each case runs from its one kohya-named file"
    );
    for case in &cases {
        assert_eq!(case.lora_format, Some(LoraFormat::Kohya));
        let got = runner.run(case).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = load_safetensors(&case.tensors_path, &Device::Cpu).unwrap();
        for name in &case.expected {
            let g = got.get(name).unwrap_or_else(|| panic!("{}: the engine produced no {name}", case.name));
            let e = expected.get(name).unwrap_or_else(|| panic!("{}: the case file has no {name}", case.name));
            let d = max_diff(&g.to_dtype(DType::F64).unwrap(), &e.to_dtype(DType::F64).unwrap());
            eprintln!("{:<38} {:<18} max|diff| {d:.3e}", case.name, name);
            assert!(d <= 1e-4, "{} {name}: {d}", case.name);
        }
    }
}

#[test]
fn the_shipped_files_read_as_loha_and_lokr_modules() {
    let loha = LoraAdapter::load(&cases_dir().join("loha.safetensors")).unwrap();
    let lokr = LoraAdapter::load(&cases_dir().join("lokr.safetensors")).unwrap();
    assert_eq!((loha.format, lokr.format), (LoraFormat::Kohya, LoraFormat::Kohya));
    // 64 UNet modules (4 attention projections × 14 attentions + 8 resnet conv1) + 6 text encoder.
    for a in [&loha, &lokr] {
        assert_eq!(a.modules.len(), 70, "{}", a.name);
        assert_eq!(a.modules.iter().filter(|m| m.component == Component::TextEncoder).count(), 6);
    }
    assert!(loha.modules.iter().all(|m| matches!(m.weights, ModuleWeights::Hadamard { .. }) && m.weights.kind() == "LoHa"));
    // LoHa: scale = alpha / r with r = hada_w1_b's rows (UNet r 4 alpha 6, conv1 r 8 alpha 4, text encoder r 4 alpha 2).
    for m in &loha.modules {
        let want = match (m.component, m.file_name().ends_with("conv1")) {
            (Component::TextEncoder, _) => (4, 0.5),
            (_, true) => (8, 0.5),
            _ => (4, 1.5),
        };
        assert_eq!((m.rank(), m.scale), want, "{}", m.file_name());
    }
    // LoKr: alpha / r where a factor is low-rank, 1 where both are full (to_v at rank 8).
    for m in &lokr.modules {
        let ModuleWeights::Kronecker { w1, w2 } = &m.weights else { panic!("{} is not LoKr", m.file_name()) };
        let both_full = matches!((w1, w2), (KronFactor::Full(_), KronFactor::Full(_)));
        assert_eq!(both_full, m.file_name().ends_with("to_v"), "{}", m.file_name());
        let want = match (m.component, both_full) {
            (_, true) => (0, 1.0),
            (Component::TextEncoder, _) => (2, 2.5),
            _ => (2, 1.5),
        };
        assert_eq!((m.rank(), m.scale), want, "{}", m.file_name());
    }
}

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

fn t(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed)
}

fn loha(stem: &str, out: usize, r: usize, n: usize, alpha: Option<f32>) -> HashMap<String, Tensor> {
    let mut f: HashMap<String, Tensor> = [
        (format!("{stem}.hada_w1_a"), t(&[out, r], 1)),
        (format!("{stem}.hada_w1_b"), t(&[r, n], 2)),
        (format!("{stem}.hada_w2_a"), t(&[out, r], 3)),
        (format!("{stem}.hada_w2_b"), t(&[r, n], 4)),
    ]
    .into();
    if let Some(a) = alpha {
        f.insert(format!("{stem}.alpha"), Tensor::new(a, &Device::Cpu).unwrap());
    }
    f
}

fn read(f: HashMap<String, Tensor>) -> atelier_engine::Result<LoraAdapter> {
    LoraAdapter::from_tensors("lyco", f, BTreeMap::new())
}

/// The error of reading `f` or, if it reads, of binding it to the starter model.
fn refused(f: HashMap<String, Tensor>) -> String {
    match read(f) {
        Err(e) => e.to_string(),
        Ok(a) => starter().bind_lora(&Arc::new(a)).expect_err("refused").to_string(),
    }
}

#[test]
fn loha_keys_and_alpha_follow_lycoris() {
    // kohya prefixes as for plain LoRA: lora_unet_, lora_te_, lora_te1_.
    let te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
    let mut f = loha(Q, 32, 4, 32, Some(2.0));
    f.extend(loha(te, 64, 4, 64, None));
    let a = read(f).unwrap();
    assert_eq!(a.format, LoraFormat::Kohya);
    let by: HashMap<_, _> = a.modules.iter().map(|m| (m.component, m)).collect();
    assert_eq!((by[&Component::Unet].file_name(), by[&Component::Unet].scale), (&Q["lora_unet_".len()..], 0.5));
    assert_eq!(by[&Component::TextEncoder].scale, 1.0, "a missing alpha means alpha = rank");
    assert_eq!(read(loha(Q, 32, 4, 32, Some(0.0))).unwrap().modules[0].scale, 1.0, "alpha 0 means alpha = rank");
    assert_eq!(read(loha(Q, 32, 4, 32, Some(-8.0))).unwrap().warnings.len(), 1, "a negative alpha warns");
    starter().bind_lora(&Arc::new(read(loha(te, 64, 4, 64, None)).unwrap())).expect("fits the starter text encoder");
}

#[test]
fn lokr_scale_is_alpha_over_the_factored_rank_and_one_without_a_factor() {
    let dev = Device::Cpu;
    let alpha = |f: &mut HashMap<String, Tensor>, a: f32| {
        f.insert(format!("{Q}.alpha"), Tensor::new(a, &dev).unwrap());
    };
    // to_q is 32→32: w1 [4, 4] ⊗ w2 [8, 8].
    let mut full: HashMap<String, Tensor> = [(format!("{Q}.lokr_w1"), t(&[4, 4], 1)), (format!("{Q}.lokr_w2"), t(&[8, 8], 2))].into();
    alpha(&mut full, 8.0);
    let m = &read(full).unwrap().modules[0];
    assert_eq!((m.rank(), m.scale), (0, 1.0), "two full matrices: scale 1 whatever alpha says");

    let mut w2_factored: HashMap<String, Tensor> =
        [(format!("{Q}.lokr_w1"), t(&[4, 4], 1)), (format!("{Q}.lokr_w2_a"), t(&[8, 2], 2)), (format!("{Q}.lokr_w2_b"), t(&[2, 8], 3))].into();
    alpha(&mut w2_factored, 3.0);
    let m = &read(w2_factored.clone()).unwrap().modules[0];
    assert_eq!((m.rank(), m.scale), (2, 1.5));
    w2_factored.remove(&format!("{Q}.alpha"));
    assert_eq!(read(w2_factored).unwrap().modules[0].scale, 1.0, "no alpha: alpha = rank");

    // Both factored, ranks 2 and 3: LyCORIS takes the rank of w1 (lokr_w1_a's columns).
    let mut both: HashMap<String, Tensor> = [
        (format!("{Q}.lokr_w1_a"), t(&[4, 2], 1)),
        (format!("{Q}.lokr_w1_b"), t(&[2, 4], 2)),
        (format!("{Q}.lokr_w2_a"), t(&[8, 3], 3)),
        (format!("{Q}.lokr_w2_b"), t(&[3, 8], 4)),
    ]
    .into();
    alpha(&mut both, 3.0);
    let a = Arc::new(read(both).unwrap());
    assert_eq!((a.modules[0].rank(), a.modules[0].scale), (2, 1.5));
    starter().bind_lora(&a).expect("fits to_q");
}

#[test]
fn unmerged_lokr_and_loha_forms_equal_a_merged_weight() {
    let dev = Device::Cpu;
    // Linear 12 → 6 with w1 [2, 3] ⊗ w2 [3, 4].
    let weights: HashMap<String, Tensor> = [("l.weight".to_string(), t(&[6, 12], 5)), ("l.bias".to_string(), t(&[6], 6))].into();
    let (linear, _) = collect_slots(|| Linear::new(12, 6, VarBuilder::from_tensors(weights.clone(), DType::F32, &dev).pp("l")).unwrap());
    let x = t(&[2, 5, 12], 7);
    let kron = DeltaWeights::Kron { w1: t(&[2, 3], 8), w2: t(&[3, 4], 9) };
    let dense = kron.matrix().unwrap();
    let merged_w = (&weights["l.weight"] + (&dense * 0.7).unwrap()).unwrap();
    let merged = candle_nn::Linear::new(merged_w, Some(weights["l.bias"].clone())).forward(&x).unwrap();
    for form in [kron.clone(), DeltaWeights::Dense { delta: dense.clone() }] {
        linear.lora().set_deltas(vec![AdapterDelta { weights: form.clone(), scale: 0.7 }]);
        let y = linear.forward(&x).unwrap();
        assert!(max_diff(&y, &merged) < 1e-5, "{form:?}: {}", max_diff(&y, &merged));
    }
    // A hand-picked entry of w1 ⊗ w2: ΔW[i·b+p, j·d+q] = w1[i, j] · w2[p, q].
    let DeltaWeights::Kron { w1, w2 } = &kron else { unreachable!() };
    let at = |t: &Tensor, i: usize, j: usize| t.get(i).unwrap().get(j).unwrap().to_scalar::<f32>().unwrap();
    assert!((at(&dense, 3 + 2, 2 * 4 + 1) - at(w1, 1, 2) * at(w2, 2, 1)).abs() < 1e-7);

    // 3×3 convolution 6 → 4, stride 2, padding 1, with w1 [2, 3] ⊗ w2 [2, 2, 3, 3].
    let cw: HashMap<String, Tensor> = [("c.weight".to_string(), t(&[4, 6, 3, 3], 10)), ("c.bias".to_string(), t(&[4], 11))].into();
    let (conv, _) = collect_slots(|| conv2d(6, 4, 3, 2, 1, VarBuilder::from_tensors(cw.clone(), DType::F32, &dev).pp("c")).unwrap());
    let x = t(&[2, 6, 9, 7], 12);
    let kron = DeltaWeights::Kron { w1: t(&[2, 3], 13), w2: t(&[2, 2, 3, 3], 14) };
    let dense = kron.matrix().unwrap().reshape((4, 6, 3, 3)).unwrap();
    let merged_w = (&cw["c.weight"] + (&dense * -0.4).unwrap()).unwrap();
    let merged = x.conv2d(&merged_w, 1, 2, 1, 1).unwrap().broadcast_add(&cw["c.bias"].reshape((1, 4, 1, 1)).unwrap()).unwrap();
    for form in [kron, DeltaWeights::Dense { delta: dense }] {
        conv.lora().set_deltas(vec![AdapterDelta { weights: form.clone(), scale: -0.4 }]);
        let y = conv.forward(&x).unwrap();
        assert!(max_diff(&y, &merged) < 1e-5, "{form:?}: {}", max_diff(&y, &merged));
    }
}

#[test]
fn an_exact_bake_of_loha_and_lokr_reproduces_them() {
    let sd = starter();
    let sample = t(&[1, 4, 8, 8], 20);
    let context = t(&[1, 77, 64], 21);
    let active: Vec<ActiveLora> = [("loha", 0.6), ("lokr", -0.5)]
        .iter()
        .map(|(n, w)| ActiveLora {
            lora: sd.bind_lora(&Arc::new(LoraAdapter::load(&cases_dir().join(format!("{n}.safetensors"))).unwrap())).unwrap(),
            weight: *w,
            blocks: BlockWeights::default(),
        })
        .collect();
    sd.set_loras(&active);
    let live = sd.unet().forward(&sample, 400.0, &context, AttentionKind::Original).unwrap();
    let baked = atelier_engine::bake::bake_exact(&active, sd.lora_slots()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baked.safetensors");
    atelier_engine::bake::save_kohya(&baked, &HashMap::new(), &path).unwrap();
    let plain = sd.bind_lora(&Arc::new(LoraAdapter::load(&path).unwrap())).unwrap();
    sd.set_loras(&[ActiveLora { lora: plain, weight: 1.0, blocks: BlockWeights::default() }]);
    let from_bake = sd.unet().forward(&sample, 400.0, &context, AttentionKind::Original).unwrap();
    sd.set_loras(&[]);
    let base = sd.unet().forward(&sample, 400.0, &context, AttentionKind::Original).unwrap();
    assert!(max_diff(&live, &base) > 1e-2, "the adapters change the output");
    let d = max_diff(&from_bake, &live);
    assert!(d < 1e-4, "exact bake vs live LoHa+LoKr: {d}");
}

#[test]
fn malformed_lycoris_modules_are_refused_naming_module_and_shapes() {
    // Products of different shapes.
    let mut f = loha(Q, 32, 4, 32, Some(4.0));
    f.insert(format!("{Q}.hada_w2_b"), t(&[4, 16], 9));
    let msg = refused(f);
    assert!(
        msg.contains(&format!("unet.{}", &Q["lora_unet_".len()..])) && msg.contains("[32, 32]") && msg.contains("[32, 16]") && msg.contains("one shape"),
        "{msg}"
    );
    // Factors that do not multiply.
    let mut f = loha(Q, 32, 4, 32, None);
    f.insert(format!("{Q}.hada_w1_b"), t(&[3, 32], 9));
    let msg = refused(f);
    assert!(msg.contains("hada_w1_a [32, 4] and hada_w1_b [3, 32] do not multiply") && msg.contains("attn1_to_q"), "{msg}");
    // A missing factor.
    let mut f = loha(Q, 32, 4, 32, None);
    f.remove(&format!("{Q}.hada_w2_b"));
    let msg = refused(f);
    assert!(msg.contains("attn1_to_q") && msg.contains("hada_w2_b missing"), "{msg}");
    // A LoHa for a wider layer: refused when bound, naming the layer and ΔW's shape.
    let msg = refused(loha(Q, 32, 4, 64, None));
    assert!(msg.contains("do not fit") && msg.contains("attn1.to_q") && msg.contains("linear 32→32") && msg.contains("LoHa ΔW is [32, 64]"), "{msg}");
    // A LoKr whose product is the wrong size.
    let lokr: HashMap<String, Tensor> = [(format!("{Q}.lokr_w1"), t(&[4, 4], 1)), (format!("{Q}.lokr_w2"), t(&[8, 4], 2))].into();
    let msg = refused(lokr);
    assert!(msg.contains("do not fit") && msg.contains("LoKr has w1 [4, 4] ⊗ w2 [8, 4]"), "{msg}");
    // lokr_w1 given twice over.
    let twice: HashMap<String, Tensor> = [
        (format!("{Q}.lokr_w1"), t(&[4, 4], 1)),
        (format!("{Q}.lokr_w1_a"), t(&[4, 2], 1)),
        (format!("{Q}.lokr_w1_b"), t(&[2, 4], 1)),
        (format!("{Q}.lokr_w2"), t(&[8, 8], 2)),
    ]
    .into();
    assert!(refused(twice).contains("both lokr_w1 and lokr_w1_a/lokr_w1_b"));
    // LoRA and LoHa keys on one module.
    let mut mixed = loha(Q, 32, 4, 32, None);
    mixed.insert(format!("{Q}.lora_down.weight"), t(&[4, 32], 1));
    let msg = refused(mixed);
    assert!(msg.contains("mixes") && msg.contains("LoRA") && msg.contains("LoHa"), "{msg}");
}

#[test]
fn cp_decomposed_kernels_and_peft_naming_are_refused_clearly() {
    let conv = "lora_unet_down_blocks_0_resnets_0_conv1";
    for (key, what) in [(format!("{conv}.hada_t1"), "LoHa with CP-decomposed"), (format!("{conv}.lokr_t2"), "LoKr with a CP-decomposed")] {
        let mut f = loha(conv, 32, 4, 288, None);
        f.insert(key.clone(), t(&[4, 4, 3, 3], 1));
        let msg = refused(f);
        assert!(msg.contains(what) && msg.contains(&key) && msg.contains("not supported"), "{msg}");
    }
    let peft: HashMap<String, Tensor> = [
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a".to_string(), t(&[32, 4], 1)),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_b".to_string(), t(&[4, 32], 1)),
    ]
    .into();
    let msg = refused(peft);
    assert!(msg.contains("LoHa file in diffusers/PEFT naming") && msg.contains("kohya"), "{msg}");
}
