//! A compatible subset of the AUTOMATIC1111 web UI's HTTP API (`/sdapi/v1`), the one many
//! existing clients and bots speak (field names and shapes from A1111's
//! `modules/api/models.py` and `modules/api/api.py`):
//!
//! - `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img` → `{"images": [base64 PNG, …],
//!   "parameters": {the request as sent}, "info": "<JSON string>"}`; `info` holds
//!   `prompt`, `all_prompts`, `negative_prompt`, `seed`, `all_seeds`, `width`, `height`,
//!   `sampler_name`, `cfg_scale`, `steps`, `batch_size`, `sd_model_name`,
//!   `sd_model_hash`, `denoising_strength`, `extra_generation_params`, `infotexts`,
//!   `job_timestamp`, … as A1111 writes them. Used fields: `prompt`, `negative_prompt`,
//!   `seed` (-1 = random), `sampler_name` (or the older `sampler_index`) with `scheduler`
//!   (`Karras` turns `DPM++ 2M` into `DPM++ 2M Karras`), `batch_size` × `n_iter`,
//!   `steps`, `cfg_scale`, `width`, `height`, `override_settings.sd_model_checkpoint`;
//!   img2img adds `init_images` (the first is used) and `denoising_strength`. Other A1111
//!   fields are accepted and ignored. `<lora:NAME:W>` tags work as everywhere.
//! - `GET /sdapi/v1/sd-models`: the served model, then one entry per deployment;
//!   `GET /sdapi/v1/loras`: the library's styles and every registry alias (`NAME@ALIAS`);
//!   `GET /sdapi/v1/samplers`: the schedulers under their A1111 names.
//! - `GET /sdapi/v1/options`, `POST /sdapi/v1/options` (a JSON object merged into the
//!   options, kept in `DATA/a1111/options.json`).
//! - `GET /sdapi/v1/progress`: the latest job started through this API.
//!
//! **Serving a deployment through this API**: set the option `sd_model_checkpoint` (for
//! every later request) or `override_settings: {"sd_model_checkpoint": …}` (for one) to
//! the deployment's name (or its `sd-models` title `NAME [TARGET]`). Its target is then
//! resolved and pinned exactly as `POST /api/v1/deployments/{name}/generate` does, and its
//! negative prompt fills an empty one. The served model's own title (`MODEL [HASH]`), name
//! or hash selects the plain model.
//!
//! Errors: a body that is not the JSON expected is a 422 in FastAPI's validation shape
//! `{"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer",
//! "type": "type_error.integer"}]}` (pydantic 1's messages and types, which A1111 uses);
//! values this studio refuses (a size that is not a multiple of 8, …) are 422s of the
//! same shape naming the A1111 field; anything else is A1111's
//! `{"error", "detail", "body", "errors"}` with its status (404 for an unknown model or
//! sampler).

use std::path::PathBuf;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use app::dto::{GenerateRequest, JobState, SCHEDULERS};

use super::{accept, image_bytes, wait_images, Overrides, Timer};
use crate::{ApiError, AppState};

/// The `/sdapi/v1` routes (merged at the top level, beside `/api`).
pub fn routes() -> Router<AppState> {
    let v1 = Router::new()
        .route("/txt2img", post(txt2img))
        .route("/img2img", post(img2img))
        .route("/sd-models", get(sd_models))
        .route("/loras", get(loras))
        .route("/samplers", get(samplers))
        .route("/options", get(get_options).post(set_options))
        .route("/progress", get(progress))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        .method_not_allowed_fallback(|| async { (StatusCode::METHOD_NOT_ALLOWED, Json(json!({"detail": "Method Not Allowed"}))) })
        .layer(axum::extract::DefaultBodyLimit::max(app::dto::MAX_BODY_BYTES));
    Router::new().nest("/sdapi/v1", v1)
}

/// The A1111 API's own state: its options and the job `/progress` reports.
pub struct A1111State {
    options_path: PathBuf,
    options: Mutex<Map<String, Value>>,
    /// The latest job started through this API, and its A1111 `job_timestamp`.
    current: Mutex<Option<(String, String)>>,
}

