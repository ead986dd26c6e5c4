//! The Generate page: the form, live progress of the current job, and the gallery.

use leptos::prelude::*;

use crate::components::gallery::Gallery;
use crate::components::progress::Progress;
use crate::dto::{GalleryItem, GenerateRequest, JobStatus, ModelInfo, DEFAULT_SCHEDULER, SCHEDULERS};
use crate::server_fns::{cancel_job, get_model_info, submit_generation};
use crate::AppError;

/// Loads the model's facts, then shows the form.
#[component]
pub fn GeneratePage() -> impl IntoView {
    let model = Resource::new(|| (), |_| get_model_info());
    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            <ErrorBoundary fallback=crate::components::errors::error_line>
                {move || Suspend::new(async move {
                    let info = model.await?;
                    Ok::<_, AppError>(view! { <GenerateForm info /> })
                })}
            </ErrorBoundary>
        </Suspense>
    }
}

/// Every form field, as signals, so "Reuse settings" can fill them.
#[derive(Clone, Copy)]
struct Form {
    prompt: RwSignal<String>,
    negative: RwSignal<String>,
    steps: RwSignal<usize>,
    guidance: RwSignal<f64>,
    random_seed: RwSignal<bool>,
    seed: RwSignal<u64>,
    width: RwSignal<usize>,
    height: RwSignal<usize>,
    scheduler: RwSignal<String>,
    /// The chosen input image as a `data:` URL, and its file name.
    init_image: RwSignal<Option<(String, String)>>,
    strength: RwSignal<f64>,
}

impl Form {
    fn new(info: &ModelInfo) -> Self {
        let d = GenerateRequest::default();
        Self {
            prompt: RwSignal::new(String::new()),
            negative: RwSignal::new(String::new()),
            steps: RwSignal::new(d.steps),
            guidance: RwSignal::new(d.guidance),
            random_seed: RwSignal::new(true),
            seed: RwSignal::new(0),
            width: RwSignal::new(info.default_width),
            height: RwSignal::new(info.default_height),
            scheduler: RwSignal::new(DEFAULT_SCHEDULER.to_string()),
            init_image: RwSignal::new(None),
            strength: RwSignal::new(d.strength),
        }
    }

    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.get_untracked(),
            negative_prompt: self.negative.get_untracked(),
            steps: self.steps.get_untracked(),
            guidance: self.guidance.get_untracked(),
            seed: (!self.random_seed.get_untracked()).then(|| self.seed.get_untracked()),
            scheduler: self.scheduler.get_untracked(),
            width: Some(self.width.get_untracked()),
            height: Some(self.height.get_untracked()),
            batch_size: 1,
            strength: self.strength.get_untracked(),
            init_image: self.init_image.get_untracked().map(|(_, url)| url),
        }
    }

    fn reuse(&self, item: &GalleryItem) {
        self.prompt.set(item.prompt.clone());
        self.negative.set(item.negative_prompt.clone());
        self.steps.set(item.steps);
        self.guidance.set(item.guidance);
        self.random_seed.set(false);
        self.seed.set(item.seed);
        self.width.set(item.width);
        self.height.set(item.height);
        self.scheduler.set(item.scheduler.clone());
        self.strength.set(item.strength);
    }
}

/// Parses a number input, keeping the old value while the text is not a number.
fn parse_into<T: std::str::FromStr>(signal: RwSignal<T>) -> impl Fn(leptos::ev::Event)
where
    T: Send + Sync + 'static,
{
    move |ev| {
        if let Ok(v) = event_target_value(&ev).trim().parse() {
            signal.set(v);
        }
    }
}

