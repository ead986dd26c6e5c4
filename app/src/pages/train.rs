//! The Train page: upload a folder's worth of images (or a zip), read the dataset report,
//! choose the settings, start a style training and watch it live (progress, loss chart,
//! sample sheets), stop it, resume it; a finished training links to its style.

use leptos::prelude::*;

use crate::dto::{DatasetSummary, StyleTrainingRequest, TrainingState, TrainingStatus};
use crate::server_fns::{delete_style_training, list_style_trainings, resume_style_training, start_style_training, stop_style_training};
use crate::AppError;

#[component]
pub fn TrainPage() -> impl IntoView {
    let trainings = Resource::new(|| (), |_| list_style_trainings());
    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            <ErrorBoundary fallback=crate::components::errors::error_line>
                {move || Suspend::new(async move {
                    let list = trainings.await?;
                    Ok::<_, AppError>(view! { <Trainer initial=list /> })
                })}
            </ErrorBoundary>
        </Suspense>
    }
}

/// The settings form, as signals.
#[derive(Clone, Copy)]
struct Settings {
    name: RwSignal<String>,
    trigger: RwSignal<String>,
    steps: RwSignal<u64>,
    rank: RwSignal<usize>,
    lr: RwSignal<f64>,
    batch: RwSignal<usize>,
    convs: RwSignal<bool>,
    text_encoder: RwSignal<bool>,
    flip: RwSignal<bool>,
}

impl Settings {
    fn new() -> Self {
        let d = StyleTrainingRequest::default();
        Self {
            name: RwSignal::new(String::new()),
            trigger: RwSignal::new(String::new()),
            steps: RwSignal::new(d.steps),
            rank: RwSignal::new(d.rank),
            lr: RwSignal::new(d.lr),
            batch: RwSignal::new(d.batch),
            convs: RwSignal::new(d.convs),
            text_encoder: RwSignal::new(d.text_encoder),
            flip: RwSignal::new(d.flip),
        }
    }

    fn request(&self, dataset_id: String) -> StyleTrainingRequest {
        StyleTrainingRequest {
            dataset_id,
            name: self.name.get_untracked(),
            trigger: self.trigger.get_untracked(),
            steps: self.steps.get_untracked(),
            rank: self.rank.get_untracked(),
            lr: self.lr.get_untracked(),
            batch: self.batch.get_untracked(),
            convs: self.convs.get_untracked(),
            text_encoder: self.text_encoder.get_untracked(),
            flip: self.flip.get_untracked(),
            ..StyleTrainingRequest::default()
        }
    }
}

/// Parses a number input, keeping the old value while the text is not a number.
fn parse_into<T: std::str::FromStr + Send + Sync + 'static>(signal: RwSignal<T>) -> impl Fn(leptos::ev::Event) {
    move |ev| {
        if let Ok(v) = event_target_value(&ev).trim().parse() {
            signal.set(v);
        }
    }
}

/// Replaces the training with the same id in `list` (or adds it at the top).
fn upsert(list: RwSignal<Vec<TrainingStatus>>, status: TrainingStatus) {
    list.update(|v| match v.iter_mut().find(|t| t.id == status.id) {
        Some(t) => *t = status,
        None => v.insert(0, status),
    });
}

