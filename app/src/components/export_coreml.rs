//! "Export for iOS/Mac": a small form for a Core ML export of a style or of a blend, queued
//! on the server (`POST /api/exports`), its live progress (package being written, bar),
//! cancel, then the zip's download link and a table of package sizes and what storing the
//! weights cost.

use leptos::prelude::*;

use crate::dto::exports::{ExportAttention, ExportPrecision, ExportRequest, ExportState, ExportStatus, ExportStyle, ExportTarget};

/// Bytes as `12.3 MB` / `456 KB`.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KB", bytes.div_ceil(1024))
    }
}

/// The export button and form for the library style `style`, or for the blend behind the
/// share code `blend` (one of the two).
#[component]
pub fn ExportCoreml(#[prop(optional, into)] style: Option<String>, #[prop(optional, into)] blend: Option<String>) -> impl IntoView {
    let style = StoredValue::new(style);
    let blend = StoredValue::new(blend);
    let open = RwSignal::new(false);
    let attention = RwSignal::new("split-einsum".to_string());
    let precision = RwSignal::new("fp16".to_string());
    let compression = RwSignal::new("none".to_string());
    let target = RwSignal::new("ios16".to_string());
    let chunk = RwSignal::new(false);
    let width = RwSignal::new(String::new());
    let height = RwSignal::new(String::new());
    let status: RwSignal<Option<ExportStatus>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    #[cfg(feature = "hydrate")]
    let stream: StoredValue<Option<crate::browser::EventStream>, LocalStorage> = StoredValue::new_local(None);

    let request = move || -> Result<ExportRequest, String> {
        let side = |name: &str, v: String| -> Result<Option<usize>, String> {
            let v = v.trim().to_string();
            if v.is_empty() {
                return Ok(None);
            }
            v.parse().map(Some).map_err(|_| format!("{name}: write a number of pixels (a multiple of 8), or leave it empty for the model's size"))
        };
        let (palettize, quantize) = match compression.get_untracked().as_str() {
            "8" => (Some(8), None),
            "6" => (Some(6), None),
            "4" => (Some(4), None),
            "int8" => (None, Some("int8".to_string())),
            _ => (None, None),
        };
        Ok(ExportRequest {
            blend: blend.get_value(),
            blend_name: None,
            styles: style.get_value().map(|name| vec![ExportStyle { name, weight: 1.0 }]).unwrap_or_default(),
            attention: if attention.get_untracked() == "original" { ExportAttention::Original } else { ExportAttention::SplitEinsum },
            precision: if precision.get_untracked() == "fp32" { ExportPrecision::Fp32 } else { ExportPrecision::Fp16 },
            palettize,
            quantize,
            chunk_unet: chunk.get_untracked(),
            target: match target.get_untracked().as_str() {
                "ios18" => ExportTarget::Ios18,
                "ios17" => ExportTarget::Ios17,
                _ => ExportTarget::Ios16,
            },
            width: side("width", width.get_untracked())?,
            height: side("height", height.get_untracked())?,
            unet_batch_one: false,
            vae_encoder: true,
        })
    };
    let submit = move |_| {
        error.set(None);
        let request = match request() {
            Ok(r) => r,
            Err(e) => return error.set(Some(e)),
        };
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::post_json::<_, ExportStatus>("/api/exports", &request).await {
                Ok(s) => {
                    let url = format!("/api/exports/{}/events", s.id);
                    status.set(Some(s));
                    open.set(false);
                    let on_lost = move || error.set(Some("lost the connection to the server".into()));
                    let watched = crate::browser::watch(&url, |s: &ExportStatus| s.state.is_finished(), move |s| status.set(Some(s)), on_lost);
                    stream.set_value(watched);
                }
                Err(e) => error.set(Some(e)),
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = request;
    };
    let cancel = move |_| {
        let Some(id) = status.with_untracked(|s| s.as_ref().map(|s| s.id.clone())) else { return };
        crate::browser::post_in_background(format!("/api/exports/{id}/cancel"), error);
    };
    let busy = move || status.with(|s| s.as_ref().is_some_and(|s| !s.state.is_finished()));
    let select = move |signal: RwSignal<String>, options: &'static [(&'static str, &'static str)]| {
        view! {
            <select on:change=move |ev| signal.set(event_target_value(&ev))>
                {options.iter().map(|(value, label)| view! {
                    <option value=*value selected=move || signal.get() == *value>{*label}</option>
                }).collect_view()}
            </select>
        }
    };

    view! {
        <div class="export-coreml">
            <button type="button" class="export-coreml-open secondary" disabled=busy on:click=move |_| open.update(|o| *o = !*o)>
                "Export for iOS/Mac"
            </button>
            {move || open.get().then(|| view! {
                <fieldset class="export-coreml-form">
                    <legend>"Core ML packages for Apple's ml-stable-diffusion"</legend>
                    <label>"Attention " {select(attention, &[("split-einsum", "split-einsum (Neural Engine)"), ("original", "original (GPU)")])}</label>
                    <label>"Precision " {select(precision, &[("fp16", "fp16"), ("fp32", "fp32")])}</label>
                    <label>"Compression " {select(compression, &[("none", "none"), ("8", "palettize 8-bit"), ("6", "palettize 6-bit"), ("4", "palettize 4-bit"), ("int8", "int8")])}</label>
                    <label>"Target " {select(target, &[("ios16", "iOS 16 / macOS 13"), ("ios17", "iOS 17 / macOS 14"), ("ios18", "iOS 18 / macOS 15")])}</label>
                    <label><input type="checkbox" prop:checked=move || chunk.get() on:change=move |ev| chunk.set(event_target_checked(&ev)) /> " Chunk the UNet (iOS)"</label>
                    <label>"Width " <input type="number" class="export-width" min="8" step="8" placeholder="model's" prop:value=move || width.get() on:input=move |ev| width.set(event_target_value(&ev)) /></label>
                    <label>"Height " <input type="number" class="export-height" min="8" step="8" placeholder="model's" prop:value=move || height.get() on:input=move |ev| height.set(event_target_value(&ev)) /></label>
                    <button type="button" class="export-coreml-submit" on:click=submit>"Export"</button>
                </fieldset>
            }.into_any())}
            {move || status.get().map(|s| {
                let line = match &s.state {
                    ExportState::Queued { position } => format!("queued (position {position})"),
                    ExportState::Running if s.stage == "zip" => "writing the zip".to_string(),
                    ExportState::Running if s.stage.is_empty() => "starting".to_string(),
                    ExportState::Running => format!("writing {} ({} of {})", s.stage, s.done, s.total),
                    ExportState::Done { bytes, .. } => format!("done: {} zipped", size(*bytes)),
                    ExportState::Failed { message } => format!("failed: {message}"),
                    ExportState::Cancelled => "cancelled".into(),
                };
                let running = !s.state.is_finished();
                let file = format!("/api/exports/{}/file", s.id);
                let name = format!("{}.zip", s.name);
                let table = match &s.state {
                    ExportState::Done { packages, compression_errors, .. } => Some(view! {
                        <table class="export-packages">
                            <thead><tr><th>"Package"</th><th>"Size"</th><th>"Stored as"</th><th>"Weight error (relative)"</th></tr></thead>
                            <tbody>
                                {packages.iter().map(|p| {
                                    let e = compression_errors.iter().find(|e| e.package == p.name);
                                    view! {
                                        <tr>
                                            <td>{p.name.clone()}</td>
                                            <td>{size(p.bytes)}</td>
                                            <td>{e.map(|e| e.option.clone()).unwrap_or_default()}</td>
                                            <td>{e.map(|e| format!("{:.2e}", e.relative_error)).unwrap_or_default()}</td>
                                        </tr>
                                    }
                                }).collect_view()}
                            </tbody>
                        </table>
                    }),
                    _ => None,
                };
                view! {
                    <div class="export-state" aria-live="polite">
                        <progress max=s.total.max(1) value=s.done></progress>
                        " " {line}
                        {s.note.clone().map(|n| view! { " " <span class="muted">{n}</span> })}
                        {running.then(|| view! { " " <button type="button" on:click=cancel>"Cancel"</button> })}
                        {table.is_some().then(|| view! { " " <a class="download export-zip" href=file download=name>"Download zip"</a> })}
                    </div>
                    {table}
                }
                .into_any()
            })}
            {move || error.get().map(|e| view! { <span class="error">{e}</span> })}
        </div>
    }
    .into_any()
}