#[component]
fn GenerateForm(info: ModelInfo) -> impl IntoView {
    let form = Form::new(&info);
    // `?prompt=…&negative=…` (the Negatives page's "adopt" link) fills the form.
    let query = leptos_router::hooks::use_query_map();
    query.with_untracked(|q| {
        if let Some(p) = q.get("prompt") {
            form.prompt.set(p);
        }
        if let Some(n) = q.get("negative") {
            form.negative.set(n);
        }
    });
    // Set once the WASM has hydrated the page: controls stay disabled before, and the
    // browser test waits for `data-ready="true"`.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));

    let status = RwSignal::new(None::<JobStatus>);
    let error = RwSignal::new(None::<String>);
    let refresh = RwSignal::new(0u32);
    let running = move || status.with(|s| s.as_ref().is_some_and(|s| !s.state.is_finished()));
    #[cfg(feature = "hydrate")]
    let stream = StoredValue::new_local(None::<crate::browser::JobStream>);

    let submit = Action::new_local(move |request: &GenerateRequest| submit_generation(request.clone()));
    // A job was accepted: follow its progress.
    Effect::new(move |_| {
        let Some(result) = submit.value().get() else { return };
        match result {
            Ok(accepted) => {
                error.set(None);
                if form.random_seed.get_untracked() {
                    form.seed.set(accepted.seed);
                }
                status.set(Some(JobStatus {
                    job_id: accepted.job_id.clone(),
                    seed: accepted.seed,
                    state: crate::dto::JobState::Queued { position: 0 },
                    preview: None,
                }));
                #[cfg(feature = "hydrate")]
                stream.set_value(crate::browser::watch_job(
                    &accepted.job_id,
                    move |s| {
                        if s.state.is_finished() {
                            refresh.update(|n| *n += 1);
                        }
                        status.set(Some(s));
                    },
                    move || error.set(Some("lost the connection to the server".into())),
                ));
            }
            Err(e) => error.set(Some(e.to_string())),
        }
    });

    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        submit.dispatch_local(form.request());
    };
    let on_cancel = move |_| {
        if let Some(job_id) = status.with_untracked(|s| s.as_ref().map(|s| s.job_id.clone())) {
            leptos::task::spawn_local(async move {
                if let Err(e) = cancel_job(job_id).await {
                    error.set(Some(e.to_string()));
                }
            });
        }
    };
    let on_file = move |ev: leptos::ev::Event| {
        #[cfg(feature = "hydrate")]
        {
            use wasm_bindgen::JsCast;
            if let Some(input) = ev.target().and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok()) {
                crate::browser::read_file_as_data_url(&input, move |name, url| {
                    form.init_image.set(Some((name, url)))
                });
            }
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = ev;
    };
    let on_reuse = Callback::new(move |item: GalleryItem| {
        form.reuse(&item);
        #[cfg(feature = "hydrate")]
        if let Some(w) = web_sys::window() {
            w.scroll_to_with_x_and_y(0.0, 0.0);
        }
    });

    let note = info.note.clone();
    view! {
        <div class="studio" data-ready=move || hydrated.get().to_string()>
            <header>
                <h1>"Atelier"</h1>
                <p class="model">
                    "Model: " <strong>{info.name.clone()}</strong> " · hash " <code>{info.hash.clone()}</code>
                    {format!(" · native size {}×{}", info.default_width, info.default_height)}
                </p>
            </header>
            {note.map(|n| view! { <p class="note" role="note">{n}</p> })}
            <form class="generate" novalidate on:submit=on_submit>
                <label class="wide">
                    "Prompt"
                    <textarea
                        name="prompt"
                        rows="3"
                        placeholder="a red circle on a blue background"
                        prop:value=move || form.prompt.get()
                        on:input=move |ev| form.prompt.set(event_target_value(&ev))
                    ></textarea>
                </label>
                <label class="wide">
                    "Negative prompt"
                    <textarea
                        name="negative_prompt"
                        rows="2"
                        placeholder="blurry, low quality"
                        prop:value=move || form.negative.get()
                        on:input=move |ev| form.negative.set(event_target_value(&ev))
                    ></textarea>
                </label>
                <label>
                    "Steps"
                    <input type="number" name="steps" min="1" max="150" value=form.steps.get_untracked().to_string() prop:value=move || form.steps.get().to_string() on:input=parse_into(form.steps) />
                </label>
                <label>
                    "Guidance (CFG)"
                    <input type="number" name="guidance" min="0" max="30" step="0.5" value=form.guidance.get_untracked().to_string() prop:value=move || form.guidance.get().to_string() on:input=parse_into(form.guidance) />
                </label>
                <label>
                    "Scheduler"
                    <select name="scheduler" prop:value=move || form.scheduler.get() on:change=move |ev| form.scheduler.set(event_target_value(&ev))>
                        {SCHEDULERS
                            .iter()
                            .map(|(id, name)| view! { <option value=*id selected=move || form.scheduler.get() == *id>{*name}</option> })
                            .collect_view()}
                    </select>
                </label>
                <label>
                    "Width"
                    <input type="number" name="width" min="8" max="2048" step="8" value=form.width.get_untracked().to_string() prop:value=move || form.width.get().to_string() on:input=parse_into(form.width) />
                </label>
                <label>
                    "Height"
                    <input type="number" name="height" min="8" max="2048" step="8" value=form.height.get_untracked().to_string() prop:value=move || form.height.get().to_string() on:input=parse_into(form.height) />
                </label>
                <div class="seed">
                    <label>
                        "Seed"
                        <input type="number" name="seed" min="0" value=form.seed.get_untracked().to_string() prop:value=move || form.seed.get().to_string() on:input=parse_into(form.seed) prop:disabled=move || form.random_seed.get() />
                    </label>
                    <label class="check">
                        <input type="checkbox" name="random_seed" checked=form.random_seed.get_untracked() prop:checked=move || form.random_seed.get() on:change=move |ev| form.random_seed.set(event_target_checked(&ev)) />
                        "random"
                    </label>
                </div>
                <fieldset class="wide img2img">
                    <legend>"Input image (optional, img2img)"</legend>
                    <input type="file" name="init_image" accept="image/png,image/jpeg,image/webp" on:change=on_file />
                    {move || {
                        form.init_image.get().map(|(name, url)| {
                            view! {
                                <img class="thumb" src=url alt=name.clone() />
                                <span>{name}</span>
                                <button type="button" class="secondary" on:click=move |_| form.init_image.set(None)>"Remove"</button>
                            }
                        })
                    }}
                    <label>
                        {move || format!("Strength {:.2}", form.strength.get())}
                        <input type="range" name="strength" min="0" max="1" step="0.05" value=form.strength.get_untracked().to_string() prop:value=move || form.strength.get().to_string() on:input=parse_into(form.strength) prop:disabled=move || form.init_image.with(Option::is_none) />
                    </label>
                </fieldset>
                <div class="actions wide">
                    <button type="submit" class="primary" disabled=move || !hydrated.get() || submit.pending().get() || running()>
                        "Generate"
                    </button>
                    <button type="button" class="secondary" on:click=on_cancel disabled=move || !running()>
                        "Cancel"
                    </button>
                </div>
            </form>
            {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
            <Progress status=status.read_only() />
            <Gallery refresh on_reuse />
        </div>
    }
}
