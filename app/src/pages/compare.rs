//! The Experiments page's comparison views (issue 14 §4) for the runs ticked in the
//! table: their curves of one metric overlaid (hand-made SVG: smoothing, log scale, values
//! under the cursor, live growth of RUNNING runs over SSE), their params side by side with
//! the differing ones marked, a scatter of a param against a metric over every run of
//! the table, and their sample sheets (MLflow image-gallery artifacts) side by side under
//! one step slider. The maths is in [`crate::charts`].

use std::collections::{BTreeMap, BTreeSet};

use leptos::prelude::*;

use crate::charts::{self, Point, Scale};
use crate::dto::{MetricPoint, RunSummary};

/// Most points drawn per curve: longer curves are downsampled with LTTB (about one point
/// per pixel of the chart, which is 800 units wide).
pub const MAX_DRAWN: usize = 1000;

/// Width and height of the charts' SVG coordinate space (scaled to the page by CSS).
const VIEW_W: f64 = 800.0;
const VIEW_H: f64 = 340.0;
/// Plot area margins: left (y labels), right, top, bottom (x labels).
const M_LEFT: f64 = 64.0;
const M_RIGHT: f64 = 16.0;
const M_TOP: f64 = 12.0;
const M_BOTTOM: f64 = 34.0;

/// A metric's history as the page keeps it, keyed by (run id, metric key).
pub type Histories = BTreeMap<(String, String), Vec<MetricPoint>>;

/// The state the comparison views share with the page.
#[derive(Clone, Copy)]
pub struct Dashboard {
    /// The runs table (`None` while loading).
    pub runs: RwSignal<Option<Vec<RunSummary>>>,
    /// Ticked run ids, in the order they were ticked.
    pub selected: RwSignal<Vec<String>>,
    /// The metric of the curves.
    pub metric: RwSignal<Option<String>>,
    pub histories: RwSignal<Histories>,
    /// EMA weight in `[0, 0.99]`.
    pub smoothing: RwSignal<f64>,
    pub log_scale: RwSignal<bool>,
}

impl Dashboard {
    /// The ticked runs that are in the table, in ticking order.
    fn chosen_runs(&self) -> Vec<RunSummary> {
        let selected = self.selected.get();
        self.runs.with(|runs| {
            let runs = runs.as_deref().unwrap_or_default();
            selected.iter().filter_map(|id| runs.iter().find(|r| &r.info.run_id == id).cloned()).collect()
        })
    }
}