impl A1111State {
    /// Reads the saved options from `DATA/a1111/options.json` (none yet is fine).
    pub fn open(data_dir: &std::path::Path) -> Self {
        let options_path = data_dir.join("a1111").join("options.json");
        let options = std::fs::read(&options_path).ok().and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok()).unwrap_or_default();
        Self { options_path, options: Mutex::new(options), current: Mutex::new(None) }
    }

    fn options(&self) -> Map<String, Value> {
        self.options.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An error answered in A1111's shapes.
pub enum A1111Error {
    /// FastAPI's request-validation error: 422 `{"detail": [{"loc", "msg", "type"}]}`.
    Validation(Vec<Value>),
    /// Anything else: `{"error", "detail", "body", "errors"}` with `status`.
    Other { status: StatusCode, error: &'static str, detail: String },
}

fn item(loc: Vec<Value>, msg: impl Into<String>, kind: &str) -> Value {
    json!({"loc": loc, "msg": msg.into(), "type": kind})
}

/// The A1111 field our request field `field` came from.
fn a1111_field(field: &str) -> &str {
    match field {
        "guidance" => "cfg_scale",
        "scheduler" => "sampler_name",
        "strength" => "denoising_strength",
        "init_image" => "init_images",
        other => other,
    }
}

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid { field, message } => {
                let f = a1111_field(&field).to_string();
                A1111Error::Validation(vec![item(vec![json!("body"), json!(f)], format!("invalid {f}: {message}"), "value_error")])
            }
            ApiError::BadImage(m) => A1111Error::Validation(vec![item(vec![json!("body"), json!("init_images")], format!("cannot read the init image: {m}"), "value_error")]),
            ApiError::OverBudget(m) => A1111Error::Validation(vec![item(vec![json!("body")], m, "value_error")]),
            other => A1111Error::Other { status: other.status(), error: "HTTPException", detail: other.to_string() },
        }
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        match self {
            A1111Error::Validation(detail) => {
                tracing::info!(?detail, "A1111 request rejected");
                (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "detail": detail }))).into_response()
            }
            A1111Error::Other { status, error, detail } => {
                if status.is_server_error() {
                    tracing::warn!(%detail, "A1111 request failed");
                }
                let detail = if status == StatusCode::INTERNAL_SERVER_ERROR { "internal server error; see the server log".to_string() } else { detail };
                (status, Json(json!({"error": error, "detail": detail, "body": "", "errors": ""}))).into_response()
            }
        }
    }
}

/// pydantic 1's message and type for a serde data error (`expected …`).
fn pydantic_kind(message: &str) -> (&'static str, &'static str) {
    let expected = message.split("expected ").nth(1).unwrap_or("");
    if message.starts_with("missing field") {
        ("field required", "value_error.missing")
    } else if message.starts_with("invalid value: integer `-") {
        ("ensure this value is greater than or equal to 0", "value_error.number.not_ge")
    } else if ["usize", "u64", "i64", "u32", "i32", "integer"].iter().any(|t| expected.starts_with(t)) {
        ("value is not a valid integer", "type_error.integer")
    } else if expected.starts_with("f64") || expected.starts_with("f32") {
        ("value is not a valid float", "type_error.float")
    } else if expected.starts_with("a string") {
        ("str type expected", "type_error.str")
    } else if expected.starts_with("a boolean") {
        ("value could not be parsed to a boolean", "type_error.bool")
    } else if expected.starts_with("a sequence") {
        ("value is not a valid list", "type_error.list")
    } else if expected.starts_with("a map") || expected.starts_with("struct") {
        ("value is not a valid dict", "type_error.dict")
    } else {
        ("value is not valid", "type_error")
    }
}

/// Parses an A1111 request body as FastAPI would: 422 with the field's location, else
/// the typed request and the body as sent (for the `parameters` echo).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, Value), A1111Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(A1111Error::Validation(vec![item(vec![json!("body")], "field required", "value_error.missing")]));
    }
    let raw: Value = serde_json::from_slice(body).map_err(|e| {
        A1111Error::Validation(vec![json!({"loc": ["body", e.column()], "msg": e.to_string(), "type": "value_error.jsondecode", "ctx": {"lineno": e.line(), "colno": e.column()}})])
    })?;
    if !raw.is_object() {
        return Err(A1111Error::Validation(vec![item(vec![json!("body")], "value is not a valid dict", "type_error.dict")]));
    }
    let typed = serde_path_to_error::deserialize::<_, T>(&raw).map_err(|e| {
        let mut loc = vec![json!("body")];
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Seq { index } => loc.push(json!(index)),
                serde_path_to_error::Segment::Map { key } => loc.push(json!(key)),
                serde_path_to_error::Segment::Enum { variant } => loc.push(json!(variant)),
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        let message = e.inner().to_string();
        if let Some(field) = message.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            loc.push(json!(field));
        }
        let (msg, kind) = pydantic_kind(&message);
        A1111Error::Validation(vec![item(loc, msg, kind)])
    })?;
    Ok((typed, raw))
}

