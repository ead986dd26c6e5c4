//! The UNet exported as Core ML packages: structure and types checked by coremltools' MIL
//! loader, numbers by the project's numpy evaluator against the engine's own UNet on the
//! same inputs (starter model), chunking, refusals, and an SD-1.5-size UNet exported
//! chunked and palettized within bounded memory.

mod coreml_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use atelier_engine::attention::AttentionKind;
use atelier_engine::coreml::compress::Compression;
use atelier_engine::coreml::mil::{Dt, Target};
use atelier_engine::coreml::unet::{self, UnetExport, UnetPart};
use atelier_engine::coreml::{Attention, Weights};
use atelier_engine::unet::{UNet2DConditionModel, UNetConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use coreml_support::{max_abs_diff, python, run, validate};

fn starter_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/starter/unet")
}

fn starter_config() -> UNetConfig {
    serde_json::from_str(&std::fs::read_to_string(starter_dir().join("config.json")).unwrap()).unwrap()
}

/// The starter UNet as the engine runs it, and its weights for the exporter.
fn starter() -> (UNetConfig, Weights, UNet2DConditionModel) {
    let cfg = starter_config();
    let path = starter_dir().join("diffusion_pytorch_model.safetensors");
    let map = atelier_engine::model::load_safetensors(&path, &Device::Cpu).unwrap();
    let model = UNet2DConditionModel::new(&cfg, VarBuilder::from_tensors(map.clone(), DType::F32, &Device::Cpu)).unwrap();
    (cfg, Weights::from_map(map, path), model)
}

fn export(dir: &Path, cfg: &UNetConfig, w: &Weights, opts: &UnetExport, part: UnetPart, precision: Dt, compression: Option<Compression>) -> (PathBuf, u64) {
    let pkg = dir.join(format!("{}.mlpackage", part.package_name()));
    let (size, _) = unet::write_package(&pkg, cfg, w, opts, part, precision, compression, Target::Ios16).unwrap();
    (pkg, size)
}

/// Random inputs: `sample` (2, 4, 8, 8), `timestep` (2,) = 500, and the context as the
/// engine takes it (2, 77, 64) and as Apple's UNet takes it (2, 64, 1, 77).
fn inputs(cfg: &UNetConfig, h: usize, w: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1., (2, cfg.in_channels, h, w), &dev).unwrap();
    let timestep = Tensor::new(&[500f32, 500.], &dev).unwrap();
    let context = Tensor::randn(0f32, 1., (2, 77, cfg.cross_attention_dim), &dev).unwrap();
    let ehs = context.transpose(1, 2).unwrap().unsqueeze(2).unwrap().contiguous().unwrap();
    (sample, timestep, context, ehs)
}

#[test]
fn tensor_list_and_chunk_split_follow_the_checkpoint() {
    let (cfg, _, _) = starter();
    let path = starter_dir().join("diffusion_pytorch_model.safetensors");
    let map = atelier_engine::model::load_safetensors(&path, &Device::Cpu).unwrap();
    let listed: HashMap<String, Vec<usize>> = unet::tensor_shapes(&cfg).into_iter().collect();
    let stored: HashMap<String, Vec<usize>> = map.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    assert_eq!(listed, stored, "the exporter reads exactly the starter checkpoint's tensors");

    // SD 1.5: the cut falls where the parameters halve.
    let sd = UNetConfig::v1_5();
    let split = unet::chunk_split(&sd).unwrap();
    let total = split.chunk1_params + split.chunk2_params;
    assert_eq!(total, unet::tensor_shapes(&sd).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum::<u64>());
    assert!((859_000_000..860_000_000).contains(&total), "SD 1.5 UNet has 859.5M parameters, got {total}");
    let share = split.chunk1_params as f64 / total as f64;
    eprintln!("SD 1.5 cut after {:?}: chunk 1 {} params ({:.1} %), chunk 2 {}", split.stage, split.chunk1_params, share * 100.0, split.chunk2_params);
    assert!((0.45..0.55).contains(&share), "chunk 1 holds {share:.3} of the parameters");
    // Apple's --chunk-unet keeps each chunk's fp16 weights under 1 GB.
    assert!(split.chunk1_params * 2 < 1_000_000_000 && split.chunk2_params * 2 < 1_000_000_000, "{split:?}");
    let opts = UnetExport { batch: 2, height: 64, width: 64, attention: Attention::SplitEinsum };
    let names: Vec<String> = unet::chunk_interface(&sd, &opts).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.first().map(String::as_str), Some("hidden_states"));
    assert_eq!(names.last().map(String::as_str), Some("time_embedding"));
}

