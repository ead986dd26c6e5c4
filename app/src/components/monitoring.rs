//! A deployment's quality monitoring on the Deployments page: where its reference stands
//! (being measured, with progress), a chart of the latest scored served images against the
//! reference band, the rule's latest figures, and its alerts. A firing alert shows the
//! retraining suggestion (why, what it would train on, the worst-scoring served images) and
//! a "Start this training" button that posts the suggested request to
//! `POST /api/style-trainings`. Polls `GET /api/deployments/{name}/monitoring` every 3 s.

use leptos::prelude::*;

use crate::dto::monitoring::{Alert, ReferenceState, Sample, Watch};

#[component]
pub fn DeploymentMonitoring(name: String) -> impl IntoView {
    let watch: RwSignal<Option<Watch>> = RwSignal::new(None);
    let url = format!("/api/deployments/{}/monitoring", crate::pages::encode_query(&name));
    let fetch = {
        let url = url.clone();
        move || {
            let url = url.clone();
            #[cfg(feature = "hydrate")]
            leptos::task::spawn_local(async move {
                if let Ok(w) = crate::browser::get_json::<Watch>(&url).await {
                    watch.set(Some(w));
                }
            });
            #[cfg(not(feature = "hydrate"))]
            let _ = url;
        }
    };
    Effect::new(move |_| {
        let fetch = fetch.clone();
        fetch();
        if let Ok(handle) = set_interval_with_handle(fetch, std::time::Duration::from_secs(3)) {
            on_cleanup(move || handle.clear());
        }
    });
    move || {
        watch.get().map(|w| {
            let firing = w.firing().cloned();
            let is_firing = firing.is_some().to_string();
            let reference = match &w.reference {
                ReferenceState::Missing => "Monitoring is off: no reference measured.".to_string(),
                ReferenceState::Measuring { done, total } => format!("Measuring the reference: {done} of {total} images…"),
                ReferenceState::Failed { message } => format!("Measuring the reference failed: {message}"),
                ReferenceState::Ready(r) => format!(
                    "Reference: {} images of {}; {} of {} served images scored ({:.0} % sampled).",
                    r.samples.len(),
                    r.version,
                    w.scored,
                    w.served,
                    w.rule.sample_fraction * 100.0
                ),
            };
            let measuring = match &w.reference {
                ReferenceState::Measuring { done, total } => Some(view! { <progress class="reference-progress" max=total.to_string() value=done.to_string()></progress> }),
                _ => None,
            };
            let checks = w
                .last_checks
                .iter()
                .map(|c| view! { <li class=if c.drifted { "check drifted" } else { "check" } data-measure=c.measure.clone()>{c.describe()}</li> })
                .collect_view();
            let chart = match &w.reference {
                ReferenceState::Ready(r) => Some(chart(&r.samples, &w.window.iter().cloned().collect::<Vec<_>>())),
                _ => None,
            };
            let past = w.alerts.iter().filter(|a| !a.is_firing()).take(5).map(|a| view! { <li class="resolved-alert">{past_line(a)}</li> }).collect_view();
            view! {
                <div class="monitoring" data-firing=is_firing>
                    <p class="reference-state">{reference}</p>
                    {measuring}
                    {chart}
                    <ul class="checks">{checks}</ul>
                    {firing.map(|a| view! { <FiringAlert alert=a /> })}
                    <ul class="past-alerts">{past}</ul>
                </div>
            }
            .into_any()
        })
    }
}

fn past_line(a: &Alert) -> String {
    format!("Resolved: {}", a.summary)
}