/// The fields of A1111's `StableDiffusionTxt2ImgProcessingAPI` this studio uses (others
/// are accepted and ignored; `null` means the default, as in A1111).
#[derive(Debug, Default, Deserialize)]
struct Txt2Img {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    sampler_name: Option<String>,
    #[serde(default)]
    sampler_index: Option<String>,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    n_iter: Option<usize>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    cfg_scale: Option<f64>,
    #[serde(default)]
    width: Option<usize>,
    #[serde(default)]
    height: Option<usize>,
    #[serde(default)]
    denoising_strength: Option<f64>,
    #[serde(default)]
    override_settings: Option<Map<String, Value>>,
    #[serde(default)]
    styles: Option<Vec<String>>,
}

/// What A1111's `StableDiffusionImg2ImgProcessingAPI` adds to txt2img's fields (read
/// from the same body; no `flatten`, so errors keep their field's location).
#[derive(Debug, Default, Deserialize)]
struct Img2Img {
    #[serde(default)]
    init_images: Option<Vec<String>>,
}

/// What a checkpoint name selects.
enum Checkpoint {
    Base,
    Deployment(String),
}

fn base_title(state: &AppState) -> String {
    format!("{} [{}]", state.model.name, state.model.hash)
}

/// Resolves an `sd_model_checkpoint` value (see the module doc).
fn checkpoint(state: &AppState, name: &str) -> Result<Checkpoint, A1111Error> {
    let name = name.trim();
    if name.is_empty() || name == base_title(state) || name == state.model.name || name.eq_ignore_ascii_case(&state.model.hash) {
        return Ok(Checkpoint::Base);
    }
    let all = state.deployments.store.list();
    if let Some(d) = all.iter().find(|d| d.name == name || format!("{} [{}]", d.name, d.target) == name) {
        return Ok(Checkpoint::Deployment(d.name.clone()));
    }
    let mut known = vec![base_title(state)];
    known.extend(all.iter().map(|d| d.name.clone()));
    Err(A1111Error::Other { status: StatusCode::NOT_FOUND, error: "HTTPException", detail: format!("model {name:?} not found (known: {})", known.join(", ")) })
}

/// Our scheduler id for A1111's `sampler_name` (+ `scheduler`).
fn scheduler_id(sampler: Option<&str>, scheduler: Option<&str>) -> Result<String, A1111Error> {
    let Some(sampler) = sampler.map(str::trim).filter(|s| !s.is_empty()) else { return Ok(app::dto::DEFAULT_SCHEDULER.to_string()) };
    let karras = scheduler.is_some_and(|s| s.eq_ignore_ascii_case("karras")) && !sampler.to_ascii_lowercase().ends_with("karras");
    let wanted = if karras { format!("{sampler} Karras") } else { sampler.to_string() };
    SCHEDULERS
        .iter()
        .find(|(id, a1111)| a1111.eq_ignore_ascii_case(&wanted) || id.eq_ignore_ascii_case(&wanted))
        .map(|(id, _)| id.to_string())
        .ok_or_else(|| A1111Error::Other {
            status: StatusCode::NOT_FOUND,
            error: "HTTPException",
            detail: format!("Sampler not found: {wanted:?} (known: {})", SCHEDULERS.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")),
        })
}

async fn txt2img(State(state): State<AppState>, body: Bytes) -> Response {
    run(&state, &body, false).await.unwrap_or_else(IntoResponse::into_response)
}

async fn img2img(State(state): State<AppState>, body: Bytes) -> Response {
    run(&state, &body, true).await.unwrap_or_else(IntoResponse::into_response)
}

fn job_timestamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().chars().filter(char::is_ascii_digit).collect()
}

