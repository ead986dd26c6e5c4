//! The Negatives page: type a prompt, read the analysis (subject, style cues, suggestions
//! ranked by what helped before, contradictions), run the optimisation with live progress
//! and cancel, then compare baseline and winner seed by seed (with a wipe slider), read the
//! per-metric changes and a chart of every candidate's score, and adopt the winner.

use leptos::prelude::*;

use crate::dto::{CandidateResult, NegativeAnalysis, OptimizeRequest, OptimizeResult, OptimizeState, OptimizeStatus, StyleSummary};
use super::encode_query;
use crate::server_fns::list_styles;
use crate::AppError;

#[component]
pub fn NegativesPage() -> impl IntoView {
    let styles = Resource::new(|| (), |_| list_styles());
    view! {
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            <ErrorBoundary fallback=crate::components::errors::error_line>
                {move || Suspend::new(async move {
                    let list = styles.await?;
                    Ok::<_, AppError>(view! { <Optimiser styles=list /> })
                })}
            </ErrorBoundary>
        </Suspense>
    }
}

/// `up` for a gain, `down` for a loss.
fn sign_class(v: f64) -> &'static str {
    if v > 0.0 {
        "up"
    } else if v < 0.0 {
        "down"
    } else {
        ""
    }
}

fn image_url(id: &str, file: &str) -> String {
    format!("/api/negatives/runs/{id}/images/{file}")
}

fn label(negative: &str) -> String {
    if negative.trim().is_empty() { "(no negative prompt)".into() } else { negative.to_string() }
}