/// The metric keys of `runs`, sorted, without repeats.
pub fn metric_keys(runs: &[RunSummary]) -> Vec<String> {
    runs.iter().flat_map(|r| r.metrics.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect()
}

/// The param keys of `runs`, sorted, without repeats.
pub fn param_keys(runs: &[RunSummary]) -> Vec<String> {
    runs.iter().flat_map(|r| r.params.keys().cloned()).collect::<BTreeSet<_>>().into_iter().collect()
}

/// Loads the history of `key` for `run` into `histories` once: a plain GET for an ended
/// run, the live stream (history, then each new point) for a RUNNING one, whose end sets the
/// run's new status in `runs`.
pub fn load_history(run: &str, key: &str, running: bool, histories: RwSignal<Histories>, runs: RwSignal<Option<Vec<RunSummary>>>) {
    #[cfg(feature = "hydrate")]
    {
        use std::cell::RefCell;
        use std::collections::{HashMap, HashSet};
        thread_local! {
            static REQUESTED: RefCell<HashSet<(String, String)>> = Default::default();
            static STREAMS: RefCell<HashMap<(String, String), crate::browser::EventStream>> = Default::default();
        }
        let id = (run.to_string(), key.to_string());
        if !REQUESTED.with(|r| r.borrow_mut().insert(id.clone())) {
            return;
        }
        let path = format!("/api/runs/{}/metrics/{}", super::encode_query(run), super::encode_query(key));
        if running {
            let (add, lost) = (id.clone(), id.clone());
            let stream = crate::browser::watch(
                &format!("{path}/stream"),
                |e: &crate::dto::MetricStreamEvent| e.status != "RUNNING",
                move |e: crate::dto::MetricStreamEvent| {
                    if e.status != "RUNNING" {
                        runs.update(|list| {
                            for r in list.iter_mut().flatten().filter(|r| r.info.run_id == add.0) {
                                r.info.status = e.status.clone();
                            }
                        });
                    }
                    histories.update(|h| h.entry(add.clone()).or_default().extend(e.points));
                },
                // Lost for good: allow a later selection to ask again.
                move || {
                    REQUESTED.with(|r| r.borrow_mut().remove(&lost));
                },
            );
            if let Some(s) = stream {
                STREAMS.with(|m| m.borrow_mut().insert(id, s));
            }
        } else {
            leptos::task::spawn_local(async move {
                // A run without this metric has an empty curve (the API answers 404).
                let points = crate::browser::get_json::<Vec<MetricPoint>>(&path).await.unwrap_or_default();
                histories.update(|h| {
                    h.insert(id, points);
                });
            });
        }
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = (run, key, running, histories, runs);
}

/// One drawn curve.
#[derive(Debug, Clone, PartialEq)]
struct Curve {
    run: String,
    label: String,
    colour: &'static str,
    running: bool,
    /// Smoothed, then downsampled: what the path draws.
    points: Vec<Point>,
    /// Points in the history.
    total: usize,
}

/// Everything the curves chart draws.
#[derive(Debug, Clone, PartialEq)]
struct ChartData {
    curves: Vec<Curve>,
    x: Scale,
    y: Scale,
}

/// The curves of `key` for `runs`: each history smoothed with weight `smoothing` (over
/// every point), then downsampled to [`MAX_DRAWN`] points, on shared scales.
fn chart_data(runs: &[RunSummary], key: &str, histories: &Histories, smoothing: f64, log: bool) -> ChartData {
    let curves: Vec<Curve> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let h = histories.get(&(r.info.run_id.clone(), key.to_string()))?;
            let values: Vec<f64> = h.iter().map(|p| p.value).collect();
            let smoothed = charts::ema_smooth(&values, smoothing);
            let pts: Vec<Point> = h.iter().zip(smoothed).map(|(p, v)| (p.step as f64, v)).collect();
            Some(Curve {
                run: r.info.run_id.clone(),
                label: r.info.name.clone(),
                colour: charts::colour(i),
                running: r.info.status == "RUNNING",
                points: charts::lttb(&pts, MAX_DRAWN),
                total: h.len(),
            })
        })
        .collect();
    let (x0, x1) = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = charts::y_extent(curves.iter().map(|c| c.points.as_slice()), log).unwrap_or((0.0, 1.0));
    ChartData {
        curves,
        x: Scale::new(x0, x1, M_LEFT, VIEW_W - M_RIGHT, false),
        y: Scale::new(y0, y1, VIEW_H - M_BOTTOM, M_TOP, log),
    }
}

/// Axis lines, grid and tick labels of a chart with scales `x` and `y`; `x_labels`
/// replaces the x ticks by category names at the given positions.
fn axes(x: &Scale, y: &Scale, x_labels: Option<Vec<(f64, String)>>) -> AnyView {
    let bottom = VIEW_H - M_BOTTOM;
    let xt: Vec<(f64, String)> = x_labels.unwrap_or_else(|| x.ticks(6).into_iter().map(|v| (x.map(v), charts::format_tick(v))).collect());
    let yt: Vec<(f64, String)> = y.ticks(5).into_iter().map(|v| (y.map(v), charts::format_tick(v))).collect();
    view! {
        <g class="axes">
            {yt.into_iter().map(|(py, label)| view! {
                <line class="grid" x1=M_LEFT x2=VIEW_W - M_RIGHT y1=py y2=py />
                <text class="tick y" x=M_LEFT - 6.0 y=py + 4.0 text-anchor="end">{label}</text>
            }).collect_view()}
            {xt.into_iter().map(|(px, label)| view! {
                <line class="tick" x1=px x2=px y1=bottom y2=bottom + 5.0 />
                <text class="tick x" x=px y=bottom + 18.0 text-anchor="middle">{label}</text>
            }).collect_view()}
            <line class="axis" x1=M_LEFT x2=VIEW_W - M_RIGHT y1=bottom y2=bottom />
            <line class="axis" x1=M_LEFT x2=M_LEFT y1=M_TOP y2=bottom />
        </g>
    }
    .into_any()
}

