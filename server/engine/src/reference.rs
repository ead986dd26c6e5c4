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
use crate::{Error, Result};

/// The kinds of case this runner understands, recognised by the case file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseKind {
    TokenizerIds,
    TextEncoder,
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
            ("text_encoder", CaseKind::TextEncoder),
            ("vae_encode", CaseKind::VaeEncode),
            ("vae_decode", CaseKind::VaeDecode),
            ("unet", CaseKind::Unet),
            ("pipeline", CaseKind::Pipeline),
        ];
        table.iter().find(|(p, _)| stem == *p || stem.starts_with(&format!("{p}_"))).map(|(_, k)| *k)
    }

    /// Names of the EXPECTED tensors this kind produces.
    pub fn outputs(self) -> &'static [&'static str] {
        match self {
            CaseKind::TokenizerIds => &["input_ids", "attention_mask", "lengths"],
            CaseKind::TextEncoder => &["last_hidden_state", "pooler_output"],
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
    /// For LoRA cases (`lora_*`): which of the adapters' two files to load.
    pub lora_format: Option<LoraFormat>,
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
        if stem.starts_with("lora_") {
            // A LoRA case is reproduced from each of its adapters' two files.
            for (format, suffix) in [(LoraFormat::Kohya, "kohya"), (LoraFormat::Diffusers, "diffusers")] {
                cases.push(Case {
                    name: format!("{stem}-{suffix}"),
                    kind,
                    json_path: path.clone(),
                    tensors_path: tensors_path.clone(),
                    lora_format: Some(format),
                });
            }
        } else {
            cases.push(Case { name: stem.to_string(), kind, json_path: path, tensors_path, lora_format: None });
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
                let tok = self.sd.tokenizer();
                let (mut ids, mut mask, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
                for p in prompts {
                    let p = p.as_str().ok_or_else(|| case_err(case, "a prompt is not a string"))?;
                    let enc = tok.encode(p);
                    ids.extend(enc.ids.iter().map(|&i| i as i64));
                    mask.extend((0..enc.ids.len()).map(|i| (i < enc.length) as i64));
                    lengths.push(enc.length as i64);
                }
                let n = prompts.len();
                let len = tok.max_len();
                out.insert("input_ids".into(), Tensor::from_vec(ids, (n, len), &Device::Cpu)?);
                out.insert("attention_mask".into(), Tensor::from_vec(mask, (n, len), &Device::Cpu)?);
                out.insert("lengths".into(), Tensor::from_vec(lengths, n, &Device::Cpu)?);
            }
            CaseKind::TextEncoder => {
                let o = self.sd.text_encoder().forward(&input("input_ids")?, attn)?;
                out.insert("last_hidden_state".into(), o.last_hidden_state);
                out.insert("pooler_output".into(), o.pooler_output);
            }
            CaseKind::Unet => {
                let t = input("timestep")?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let t = *t.first().ok_or_else(|| case_err(case, "timestep is empty"))?;
                let pred = self.sd.unet().forward(&input("sample")?, t, &input("encoder_hidden_states")?, attn)?;
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
                let negative = s("negative_prompt").unwrap_or_default();
                let steps = json
                    .get("num_inference_steps")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| case_err(case, "num_inference_steps is missing"))? as usize;
                let guidance = json.get("guidance_scale").and_then(Value::as_f64).unwrap_or(7.5);
                let (kind, config) = scheduler_from_case(json, self.sd.scheduler_config()).map_err(|m| case_err(case, m))?;
                let mut scheduler = crate::scheduler::build(kind, &config, steps)?;
                let mut warnings = Vec::new();
                let cond = self.sd.encode_prompt(&prompt, attn, &mut warnings)?;
                let uncond =
                    if guidance > 1.0 { Some(self.sd.encode_prompt(&negative, attn, &mut warnings)?) } else { None };
                let latents = (input("init_latents")? * scheduler.init_noise_sigma())?;
                let b = latents.dim(0)?;
                let cond = cond.repeat((b, 1, 1))?;
                let uncond = uncond.map(|u| u.repeat((b, 1, 1))).transpose()?;
                let seed = json.get("seed").and_then(Value::as_u64).unwrap_or(0);
                let mut noise = Noise::new(seed);
                let final_latents = self.sd.denoise(
                    latents,
                    &cond,
                    uncond.as_ref(),
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