#[component]
fn Optimiser(styles: Vec<StyleSummary>) -> impl IntoView {
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));
    let d = OptimizeRequest::default();
    let prompt = RwSignal::new("a red circle on a blue background".to_string());
    let baseline = RwSignal::new(String::new());
    let style = RwSignal::new(String::new());
    let candidates = RwSignal::new(d.candidates);
    let seeds = RwSignal::new(d.seeds);
    let holdout = RwSignal::new(d.holdout_seeds);
    let steps = RwSignal::new(d.steps);
    let own = RwSignal::new(String::new());
    let analysis = RwSignal::new(None::<NegativeAnalysis>);
    let analysis_error = RwSignal::new(None::<String>);
    let status = RwSignal::new(None::<OptimizeStatus>);
    let error = RwSignal::new(None::<String>);

    // Analyse 300 ms after the last keystroke.
    let generation = StoredValue::new(0u32);
    Effect::new(move |_| {
        let (p, n) = (prompt.get(), baseline.get());
        if !hydrated.get() {
            return;
        }
        generation.update_value(|g| *g += 1);
        let mine = generation.get_value();
        #[cfg(feature = "hydrate")]
        set_timeout(
            move || {
                if generation.get_value() != mine {
                    return;
                }
                leptos::task::spawn_local(async move {
                    let body = crate::dto::NegativeAnalysisRequest { prompt: p, negative_prompt: n };
                    match crate::browser::post_json::<_, NegativeAnalysis>("/api/negatives/analyze", &body).await {
                        Ok(a) => {
                            analysis.set(Some(a));
                            analysis_error.set(None);
                        }
                        Err(e) => analysis_error.set(Some(e)),
                    }
                });
            },
            std::time::Duration::from_millis(300),
        );
        #[cfg(not(feature = "hydrate"))]
        let _ = (p, n, mine);
    });

    let running = move || status.with(|s| s.as_ref().is_some_and(|s| !s.state.is_finished()));
    let start = move |_| {
        error.set(None);
        let request = OptimizeRequest {
            prompt: prompt.get_untracked(),
            negative_prompt: baseline.get_untracked(),
            style: Some(style.get_untracked()).filter(|s| !s.is_empty()),
            candidates: candidates.get_untracked(),
            seeds: seeds.get_untracked(),
            holdout_seeds: holdout.get_untracked(),
            steps: steps.get_untracked(),
            own: own.get_untracked().lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
            ..OptimizeRequest::default()
        };
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::post_json::<_, OptimizeStatus>("/api/negatives/optimize", &request).await {
                Ok(s) => {
                    let id = s.id.clone();
                    status.set(Some(s));
                    follow(&id, status, error);
                }
                Err(e) => error.set(Some(e)),
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = request;
    };
    let cancel = move |_| {
        let Some(id) = status.with_untracked(|s| s.as_ref().map(|s| s.id.clone())) else { return };
        crate::browser::post_in_background(format!("/api/negatives/runs/{id}/cancel"), error);
    };
    let add_own = move |negative: String| {
        own.update(|o| {
            if !o.lines().any(|l| l.trim() == negative) {
                if !o.is_empty() && !o.ends_with('\n') {
                    o.push('\n');
                }
                o.push_str(&negative);
            }
        })
    };

    let style_options: Vec<String> = styles.into_iter().map(|s| s.name).collect();
    let number = |signal: RwSignal<usize>| {
        move |ev: leptos::ev::Event| {
            if let Ok(v) = event_target_value(&ev).trim().parse() {
                signal.set(v);
            }
        }
    };

    view! {
        <section class="negatives">
            <h1>"Negative prompts"</h1>
            <p class="muted">
                "Atelier tries negative prompts on the same seeds as your current one, scores every image (sharpness, noise, contrast, exposure, colourfulness, blockiness, and style similarity when a style is on), and keeps a candidate only if it wins seed by seed and again on new seeds."
            </p>
            <div class="neg-form">
                <label>"Prompt" <textarea id="neg-prompt" rows="2" prop:value=prompt on:input=move |ev| prompt.set(event_target_value(&ev))></textarea></label>
                <label>
                    "Your negative prompt (the baseline)"
                    <input id="neg-baseline" type="text" placeholder="empty" prop:value=baseline on:input=move |ev| baseline.set(event_target_value(&ev)) />
                </label>
                <div class="row">
                    <label>
                        "Style "
                        <select id="neg-style" on:change=move |ev| style.set(event_target_value(&ev))>
                            <option value="">"none"</option>
                            {style_options.into_iter().map(|n| view! { <option value=n.clone()>{n.clone()}</option> }).collect_view()}
                        </select>
                    </label>
                    <label>"Suggestions to try " <input id="neg-candidates" type="number" min="0" max="20" prop:value=move || candidates.get().to_string() on:change=number(candidates) /></label>
                    <label>"Seeds " <input id="neg-seeds" type="number" min="1" max="16" prop:value=move || seeds.get().to_string() on:change=number(seeds) /></label>
                    <label>"New seeds to confirm " <input id="neg-holdout" type="number" min="0" max="16" prop:value=move || holdout.get().to_string() on:change=number(holdout) /></label>
                    <label>"Steps " <input id="neg-steps" type="number" min="1" max="150" prop:value=move || steps.get().to_string() on:change=number(steps) /></label>
                </div>
                <label>
                    "Your own candidates (one per line)"
                    <textarea id="neg-own" rows="2" prop:value=own on:input=move |ev| own.set(event_target_value(&ev))></textarea>
                </label>
            </div>

            <Analysis analysis analysis_error add_own />
            <KnowledgeEditor />

            <div class="row">
                <button id="neg-run" class="start" disabled=move || !hydrated.get() || running() on:click=start>"Optimise"</button>
                <Show when=running>
                    <button id="neg-cancel" class="secondary" on:click=cancel>"Cancel"</button>
                </Show>
            </div>
            {move || error.get().map(|e| view! { <p class="error neg-error">{e}</p> })}
            <RunView status />
        </section>
    }
}

