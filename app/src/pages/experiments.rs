//! The Experiments page: every tracked run (style trainings, negative-prompt runs, …) by
//! experiment, in a table with a column per param and per metric (its latest value),
//! narrowed by MLflow's filter language (`metrics.similarity_gain > 0.05 and
//! params.rank = '8'`); a filter the server cannot read is shown with the character where
//! it fails. Data comes from `GET /api/experiments…` once the page is live.

use std::collections::BTreeSet;

use leptos::prelude::*;

use crate::dto::{ExperimentInfo, RunSummary};

#[component]
pub fn ExperimentsPage() -> impl IntoView {
    let experiments: RwSignal<Vec<ExperimentInfo>> = RwSignal::new(Vec::new());
    let chosen: RwSignal<Option<String>> = RwSignal::new(None);
    let filter = RwSignal::new(String::new());
    let applied = RwSignal::new(String::new());
    let runs: RwSignal<Option<Vec<RunSummary>>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let ready = RwSignal::new(false);

    // Once live (effects run in the browser only): the experiments, the first with runs chosen.
    Effect::new(move |_| {
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::get_json::<Vec<ExperimentInfo>>("/api/experiments").await {
                Ok(list) => {
                    let first = list.iter().find(|e| e.runs > 0).or(list.first()).map(|e| e.name.clone());
                    experiments.set(list);
                    chosen.set(first);
                }
                Err(e) => error.set(Some(e)),
            }
            ready.set(true);
        });
    });
    // The runs of the chosen experiment under the applied filter.
    Effect::new(move |_| {
        let (Some(name), text) = (chosen.get(), applied.get()) else { return };
        let url = format!("/api/experiments/{}/runs?filter={}", super::encode_query(&name), super::encode_query(&text));
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::get_json::<Vec<RunSummary>>(&url).await {
                Ok(list) => {
                    error.set(None);
                    runs.set(Some(list));
                }
                Err(e) => error.set(Some(e)),
            }
        });
        #[cfg(not(feature = "hydrate"))]
        let _ = url;
    });

    view! {
        <section class="experiments" data-ready=move || ready.get().to_string()>
            <h1>"Experiments"</h1>
            <p class="muted">"Every style training and negative-prompt run is tracked here, with its settings (params) and measurements (metrics)."</p>
            <crate::components::sync_status::SyncStatus />
            <div class="exp-list">
                <For each=move || experiments.get() key=|e| e.experiment_id let:e>
                    {
                        let name = e.name.clone();
                        let is_chosen = { let name = name.clone(); move || chosen.get().as_deref() == Some(name.as_str()) };
                        view! {
                            <button type="button" class:chosen=is_chosen data-experiment=name.clone()
                                on:click=move |_| { runs.set(None); chosen.set(Some(name.clone())); }>
                                {format!("{} ({})", e.name, e.runs)}
                            </button>
                        }
                    }
                </For>
                {move || (ready.get() && experiments.with(Vec::is_empty)).then(|| view! {
                    <span class="muted">"No runs yet: train a style or optimise a negative prompt."</span>
                }.into_any())}
            </div>
            <form class="run-filter" on:submit=move |ev| { ev.prevent_default(); applied.set(filter.get_untracked()); }>
                <input id="run-filter" type="text" placeholder="metrics.similarity_gain > 0.05 and params.rank = '8'"
                    prop:value=filter on:input=move |ev| filter.set(event_target_value(&ev)) />
                <button type="submit">"Filter"</button>
            </form>
            {move || error.get().map(|e| view! { <p class="error filter-error">{e}</p> }.into_any())}
            {move || runs.get().map(|list| view! { <RunsTable runs=list /> }.into_any())}
        </section>
    }
}

/// The runs, a row each: name, status, start, then every param and every metric.
#[component]
fn RunsTable(runs: Vec<RunSummary>) -> impl IntoView {
    let params: Vec<String> = runs.iter().flat_map(|r| r.params.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect();
    let metrics: Vec<String> = runs.iter().flat_map(|r| r.metrics.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect();
    let count = format!("{} run{}", runs.len(), if runs.len() == 1 { "" } else { "s" });
    let header = params.iter().map(|p| view! { <th class="param">{p.clone()}</th> }).collect_view();
    let header_m = metrics.iter().map(|m| view! { <th class="metric">{m.clone()}</th> }).collect_view();
    let rows = runs
        .into_iter()
        .map(|r| {
            let cells = params.iter().map(|p| view! { <td>{r.params.get(p).cloned().unwrap_or_default()}</td> }).collect_view();
            let cells_m = metrics.iter().map(|m| view! { <td class="num">{r.metrics.get(m).map(|v| format!("{v:.4}")).unwrap_or_default()}</td> }).collect_view();
            let started = format_time(r.info.start_time);
            view! {
                <tr data-run=r.info.run_id.clone()>
                    <td>{r.info.name.clone()}</td>
                    <td class=format!("status {}", r.info.status.to_lowercase())>{r.info.status.clone()}</td>
                    <td>{started}</td>
                    {cells}
                    {cells_m}
                </tr>
            }
        })
        .collect_view();
    view! {
        <p class="run-count">{count}</p>
        <div class="table-scroll">
            <table class="runs">
                <thead><tr><th>"run"</th><th>"status"</th><th>"started (UTC)"</th>{header}{header_m}</tr></thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) of a time in ms since the epoch.
fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", rest / 3600, rest % 3600 / 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00");
        assert_eq!(super::format_time(1_764_519_300_000), "2025-11-30 16:15");
        assert_eq!(super::format_time(951_782_400_000), "2000-02-29 00:00");
    }
}
