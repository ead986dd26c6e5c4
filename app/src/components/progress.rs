//! Live progress of the current job: state line, progress bar, the intermediate preview while
//! it runs and the finished image(s) once it is done.

use leptos::prelude::*;

use crate::dto::{image_url, JobState, JobStatus};

/// Shows `status` (nothing before the first job).
#[component]
pub fn Progress(status: ReadSignal<Option<JobStatus>>) -> impl IntoView {
    let line = move || {
        status.get().map(|s| match s.state {
            // Position 0: submitted, the first progress event has not arrived yet.
            JobState::Queued { position: 0 } => "queued".to_string(),
            JobState::Queued { position } => format!("queued (position {position})"),
            JobState::Running { step, total } => format!("step {step}/{total}"),
            JobState::Done { image_ids, .. } => {
                format!("done: {} image{}", image_ids.len(), if image_ids.len() == 1 { "" } else { "s" })
            }
            JobState::Failed { message } => format!("failed: {message}"),
            JobState::Cancelled => "cancelled".into(),
        })
    };
    let fraction = move || match status.get().map(|s| s.state) {
        Some(JobState::Running { step, total }) if total > 0 => step as f64 / total as f64,
        Some(JobState::Done { .. }) => 1.0,
        _ => 0.0,
    };
    let warnings = move || match status.get().map(|s| s.state) {
        Some(JobState::Done { warnings, .. }) => warnings,
        _ => vec![],
    };
    view! {
        <Show when=move || status.with(Option::is_some)>
            <section class="progress" aria-live="polite">
                <div class="progress-line">
                    <span class="step-counter">{line}</span>
                    <span class="seed-used">
                        {move || status.get().map(|s| format!("seed {}", s.seed))}
                    </span>
                </div>
                <div class="bar">
                    <div class="bar-fill" style:width=move || format!("{:.1}%", fraction() * 100.0)></div>
                </div>
                <For each=warnings key=|w| w.clone() let:w>
                    <p class="warning">{w}</p>
                </For>
                {move || status.get().map(|s| panel_image(s.state, s.preview))}
            </section>
        </Show>
    }
}

/// What the panel shows under the bar: the latest intermediate only while the job runs (the
/// status keeps its last preview after the job ends, and a finished, failed or cancelled job must
/// not go on showing a blurry latent), then the finished images themselves.
fn panel_image(state: JobState, preview: Option<String>) -> Option<AnyView> {
    match state {
        JobState::Running { .. } => preview.map(|src| view! { <img class="preview" src=src alt="intermediate preview" /> }.into_any()),
        JobState::Done { image_ids, .. } if !image_ids.is_empty() => Some(
            view! {
                <div class="results">
                    {image_ids
                        .into_iter()
                        .map(|id| {
                            let (href, src) = (image_url(&id), image_url(&id));
                            view! { <a href=href target="_blank"><img class="result" src=src alt="the finished image" /></a> }
                        })
                        .collect_view()}
                </div>
            }
            .into_any(),
        ),
        _ => None,
    }
}
