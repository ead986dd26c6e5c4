//! Reproduces reference cases computed by diffusers: for each case file
//! (`NAME.json` + `NAME.safetensors`, the sd-tiny fixture format) it feeds the
//! case's INPUT tensors and JSON settings to our engine and returns tensors named
//! like the case's EXPECTED ones, so the two can be compared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::attention::AttentionKind;
use crate::lora::{ActiveLora, BlockWeights, LoraAdapter, LoraFormat};
use crate::model::load_safetensors;
use crate::noise::Noise;
use crate::pipeline::StableDiffusion;
use crate::scheduler::{SchedulerConfig, SchedulerKind};
use crate::unet::{AddedConditioning, MicroConditioning};
use crate::{Error, Result};

/// The kinds of case this runner understands, recognised by the case file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseKind {
    TokenizerIds,
    TextEncoder,
    /// SDXL's two text encoders together (`text_encoders.json`).
    TextEncoders,
    Unet,
    VaeEncode,
    VaeDecode,
    Pipeline,
}

impl CaseKind {
    /// Recognises a case by its file stem (`unet`, `unet_24x40`, `pipeline_euler`, …);
    /// LoRA cases are the same kinds with a `lora_` prefix (`lora_unet_mix`).
    pub fn recognise(stem: &str) -> Option<Self> {
        let stem = stem.strip_prefix("lora_").unwrap_or(stem);
        let table = [
            ("tokenizer_ids", CaseKind::TokenizerIds),
            ("text_encoders", CaseKind::TextEncoders),
            ("text_encoder", CaseKind::TextEncoder),
            ("vae_encode", CaseKind::VaeEncode),
            ("vae_decode", CaseKind::VaeDecode),
            ("unet", CaseKind::Unet),
            ("pipeline", CaseKind::Pipeline),
        ];
        table.iter().find(|(p, _)| stem == *p || stem.starts_with(&format!("{p}_"))).map(|(_, k)| *k)
    }

    /// Names of the EXPECTED tensors this kind produces for an SD 1.x/2.x model (a case's
    /// own list, [`Case::expected`], is what to compare).
    pub fn outputs(self) -> &'static [&'static str] {
        match self {
            CaseKind::TokenizerIds => &["input_ids", "attention_mask", "lengths"],
            CaseKind::TextEncoder => &["last_hidden_state", "pooler_output"],
            CaseKind::TextEncoders => &["text_encoder_penultimate", "text_encoder_2_penultimate", "prompt_embeds", "text_embeds"],
            CaseKind::Unet => &["noise_pred"],
            CaseKind::VaeEncode => &["latent_mean", "latent_logvar"],
            CaseKind::VaeDecode => &["decoded"],
            CaseKind::Pipeline => &["final_latents", "decoded", "image"],
        }
    }
}

/// One case found in a cases folder.
#[derive(Debug, Clone)]
pub struct Case {
    /// The file stem, with `-kohya` / `-diffusers` appended for LoRA cases.
    pub name: String,
    pub kind: CaseKind,
    pub json_path: PathBuf,
    pub tensors_path: PathBuf,
    /// For LoRA cases (`lora_*`): which of the adapters' files to load (a case whose
    /// adapters name only `file_kohya`, as the LyCORIS cases do, is run from that alone).
    pub lora_format: Option<LoraFormat>,
    /// The tensors the case file marks EXPECTED (its `expected` map, or the `EXPECTED`
    /// entries of `tensor_roles`), else [`CaseKind::outputs`]: what a run must produce.
    pub expected: Vec<String>,
}

/// The EXPECTED tensor names a case JSON lists.
fn expected_names(json_path: &Path, kind: CaseKind) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(json_path).map_err(|e| Error::io(json_path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::Config { path: json_path.to_path_buf(), message: e.to_string() })?;
    let mut names: Vec<String> = match (json.get("expected").and_then(Value::as_object), json.get("tensor_roles").and_then(Value::as_object)) {
        (Some(e), _) => e.keys().cloned().collect(),
        (None, Some(roles)) => {
            roles.iter().filter(|(_, r)| r.as_str().is_some_and(|r| r.starts_with("EXPECTED"))).map(|(k, _)| k.clone()).collect()
        }
        (None, None) => Vec::new(),
    };
    if names.is_empty() {
        names = kind.outputs().iter().map(|s| s.to_string()).collect();
    }
    Ok(names)
}