/// Opens (or reopens) the live stream of training `id`, feeding `list`.
fn follow(id: &str, list: RwSignal<Vec<TrainingStatus>>, lost: RwSignal<Option<String>>) {
    #[cfg(feature = "hydrate")]
    {
        use std::collections::HashMap;
        thread_local! {
            static STREAMS: std::cell::RefCell<HashMap<String, crate::browser::EventStream>> = Default::default();
        }
        let stream = crate::browser::watch_training(
            id,
            move |s| upsert(list, s),
            move || lost.set(Some("lost the connection to the server; reload the page to see the training".into())),
        );
        STREAMS.with(|m| {
            let mut m = m.borrow_mut();
            match stream {
                Some(s) => m.insert(id.to_string(), s),
                None => m.remove(id),
            };
        });
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = (id, list, lost);
}

#[component]
fn Trainer(initial: Vec<TrainingStatus>) -> impl IntoView {
    let hydrated = RwSignal::new(false);
    let trainings = RwSignal::new(initial);
    let connection = RwSignal::new(None::<String>);
    // Follow every training that is still going once the page runs in the browser.
    Effect::new(move |_| {
        hydrated.set(true);
        for t in trainings.get_untracked().iter().filter(|t| t.state.is_active()) {
            follow(&t.id, trainings, connection);
        }
    });

    let dataset = RwSignal::new(None::<DatasetSummary>);
    let uploading = RwSignal::new(None::<(f64, f64)>);
    let upload_error = RwSignal::new(None::<String>);
    let on_files = move |ev: leptos::ev::Event| {
        #[cfg(feature = "hydrate")]
        {
            use wasm_bindgen::JsCast;
            let Some(input) = ev.target().and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok()) else { return };
            if input.files().is_none_or(|f| f.length() == 0) {
                return;
            }
            let url = match dataset.get_untracked() {
                Some(d) => format!("/api/style-datasets?dataset={}", d.id),
                None => "/api/style-datasets".to_string(),
            };
            upload_error.set(None);
            uploading.set(Some((0.0, 1.0)));
            let reset = input.clone();
            crate::browser::upload_files::<DatasetSummary>(
                &url,
                &input,
                move |sent, total| uploading.set(Some((sent, total))),
                move |result| {
                    uploading.set(None);
                    // Lets the same files be chosen again.
                    reset.set_value("");
                    match result {
                        Ok(d) => dataset.set(Some(d)),
                        Err(e) => upload_error.set(Some(e)),
                    }
                },
            );
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = ev;
    };

    let settings = Settings::new();
    let start_error = RwSignal::new(None::<String>);
    let start = Action::new_local(move |request: &StyleTrainingRequest| start_style_training(request.clone()));
    Effect::new(move |_| {
        let Some(result) = start.value().get() else { return };
        match result {
            Ok(status) => {
                start_error.set(None);
                let id = status.id.clone();
                upsert(trainings, status);
                follow(&id, trainings, connection);
            }
            Err(e) => start_error.set(Some(e.to_string())),
        }
    });
    let can_start = move || {
        hydrated.get()
            && !start.pending().get()
            && !settings.name.get().trim().is_empty()
            && dataset.with(|d| d.as_ref().is_some_and(|d| d.usable))
    };
    let on_start = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        if let Some(d) = dataset.get_untracked() {
            start.dispatch(settings.request(d.id));
        }
    };

    view! {
        <section class="train" data-ready=move || hydrated.get().to_string()>
            <h1>"Train a style"</h1>
            <p class="muted">
                "Bring 10–50 images in one style. Atelier trains a LoRA adapter on the loaded model, keeps it in the "
                <a href="/styles">"style library"</a>
                ", and measures it against the base model on the same prompts and seeds."
            </p>

            <div class="train-step">
                <h2>"1. Images"</h2>
                <label class="upload">
                    <span>
                        {move || if dataset.with(Option::is_some) { "Add more files" } else { "Choose images" }}
                        " (PNG, JPEG, WebP), optional .txt captions with the same names, or a .zip of them"
                    </span>
                    <input type="file" id="train-files" multiple accept="image/png,image/jpeg,image/webp,.txt,.zip,application/zip"
                        disabled=move || !hydrated.get() || uploading.with(Option::is_some) on:change=on_files />
                </label>
                {move || uploading.get().map(|(sent, total)| view! {
                    <div class="upload-progress">
                        <div class="bar"><div class="bar-fill" style:width=format!("{:.1}%", 100.0 * sent / total.max(1.0))></div></div>
                        <span class="muted">{format!("uploading {:.1} of {:.1} MB", sent / 1e6, total / 1e6)}</span>
                    </div>
                })}
                {move || upload_error.get().map(|e| view! { <p class="error upload-error">{e}</p> })}
                {move || dataset.get().map(|d| view! { <DatasetReport dataset=d on_clear=move || dataset.set(None) on_change=Callback::new(move |d| dataset.set(Some(d))) /> })}
            </div>

            <form class="train-step settings" on:submit=on_start>
                <h2>"2. Settings"</h2>
                <div class="row">
                    <label>"Name" <input type="text" id="style-name" placeholder="my-style" required
                        prop:value=move || settings.name.get() on:input=move |ev| settings.name.set(event_target_value(&ev)) /></label>
                    <label>"Trigger word" <input type="text" id="style-trigger" placeholder="the name"
                        prop:value=move || settings.trigger.get() on:input=move |ev| settings.trigger.set(event_target_value(&ev)) /></label>
                </div>
                <div class="row">
                    <label>"Steps" <input type="number" id="style-steps" min="1" max="100000" prop:value=move || settings.steps.get().to_string() on:input=parse_into(settings.steps) /></label>
                    <label>"Rank" <input type="number" id="style-rank" min="1" max="256" prop:value=move || settings.rank.get().to_string() on:input=parse_into(settings.rank) /></label>
                    <label>"Learning rate" <input type="number" id="style-lr" step="any" min="0" prop:value=move || settings.lr.get().to_string() on:input=parse_into(settings.lr) /></label>
                    <label>"Batch" <input type="number" id="style-batch" min="1" max="64" prop:value=move || settings.batch.get().to_string() on:input=parse_into(settings.batch) /></label>
                </div>
                <div class="row checks">
                    <label><input type="checkbox" prop:checked=move || settings.flip.get() on:change=move |ev| settings.flip.set(event_target_checked(&ev)) /> "Add mirror images"</label>
                    <label><input type="checkbox" prop:checked=move || settings.convs.get() on:change=move |ev| settings.convs.set(event_target_checked(&ev)) /> "Also the convolutions (LoCon)"</label>
                    <label><input type="checkbox" prop:checked=move || settings.text_encoder.get() on:change=move |ev| settings.text_encoder.set(event_target_checked(&ev)) /> "Also the text encoder"</label>
                </div>
                <button type="submit" class="start" disabled=move || !can_start()>"Start training"</button>
                {move || (!dataset.with(|d| d.as_ref().is_some_and(|d| d.usable))).then(|| view! {
                    <span class="muted">" Upload enough usable images first."</span>
                })}
                {move || start_error.get().map(|e| view! { <p class="error start-error">{e}</p> })}
            </form>

            <div class="train-step">
                <h2>"3. Trainings"</h2>
                {move || connection.get().map(|e| view! { <p class="error">{e}</p> })}
                <Show when=move || trainings.with(|t| !t.is_empty()) fallback=|| view! { <p class="muted">"No trainings yet."</p> }>
                    <ul class="trainings">
                        <For each=move || trainings.get() key=|t| t.id.clone() children=move |t: TrainingStatus| {
                            let id = t.id.clone();
                            let status = Signal::derive(move || trainings.with(|v| v.iter().find(|x| x.id == id).cloned()));
                            view! { <TrainingCard status trainings connection /> }
                        } />
                    </ul>
                </Show>
            </div>
        </section>
    }
}