/// The style (top) and quality (bottom) scores of the window's images as dots over the
/// reference's mean ± one standard deviation (shaded band), oldest image on the left.
fn chart(reference: &[Sample], window: &[Sample]) -> impl IntoView {
    const W: f64 = 320.0;
    const H: f64 = 60.0;
    let rows: [(&str, fn(&Sample) -> Option<f64>); 2] = [("style", |s| s.style), ("quality", |s| Some(s.quality))];
    let n = window.len().max(1) as f64;
    let panels = rows
        .iter()
        .enumerate()
        .filter_map(|(row, (label, get))| {
            let r: Vec<f64> = reference.iter().filter_map(get).collect();
            if r.is_empty() {
                return None;
            }
            let mean = r.iter().sum::<f64>() / r.len() as f64;
            let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (r.len().max(2) - 1) as f64).sqrt();
            let values: Vec<f64> = window.iter().filter_map(get).collect();
            let lo = values.iter().copied().chain([mean - 2.0 * sd]).fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().chain([mean + 2.0 * sd]).fold(f64::NEG_INFINITY, f64::max);
            let span = (hi - lo).max(1e-6);
            let y0 = row as f64 * (H + 16.0) + 12.0;
            let y = move |v: f64| y0 + H - (v - lo) / span * H;
            let dots = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let cx = 10.0 + (i as f64 + 0.5) / n * (W - 20.0);
                    let low = *v < mean - 2.0 * sd;
                    view! { <circle cx=format!("{cx:.1}") cy=format!("{:.1}", y(*v)) r="4" class=if low { "dot low" } else { "dot" }><title>{format!("{label} {v:.3}")}</title></circle> }
                })
                .collect_view();
            Some(view! {
                <g class=format!("panel {label}")>
                    <text x="0" y=format!("{:.1}", y0 - 2.0) class="panel-label">{format!("{label} (reference {mean:.3} ± {sd:.3})")}</text>
                    <rect x="0" y=format!("{:.1}", y(mean + sd)) width=W.to_string() height=format!("{:.1}", (y(mean - sd) - y(mean + sd)).max(1.0)) class="band" />
                    <line x1="0" x2=W.to_string() y1=format!("{:.1}", y(mean)) y2=format!("{:.1}", y(mean)) class="mean" />
                    {dots}
                </g>
            })
        })
        .collect_view();
    view! {
        <svg class="drift-chart" viewBox=format!("0 0 {W} {}", 2.0 * (H + 16.0) + 4.0) role="img" aria-label="scores of the latest served images against the reference">
            {panels}
        </svg>
    }
}

#[component]
fn FiringAlert(alert: Alert) -> impl IntoView {
    let started: RwSignal<Option<String>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let suggestion = alert.suggestion.clone();
    let request = suggestion.as_ref().and_then(|s| s.training.clone());
    let start = move |_| {
        let Some(req) = request.clone() else { return };
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::post_json::<_, crate::dto::TrainingStatus>("/api/style-trainings", &req).await {
                Ok(s) => {
                    error.set(None);
                    started.set(Some(s.id));
                }
                Err(e) => error.set(Some(e)),
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = req;
    };
    let details = suggestion.map(|s| {
        let changes = s.dataset.as_ref().map(|d| d.changes.iter().map(|c| view! { <li>{c.clone()}</li> }).collect_view());
        let worst = s
            .worst_images
            .iter()
            .map(|id| view! { <a href=format!("/api/images/{id}.png") target="_blank"><img class="worst" src=format!("/api/images/{id}.png") alt="a served image that scored low" /></a> })
            .collect_view();
        let can_start = s.training.is_some();
        view! {
            <div class="suggestion">
                <p class="headline">{s.headline.clone()}</p>
                <p class="why">{format!("Why: {}", s.why)}</p>
                <ul class="changes">{changes}</ul>
                <div class="worst-images">{worst}</div>
                {s.command.clone().map(|c| view! { <p>"From the command line: " <code>{c}</code></p> })}
                {can_start.then(|| view! { <button type="button" class="start-retraining" on:click=start>"Start this training"</button> })}
            </div>
        }
    });
    view! {
        <div class="drift-alert" role="alert">
            <p class="summary">{alert.summary.clone()}</p>
            {details}
            {move || started.get().map(|id| view! { <p class="started">"Training started: " <a href="/train">{id}</a></p> })}
            {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
        </div>
    }
}
