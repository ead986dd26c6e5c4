//! Locating and loading a diffusers-layout model folder: which files make up each
//! component, reading their configs, and turning weight-file problems into errors that
//! name the file and what does not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// The files of one diffusers pipeline folder.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub scheduler_config: PathBuf,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`, OpenCLIP bigG) and its
    /// tokenizer: present together or not at all.
    pub text_encoder_2: Option<SecondEncoderFiles>,
}

/// The files of SDXL's second text encoder.
#[derive(Debug, Clone)]
pub struct SecondEncoderFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer_dir: PathBuf,
}

/// Weight file names diffusers / transformers write, in order of preference.
const WEIGHT_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

impl ModelFiles {
    /// Finds every component of the pipeline in `root`, or says which one is missing.
    pub fn locate(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingComponent { dir: root.to_path_buf(), what: "the folder itself (it does not exist or is not a folder)".into() });
        }
        let need = |rel: &str| -> Result<PathBuf> {
            let p = root.join(rel);
            if p.exists() {
                Ok(p)
            } else {
                Err(Error::MissingComponent { dir: root.to_path_buf(), what: rel.to_string() })
            }
        };
        let weights = |sub: &str| -> Result<PathBuf> {
            let dir = need(sub)?;
            for name in WEIGHT_NAMES {
                let p = dir.join(name);
                if p.is_file() {
                    return Ok(p);
                }
            }
            let has_bin = dir.join("diffusion_pytorch_model.bin").exists() || dir.join("pytorch_model.bin").exists();
            let what = if has_bin {
                format!("{sub}/*.safetensors (only a PyTorch .bin file is there; convert it to safetensors, e.g. by re-saving with diffusers' save_pretrained(safe_serialization=True))")
            } else {
                format!("{sub}/diffusion_pytorch_model.safetensors or {sub}/model.safetensors")
            };
            Err(Error::MissingComponent { dir: root.to_path_buf(), what })
        };
        need("model_index.json")?;
        let text_encoder_2 = if root.join("text_encoder_2").exists() || root.join("tokenizer_2").exists() {
            Some(SecondEncoderFiles {
                config: need("text_encoder_2/config.json")?,
                weights: weights("text_encoder_2")?,
                tokenizer_dir: need("tokenizer_2")?,
            })
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            unet_config: need("unet/config.json")?,
            unet_weights: weights("unet")?,
            vae_config: need("vae/config.json")?,
            vae_weights: weights("vae")?,
            text_encoder_config: need("text_encoder/config.json")?,
            text_encoder_weights: weights("text_encoder")?,
            tokenizer_dir: need("tokenizer")?,
            scheduler_config: need("scheduler/scheduler_config.json")?,
            text_encoder_2,
        })
    }
}

/// Reads and parses a JSON config, naming the file on failure.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })
}

/// Loads all tensors of a safetensors file onto `device`, with a clear error for
/// truncated or corrupt files.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file ({e}); the file may be truncated or corrupt — download it again"),
    })
}

/// Builds a model from a weight file, turning missing or mis-shaped tensors into
/// [`Error::Weights`] naming the file and the tensor.
pub fn build_from_file<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let tensors = load_safetensors(path, device)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    build(vb).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        message: format!("does not match its config.json: {e}"),
    })
}

/// A1111's short model hash: the first 10 hex digits of the sha256 of a weight file.
pub fn short_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
}

/// Turns a `--model` value into a folder: a single-file checkpoint (`.safetensors` in the
/// original LDM / SGM layout, as A1111 and Civitai have them) of a standard architecture is
/// converted once into the checkpoint cache ([`crate::presets::materialize_checkpoint`]); an
/// existing folder is used as is; an id like
/// `runwayml/stable-diffusion-v1-5` is looked up in the standard Hugging Face cache
/// (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), at the
/// snapshot that `refs/main` names (or the only snapshot there is).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return crate::presets::materialize_checkpoint(path, None, &crate::single_file::default_cache());
    }
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let looks_like_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\');
    if !looks_like_id {
        return Err(Error::MissingComponent { dir: path.to_path_buf(), what: "the folder itself (it does not exist)".into() });
    }
    let cache = hub_cache_dir();
    resolve_in_cache(spec, &cache)
}

/// The Hugging Face hub cache folder from the environment.
pub fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    dirs::home_dir().unwrap_or_default().join(".cache/huggingface/hub")
}

/// Looks a hub id up in a cache folder laid out as `huggingface_hub` does.
pub fn resolve_in_cache(id: &str, cache: &Path) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let hub_err = |message: String| Error::Hub { id: id.to_string(), message };
    if !repo.is_dir() {
        return Err(hub_err(format!(
            "not found in the Hugging Face cache {} and this build does not download; run `huggingface-cli download {id}` on a machine with a network, or pass a local diffusers folder",
            cache.display()
        )));
    }
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let snap = snapshots.join(rev.trim());
        if snap.is_dir() {
            return Ok(snap);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| Error::io(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    snaps.sort();
    match snaps.len() {
        1 => Ok(snaps.remove(0)),
        0 => Err(hub_err(format!("{} has no snapshot", repo.display()))),
        _ => Err(hub_err(format!("{} has several snapshots and no refs/main", repo.display()))),
    }
}

/// Writes tensors to a safetensors file atomically ([`crate::files::write_atomic_with`]),
/// creating its folder.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    crate::files::write_atomic_with(
        path,
        |tmp| Ok(candle_core::safetensors::save(&cpu, tmp)?),
        |e| Error::io(path, e),
    )
}

/// Like [`save_safetensors_atomic`], with a safetensors metadata header (string pairs).
pub fn save_safetensors_with_metadata_atomic(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    crate::files::write_atomic_with(
        path,
        |tmp| {
            safetensors::serialize_to_file(cpu, Some(metadata.clone()), tmp)
                .map_err(|e| Error::Weights { path: path.to_path_buf(), message: format!("cannot write ({e})") })
        },
        |e| Error::io(path, e),
    )
}

/// Weights drawn at random (N(0, 0.02²), deterministic per tensor name): lets benchmarks
/// build a full-size model from its config without downloading anything.
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let seed = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid normal");
        let data: Vec<f32> = (0..s.elem_count()).map(|_| normal.sample(&mut rng)).collect();
        Tensor::from_vec(data, s, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// A `VarBuilder` whose every tensor is random (see [`RandomWeights`]); plain tensors,
/// no autograd tracking.
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(RandomWeights);
    VarBuilder::from_backend(backend, dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_hub_id_through_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--runwayml--stable-diffusion-v1-5");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(resolve_in_cache("runwayml/stable-diffusion-v1-5", tmp.path()).unwrap(), snap);
        let err = resolve_in_cache("other/model", tmp.path()).unwrap_err().to_string();
        assert!(err.contains("other/model") && err.contains("not found"), "{err}");
    }

    #[test]
    fn missing_component_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("model_index.json"), "{}").unwrap();
        let err = ModelFiles::locate(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("unet/config.json"), "{err}");
    }

    #[test]
    fn corrupt_weights_are_refused_with_the_file_name() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("w.safetensors");
        std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let err = load_safetensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("w.safetensors") && err.contains("corrupt"), "{err}");
    }
}