#[test]
fn refuses_what_it_cannot_express_before_writing() {
    let (cfg, w, _) = starter();
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("Unet.mlpackage");
    let opts = UnetExport { batch: 2, height: 8, width: 8, attention: Attention::Original };
    let empty = |d: &Path| std::fs::read_dir(d).unwrap().next().is_none();

    let mut sdxl = cfg.clone();
    sdxl.addition_embed_type = Some("text_time".into());
    let e = unet::write_package(&pkg, &sdxl, &w, &opts, UnetPart::Whole, Dt::F32, None, Target::Ios16).unwrap_err().to_string();
    assert!(e.contains("addition"), "{e}");
    assert!(empty(dir.path()));

    let e = unet::write_package(&pkg, &cfg, &w, &UnetExport { height: 5, ..opts }, UnetPart::Whole, Dt::F32, None, Target::Ios16).unwrap_err().to_string();
    assert!(e.contains("multiple of 16 pixels"), "{e}");
    assert!(empty(dir.path()));

    let mut map = HashMap::new();
    for (k, s) in unet::tensor_shapes(&cfg) {
        if k != "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" {
            map.insert(k.clone(), w.get(&k, Some(&s)).unwrap().clone());
        }
    }
    let partial = Weights::from_map(map, "partial.safetensors");
    let e = unet::write_package(&pkg, &cfg, &partial, &opts, UnetPart::Chunk2, Dt::F32, None, Target::Ios16).unwrap_err().to_string();
    assert!(e.contains("attn2.to_k.weight"), "{e}");
    assert!(empty(dir.path()));
}

#[test]
fn starter_unet_runs_to_the_engines_numbers() {
    let Some(py) = python() else { return };
    let (cfg, w, model) = starter();
    let (sample, timestep, context, ehs) = inputs(&cfg, 8, 8);
    let want = model.forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("engine noise_pred max |x| = {scale}");
    let all = [("sample", &sample), ("timestep", &timestep), ("encoder_hidden_states", &ehs)];
    let dir = tempfile::tempdir().unwrap();

    let mut whole = HashMap::new();
    for attention in [Attention::Original, Attention::SplitEinsum] {
        let opts = UnetExport { batch: 2, height: 8, width: 8, attention };
        let sub = dir.path().join(attention.id());
        let t0 = Instant::now();
        let (pkg, size) = export(&sub, &cfg, &w, &opts, UnetPart::Whole, Dt::F32, None);
        validate(&py, &[&pkg]);
        let got = run(&py, &pkg, &all, None).remove("noise_pred").expect("noise_pred");
        let d = max_abs_diff(&got, &want);
        eprintln!("fp32 {}: {size} bytes, max |Δ| vs engine {d:.2e} ({:.1} s)", attention.id(), t0.elapsed().as_secs_f32());
        assert!(d <= 1e-4, "fp32 {} differs from the engine by {d}", attention.id());
        whole.insert(attention.id(), got);
    }

    // Chunked: chunk 1's outputs, by name, with the original inputs chunk 2 declares.
    for attention in [Attention::Original, Attention::SplitEinsum] {
        let opts = UnetExport { batch: 2, height: 8, width: 8, attention };
        let sub = dir.path().join(format!("chunks-{}", attention.id()));
        let (c1, s1) = export(&sub, &cfg, &w, &opts, UnetPart::Chunk1, Dt::F32, None);
        let (c2, s2) = export(&sub, &cfg, &w, &opts, UnetPart::Chunk2, Dt::F32, None);
        validate(&py, &[&c1, &c2]);
        let mid = run(&py, &c1, &all, None);
        let interface = unet::chunk_interface(&cfg, &opts).unwrap();
        assert_eq!(mid.len(), interface.len(), "chunk 1 outputs {:?}", mid.keys().collect::<Vec<_>>());
        let mut feed: Vec<(&str, &Tensor)> = interface.iter().map(|(n, _)| (n.as_str(), &mid[n])).collect();
        feed.push(("encoder_hidden_states", &ehs));
        let got = run(&py, &c2, &feed, None).remove("noise_pred").expect("noise_pred");
        let d_whole = max_abs_diff(&got, &whole[attention.id()]);
        let d = max_abs_diff(&got, &want);
        let split = unet::chunk_split(&cfg).unwrap();
        eprintln!(
            "chunked {} (cut after {:?}; chunk 1 {s1} bytes / {} params, chunk 2 {s2} bytes / {} params): max |Δ| vs whole {d_whole:.2e}, vs engine {d:.2e}",
            attention.id(),
            split.stage,
            split.chunk1_params,
            split.chunk2_params
        );
        assert!(d_whole <= 1e-5 && d <= 1e-4, "chunked {}: {d_whole} vs whole, {d} vs engine", attention.id());
    }

    // fp16 weights and activations (group norms in fp32).
    for attention in [Attention::Original, Attention::SplitEinsum] {
        let opts = UnetExport { batch: 2, height: 8, width: 8, attention };
        let (pkg, size) = export(&dir.path().join(format!("fp16-{}", attention.id())), &cfg, &w, &opts, UnetPart::Whole, Dt::F16, None);
        validate(&py, &[&pkg]);
        let got = run(&py, &pkg, &all, None).remove("noise_pred").expect("noise_pred");
        let d = max_abs_diff(&got, &want);
        eprintln!("fp16 {}: {size} bytes, max |Δ| vs engine {d:.2e}", attention.id());
        assert!(d <= FP16_TOLERANCE, "fp16 {} differs from the engine by {d}", attention.id());
    }

    // Palettized (4-bit k-means, one LUT per tensor) and int8: the error they cost.
    for (label, compression) in [("palettized 4-bit", Compression::Palettize { bits: 4, group_size: None }), ("palettized 6-bit", Compression::Palettize { bits: 6, group_size: None }), ("int8", Compression::Int8)] {
        let opts = UnetExport { batch: 2, height: 8, width: 8, attention: Attention::SplitEinsum };
        let pkg = dir.path().join(format!("c-{}", label.replace(' ', "-"))).join("Unet.mlpackage");
        let (size, stats) = unet::write_package(&pkg, &cfg, &w, &opts, UnetPart::Whole, Dt::F16, Some(compression), Target::Ios16).unwrap();
        validate(&py, &[&pkg]);
        let got = run(&py, &pkg, &all, None).remove("noise_pred").expect("noise_pred");
        let d = max_abs_diff(&got, &want);
        eprintln!(
            "fp16 {label}: {size} bytes, {} tensors compressed, weight relative error {:.3}, noise_pred max |Δ| vs engine {d:.2e}",
            stats.compressed_tensors,
            stats.relative_error()
        );
        assert!(stats.compressed_tensors > 0);
        assert!(d.is_finite() && d <= COMPRESSED_TOLERANCE * scale, "{label}: {d}");
    }
}