/// The file layouts a LoRA case can be run from: those (`file_kohya`, `file_diffusers`)
/// that every adapter it uses names; both when none is common (running then says which
/// file is missing).
fn lora_formats(json_path: &Path) -> Result<Vec<(LoraFormat, &'static str)>> {
    let text = std::fs::read_to_string(json_path).map_err(|e| Error::io(json_path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::Config { path: json_path.to_path_buf(), message: e.to_string() })?;
    let both = [(LoraFormat::Kohya, "kohya"), (LoraFormat::Diffusers, "diffusers")];
    let Some(adapters) = json.get("adapters").and_then(Value::as_object) else { return Ok(both.to_vec()) };
    let active: Vec<&str> = match json.get("active_adapters").and_then(Value::as_array) {
        Some(a) => a.iter().filter_map(Value::as_str).collect(),
        None => adapters.keys().map(String::as_str).collect(),
    };
    let have = |key: &str| active.iter().all(|name| adapters.get(*name).and_then(|a| a.get(key)).and_then(Value::as_str).is_some());
    let found: Vec<_> = both.iter().copied().filter(|(_, suffix)| have(&format!("file_{suffix}"))).collect();
    Ok(if found.is_empty() { both.to_vec() } else { found })
}

/// Lists the recognised cases of a folder (non-recursive), sorted by name.
pub fn discover(cases_dir: &Path) -> Result<Vec<Case>> {
    let entries = std::fs::read_dir(cases_dir).map_err(|e| Error::io(cases_dir, e))?;
    let mut cases = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(cases_dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        let Some(kind) = CaseKind::recognise(stem) else { continue };
        let tensors_path = path.with_extension("safetensors");
        if !tensors_path.is_file() {
            continue;
        }
        let expected = expected_names(&path, kind)?;
        if stem.starts_with("lora_") {
            // A LoRA case is reproduced from each of its adapters' files (kohya and
            // diffusers, or the one layout every adapter has, e.g. LyCORIS' kohya naming).
            for (format, suffix) in lora_formats(&path)? {
                cases.push(Case {
                    name: format!("{stem}-{suffix}"),
                    kind,
                    json_path: path.clone(),
                    tensors_path: tensors_path.clone(),
                    lora_format: Some(format),
                    expected: expected.clone(),
                });
            }
        } else {
            cases.push(Case { name: stem.to_string(), kind, json_path: path, tensors_path, lora_format: None, expected });
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(cases)
}

/// Runs cases against one loaded model.
pub struct ReferenceRunner {
    sd: StableDiffusion,
    device: Device,
    attention: AttentionKind,
}

fn case_err(case: &Case, message: impl Into<String>) -> Error {
    Error::Config { path: case.json_path.clone(), message: message.into() }
}

impl ReferenceRunner {
    pub fn new(model_dir: &Path, device: &Device, attention: AttentionKind) -> Result<Self> {
        let sd = StableDiffusion::load_with_dtype(model_dir, device, DType::F32)?;
        Ok(Self { sd, device: device.clone(), attention })
    }

    /// Computes the outputs of one case from its inputs.
    pub fn run(&self, case: &Case) -> Result<HashMap<String, Tensor>> {
        let text = std::fs::read_to_string(&case.json_path).map_err(|e| Error::io(&case.json_path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| case_err(case, e.to_string()))?;
        let inputs = load_safetensors(&case.tensors_path, &self.device)?;
        let input = |name: &str| {
            inputs.get(name).cloned().ok_or_else(|| case_err(case, format!("INPUT tensor {name} is missing")))
        };
        let attn = self.attention;
        let loras = match case.lora_format {
            Some(format) => self.case_loras(case, &json, format)?,
            None => Vec::new(),
        };
        self.sd.set_loras(&loras);
        let out = self.compute(case, &json, &input, attn);
        self.sd.set_loras(&[]);
        out
    }

    /// The adapters a LoRA case names (`active_adapters`, else every entry of
    /// `adapters`), read from their `format` files, with `adapter_weights`.
    fn case_loras(&self, case: &Case, json: &Value, format: LoraFormat) -> Result<Vec<ActiveLora>> {
        let adapters = json.get("adapters").and_then(Value::as_object).ok_or_else(|| case_err(case, "adapters is missing"))?;
        let names: Vec<String> = match json.get("active_adapters").and_then(Value::as_array) {
            Some(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            None => adapters.keys().cloned().collect(),
        };
        let weights: Vec<f64> = json
            .get("adapter_weights")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .ok_or_else(|| case_err(case, "adapter_weights is missing"))?;
        if weights.len() != names.len() {
            return Err(case_err(case, format!("{} adapters but {} weights", names.len(), weights.len())));
        }
        let key = match format {
            LoraFormat::Kohya => "file_kohya",
            LoraFormat::Diffusers => "file_diffusers",
        };
        let case_dir = case.json_path.parent().unwrap_or(Path::new("."));
        let mut active = Vec::new();
        for (name, weight) in names.iter().zip(weights) {
            let file = adapters
                .get(name)
                .and_then(|a| a.get(key))
                .and_then(Value::as_str)
                .ok_or_else(|| case_err(case, format!("adapters.{name}.{key} is missing")))?;
            // Paths are relative to the fixture root, which is the case folder or its parent.
            let rel = Path::new(file);
            let path = [case_dir.join(rel), case_dir.join("..").join(rel), case_dir.join(rel.file_name().unwrap_or_default())]
                .into_iter()
                .find(|p| p.is_file())
                .ok_or_else(|| case_err(case, format!("adapter file {file} not found beside the case")))?;
            let adapter = std::sync::Arc::new(LoraAdapter::load(&path)?);
            if adapter.format != format {
                return Err(case_err(case, format!("{} is not in the {format:?} layout", path.display())));
            }
            active.push(ActiveLora { lora: self.sd.bind_lora(&adapter)?, weight, blocks: BlockWeights::default() });
        }
        Ok(active)
    }

    fn compute(
        &self,
        case: &Case,
        json: &Value,
        input: &dyn Fn(&str) -> Result<Tensor>,
        attn: AttentionKind,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        match case.kind {
            CaseKind::TokenizerIds => {
                let prompts = json
                    .pointer("/inputs/prompts")
                    .and_then(Value::as_array)
                    .ok_or_else(|| case_err(case, "inputs.prompts is missing"))?;
                let prompts: Vec<&str> =
                    prompts.iter().map(|p| p.as_str().ok_or_else(|| case_err(case, "a prompt is not a string"))).collect::<Result<_>>()?;
                let mut tokenizers = vec![("", self.sd.tokenizer())];
                tokenizers.extend(self.sd.text_encoder_2().map(|(t, _)| ("_2", t)));
                for (suffix, tok) in tokenizers {
                    let (mut ids, mut mask, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
                    for p in &prompts {
                        let enc = tok.encode(p);
                        ids.extend(enc.ids.iter().map(|&i| i as i64));
                        mask.extend((0..enc.ids.len()).map(|i| (i < enc.length) as i64));
                        lengths.push(enc.length as i64);
                    }
                    let n = prompts.len();
                    let len = tok.max_len();
                    out.insert(format!("input_ids{suffix}"), Tensor::from_vec(ids, (n, len), &Device::Cpu)?);
                    out.insert(format!("attention_mask{suffix}"), Tensor::from_vec(mask, (n, len), &Device::Cpu)?);
                    out.insert(format!("lengths{suffix}"), Tensor::from_vec(lengths, n, &Device::Cpu)?);
                }
            }
            CaseKind::TextEncoder => {
                let o = self.sd.text_encoder().forward(&input("input_ids")?, attn)?;
                out.insert("last_hidden_state".into(), o.last_hidden_state);
                out.insert("pooler_output".into(), o.pooler_output);
            }
            CaseKind::TextEncoders => {
                let (_, te2) = self.sd.text_encoder_2().ok_or_else(|| case_err(case, "an SDXL case needs a model with text_encoder_2"))?;
                let a = self.sd.text_encoder().forward_penultimate(&input("input_ids")?, false, attn)?.penultimate;
                let b = te2.forward_penultimate(&input("input_ids_2")?, true, attn)?;
                out.insert("prompt_embeds".into(), Tensor::cat(&[&a, &b.penultimate], 2)?);
                out.insert("text_encoder_penultimate".into(), a);
                out.insert("text_encoder_2_penultimate".into(), b.penultimate);
                out.insert("text_embeds".into(), b.text_embeds.ok_or_else(|| case_err(case, "no text_embeds"))?);
            }
            CaseKind::Unet => {
                let t = input("timestep")?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let t = *t.first().ok_or_else(|| case_err(case, "timestep is empty"))?;
                let sample = input("sample")?;
                let added = if self.sd.unet().needs_added_conditioning() {
                    Some(AddedConditioning { text_embeds: input("text_embeds")?, time_ids: input("time_ids")? })
                } else {
                    None
                };
                let t = Tensor::full(t as f32, sample.dim(0)?, &self.device)?;
                let pred = self.sd.unet().forward_added(&sample, &t, &input("encoder_hidden_states")?, added.as_ref(), attn)?;
                out.insert("noise_pred".into(), pred);
            }
            CaseKind::VaeEncode => {
                let d = self.sd.vae().encode(&input("image")?, attn)?;
                out.insert("latent_mean".into(), d.mean);
                out.insert("latent_logvar".into(), d.logvar);
            }
            CaseKind::VaeDecode => {
                out.insert("decoded".into(), self.sd.vae().decode(&input("latent")?, attn)?);
            }
            CaseKind::Pipeline => {
                let s = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_string);
                let prompt = s("prompt").ok_or_else(|| case_err(case, "prompt is missing"))?;
                // diffusers: no negative prompt on a `force_zeros_for_empty_prompt` model
                // means zero embeddings; otherwise it encodes "" (or the text).
                let negative = s("negative_prompt");
                let steps = json
                    .get("num_inference_steps")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| case_err(case, "num_inference_steps is missing"))? as usize;
                let guidance = json.get("guidance_scale").and_then(Value::as_f64).unwrap_or(7.5);
                let (kind, config) = scheduler_from_case(json, self.sd.scheduler_config()).map_err(|m| case_err(case, m))?;
                let mut scheduler = crate::scheduler::build(kind, &config, steps)?;
                let mut warnings = Vec::new();
                let cond = self.sd.encode_prompt(&prompt, attn, &mut warnings)?;
                let uncond = match (guidance > 1.0, negative) {
                    (false, _) => None,
                    (true, None) if self.sd.zeros_for_empty_negative() => Some(cond.zeros_like()?),
                    (true, n) => Some(self.sd.encode_prompt(&n.unwrap_or_default(), attn, &mut warnings)?),
                };
                let latents = (input("init_latents")? * scheduler.init_noise_sigma())?;
                let b = latents.dim(0)?;
                let cond = cond.repeat(b)?;
                let uncond = uncond.map(|u| u.repeat(b)).transpose()?;
                let pair = |k: &str| -> Option<(f64, f64)> {
                    let a = json.get(k)?.as_array()?;
                    Some((a.first()?.as_f64()?, a.get(1)?.as_f64()?))
                };
                let f = self.sd.vae_scale_factor();
                let (h, w) = (latents.dim(2)? * f, latents.dim(3)? * f);
                let size = (h as f64, w as f64);
                let micro = MicroConditioning {
                    original_size: pair("original_size").unwrap_or(size),
                    crop_top_left: pair("crops_coords_top_left").unwrap_or((0.0, 0.0)),
                    target_size: pair("target_size").unwrap_or(size),
                };
                let seed = json.get("seed").and_then(Value::as_u64).unwrap_or(0);
                let mut noise = Noise::new(seed);
                let final_latents = self.sd.denoise(
                    latents,
                    &cond,
                    uncond.as_ref(),
                    &micro,
                    guidance,
                    scheduler.as_mut(),
                    0,
                    &mut noise,
                    attn,
                    &mut |_, _| true,
                )?;
                let decoded = self.sd.decode(&final_latents, attn)?;
                let image = ((&decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
                out.insert("final_latents".into(), final_latents);
                out.insert("decoded".into(), decoded);
                out.insert("image".into(), image);
            }
        }
        Ok(out)
    }
}

/// Picks the scheduler of a pipeline case: `scheduler_class` (diffusers class name) and
/// `scheduler_config` from the case when present, else the model's own config.
fn scheduler_from_case(json: &Value, model: &SchedulerConfig) -> std::result::Result<(SchedulerKind, SchedulerConfig), String> {
    let class = json.get("scheduler_class").and_then(Value::as_str).unwrap_or("DDIMScheduler");
    let config = match json.get("scheduler_config") {
        Some(v) => SchedulerConfig::parse(&v.to_string(), "scheduler_config").map_err(|e| format!("scheduler_config: {e}"))?,
        None => model.clone(),
    };
    let karras = json.pointer("/scheduler_config/use_karras_sigmas").and_then(Value::as_bool).unwrap_or(false);
    let kind = match class {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        "DPMSolverMultistepScheduler" if karras => SchedulerKind::DpmPp2mKarras,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmPp2m,
        other => return Err(format!("scheduler_class {other} is not supported")),
    };
    Ok((kind, config))
}


/// Largest absolute difference between two tensors of the same shape (as f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::invalid("shape", format!("{:?} vs {:?}", a.dims(), b.dims())));
    }
    let a = a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let b = b.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Largest absolute value of a tensor (as f64).
pub fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}