/// Follows the run's progress stream.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
fn follow(id: &str, status: RwSignal<Option<OptimizeStatus>>, error: RwSignal<Option<String>>) {
    #[cfg(feature = "hydrate")]
    {
        thread_local! {
            static STREAM: std::cell::RefCell<Option<crate::browser::EventStream>> = Default::default();
        }
        let stream = crate::browser::watch(
            &format!("/api/negatives/runs/{id}/events"),
            |s: &OptimizeStatus| s.state.is_finished(),
            move |s| status.set(Some(s)),
            move || error.set(Some("lost the connection to the server; reload the page".into())),
        );
        STREAM.with(|s| *s.borrow_mut() = stream);
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = (id, status, error);
}

#[component]
fn Analysis(
    analysis: RwSignal<Option<NegativeAnalysis>>,
    analysis_error: RwSignal<Option<String>>,
    add_own: impl Fn(String) + Copy + Send + Sync + 'static,
) -> impl IntoView {
    view! {
        <section class="analysis" aria-live="polite">
            {move || analysis_error.get().map(|e| view! { <p class="error">{e}</p> })}
            {move || {
                analysis
                    .get()
                    .map(|a| {
                        let cues = |v: &Vec<String>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
                        view! {
                            <p class="cues">
                                "Subject: " <b class="subject">{cues(&a.subject)}</b> " · style cues: " <b>{cues(&a.style_cues)}</b>
                                " · categories: " {a.categories.join(", ")}
                            </p>
                            {a
                                .contradictions
                                .iter()
                                .map(|c| view! { <p class="warning contradiction" data-word=c.word.clone()>{c.message.clone()}</p> })
                                .collect_view()}
                            <ul class="suggestions">
                                {a
                                    .suggestions
                                    .iter()
                                    .take(12)
                                    .map(|s| {
                                        let n = s.negative.clone();
                                        view! {
                                            <li class="suggestion" class:from-history={s.category == "history"}>
                                                <span class="negative">{s.negative.clone()}</span>
                                                <span class="muted">" — " {s.reason.clone()}</span>
                                                <button class="secondary small" on:click=move |_| add_own(n.clone())>"add"</button>
                                            </li>
                                        }
                                    })
                                    .collect_view()}
                            </ul>
                        }
                    })
            }}
        </section>
    }
}

/// The knowledge base as JSON, loaded when opened, checked and saved by the server.
#[component]
fn KnowledgeEditor() -> impl IntoView {
    let text = RwSignal::new(String::new());
    let note = RwSignal::new(None::<(bool, String)>);
    // Loaded the first time it is opened; closing it keeps the edits.
    let load = move |_| {
        if !text.with_untracked(String::is_empty) {
            return;
        }
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::get_json::<serde_json::Value>("/api/negatives/knowledge").await {
                Ok(v) => text.set(serde_json::to_string_pretty(&v).unwrap_or_default()),
                Err(e) => note.set(Some((false, e))),
            }
        });
    };
    let save = move |_| {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(&text.get_untracked());
        match parsed {
            Err(e) => note.set(Some((false, format!("not valid JSON: {e}")))),
            Ok(v) => {
                #[cfg(feature = "hydrate")]
                leptos::task::spawn_local(async move {
                    match crate::browser::put_json::<_, serde_json::Value>("/api/negatives/knowledge", &v).await {
                        Ok(_) => note.set(Some((true, "saved; suggestions use it from now on".into()))),
                        Err(e) => note.set(Some((false, e))),
                    }
                });
                #[cfg(not(feature = "hydrate"))]
                let _ = v;
            }
        }
    };
    view! {
        <details class="knowledge" on:toggle=load>
            <summary>"Knowledge base (categories, cue words, negatives)"</summary>
            <textarea id="neg-knowledge" rows="14" prop:value=text on:input=move |ev| text.set(event_target_value(&ev))></textarea>
            <button id="neg-knowledge-save" class="secondary" on:click=save>"Save"</button>
            {move || note.get().map(|(ok, m)| view! { <p class=if ok { "muted knowledge-note" } else { "error knowledge-note" }>{m}</p> })}
        </details>
    }
}