#[component]
fn DatasetReport(dataset: DatasetSummary, on_clear: impl Fn() + Send + Sync + 'static, on_change: Callback<DatasetSummary>) -> impl IntoView {
    let edit_error = RwSignal::new(None::<String>);
    // Removing an image or editing a caption commits a new DVC version, then the report is read again.
    let edit = move |id: String, file: String, caption: Option<Option<String>>| {
        #[cfg(feature = "hydrate")]
        {
            let file_path = super::encode_query(&file);
            let (url, body) = match &caption {
                Some(current) => {
                    let Some(w) = web_sys::window() else { return };
                    let message = format!("Caption of {file} (empty: the default caption)");
                    let Ok(Some(text)) = w.prompt_with_message_and_default(&message, current.as_deref().unwrap_or("")) else { return };
                    (format!("/api/datasets/{id}/captions/{file_path}"), Some(serde_json::json!({ "caption": text })))
                }
                None => (format!("/api/datasets/{id}/files/{file_path}"), None),
            };
            let back = format!("/api/style-datasets/{id}");
            leptos::task::spawn_local(async move {
                let done: Result<serde_json::Value, String> = match body {
                    Some(b) => crate::browser::put_json(&url, &b).await,
                    None => crate::browser::delete_json(&url).await,
                };
                match done {
                    Ok(_) => match crate::browser::get_json::<DatasetSummary>(&back).await {
                        Ok(d) => on_change.run(d),
                        Err(e) => edit_error.set(Some(e)),
                    },
                    Err(e) => edit_error.set(Some(e)),
                }
            });
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = (id, file, caption, on_change);
    };
    let captions = dataset.images.iter().filter(|i| i.caption.is_some()).count();
    let summary = format!(
        "{} usable image{} at {}×{} (at least {} needed) · {} with a caption file, the rest captioned “TRIGGER style”",
        dataset.images.len(),
        if dataset.images.len() == 1 { "" } else { "s" },
        dataset.resolution,
        dataset.resolution,
        dataset.min_images,
        captions
    );
    let base = format!("/api/style-datasets/{}/files/", dataset.id);
    let skipped = dataset.skipped.clone();
    let count = dataset.images.len().to_string();
    view! {
        <div class="dataset-report" data-usable=dataset.usable.to_string() data-images=count>
            <p class=if dataset.usable { "report-summary ok" } else { "report-summary error" }>{summary}</p>
            {(!dataset.usable).then(|| view! { <p class="error">"Not enough usable images to train: add more files."</p> })}
            <ul class="thumbs">
                {dataset.images.into_iter().map(|i| {
                    let title = i.caption.clone().unwrap_or_else(|| "default caption".into());
                    let note = i.caption_note.clone();
                    let title = match &note {
                        Some(n) => format!("{}: {title} ({n})", i.file),
                        None => format!("{}: {title}", i.file),
                    };
                    // Thumbnails come from the trainer's own reader: upright, transparency on white.
                    let (id1, id2, f1, f2, current) = (dataset.id.clone(), dataset.id.clone(), i.file.clone(), i.file.clone(), i.caption.clone());
                    view! {
                        <li>
                            <img src=format!("{base}{}?thumb=160", i.file) alt=i.file.clone() title=title />
                            <button type="button" class="thumb-action caption-edit" title="Edit the caption (a new dataset version)"
                                on:click=move |_| edit(id1.clone(), f1.clone(), Some(current.clone()))>"✎"</button>
                            <button type="button" class="thumb-action remove" title="Remove from the dataset (a new dataset version)"
                                on:click=move |_| edit(id2.clone(), f2.clone(), None)>"×"</button>
                            {note.map(|n| { let t = n.clone(); view! { <span class="caption-note" title=t>{n}</span> } })}
                        </li>
                    }
                }).collect_view()}
            </ul>
            {(!skipped.is_empty()).then(|| view! {
                <table class="skipped">
                    <caption>"Left out"</caption>
                    <tbody>
                        {skipped.into_iter().map(|s| view! { <tr><td>{s.file}</td><td>{s.reason}</td></tr> }).collect_view()}
                    </tbody>
                </table>
            })}
            {move || edit_error.get().map(|e| view! { <p class="error edit-error">{e}</p> })}
            <super::dataset_versions::DatasetVersions id=dataset.id.clone() />
            <button type="button" class="secondary clear" on:click=move |_| on_clear()>"Start over with other images"</button>
        </div>
    }
}

fn state_label(s: &TrainingState) -> String {
    match s {
        TrainingState::Queued { position } => format!("queued ({position})"),
        TrainingState::Running => "training".into(),
        other => other.name().into(),
    }
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The loss history as an SVG line (raw loss, its running mean over ~10% of the points).
#[component]
fn LossChart(losses: Vec<(u64, f64)>, total: u64) -> impl IntoView {
    let (w, h) = (320.0, 110.0);
    let (lo, hi) = losses.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, l)| (lo.min(*l), hi.max(*l)));
    let span = (hi - lo).max(1e-9);
    let x = |step: u64| 4.0 + (w - 8.0) * step as f64 / total.max(1) as f64;
    let y = |l: f64| 4.0 + (h - 18.0) * (1.0 - (l - lo) / span);
    let raw: String = losses.iter().map(|(s, l)| format!("{:.1},{:.1} ", x(*s), y(*l))).collect();
    let k = (losses.len() / 10).max(1);
    let smooth: String = (0..losses.len())
        .map(|i| {
            let from = i.saturating_sub(k - 1);
            let mean = losses[from..=i].iter().map(|(_, l)| l).sum::<f64>() / (i - from + 1) as f64;
            format!("{:.1},{:.1} ", x(losses[i].0), y(mean))
        })
        .collect();
    view! {
        <svg class="loss-chart" viewBox=format!("0 0 {w} {h}") role="img" aria-label="training loss by step">
            <polyline class="raw" points=raw fill="none" />
            <polyline class="smooth" points=smooth fill="none" />
            <text x="4" y=h - 3.0>{format!("loss {lo:.3}–{hi:.3}")}</text>
            <text x=w - 4.0 y=h - 3.0 text-anchor="end">{format!("step {total}")}</text>
        </svg>
    }
}