/// The x of the pointer in `ev` in the chart's SVG units, or `None` outside the browser.
fn pointer_x(ev: &leptos::ev::MouseEvent) -> Option<f64> {
    #[cfg(feature = "hydrate")]
    {
        use wasm_bindgen::JsCast;
        let el: web_sys::Element = ev.current_target()?.dyn_into().ok()?;
        let r = el.get_bounding_client_rect();
        (r.width() > 0.0).then(|| (f64::from(ev.client_x()) - r.left()) / r.width() * VIEW_W)
    }
    #[cfg(not(feature = "hydrate"))]
    {
        let _ = ev;
        None
    }
}

/// The ticked runs' curves of one metric, with the metric picker, smoothing, log scale,
/// a legend (with each curve's CSV) and the values under the cursor.
#[component]
pub fn MetricCurves(dash: Dashboard) -> impl IntoView {
    let Dashboard { metric, histories, smoothing, log_scale, .. } = dash;
    let chosen = Memo::new(move |_| dash.chosen_runs());
    let keys = Memo::new(move |_| chosen.with(|c| metric_keys(c)));
    let data = Memo::new(move |_| {
        let key = metric.get().unwrap_or_default();
        chosen.with(|runs| histories.with(|h| chart_data(runs, &key, h, smoothing.get(), log_scale.get())))
    });
    let hover: RwSignal<Option<f64>> = RwSignal::new(None);
    let options = move || {
        let current = metric.get();
        keys.get()
            .into_iter()
            .map(|k| {
                let sel = current.as_deref() == Some(k.as_str());
                view! { <option value=k.clone() selected=sel>{k.clone()}</option> }
            })
            .collect_view()
    };
    let curves = move || {
        data.with(|d| {
            let paths = d
                .curves
                .iter()
                .map(|c| {
                    view! {
                        <path class="curve" class:live=c.running data-run=c.run.clone() data-points=c.points.len().to_string()
                            d=charts::svg_path(&c.points, &d.x, &d.y) stroke=c.colour fill="none" />
                    }
                })
                .collect_view();
            view! { {axes(&d.x, &d.y, None)} <g class="curves">{paths}</g> }.into_any()
        })
    };
    let overlay = move || {
        let px = hover.get()?;
        data.with(|d| {
            if d.curves.is_empty() || px < M_LEFT || px > VIEW_W - M_RIGHT {
                return None;
            }
            let step = d.x.invert(px);
            let rows: Vec<(String, &'static str, f64, f64)> = d
                .curves
                .iter()
                .filter_map(|c| charts::nearest(&c.points, step).map(|i| (c.label.clone(), c.colour, c.points[i].0, c.points[i].1)))
                .collect();
            let at = rows.first().map_or(step, |r| r.2);
            let lx = d.x.map(at);
            let (bw, bh) = (200.0, 18.0 + 15.0 * rows.len() as f64);
            let bx = if lx + 12.0 + bw > VIEW_W { lx - 12.0 - bw } else { lx + 12.0 };
            let dots = rows
                .iter()
                .map(|(_, colour, x, y)| view! { <circle cx=d.x.map(*x) cy=d.y.map(*y) r="3" fill=*colour /> })
                .collect_view();
            let texts = rows
                .iter()
                .enumerate()
                .map(|(i, (label, colour, _, y))| {
                    view! { <text x=bx + 8.0 y=M_TOP + 30.0 + 15.0 * i as f64 fill=*colour>{format!("{label}: {}", format_value(*y))}</text> }
                })
                .collect_view();
            Some(
                view! {
                    <g class="hover">
                        <line class="cursor" x1=lx x2=lx y1=M_TOP y2=VIEW_H - M_BOTTOM />
                        {dots}
                        <rect x=bx y=M_TOP + 2.0 width=bw height=bh rx="3" />
                        <text class="hover-step" x=bx + 8.0 y=M_TOP + 15.0>{format!("step {at}")}</text>
                        {texts}
                    </g>
                }
                .into_any(),
            )
        })
    };
    let legend = move || {
        let key = metric.get().unwrap_or_default();
        data.with(|d| {
            d.curves
                .iter()
                .map(|c| {
                    let csv = format!("/api/runs/{}/metrics/{}.csv", super::encode_query(&c.run), super::encode_query(&key));
                    let drawn = if c.points.len() < c.total { format!("{} points, {} drawn", c.total, c.points.len()) } else { format!("{} points", c.total) };
                    view! {
                        <li data-run=c.run.clone()>
                            <span class="swatch" style=format!("background:{}", c.colour)></span>
                            {c.label.clone()}
                            {c.running.then_some(view! { <span class="live-badge">" live"</span> })}
                            <span class="muted">{format!(" ({drawn}) ")}</span>
                            <a class="csv-metric" href=csv download="">"CSV"</a>
                        </li>
                    }
                })
                .collect_view()
        })
    };
    view! {
        <div class="metric-curves">
            <div class="chart-controls">
                <label>"metric " <select id="metric-pick" on:change=move |ev| metric.set(Some(event_target_value(&ev)))>{options}</select></label>
                <label>"smoothing "
                    <input id="smoothing" type="range" min="0" max="0.99" step="0.01" prop:value=move || smoothing.get().to_string()
                        on:input=move |ev| smoothing.set(event_target_value(&ev).parse::<f64>().unwrap_or(0.0).clamp(0.0, 0.99)) />
                    <span class="smoothing-value">{move || format!("{:.2}", smoothing.get())}</span>
                </label>
                <label><input id="log-scale" type="checkbox" prop:checked=move || log_scale.get() on:change=move |ev| log_scale.set(event_target_checked(&ev)) /> "log scale"</label>
            </div>
            <svg class="metric-chart" viewBox=format!("0 0 {VIEW_W} {VIEW_H}") role="img" aria-label="metric by step for the chosen runs"
                on:mousemove=move |ev| hover.set(pointer_x(&ev)) on:mouseleave=move |_| hover.set(None)>
                {curves}
                {overlay}
            </svg>
            <ul class="legend">{legend}</ul>
        </div>
    }
    .into_any()
}

/// A metric value, short: 4 significant digits.
fn format_value(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{}", (v * 1e4).round() / 1e4)
    }
}