async fn run(state: &AppState, body: &[u8], image: bool) -> Result<Response, A1111Error> {
    let (req, init, raw) = if image {
        let (r, raw): (Txt2Img, Value) = parse(body)?;
        let (images, _): (Img2Img, Value) = parse(body)?;
        let first = images.init_images.unwrap_or_default().into_iter().next().filter(|s| !s.trim().is_empty());
        let Some(first) = first else {
            return Err(A1111Error::Other { status: StatusCode::NOT_FOUND, error: "HTTPException", detail: "Init image not found: init_images is empty".into() });
        };
        (r, Some(first), raw)
    } else {
        let (r, raw): (Txt2Img, Value) = parse(body)?;
        (r, None, raw)
    };
    let chosen = req
        .override_settings
        .as_ref()
        .and_then(|o| o.get("sd_model_checkpoint"))
        .or(state.deployments.a1111.options().get("sd_model_checkpoint"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let chosen = match chosen {
        Some(name) => checkpoint(state, &name)?,
        None => Checkpoint::Base,
    };
    let scheduler = scheduler_id(req.sampler_name.as_deref().or(req.sampler_index.as_deref()), req.scheduler.as_deref())?;
    let seed = match req.seed {
        None | Some(-1) => None,
        Some(s) if s < 0 => return Err(A1111Error::Validation(vec![item(vec![json!("body"), json!("seed")], format!("{s} is not a seed: use -1 for a random one or a number from 0"), "value_error")])),
        Some(s) => Some(s as u64),
    };
    let batch = req.batch_size.unwrap_or(1).max(1) * req.n_iter.unwrap_or(1).max(1);
    let prompt = req.prompt.clone().unwrap_or_default();
    let negative = req.negative_prompt.clone().unwrap_or_default();
    let strength = req.denoising_strength.unwrap_or(0.75);
    let timer = Timer::start();
    let (job, deployment) = match &chosen {
        Checkpoint::Deployment(name) => {
            let o = Overrides {
                prompt: prompt.clone(),
                negative_prompt: Some(negative.clone()).filter(|n| !n.is_empty()),
                steps: req.steps,
                guidance: req.cfg_scale,
                scheduler: Some(scheduler),
                width: req.width,
                height: req.height,
                seed,
                batch_size: Some(batch),
                init_image: init.clone(),
                strength: init.as_ref().map(|_| strength),
            };
            match accept(state, name, o).await {
                Ok(a) => (a.job, Some((a.deployment, a.version))),
                Err(e) => {
                    if !matches!(e, ApiError::NotFound { what: "deployment", .. }) {
                        timer.done(name, "", e.status().as_u16());
                    }
                    return Err(e.into());
                }
            }
        }
        Checkpoint::Base => {
            let d = GenerateRequest::default();
            let request = GenerateRequest {
                prompt: prompt.clone(),
                negative_prompt: negative.clone(),
                steps: req.steps.unwrap_or(d.steps),
                guidance: req.cfg_scale.unwrap_or(d.guidance),
                seed,
                scheduler,
                width: req.width,
                height: req.height,
                batch_size: batch,
                strength,
                init_image: init.clone(),
            };
            (state.submit(request).await?, None)
        }
    };
    let timestamp = job_timestamp();
    *state.deployments.a1111.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((job.job_id.clone(), timestamp.clone()));
    let waited = async {
        let ids = wait_images(state, &job.job_id).await?;
        let mut pngs = Vec::with_capacity(ids.len());
        for id in &ids {
            pngs.push(image_bytes(state, id).await?);
        }
        Ok::<_, ApiError>(pngs)
    }
    .await;
    if let Some((name, version)) = &deployment {
        timer.done(name, version, waited.as_ref().map_or_else(|e| e.status().as_u16(), |_| 200));
    }
    let pngs = waited?;
    let infotexts: Vec<String> = pngs.iter().map(|p| atelier_engine::metadata::read_png_parameters(p).ok().flatten().unwrap_or_default()).collect();
    let first = infotexts.first().and_then(|t| atelier_engine::metadata::parse_parameters(t).ok());
    let extra: Map<String, Value> = first.as_ref().map(|m| m.extra.iter().map(|(k, v)| (k.clone(), json!(v))).collect()).unwrap_or_default();
    let seeds: Vec<u64> = (0..pngs.len() as u64).map(|k| job.seed.wrapping_add(k)).collect();
    let (model_name, model_hash) = match &deployment {
        Some((name, _)) => (name.clone(), state.model.hash.clone()),
        None => (state.model.name.clone(), state.model.hash.clone()),
    };
    let info = json!({
        "prompt": prompt,
        "all_prompts": vec![prompt.clone(); pngs.len()],
        "negative_prompt": first.as_ref().map_or(negative.clone(), |m| m.negative_prompt.clone()),
        "all_negative_prompts": vec![first.as_ref().map_or(negative.clone(), |m| m.negative_prompt.clone()); pngs.len()],
        "seed": job.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; pngs.len()],
        "subseed_strength": 0,
        "width": first.as_ref().map(|m| m.width),
        "height": first.as_ref().map(|m| m.height),
        "sampler_name": first.as_ref().map(|m| m.sampler.clone()),
        "cfg_scale": first.as_ref().map(|m| m.cfg_scale),
        "steps": first.as_ref().map(|m| m.steps),
        "batch_size": batch,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": if init.is_some() { json!(strength) } else { json!(0) },
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": req.styles.unwrap_or_default(),
        "job_timestamp": timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": concat!("atelier ", env!("CARGO_PKG_VERSION")),
    });
    let images: Vec<String> = pngs.iter().map(|p| base64::engine::general_purpose::STANDARD.encode(p)).collect();
    Ok(Json(json!({ "images": images, "parameters": raw, "info": info.to_string() })).into_response())
}

async fn sd_models(State(state): State<AppState>) -> Json<Value> {
    let mut out = vec![json!({
        "title": base_title(&state), "model_name": state.model.name, "hash": state.model.hash,
        "sha256": null, "filename": state.model.name, "config": null,
    })];
    let store = state.deployments.store.clone();
    let deployments = tokio::task::spawn_blocking(move || store.list()).await.unwrap_or_default();
    out.extend(deployments.into_iter().map(|d| {
        json!({
            "title": format!("{} [{}]", d.name, d.target), "model_name": d.name, "hash": state.model.hash,
            "sha256": null, "filename": format!("deployment:{}", d.name), "config": null,
        })
    }));
    Json(Value::Array(out))
}

async fn loras(State(state): State<AppState>) -> Json<Value> {
    let (styles, tracking) = (state.styles.clone(), state.data_dir.join("tracking"));
    let list = tokio::task::spawn_blocking(move || {
        let mut out: Vec<Value> = styles
            .list()
            .into_iter()
            .map(|s| {
                let metadata = s.card.as_ref().map_or(json!({}), |c| json!({"ss_base_model_hash": c.base_model_hash, "trigger": c.trigger}));
                json!({"name": s.name, "alias": s.name, "path": s.adapter().display().to_string(), "metadata": metadata})
            })
            .collect();
        if tracking.join("tracking.sqlite").is_file() {
            if let Ok(models) = crate::tracking::Tracker::open(&tracking).and_then(|t| t.registered_models()) {
                for m in models {
                    for (alias, version) in &m.aliases {
                        let source = m.versions.iter().find(|v| v.version == *version).map(|v| v.source.clone()).unwrap_or_default();
                        let name = format!("{}@{alias}", m.name);
                        out.push(json!({"name": name, "alias": name, "path": format!("{source}/{}.safetensors", m.name), "metadata": {"version": version}}));
                    }
                }
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    Json(Value::Array(list))
}

async fn samplers() -> Json<Value> {
    Json(Value::Array(SCHEDULERS.iter().map(|(id, name)| json!({"name": name, "aliases": [id], "options": {}})).collect()))
}

async fn get_options(State(state): State<AppState>) -> Json<Value> {
    let mut options = Map::new();
    options.insert("sd_model_checkpoint".into(), json!(base_title(&state)));
    options.insert("sd_checkpoint_hash".into(), json!(state.model.hash));
    options.insert("samples_format".into(), json!("png"));
    options.insert("CLIP_stop_at_last_layers".into(), json!(1));
    options.insert("sd_vae".into(), json!("None"));
    options.extend(state.deployments.a1111.options());
    Json(Value::Object(options))
}

/// `POST /sdapi/v1/options`: merges a JSON object into the options (an unknown
/// `sd_model_checkpoint` is a 404 and changes nothing); answers `null` as A1111 does.
async fn set_options(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, A1111Error> {
    let (update, _): (Map<String, Value>, Value) = parse(&body)?;
    if let Some(v) = update.get("sd_model_checkpoint") {
        let Some(name) = v.as_str() else {
            return Err(A1111Error::Validation(vec![item(vec![json!("body"), json!("sd_model_checkpoint")], "str type expected", "type_error.str")]));
        };
        checkpoint(&state, name)?;
    }
    let a = &state.deployments.a1111;
    let merged = {
        let mut options = a.options.lock().unwrap_or_else(|e| e.into_inner());
        options.extend(update);
        options.clone()
    };
    let path = a.options_path.clone();
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        atelier_engine::files::write_json_atomic(&path, &merged)
    })
    .await
    .map_err(|e| A1111Error::from(ApiError::Internal(e.to_string())))?
    .map_err(|e| A1111Error::from(ApiError::storage(&e, &e)))?;
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/progress`: A1111's `ProgressResponse` for the latest job of this API.
async fn progress(State(state): State<AppState>) -> Json<Value> {
    let current = state.deployments.a1111.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let status = current.as_ref().and_then(|(id, _)| state.jobs.status(id).ok());
    let (progress, step, total, job_count, job) = match status.as_ref().map(|s| &s.state) {
        Some(JobState::Running { step, total }) => (if *total > 0 { *step as f64 / *total as f64 } else { 0.0 }, *step, *total, 1, current.as_ref().map(|c| c.0.clone()).unwrap_or_default()),
        Some(JobState::Queued { .. }) => (0.0, 0, 0, 1, current.as_ref().map(|c| c.0.clone()).unwrap_or_default()),
        _ => (0.0, 0, 0, 0, String::new()),
    };
    Json(json!({
        "progress": progress,
        "eta_relative": 0.0,
        "state": {
            "skipped": false, "interrupted": matches!(status.as_ref().map(|s| &s.state), Some(JobState::Cancelled)),
            "job": job, "job_count": job_count,
            "job_timestamp": current.map(|c| c.1).unwrap_or_else(|| "0".into()),
            "job_no": 0, "sampling_step": step, "sampling_steps": total,
        },
        "current_image": null,
        "textinfo": null,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_map_to_schedulers() {
        assert_eq!(scheduler_id(Some("Euler a"), Some("automatic")).ok(), Some("euler-a".into()));
        assert_eq!(scheduler_id(Some("DPM++ 2M"), Some("Karras")).ok(), Some("dpmpp-2m-karras".into()));
        assert_eq!(scheduler_id(Some("DPM++ 2M Karras"), None).ok(), Some("dpmpp-2m-karras".into()));
        assert_eq!(scheduler_id(None, None).ok(), Some(app::dto::DEFAULT_SCHEDULER.into()));
        assert!(scheduler_id(Some("LMS"), None).is_err());
    }

    #[test]
    fn validation_errors_have_fastapi_locations() {
        let detail = |body: &str| match parse::<Txt2Img>(body.as_bytes()) {
            Err(A1111Error::Validation(d)) => d,
            _ => panic!("{body} should be refused"),
        };
        let d = detail(r#"{"steps": "many"}"#);
        assert_eq!(d[0]["loc"], json!(["body", "steps"]));
        assert_eq!((d[0]["msg"].as_str(), d[0]["type"].as_str()), (Some("value is not a valid integer"), Some("type_error.integer")));
        assert_eq!(detail(r#"{"cfg_scale": "x"}"#)[0]["type"], "type_error.float");
        assert_eq!(detail(r#"{"prompt": 3}"#)[0]["type"], "type_error.str");
        assert_eq!(detail("[1]")[0]["loc"], json!(["body"]));
        assert_eq!(detail("{nope")[0]["type"], "value_error.jsondecode");
        assert_eq!(detail("")[0]["type"], "value_error.missing");
        let d = match parse::<Img2Img>(br#"{"init_images": [1]}"#) {
            Err(A1111Error::Validation(d)) => d,
            _ => panic!(),
        };
        assert_eq!(d[0]["loc"], json!(["body", "init_images", 0]));
    }
}