#[component]
fn RunView(status: RwSignal<Option<OptimizeStatus>>) -> impl IntoView {
    let line = move || {
        status.get().map(|s| match &s.state {
            OptimizeState::Queued { position } => format!("queued (position {position})"),
            OptimizeState::Running => format!("{} of {} images · {}", s.done, s.total, s.phase),
            OptimizeState::Done => format!("done: {} images", s.done),
            OptimizeState::Failed { message } => format!("failed: {message}"),
            OptimizeState::Cancelled => format!("cancelled after {} images", s.done),
        })
    };
    let fraction = move || status.with(|s| s.as_ref().map_or(0.0, |s| if s.total > 0 { s.done as f64 / s.total as f64 } else { 0.0 }));
    view! {
        <Show when=move || status.with(Option::is_some)>
            <section class="progress neg-progress" aria-live="polite">
                <span class="step-counter">{line}</span>
                <div class="bar">
                    <div class="bar-fill" style:width=move || format!("{:.1}%", fraction() * 100.0)></div>
                </div>
            </section>
        </Show>
        {move || {
            status
                .get()
                .map(|s| {
                    let id = s.id.clone();
                    // Adopt the prompt the run measured, whatever the field holds now.
                    let prompt = s.request.prompt.trim().to_string();
                    match s.result.clone() {
                        Some(result) => view! { <Results id result prompt /> }.into_any(),
                        None => view! { <CandidateTable id baseline=s.partial.first().cloned() rows=s.partial.iter().skip(1).cloned().collect() winner=None /> }.into_any(),
                    }
                })
        }}
    }
}

#[component]
fn CandidateTable(id: String, baseline: Option<CandidateResult>, rows: Vec<CandidateResult>, winner: Option<usize>) -> impl IntoView {
    let _ = id;
    view! {
        <table class="candidates">
            <thead>
                <tr><th>"negative prompt"</th><th>"source"</th><th>"mean score"</th><th>"Δ vs baseline"</th><th>"seeds better"</th><th>"p"</th></tr>
            </thead>
            <tbody>
                {baseline.map(|b| view! { <tr class="baseline"><td>{label(&b.negative)}</td><td>"baseline"</td><td>{format!("{:.4}", b.mean)}</td><td></td><td></td><td></td></tr> })}
                {rows
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        view! {
                            <tr class="candidate" class:winner={Some(i) == winner}>
                                <td>{label(&c.negative)}</td>
                                <td>{c.source.clone()}</td>
                                <td>{format!("{:.4}", c.mean)}</td>
                                <td class=sign_class(c.mean_delta)>{format!("{:+.4}", c.mean_delta)}</td>
                                <td>{format!("{}/{}", c.improved, c.scores.len())}</td>
                                <td>{format!("{:.3}", c.p_value)}</td>
                            </tr>
                        }
                    })
                    .collect_view()}
            </tbody>
        </table>
    }
}

/// Horizontal bars of every candidate's mean score, the baseline as a line.
#[component]
fn ScoreChart(result: OptimizeResult) -> impl IntoView {
    let all: Vec<f64> = std::iter::once(result.baseline.mean).chain(result.candidates.iter().map(|c| c.mean)).collect();
    let lo = all.iter().cloned().fold(f64::INFINITY, f64::min) - 0.01;
    let hi = all.iter().cloned().fold(f64::NEG_INFINITY, f64::max) + 0.01;
    let (w, row) = (420.0, 18.0);
    let x = move |v: f64| 150.0 + (v - lo) / (hi - lo).max(1e-9) * (w - 160.0);
    let height = row * (result.candidates.len() as f64 + 1.0) + 10.0;
    let base_x = x(result.baseline.mean);
    view! {
        <svg class="cand-chart" viewBox=format!("0 0 {w} {height}") width=w height=height role="img" aria-label="candidate scores">
            {result
                .candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let y = row * i as f64 + 4.0;
                    let name: String = label(&c.negative).chars().take(24).collect();
                    view! {
                        <text x="0" y=y + 12.0 font-size="11">{name}</text>
                        <rect class="bar-rect" class:winner={Some(i) == result.winner} x="150" y=y width=(x(c.mean) - 150.0).max(1.0) height=row - 5.0 data-score=format!("{:.4}", c.mean)></rect>
                    }
                })
                .collect_view()}
            <line class="baseline-line" x1=base_x x2=base_x y1="0" y2=height></line>
            <text x=base_x + 3.0 y=height - 2.0 font-size="10">{format!("baseline {:.3}", result.baseline.mean)}</text>
        </svg>
    }
}