/// The ticked runs' params side by side: a row per param (every param of any of them), a
/// column per run; rows whose values are not all equal (a missing value counts) have class
/// `differs`.
#[component]
pub fn ParamsDiff(runs: Vec<RunSummary>) -> impl IntoView {
    let keys = param_keys(&runs);
    let head = runs.iter().map(|r| view! { <th data-run=r.info.run_id.clone()>{r.info.name.clone()}</th> }).collect_view();
    let rows = keys
        .into_iter()
        .map(|k| {
            let values: Vec<Option<String>> = runs.iter().map(|r| r.params.get(&k).cloned()).collect();
            let differs = values.windows(2).any(|w| w[0] != w[1]);
            let cells = values.into_iter().map(|v| view! { <td>{v.unwrap_or_else(|| "—".into())}</td> }).collect_view();
            view! { <tr class:differs=differs data-param=k.clone()><th>{k.clone()}</th>{cells}</tr> }
        })
        .collect_view();
    view! {
        <table class="params-diff">
            <thead><tr><th>"param"</th>{head}</tr></thead>
            <tbody>{rows}</tbody>
        </table>
    }
}

/// Where each run's param value goes on the x axis: numbers on a linear scale when every
/// value is a number, else categories (sorted) spread evenly. Returns the position per run
/// (`None` when it has no value) and the category labels (`None` when numeric).
fn x_positions(values: &[Option<String>]) -> (Vec<Option<f64>>, Option<Vec<String>>) {
    let present: Vec<&String> = values.iter().flatten().collect();
    if !present.is_empty() && present.iter().all(|v| v.trim().parse::<f64>().is_ok_and(f64::is_finite)) {
        return (values.iter().map(|v| v.as_ref().and_then(|s| s.trim().parse().ok())).collect(), None);
    }
    let cats: Vec<String> = present.into_iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
    let pos = values.iter().map(|v| v.as_ref().and_then(|s| cats.iter().position(|c| c == s)).map(|i| i as f64)).collect();
    (pos, Some(cats))
}