/// Chunks cut after each kind of stage (a down layer and a downsampler, where the top skip
/// is the hidden state itself and passes once; an up layer; an upsampler) chain to the
/// engine's numbers; batch one (Apple's `--unet-batch-one`) too.
#[test]
fn every_kind_of_cut_chains_to_the_engines_numbers() {
    let Some(py) = python() else { return };
    let (cfg, w, model) = starter();
    let (sample, timestep, context, ehs) = inputs(&cfg, 8, 8);
    let want = model.forward(&sample, 500.0, &context, AttentionKind::Original).unwrap();
    let all = [("sample", &sample), ("timestep", &timestep), ("encoder_hidden_states", &ehs)];
    let dir = tempfile::tempdir().unwrap();
    let opts = UnetExport { batch: 2, height: 8, width: 8, attention: Attention::Original };
    let stages = unet::stages(&cfg);
    let e = unet::write_package_at(&dir.path().join("x.mlpackage"), &cfg, &w, &opts, UnetPart::Chunk1, Dt::F32, None, Target::Ios16, Some(stages.len() - 1)).unwrap_err().to_string();
    assert!(e.contains("chunk 2 empty"), "{e}");
    for after in [0, 1, 5, 6] {
        let sub = dir.path().join(format!("cut{after}"));
        let mut pkgs = Vec::new();
        for part in [UnetPart::Chunk1, UnetPart::Chunk2] {
            let pkg = sub.join(format!("{}.mlpackage", part.package_name()));
            unet::write_package_at(&pkg, &cfg, &w, &opts, part, Dt::F32, None, Target::Ios16, Some(after)).unwrap();
            pkgs.push(pkg);
        }
        validate(&py, &[&pkgs[0], &pkgs[1]]);
        let mid = run(&py, &pkgs[0], &all, None);
        let interface = unet::chunk_interface_at(&cfg, &opts, after).unwrap();
        let names: Vec<&str> = interface.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(mid.len(), interface.len());
        let mut feed: Vec<(&str, &Tensor)> = names.iter().map(|n| (*n, &mid[*n])).collect();
        feed.push(("encoder_hidden_states", &ehs));
        let got = run(&py, &pkgs[1], &feed, None).remove("noise_pred").expect("noise_pred");
        let d = max_abs_diff(&got, &want);
        eprintln!("cut after {:?} (passing {names:?}): max |Δ| vs engine {d:.2e}", stages[after]);
        assert!(d <= 1e-4, "cut after {:?}: {d}", stages[after]);
    }

    let one = UnetExport { batch: 1, attention: Attention::SplitEinsum, ..opts };
    let (pkg, _) = export(&dir.path().join("one"), &cfg, &w, &one, UnetPart::Whole, Dt::F32, None);
    validate(&py, &[&pkg]);
    let s1 = sample.narrow(0, 1, 1).unwrap();
    let (t1, e1) = (timestep.narrow(0, 1, 1).unwrap(), ehs.narrow(0, 1, 1).unwrap().contiguous().unwrap());
    let got = run(&py, &pkg, &[("sample", &s1), ("timestep", &t1), ("encoder_hidden_states", &e1)], None).remove("noise_pred").unwrap();
    let want1 = model.forward(&s1, 500.0, &context.narrow(0, 1, 1).unwrap(), AttentionKind::Original).unwrap();
    let d = max_abs_diff(&got, &want1);
    eprintln!("batch one: max |Δ| vs engine {d:.2e}");
    assert!(d <= 1e-4, "batch one: {d}");
}