#[component]
fn TrainingCard(
    status: Signal<Option<TrainingStatus>>,
    trainings: RwSignal<Vec<TrainingStatus>>,
    connection: RwSignal<Option<String>>,
) -> impl IntoView {
    let error = RwSignal::new(None::<String>);
    let act = Action::new_local(move |(what, id): &(&'static str, String)| {
        let (what, id) = (*what, id.clone());
        async move {
            let result = match what {
                "stop" => stop_style_training(id.clone()).await.map(Some),
                "resume" => resume_style_training(id.clone()).await.map(Some),
                _ => delete_style_training(id.clone()).await.map(|_| None),
            };
            match result {
                Ok(Some(s)) => {
                    error.set(None);
                    // The reply can arrive after the stream's last event (a stop whose
                    // checkpoint took milliseconds): while it says the training is still
                    // going, follow the stream again, which starts with the current status.
                    let follow_again = what == "resume" || s.state.is_active();
                    upsert(trainings, s);
                    if follow_again {
                        follow(&id, trainings, connection);
                    }
                }
                Ok(None) => trainings.update(|v| v.retain(|t| t.id != id)),
                Err(e) => error.set(Some(e.to_string())),
            }
        }
    });
    move || {
        let Some(t) = status.get() else { return ().into_any() };
        let id = t.id.clone();
        let fraction = if t.total > 0 { t.step as f64 / t.total as f64 } else { 0.0 };
        let mut facts = vec![format!("step {}/{}", t.step, t.total)];
        if let Some(l) = t.loss {
            facts.push(format!("loss {l:.4}"));
        }
        if let Some(r) = t.steps_per_s {
            facts.push(format!("{r:.1} steps/s"));
        }
        if let Some(e) = t.eta_s {
            facts.push(format!("{} left", duration(e)));
        }
        let r = &t.request;
        let settings = format!(
            "trigger “{}” · rank {} · lr {} · batch {}{}{} · started {}",
            r.trigger_word(),
            r.rank,
            r.lr,
            r.batch,
            if r.convs { " · LoCon" } else { "" },
            if r.text_encoder { " · text encoder" } else { "" },
            t.created_at.replace('T', " ").trim_end_matches('Z')
        );
        let sample = t.samples.last().cloned();
        let (stop_id, resume_id, delete_id) = (id.clone(), id.clone(), id.clone());
        view! {
            <li class="training" data-id=id.clone() data-name=t.request.name.clone() data-state=t.state.name()>
                <h3>{t.request.name.clone()} " " <span class=format!("badge state {}", t.state.name())>{state_label(&t.state)}</span></h3>
                <p class="details">{settings}</p>
                <div class="bar"><div class="bar-fill" style:width=format!("{:.1}%", fraction * 100.0)></div></div>
                <p class="step-counter">{facts.join(" · ")}</p>
                {t.note.clone().map(|n| view! { <p class="muted training-note">{n}</p> })}
                {match &t.state {
                    TrainingState::Failed { message } => Some(view! { <p class="error">{message.clone()}</p> }.into_any()),
                    TrainingState::Done { style } => Some(view! {
                        <p class="done">
                            "In the library as " <a class="open-style" href="/styles">{style.clone()}</a>
                            ". Use it in a prompt: " <code>{format!("<lora:{style}:0.8> {}", t.request.trigger_word())}</code>
                        </p>
                    }.into_any()),
                    _ => None,
                }}
                <div class="training-media">
                    {(t.losses.len() >= 2).then(|| view! { <LossChart losses=t.losses.clone() total=t.total /> })}
                    {if let TrainingState::Done { style } = &t.state {
                        let style = style.clone();
                        Some(view! {
                            <figure>
                                <img class="compare" src=format!("/api/styles/{style}/files/compare.png") alt="base model (top) and the style (bottom)" />
                                <figcaption>"base model (top) vs the style (bottom), same prompts and seeds"</figcaption>
                            </figure>
                        })
                    } else {
                        None
                    }}
                    {sample.map(|s| view! {
                        <figure>
                            <img class="sample" src=s.url.clone() alt=format!("samples at step {}", s.step) />
                            <figcaption>{format!("samples at step {}", s.step)}</figcaption>
                        </figure>
                    })}
                </div>
                <div class="card-actions">
                    {matches!(t.state, TrainingState::Queued { .. } | TrainingState::Preparing | TrainingState::Running).then(|| view! {
                        <button type="button" class="stop secondary" on:click=move |_| { act.dispatch(("stop", stop_id.clone())); }>"Stop"</button>
                    })}
                    {t.state.can_resume().then(|| view! {
                        <button type="button" class="resume" on:click=move |_| { act.dispatch(("resume", resume_id.clone())); }>"Resume"</button>
                    })}
                    {(!t.state.is_active()).then(|| {
                        let (label, title) = if matches!(t.state, TrainingState::Done { .. }) {
                            ("Remove from list", "the style stays in the library")
                        } else {
                            ("Discard", "forget this training and delete its checkpoints")
                        };
                        view! {
                            <button type="button" class="delete secondary" title=title on:click=move |_| { act.dispatch(("delete", delete_id.clone())); }>{label}</button>
                        }
                    })}
                </div>
                {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
            </li>
        }
        .into_any()
    }
}
