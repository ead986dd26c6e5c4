//! The Experiments page: every tracked run (style trainings, negative-prompt runs, …) by
//! experiment, in a table with a column per param and per metric (its latest value),
//! narrowed by MLflow's filter language (`metrics.similarity_gain > 0.05 and
//! params.rank = '8'`); a filter the server cannot read is shown with the character where
//! it fails. Columns sort by a click on their header (numbers numerically). Ticked runs are
//! compared ([`super::compare`]): overlaid metric curves, a params diff, and a scatter of a
//! param against a metric over the table. The address holds the experiment, the filter,
//! the ticked runs and the metric (`/experiments?experiment=styles&runs=ID1,ID2&metric=loss`),
//! so a link reopens the same comparison. Data comes from `GET /api/experiments…` once the
//! page is live.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use leptos::prelude::*;

use super::compare::{self, Dashboard, Histories, MetricCurves, ParamsDiff, SampleSheets, Scatter};
use crate::dto::{ExperimentInfo, RunSummary};

/// What the page's address holds (its query string).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UrlState {
    pub experiment: Option<String>,
    pub filter: String,
    /// Ticked run ids, in ticking order.
    pub runs: Vec<String>,
    pub metric: Option<String>,
}

impl UrlState {
    /// Reads a query string (`?experiment=…&filter=…&runs=A,B&metric=…`, the `?` optional);
    /// unknown keys are ignored.
    pub fn parse(search: &str) -> Self {
        let mut out = UrlState::default();
        for pair in search.trim_start_matches('?').split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode_query(v);
            match decode_query(k).as_str() {
                "experiment" => out.experiment = Some(v).filter(|v| !v.is_empty()),
                "filter" => out.filter = v,
                "runs" => out.runs = v.split(',').map(str::trim).filter(|r| !r.is_empty()).map(String::from).collect(),
                "metric" => out.metric = Some(v).filter(|v| !v.is_empty()),
                _ => {}
            }
        }
        out
    }

    /// The page's address for this state: `/experiments?…`, empty parts left out.
    pub fn to_url(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.experiment {
            parts.push(format!("experiment={}", super::encode_query(e)));
        }
        if !self.filter.is_empty() {
            parts.push(format!("filter={}", super::encode_query(&self.filter)));
        }
        if !self.runs.is_empty() {
            parts.push(format!("runs={}", self.runs.iter().map(|r| super::encode_query(r)).collect::<Vec<_>>().join(",")));
        }
        if let Some(m) = &self.metric {
            parts.push(format!("metric={}", super::encode_query(m)));
        }
        if parts.is_empty() {
            "/experiments".into()
        } else {
            format!("/experiments?{}", parts.join("&"))
        }
    }
}

/// Decodes a query value: `+` is a space, `%XX` a byte (invalid UTF-8 replaced).
fn decode_query(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The text of column `col` of a run: `name`, `status`, `started` (ms, for sorting), or
/// `params.KEY` / `metrics.KEY`; `None` when the run has no value there.
pub fn cell(r: &RunSummary, col: &str) -> Option<String> {
    match col {
        "name" => Some(r.info.name.clone()),
        "status" => Some(r.info.status.clone()),
        "started" => Some(r.info.start_time.to_string()),
        c => {
            if let Some(k) = c.strip_prefix("params.") {
                r.params.get(k).cloned()
            } else if let Some(k) = c.strip_prefix("metrics.") {
                r.metrics.get(k).map(|v| v.to_string())
            } else {
                None
            }
        }
    }
}

/// Orders two cells: numerically when both are numbers, else as text (numbers first).
pub fn compare_values(a: &str, b: &str) -> Ordering {
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        _ => a.cmp(b),
    }
}

/// Sorts `runs` by column `col` (see [`cell`]), descending when `desc`; runs without a
/// value go last either way, ties keep their order.
pub fn sort_runs(runs: &mut [RunSummary], col: &str, desc: bool) {
    runs.sort_by(|a, b| match (cell(a, col), cell(b, col)) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => {
            let o = compare_values(&x, &y);
            if desc {
                o.reverse()
            } else {
                o
            }
        }
    });
}

/// The page's address, without reloading: `history.replaceState`.
fn replace_url(url: &str) {
    #[cfg(feature = "hydrate")]
    if let Some(h) = web_sys::window().and_then(|w| w.history().ok()) {
        let _ = h.replace_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(url));
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = url;
}

/// The query string the page was opened with (empty outside the browser).
fn opened_with() -> String {
    #[cfg(feature = "hydrate")]
    return web_sys::window().and_then(|w| w.location().search().ok()).unwrap_or_default();
    #[cfg(not(feature = "hydrate"))]
    String::new()
}