#[component]
fn Results(id: String, result: OptimizeResult, prompt: String) -> impl IntoView {
    let winner = result.winner.map(|w| result.candidates[w].clone());
    let wipe = RwSignal::new(50.0f64);
    let adopt = winner.as_ref().map(|w| format!("/?prompt={}&negative={}", encode_query(&prompt), encode_query(&w.negative)));
    let first = result.comparisons.first().cloned();
    let deltas = |m: &std::collections::BTreeMap<String, f64>| {
        m.iter().map(|(k, v)| view! { <span class=format!("delta {}", sign_class(*v))>{format!("{k} {v:+.3}")}</span> }).collect_view()
    };
    let search_deltas = winner.as_ref().map(|w| w.metric_deltas.clone()).unwrap_or_default();
    view! {
        <section class="neg-results">
            <p class="verdict" class:helped=result.helped>{result.verdict.clone()}</p>
            {adopt.map(|href| view! { <a class="adopt button" href=href>"Adopt the winner on the Generate page"</a> })}
            <h2>"Candidates"</h2>
            <ScoreChart result=result.clone() />
            <CandidateTable id=id.clone() baseline=Some(result.baseline.clone()) rows=result.candidates.clone() winner=result.winner />
            {(!search_deltas.is_empty()).then(|| view! {
                <p class="metric-deltas">"Winner vs baseline, mean per metric on the search seeds: " {deltas(&search_deltas)}</p>
            })}
            {(!result.holdout_metric_deltas.is_empty()).then(|| view! {
                <p class="metric-deltas">"… and on the new seeds: " {deltas(&result.holdout_metric_deltas)}</p>
            })}
            {first.map(|c| {
                let (b, w) = (image_url(&id, &c.baseline_image), image_url(&id, &c.winner_image));
                view! {
                    <h2>"Before / after"</h2>
                    <div class="wipe">
                        <img class="wipe-after" src=w alt="winner" />
                        <img class="wipe-before" src=b alt="baseline" style:clip-path=move || format!("inset(0 {:.1}% 0 0)", 100.0 - wipe.get()) />
                    </div>
                    <input id="neg-wipe" type="range" min="0" max="100" prop:value=move || wipe.get().to_string() on:input=move |ev| {
                        if let Ok(v) = event_target_value(&ev).parse() { wipe.set(v) }
                    } />
                    <p class="muted">"Left of the line: baseline; right: winner (seed " {c.seed} ")."</p>
                }
            })}
            <div class="pairs">
                {result
                    .comparisons
                    .iter()
                    .map(|c| {
                        view! {
                            <figure class="pair" class:held-out=c.held_out>
                                <img src=image_url(&id, &c.baseline_image) alt="baseline" />
                                <img src=image_url(&id, &c.winner_image) alt="winner" />
                                <figcaption>
                                    {format!("seed {}{} · {:.3} → {:.3} ({:+.3})", c.seed, if c.held_out { " (new)" } else { "" }, c.baseline_score, c.winner_score, c.winner_score - c.baseline_score)}
                                    <br />
                                    {deltas(&c.metric_deltas)}
                                </figcaption>
                            </figure>
                        }
                    })
                    .collect_view()}
            </div>
        </section>
    }
}