/// fp16 programs against the fp32 engine, max abs on noise_pred (measured: see the report).
const FP16_TOLERANCE: f32 = 2e-2;
/// Compressed programs, relative to the largest |noise_pred|: a sanity bound only (the
/// error is reported, not judged).
const COMPRESSED_TOLERANCE: f32 = 1.0;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// SD 1.5's UNet (859.5M parameters, random fp16 weights) exported chunked and palettized
/// to 4 bits at 64×64 latents: both chunks load in coremltools, and the exporter's own
/// memory stays far below the size of the weights (they stream into weight.bin).
#[test]
fn sd15_size_unet_exports_chunked_and_palettized_in_bounded_memory() {
    let cfg = UNetConfig::v1_5();
    let t0 = Instant::now();
    let mut map = HashMap::new();
    let mut bytes = 0u64;
    for (k, s) in unet::tensor_shapes(&cfg) {
        let t = Tensor::randn(0f32, 0.02, s.as_slice(), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        bytes += t.elem_count() as u64 * 2;
        map.insert(k, t);
    }
    let w = Weights::from_map(map, "random-sd15.safetensors");
    eprintln!("random SD 1.5 UNet: {:.2} GB of fp16 weights in {:.1} s", bytes as f64 / 1e9, t0.elapsed().as_secs_f32());
    // Peak RSS from here on (writing 5 to clear_refs resets VmHWM, Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    let dir = tempfile::tempdir_in(std::env::var_os("ATELIER_COREML_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)).unwrap();
    let opts = UnetExport { batch: 2, height: 64, width: 64, attention: Attention::SplitEinsum };
    let compression = Some(Compression::Palettize { bits: 4, group_size: None });
    let t1 = Instant::now();
    let (c1, s1) = export(dir.path(), &cfg, &w, &opts, UnetPart::Chunk1, Dt::F16, compression);
    let (c2, s2) = export(dir.path(), &cfg, &w, &opts, UnetPart::Chunk2, Dt::F16, compression);
    let export_s = t1.elapsed().as_secs_f32();
    let peak = status_kib("VmHWM:");
    let extra_mb = peak.saturating_sub(before) as f64 / 1024.0;
    let split = unet::chunk_split(&cfg).unwrap();
    eprintln!(
        "SD 1.5 chunked 4-bit: cut after {:?}; UnetChunk1 {:.1} MB ({} params), UnetChunk2 {:.1} MB ({} params); export {export_s:.1} s; RSS before {:.0} MB, peak {:.0} MB (+{extra_mb:.0} MB)",
        split.stage,
        s1 as f64 / 1e6,
        split.chunk1_params,
        s2 as f64 / 1e6,
        split.chunk2_params,
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    // 4-bit indices: ~0.5 byte a parameter, plus fp16 biases and norms.
    let total = (s1 + s2) as f64;
    assert!(total < 0.6 * 859.6e6 && total > 0.45 * 859.6e6, "packages total {total} bytes");
    assert!(extra_mb < 1024.0, "the export took {extra_mb:.0} MB above the weights it read");
    if let Some(py) = python() {
        let t2 = Instant::now();
        validate(&py, &[&c1, &c2]);
        eprintln!("coremltools validated both chunks in {:.1} s", t2.elapsed().as_secs_f32());
    }
}