/// A param (x) against a metric's latest value (y), a dot per run of the table; ticked
/// runs are drawn larger.
#[component]
pub fn Scatter(dash: Dashboard) -> impl IntoView {
    let param: RwSignal<Option<String>> = RwSignal::new(None);
    let metric: RwSignal<Option<String>> = RwSignal::new(None);
    let all = move || dash.runs.get().unwrap_or_default();
    let pick = move |current: Option<String>, keys: Vec<String>, prefer: Option<String>| -> Option<String> {
        current.filter(|c| keys.contains(c)).or(prefer.filter(|p| keys.contains(p))).or_else(|| keys.first().cloned())
    };
    let chosen_param = Memo::new(move |_| pick(param.get(), param_keys(&all()), None));
    let chosen_metric = Memo::new(move |_| pick(metric.get(), metric_keys(&all()), dash.metric.get()));
    let select = move |id: &'static str, keys: Vec<String>, current: Option<String>, target: RwSignal<Option<String>>| {
        let opts = keys
            .into_iter()
            .map(|k| {
                let sel = current.as_deref() == Some(k.as_str());
                view! { <option value=k.clone() selected=sel>{k.clone()}</option> }
            })
            .collect_view();
        view! { <select id=id on:change=move |ev| target.set(Some(event_target_value(&ev)))>{opts}</select> }.into_any()
    };
    let chart = move || {
        let runs = all();
        let (Some(p), Some(m)) = (chosen_param.get(), chosen_metric.get()) else {
            return view! { <p class="muted">"The scatter needs runs with a param and a metric."</p> }.into_any();
        };
        let selected = dash.selected.get();
        let values: Vec<Option<String>> = runs.iter().map(|r| r.params.get(&p).cloned()).collect();
        let (xs, cats) = x_positions(&values);
        let ys: Vec<Option<f64>> = runs.iter().map(|r| r.metrics.get(&m).copied().filter(|v| v.is_finite())).collect();
        let (x0, x1) = xs.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(*x), b.max(*x)));
        let (y0, y1) = ys.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(*y), b.max(*y)));
        let x = match &cats {
            // Categories sit in the middle of equal bands.
            Some(c) => Scale::new(-0.5, c.len() as f64 - 0.5, M_LEFT, VIEW_W - M_RIGHT, false),
            None => Scale::new(x0, x1, M_LEFT + 10.0, VIEW_W - M_RIGHT - 10.0, false),
        };
        let y = Scale::new(y0, y1, VIEW_H - M_BOTTOM - 8.0, M_TOP + 8.0, false);
        let labels = cats.map(|c| c.into_iter().enumerate().map(|(i, name)| (x.map(i as f64), name)).collect());
        let dots = runs
            .iter()
            .zip(xs.iter().zip(&ys))
            .filter_map(|(r, (xv, yv))| Some((r, (*xv)?, (*yv)?)))
            .map(|(r, xv, yv)| {
                let is_sel = selected.contains(&r.info.run_id);
                let tip = format!("{}: {p} = {}, {m} = {}", r.info.name, r.params.get(&p).cloned().unwrap_or_default(), format_value(yv));
                view! {
                    <circle class="dot" class:selected=is_sel data-run=r.info.run_id.clone() cx=x.map(xv) cy=y.map(yv) r=if is_sel { "6" } else { "4" }>
                        <title>{tip}</title>
                    </circle>
                }
            })
            .collect_view();
        view! {
            <svg class="scatter" viewBox=format!("0 0 {VIEW_W} {VIEW_H}") role="img" aria-label=format!("{m} against {p} for every run")>
                {axes(&x, &y, labels)}
                <g class="dots">{dots}</g>
            </svg>
        }
        .into_any()
    };
    view! {
        <div class="scatter-view">
            <h2>"Param against metric, every run"</h2>
            <div class="chart-controls">
                <label>"param " {move || select("scatter-param", param_keys(&all()), chosen_param.get(), param)}</label>
                <label>"metric " {move || select("scatter-metric", metric_keys(&all()), chosen_metric.get(), metric)}</label>
            </div>
            {chart}
        </div>
    }
    .into_any()
}

