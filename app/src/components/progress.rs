//! Live progress of the current job: state line, progress bar and intermediate preview.

use leptos::prelude::*;

use crate::dto::{JobState, JobStatus};

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
                {move || {
                    status
                        .get()
                        .and_then(|s| s.preview)
                        .map(|src| view! { <img class="preview" src=src alt="intermediate preview" /> })
                }}
            </section>
        </Show>
    }
}