#[component]
pub fn ExperimentsPage() -> impl IntoView {
    let experiments: RwSignal<Vec<ExperimentInfo>> = RwSignal::new(Vec::new());
    let chosen: RwSignal<Option<String>> = RwSignal::new(None);
    let filter = RwSignal::new(String::new());
    let applied = RwSignal::new(String::new());
    let runs: RwSignal<Option<Vec<RunSummary>>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    let ready = RwSignal::new(false);
    let sort: RwSignal<Option<(String, bool)>> = RwSignal::new(None);
    let dash = Dashboard {
        runs,
        selected: RwSignal::new(Vec::new()),
        metric: RwSignal::new(None),
        histories: RwSignal::new(Histories::new()),
        smoothing: RwSignal::new(0.0),
        log_scale: RwSignal::new(false),
    };

    // Once live (effects run in the browser only): the state in the address, then the
    // experiments, the one named there (else the first with runs) chosen.
    Effect::new(move |_| {
        let opened = UrlState::parse(&opened_with());
        filter.set(opened.filter.clone());
        applied.set(opened.filter.clone());
        dash.selected.set(opened.runs.clone());
        dash.metric.set(opened.metric.clone());
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            match crate::browser::get_json::<Vec<ExperimentInfo>>("/api/experiments").await {
                Ok(list) => {
                    let named = opened.experiment.filter(|n| list.iter().any(|e| &e.name == n || e.experiment_id.to_string() == *n));
                    let first = named.or_else(|| list.iter().find(|e| e.runs > 0).or(list.first()).map(|e| e.name.clone()));
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
    // The metric of the curves: kept while some ticked run has it, else the first one's.
    Effect::new(move |_| {
        let selected = dash.selected.get();
        let keys = runs.with(|r| compare::metric_keys(&r.as_deref().unwrap_or_default().iter().filter(|r| selected.contains(&r.info.run_id)).cloned().collect::<Vec<_>>()));
        let current = dash.metric.get_untracked();
        if !keys.is_empty() && !current.as_ref().is_some_and(|c| keys.contains(c)) {
            let prefer = ["loss"].iter().map(|s| s.to_string()).find(|k| keys.contains(k));
            dash.metric.set(prefer.or_else(|| keys.first().cloned()));
        }
    });
    // The histories the curves need: fetched once, followed live for RUNNING runs.
    Effect::new(move |_| {
        let Some(key) = dash.metric.get() else { return };
        let selected = dash.selected.get();
        runs.with(|r| {
            for run in r.as_deref().unwrap_or_default().iter().filter(|r| selected.contains(&r.info.run_id)) {
                compare::load_history(&run.info.run_id, &key, run.info.status == "RUNNING", dash.histories, runs);
            }
        });
    });
    // The address follows the state.
    Effect::new(move |_| {
        let state = UrlState { experiment: chosen.get(), filter: applied.get(), runs: dash.selected.get(), metric: dash.metric.get() };
        if ready.get() {
            replace_url(&state.to_url());
        }
    });

    let csv_url = move || {
        let name = chosen.get().unwrap_or_default();
        format!("/api/experiments/{}/runs.csv?filter={}", super::encode_query(&name), super::encode_query(&applied.get()))
    };
    let table = move || {
        runs.get().map(|mut list| {
            if let Some((col, desc)) = sort.get() {
                sort_runs(&mut list, &col, desc);
            }
            view! { <RunsTable runs=list selected=dash.selected sort=sort /> }.into_any()
        })
    };
    let comparison = move || {
        let chosen_runs: Vec<RunSummary> = {
            let selected = dash.selected.get();
            runs.with(|r| selected.iter().filter_map(|id| r.as_deref().unwrap_or_default().iter().find(|x| &x.info.run_id == id).cloned()).collect())
        };
        if chosen_runs.is_empty() {
            return view! { <p class="muted compare-hint">"Tick runs in the table to compare their curves and params."</p> }.into_any();
        }
        view! {
            <h2>"Ticked runs"</h2>
            <ParamsDiff runs=chosen_runs />
        }
        .into_any()
    };

    view! {
        <section class="experiments" data-ready=move || ready.get().to_string()>
            <h1>"Experiments"</h1>
            <p class="muted">"Every style training and negative-prompt run is tracked here, with its settings (params) and measurements (metrics). "
                <a href="#overview" class="to-overview">"Overview across experiments ↓"</a></p>
            <crate::components::sync_status::SyncStatus />
            <div class="exp-list">
                <For each=move || experiments.get() key=|e| e.experiment_id let:e>
                    {
                        let name = e.name.clone();
                        let is_chosen = { let name = name.clone(); move || chosen.get().as_deref() == Some(name.as_str()) };
                        view! {
                            <button type="button" class:chosen=is_chosen data-experiment=name.clone()
                                on:click=move |_| {
                                    if chosen.get_untracked().as_deref() != Some(name.as_str()) {
                                        runs.set(None);
                                        dash.selected.set(Vec::new());
                                        sort.set(None);
                                        chosen.set(Some(name.clone()));
                                    }
                                }>
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
            {move || chosen.get().is_some().then(|| view! { <a class="csv-runs" href=csv_url download="">"Download the table (CSV)"</a> }.into_any())}
            {table}
            <div class="compare">
                {comparison}
                // Kept (with its hover and memos) while runs are ticked, not rebuilt per tick.
                <Show when=move || !dash.selected.with(Vec::is_empty)>
                    {view! { <MetricCurves dash=dash /> }.into_any()}
                    {view! { <SampleSheets dash=dash /> }.into_any()}
                </Show>
            </div>
            <Show when=move || runs.with(|r| r.as_ref().is_some_and(|r| !r.is_empty()))>
                {view! { <Scatter dash=dash /> }.into_any()}
            </Show>
            {view! { <super::overview::Overview /> }.into_any()}
        </section>
    }
}

/// The runs, a row each: a tick box, name, status, start, then every param and every
/// metric. A click on a header sorts by that column (again: the other way).
#[component]
fn RunsTable(runs: Vec<RunSummary>, selected: RwSignal<Vec<String>>, sort: RwSignal<Option<(String, bool)>>) -> impl IntoView {
    let params: Vec<String> = runs.iter().flat_map(|r| r.params.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect();
    let metrics: Vec<String> = runs.iter().flat_map(|r| r.metrics.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect();
    let count = format!("{} run{}", runs.len(), if runs.len() == 1 { "" } else { "s" });
    let current = sort.get_untracked();
    let th = move |col: String, label: String, class: &'static str| {
        let arrow = match &current {
            Some((c, desc)) if *c == col => if *desc { " ▼" } else { " ▲" },
            _ => "",
        };
        let c = col.clone();
        view! {
            <th class=format!("{class} sortable") data-col=col.clone()
                on:click=move |_| sort.update(|s| *s = Some((c.clone(), matches!(s, Some((x, false)) if *x == c))))>
                {label}{arrow}
            </th>
        }
    };
    let header = [("name", "run"), ("status", "status"), ("started", "started (UTC)")]
        .into_iter()
        .map(|(c, l)| th(c.to_string(), l.to_string(), "attr"))
        .chain(params.iter().map(|p| th(format!("params.{p}"), p.clone(), "param")))
        .chain(metrics.iter().map(|m| th(format!("metrics.{m}"), m.clone(), "metric")))
        .collect_view();
    let rows = runs
        .into_iter()
        .map(|r| {
            let cells = params.iter().map(|p| view! { <td>{r.params.get(p).cloned().unwrap_or_default()}</td> }).collect_view();
            let cells_m = metrics.iter().map(|m| view! { <td class="num">{r.metrics.get(m).map(|v| format!("{v:.4}")).unwrap_or_default()}</td> }).collect_view();
            let started = format_time(r.info.start_time);
            let id = r.info.run_id.clone();
            let (checked_id, toggle_id) = (id.clone(), id.clone());
            view! {
                <tr data-run=id>
                    <td class="pick"><input type="checkbox" class="pick-run" data-run=id.clone() aria-label=format!("compare {}", r.info.name)
                        prop:checked=move || selected.with(|s| s.contains(&checked_id))
                        on:change=move |ev| {
                            let on = event_target_checked(&ev);
                            selected.update(|s| {
                                s.retain(|x| *x != toggle_id);
                                if on {
                                    s.push(toggle_id.clone());
                                }
                            });
                        } /></td>
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
                <thead><tr><th class="pick"></th>{header}</tr></thead>
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
    use super::*;

    #[test]
    fn the_address_round_trips() {
        let s = UrlState { experiment: Some("styles".into()), filter: "params.rank = '8'".into(), runs: vec!["ab12".into(), "cd34".into()], metric: Some("train/loss".into()) };
        let url = s.to_url();
        assert_eq!(url, "/experiments?experiment=styles&filter=params.rank%20%3D%20%278%27&runs=ab12,cd34&metric=train%2Floss");
        assert_eq!(UrlState::parse(url.split_once('?').unwrap().1), s);
        assert_eq!(UrlState::parse("?runs=a,,b&filter=a+b%zz&x=1"), UrlState { runs: vec!["a".into(), "b".into()], filter: "a b%zz".into(), ..Default::default() });
        assert_eq!(UrlState::default().to_url(), "/experiments");
        assert_eq!(decode_query("%C3%A9t%C3%A9%2"), "été%2");
    }

    #[test]
    fn columns_sort_numbers_numerically_and_missing_last() {
        let run = |name: &str, rank: Option<&str>| RunSummary {
            info: crate::dto::RunInfo { run_id: name.into(), experiment_id: 1, name: name.into(), status: "FINISHED".into(), start_time: 0, end_time: None, artifact_uri: String::new() },
            params: rank.map(|r| [("rank".to_string(), r.to_string())].into_iter().collect()).unwrap_or_default(),
            tags: Default::default(),
            metrics: Default::default(),
        };
        let mut runs = vec![run("a", Some("16")), run("b", None), run("c", Some("4")), run("d", Some("8")), run("e", Some("x"))];
        sort_runs(&mut runs, "params.rank", false);
        assert_eq!(runs.iter().map(|r| r.info.name.as_str()).collect::<String>(), "cdaeb");
        sort_runs(&mut runs, "params.rank", true);
        assert_eq!(runs.iter().map(|r| r.info.name.as_str()).collect::<String>(), "eadcb");
        assert_eq!(compare_values("10", "9"), Ordering::Greater, "not as text");
        assert_eq!(compare_values("1e-3", "0.01"), Ordering::Less);
    }

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_764_519_300_000), "2025-11-30 16:15");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00");
    }
}