/// The URL of artifact `path` (relative, `/`-separated) of run `run`:
/// `GET /api/runs/{id}/artifacts/{path}`, each folder name percent-encoded.
pub fn artifact_url(run: &str, path: &str) -> String {
    let parts: Vec<String> = path.split('/').map(super::encode_query).collect();
    format!("/api/runs/{}/artifacts/{}", super::encode_query(run), parts.join("/"))
}

/// The gallery key the sheets show: `samples` (what style trainings log) when some run has
/// it, else the first key any run has.
fn sheet_key(artifacts: &BTreeMap<String, Vec<String>>) -> Option<String> {
    let keys: BTreeSet<String> = artifacts.values().flatten().filter_map(|a| charts::parse_gallery_name(a)).map(|g| g.key).collect();
    if keys.contains("samples") {
        Some("samples".into())
    } else {
        keys.into_iter().next()
    }
}

/// The ticked runs' sample sheets side by side (one labelled image per run that logged
/// any), under a slider over every step any of them logged a sheet at; each run shows its
/// sheet at the highest step ≤ the slider's (see [`charts::image_at`]). The artifact lists
/// come from `GET /api/runs/{id}`, once per run.
#[component]
pub fn SampleSheets(dash: Dashboard) -> impl IntoView {
    let chosen = Memo::new(move |_| dash.chosen_runs());
    // Run id → its artifact paths (fetched once per run).
    let artifacts: RwSignal<BTreeMap<String, Vec<String>>> = RwSignal::new(BTreeMap::new());
    // The slider's value, a step; `None` follows the last step.
    let at: RwSignal<Option<i64>> = RwSignal::new(None);
    Effect::new(move |_| {
        for r in chosen.get() {
            let id = r.info.run_id.clone();
            if artifacts.with_untracked(|a| a.contains_key(&id)) {
                continue;
            }
            artifacts.update(|a| {
                a.insert(id.clone(), Vec::new());
            });
            #[cfg(feature = "hydrate")]
            leptos::task::spawn_local(async move {
                #[derive(serde::Deserialize)]
                struct Listed {
                    artifacts: Vec<String>,
                }
                let url = format!("/api/runs/{}", super::encode_query(&id));
                if let Ok(l) = crate::browser::get_json::<Listed>(&url).await {
                    artifacts.update(|a| {
                        a.insert(id, l.artifacts);
                    });
                }
            });
        }
    });
    // (run id, label, its sheets by step) for the ticked runs with sheets, in ticking order.
    let sheets = Memo::new(move |_| {
        artifacts.with(|a| {
            let Some(key) = sheet_key(a) else { return Vec::new() };
            chosen
                .get()
                .into_iter()
                .filter_map(|r| {
                    let g = charts::gallery(a.get(&r.info.run_id)?, &key);
                    (!g.is_empty()).then(|| (r.info.run_id.clone(), r.info.name.clone(), g))
                })
                .collect::<Vec<_>>()
        })
    });
    let steps = Memo::new(move |_| sheets.with(|s| charts::union_steps(s.iter().map(|(_, _, g)| g.as_slice()))));
    // The slider's step: the chosen one when it is a stop, else the last.
    let current = move || {
        let stops = steps.get();
        at.get().filter(|s| stops.contains(s)).or_else(|| stops.last().copied())
    };
    move || {
        let stops = steps.get();
        if stops.is_empty() {
            return None;
        }
        let step = current().unwrap_or_default();
        let index = stops.iter().position(|s| *s == step).unwrap_or(stops.len() - 1);
        let max = stops.len() - 1;
        let images = sheets.with(|list| {
            list.iter()
                .map(|(run, label, g)| match charts::image_at(g, step) {
                    Some(img) => view! {
                        <figure class="sheet">
                            <img data-run=run.clone() data-step=img.step.to_string() src=artifact_url(run, &img.path)
                                alt=format!("{label}: samples at step {}", img.step) />
                            <figcaption>{format!("{label} (step {})", img.step)}</figcaption>
                        </figure>
                    }
                    .into_any(),
                    None => view! {
                        <figure class="sheet empty" data-run=run.clone()>
                            <figcaption>{format!("{label}: no sheet by step {step}")}</figcaption>
                        </figure>
                    }
                    .into_any(),
                })
                .collect_view()
        });
        Some(
            view! {
                <div class="sample-sheets" data-step=step.to_string()>
                    <h2>"Sample sheets"</h2>
                    <label>"step "
                        <input id="sheet-step" type="range" min="0" max=max.to_string() step="1" prop:value=index.to_string()
                            on:input=move |ev| {
                                let i = event_target_value(&ev).parse::<usize>().unwrap_or(0);
                                at.set(steps.with_untracked(|s| s.get(i).copied()));
                            } />
                        <span class="sheet-step-value">{step.to_string()}</span>
                    </label>
                    <div class="sheet-row">{images}</div>
                </div>
            }
            .into_any(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_and_numbers_on_the_scatter_axis() {
        let v = |s: &[Option<&str>]| s.iter().map(|o| o.map(String::from)).collect::<Vec<_>>();
        assert_eq!(x_positions(&v(&[Some("8"), None, Some("4")])), (vec![Some(8.0), None, Some(4.0)], None));
        let (pos, cats) = x_positions(&v(&[Some("sgd"), Some("adamw"), Some("sgd"), Some("16")]));
        assert_eq!(cats, Some(vec!["16".to_string(), "adamw".into(), "sgd".into()]));
        assert_eq!(pos, vec![Some(2.0), Some(1.0), Some(2.0), Some(0.0)]);
    }

    #[test]
    fn curves_are_smoothed_then_downsampled() {
        let run = |id: &str| RunSummary {
            info: crate::dto::RunInfo { run_id: id.into(), experiment_id: 1, name: id.into(), status: "FINISHED".into(), start_time: 0, end_time: None, artifact_uri: String::new() },
            params: Default::default(),
            tags: Default::default(),
            metrics: Default::default(),
        };
        let mut h = Histories::new();
        h.insert(("a".into(), "loss".into()), (1..=3000).map(|s| MetricPoint { value: 1.0 / s as f64, timestamp: 0, step: s }).collect());
        h.insert(("b".into(), "loss".into()), vec![MetricPoint { value: 2.0, timestamp: 0, step: 1 }, MetricPoint { value: 4.0, timestamp: 0, step: 2 }]);
        let d = chart_data(&[run("a"), run("b"), run("c")], "loss", &h, 0.5, false);
        assert_eq!(d.curves.len(), 2, "a run without the metric draws nothing");
        assert_eq!((d.curves[0].points.len(), d.curves[0].total), (MAX_DRAWN, 3000));
        assert_eq!(d.curves[1].points, vec![(1.0, 2.0), (2.0, 2.5 / 0.75)], "EMA 0.5 of 2, 4");
        assert_eq!((d.x.d0, d.x.d1), (1.0, 3000.0));
        assert_eq!(d.y.d1, 2.5 / 0.75, "the smoothed maximum");
    }

    #[test]
    fn sheets_use_samples_first_and_urls_encode_each_part() {
        let mut a = BTreeMap::new();
        a.insert("r1".to_string(), vec!["images/aaa+step+1+timestamp+1+u.png".to_string(), "card.json".into()]);
        assert_eq!(sheet_key(&a), Some("aaa".into()));
        a.insert("r2".to_string(), vec!["images/samples+step+5+timestamp+1+u.png".to_string()]);
        assert_eq!(sheet_key(&a), Some("samples".into()));
        assert_eq!(sheet_key(&BTreeMap::new()), None);
        assert_eq!(artifact_url("ab12", "images/samples+step+5+timestamp+1+u.png"), "/api/runs/ab12/artifacts/images/samples%2Bstep%2B5%2Btimestamp%2B1%2Bu.png");
    }
}
