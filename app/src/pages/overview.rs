//! The Experiments page's overview across experiments (issue 14 §4): every style
//! training's similarity gain and its base → style sharpness and colourfulness, every
//! negative-prompt optimisation's held-out gain, and the benchmark's timings over commits
//! (a line per case and attention against bench invocations ordered by start time, each
//! labelled with its short `atelier.commit`). Data: `GET /api/experiments/{name}/runs` for
//! `styles`, `negative-prompts` and `bench`; the shaping below is pure and unit-tested,
//! the drawing uses [`crate::charts`].

use std::collections::BTreeMap;

use leptos::prelude::*;

use crate::charts::{self, Point, Scale};
use crate::dto::RunSummary;

/// Chart coordinate space (scaled by CSS) and plot margins: left, right, top, bottom.
const VIEW_W: f64 = 800.0;
const VIEW_H: f64 = 240.0;
const M_LEFT: f64 = 64.0;
const M_RIGHT: f64 = 16.0;
const M_TOP: f64 = 14.0;
const M_BOTTOM: f64 = 46.0;

/// One style training as the overview shows it (latest values of its metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct StyleRow {
    pub run_id: String,
    pub name: String,
    /// `similarity_gain`: style-prompt similarity with the style minus without.
    pub gain: f64,
    /// `base_sharpness` → `style_sharpness`, when both were measured.
    pub sharpness: Option<(f64, f64)>,
    /// `base_colourfulness` → `style_colourfulness`, when both were measured.
    pub colourfulness: Option<(f64, f64)>,
}

/// The style runs that measured `similarity_gain`, oldest first.
pub fn style_rows(runs: &[RunSummary]) -> Vec<StyleRow> {
    let mut runs: Vec<&RunSummary> = runs.iter().filter(|r| r.metrics.get("similarity_gain").is_some_and(|v| v.is_finite())).collect();
    runs.sort_by_key(|r| r.info.start_time);
    let pair = |r: &RunSummary, a: &str, b: &str| Some((*r.metrics.get(a)?, *r.metrics.get(b)?));
    runs.into_iter()
        .map(|r| StyleRow {
            run_id: r.info.run_id.clone(),
            name: r.info.name.clone(),
            gain: r.metrics["similarity_gain"],
            sharpness: pair(r, "base_sharpness", "style_sharpness"),
            colourfulness: pair(r, "base_colourfulness", "style_colourfulness"),
        })
        .collect()
}

/// (run id, name, `holdout_mean_delta`) of the negative-prompt runs that logged it, oldest
/// first: how much the optimised negative prompt raised the held-out score.
pub fn negative_rows(runs: &[RunSummary]) -> Vec<(String, String, f64)> {
    let mut runs: Vec<&RunSummary> = runs.iter().filter(|r| r.metrics.get("holdout_mean_delta").is_some_and(|v| v.is_finite())).collect();
    runs.sort_by_key(|r| r.info.start_time);
    runs.into_iter().map(|r| (r.info.run_id.clone(), r.info.name.clone(), r.metrics["holdout_mean_delta"])).collect()
}

/// One bench invocation (a parent run, or a lone run): where it sits on the x axis.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    /// The parent run's id (`mlflow.parentRunId`), or the run's own.
    pub group: String,
    /// The short (7 characters) `atelier.commit` tag, `?` when untagged.
    pub commit: String,
    /// Earliest start among its runs, ms since the epoch.
    pub start_time: i64,
}

/// The timings of one bench case with one attention over the invocations.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSeries {
    /// `CASE ATTENTION` (e.g. `starter-unet naive`).
    pub label: String,
    /// `seconds_per_step` or `seconds_per_image`.
    pub metric: String,
    /// (index into the invocations, seconds), by index.
    pub points: Vec<(usize, f64)>,
}

/// Groups bench child runs (params `case` and `attention`, metric `seconds_per_step` or
/// `seconds_per_image`) by invocation, ordered by start time, and into a series per case,
/// attention and metric (sorted by label). Runs without those (the parents) only place
/// their children.
pub fn bench_series(runs: &[RunSummary]) -> (Vec<BenchRun>, Vec<BenchSeries>) {
    let mut invocations: BTreeMap<String, BenchRun> = BTreeMap::new();
    let mut measured: Vec<(String, String, String, f64)> = Vec::new();
    for r in runs {
        let (Some(case), Some(attention)) = (r.params.get("case"), r.params.get("attention")) else { continue };
        let Some((metric, v)) = ["seconds_per_step", "seconds_per_image"].iter().find_map(|k| r.metrics.get(*k).filter(|v| v.is_finite()).map(|v| (k.to_string(), *v))) else { continue };
        let group = r.tags.get("mlflow.parentRunId").cloned().unwrap_or_else(|| r.info.run_id.clone());
        let commit = r.tags.get("atelier.commit").map(|c| c.chars().take(7).collect()).unwrap_or_else(|| "?".to_string());
        let entry = invocations.entry(group.clone()).or_insert(BenchRun { group: group.clone(), commit, start_time: r.info.start_time });
        entry.start_time = entry.start_time.min(r.info.start_time);
        measured.push((group, format!("{case} {attention}"), metric, v));
    }
    let mut order: Vec<BenchRun> = invocations.into_values().collect();
    order.sort_by(|a, b| a.start_time.cmp(&b.start_time).then_with(|| a.group.cmp(&b.group)));
    let mut series: BTreeMap<(String, String), Vec<(usize, f64)>> = BTreeMap::new();
    for (group, label, metric, v) in measured {
        if let Some(i) = order.iter().position(|b| b.group == group) {
            series.entry((label, metric)).or_default().push((i, v));
        }
    }
    let series = series
        .into_iter()
        .map(|((label, metric), mut points)| {
            points.sort_by_key(|p| p.0);
            BenchSeries { label, metric, points }
        })
        .collect();
    (order, series)
}

/// A value, short: 3 significant digits.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) {
        format!("{v:.2e}")
    } else {
        format!("{}", (v * 1000.0).round() / 1000.0)
    }
}

/// Horizontal grid and y tick labels of `y` over the plot area.
fn y_axis(y: &Scale) -> AnyView {
    let bottom = VIEW_H - M_BOTTOM;
    let ticks = y
        .ticks(4)
        .into_iter()
        .map(|v| {
            let py = y.map(v);
            view! {
                <line class="grid" x1=M_LEFT x2=VIEW_W - M_RIGHT y1=py y2=py />
                <text class="tick y" x=M_LEFT - 6.0 y=py + 4.0 text-anchor="end">{charts::format_tick(v)}</text>
            }
        })
        .collect_view();
    view! {
        {ticks}
        <line class="axis" x1=M_LEFT x2=VIEW_W - M_RIGHT y1=bottom y2=bottom />
        <line class="axis" x1=M_LEFT x2=M_LEFT y1=M_TOP y2=bottom />
    }
    .into_any()
}

/// A category label under the plot, cut to 14 characters (the full name is in a title).
fn x_label(px: f64, text: &str) -> AnyView {
    let cut: String = if text.chars().count() > 14 { text.chars().take(13).chain(['…']).collect() } else { text.to_string() };
    view! { <text class="tick x" x=px y=VIEW_H - M_BOTTOM + 16.0 text-anchor="middle"><title>{text.to_string()}</title>{cut}</text> }.into_any()
}

/// A bar per item (`(run id, name, value)`) from 0, labelled with its value; `class`
/// names the chart for styling and tests (`svg.CLASS rect.gain-bar[data-name][data-value]`).
fn bar_chart(class: &'static str, label: &'static str, items: &[(String, String, f64)]) -> AnyView {
    let lo = items.iter().map(|i| i.2).fold(0.0f64, f64::min);
    let hi = items.iter().map(|i| i.2).fold(0.0f64, f64::max);
    // A tenth of the range above (and below) for the value labels.
    let pad = (hi - lo) * 0.1;
    let y = Scale::new(if lo < 0.0 { lo - pad } else { lo }, hi + pad, VIEW_H - M_BOTTOM, M_TOP, false);
    let (x0, x1) = (M_LEFT, VIEW_W - M_RIGHT);
    let width = ((x1 - x0) / items.len().max(1) as f64 * 0.6).min(60.0);
    let bars = items
        .iter()
        .enumerate()
        .map(|(i, (run, name, v))| {
            let cx = charts::band_centre(i, items.len(), x0, x1);
            let (top, bottom) = (y.map(v.max(0.0)), y.map(v.min(0.0)));
            let negative = *v < 0.0;
            let height = (bottom - top).max(0.5);
            view! {
                <rect class="gain-bar" class:negative=negative data-run=run.clone() data-name=name.clone() data-value=v.to_string()
                    x=cx - width / 2.0 y=top width=width height=height fill=charts::colour(0)>
                    <title>{format!("{name}: {label} {}", short(*v))}</title>
                </rect>
                <text class="value" x=cx y=top - 3.0 text-anchor="middle">{short(*v)}</text>
                {x_label(cx, name)}
            }
        })
        .collect_view();
    view! {
        <svg class=format!("overview-chart {class}") viewBox=format!("0 0 {VIEW_W} {VIEW_H}") role="img" aria-label=label>
            {y_axis(&y)}
            <line class="axis zero" x1=M_LEFT x2=VIEW_W - M_RIGHT y1=y.map(0.0) y2=y.map(0.0) />
            {bars}
        </svg>
    }
    .into_any()
}

/// Base → style of one quality measure per style run: a grey dot (base), an arrow to a
/// coloured dot (with the style). `svg.CLASS g.change[data-name][data-base][data-style]`.
fn change_chart(class: &'static str, label: &'static str, items: &[(String, String, f64, f64)]) -> AnyView {
    let (lo, hi) = items.iter().flat_map(|i| [i.2, i.3]).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let y = Scale::new(lo, hi, VIEW_H - M_BOTTOM, M_TOP, false);
    let marks = items
        .iter()
        .enumerate()
        .map(|(i, (run, name, base, style))| {
            let cx = charts::band_centre(i, items.len(), M_LEFT, VIEW_W - M_RIGHT);
            view! {
                <g class="change" data-run=run.clone() data-name=name.clone() data-base=base.to_string() data-style=style.to_string()>
                    <title>{format!("{name}: {label} {} → {}", short(*base), short(*style))}</title>
                    <line x1=cx x2=cx y1=y.map(*base) y2=y.map(*style) stroke="#999" />
                    <circle class="base" cx=cx cy=y.map(*base) r="4" fill="#bbb" />
                    <circle class="style" cx=cx cy=y.map(*style) r="5" fill=charts::colour(1) />
                </g>
                {x_label(cx, name)}
            }
        })
        .collect_view();
    view! {
        <svg class=format!("overview-chart {class}") viewBox=format!("0 0 {VIEW_W} {VIEW_H}") role="img" aria-label=label>
            {y_axis(&y)}
            {marks}
        </svg>
    }
    .into_any()
}

/// The bench lines: x = invocation (labelled with its short commit), y = seconds (log
/// scale when the timings span more than a factor of 20). `path.bench-line[data-series]
/// [data-points]`, a `circle[data-commit][data-value]` per point.
fn bench_chart(order: &[BenchRun], series: &[BenchSeries]) -> AnyView {
    let curves: Vec<Vec<Point>> = series.iter().map(|s| s.points.iter().map(|&(i, v)| (i as f64, v)).collect()).collect();
    let (lo, hi) = charts::y_extent(curves.iter().map(|c| c.as_slice()), false).unwrap_or((0.0, 1.0));
    let log = lo > 0.0 && hi / lo > 20.0;
    let x = Scale::new(-0.5, order.len() as f64 - 0.5, M_LEFT, VIEW_W - M_RIGHT, false);
    let y = Scale::new(if log { lo } else { 0.0f64.min(lo) }, hi, VIEW_H - M_BOTTOM, M_TOP, log);
    let labels = order.iter().enumerate().map(|(i, b)| x_label(x.map(i as f64), &b.commit)).collect_view();
    let lines = series
        .iter()
        .zip(&curves)
        .enumerate()
        .map(|(k, (s, c))| {
            let colour = charts::colour(k);
            let dots = s
                .points
                .iter()
                .map(|&(i, v)| {
                    view! {
                        <circle cx=x.map(i as f64) cy=y.map(v) r="3.5" fill=colour data-commit=order[i].commit.clone() data-value=v.to_string()>
                            <title>{format!("{} at {}: {} {}", s.label, order[i].commit, short(v), s.metric)}</title>
                        </circle>
                    }
                })
                .collect_view();
            view! {
                <g class="bench-series" data-series=s.label.clone() data-metric=s.metric.clone()>
                    <path class="bench-line" data-series=s.label.clone() data-points=s.points.len().to_string() d=charts::svg_path(c, &x, &y) stroke=colour fill="none" />
                    {dots}
                </g>
            }
        })
        .collect_view();
    let legend = series
        .iter()
        .enumerate()
        .map(|(k, s)| view! { <li><span class="swatch" style=format!("background:{}", charts::colour(k))></span>{format!("{} ({})", s.label, s.metric)}</li> })
        .collect_view();
    view! {
        <svg class="overview-chart bench-chart" viewBox=format!("0 0 {VIEW_W} {VIEW_H}") role="img" aria-label="bench seconds by commit">
            {y_axis(&y)}
            {labels}
            <g class="lines">{lines}</g>
        </svg>
        <ul class="legend">{legend}</ul>
    }
    .into_any()
}

/// The overview's runs: styles, negative prompts, bench (`None` while loading).
type Loaded = Option<(Vec<RunSummary>, Vec<RunSummary>, Vec<RunSummary>)>;

/// The overview section: loads the three experiments' runs once live, and again on
/// "Refresh" (an experiment that does not exist yet counts as empty), and draws them,
/// with a hint for each empty one.
#[component]
pub fn Overview() -> impl IntoView {
    let data: RwSignal<Loaded> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);
    // Bumped by the refresh button: the effect below loads again.
    let reload = RwSignal::new(0u32);
    Effect::new(move |_| {
        reload.track();
        #[cfg(feature = "hydrate")]
        leptos::task::spawn_local(async move {
            let list = match crate::browser::get_json::<Vec<crate::dto::ExperimentInfo>>("/api/experiments").await {
                Ok(l) => l,
                Err(e) => return error.set(Some(e)),
            };
            let mut out: [Vec<RunSummary>; 3] = Default::default();
            for (slot, name) in out.iter_mut().zip(["styles", "negative-prompts", "bench"]) {
                if !list.iter().any(|e| e.name == name) {
                    continue;
                }
                match crate::browser::get_json::<Vec<RunSummary>>(&format!("/api/experiments/{name}/runs")).await {
                    Ok(runs) => *slot = runs,
                    Err(e) => return error.set(Some(format!("{name}: {e}"))),
                }
            }
            let [s, n, b] = out;
            data.set(Some((s, n, b)));
        });
    });
    let body = move || {
        if let Some(e) = error.get() {
            return view! { <p class="error">{e}</p> }.into_any();
        }
        let Some((styles, negatives, bench)) = data.get() else {
            return view! { <p class="muted">"Loading…"</p> }.into_any();
        };
        let rows = style_rows(&styles);
        let styles_view = if rows.is_empty() {
            view! { <p class="muted hint">"No style trainings yet: train one on the Train page."</p> }.into_any()
        } else {
            let gains: Vec<(String, String, f64)> = rows.iter().map(|r| (r.run_id.clone(), r.name.clone(), r.gain)).collect();
            let sharp: Vec<(String, String, f64, f64)> = rows.iter().filter_map(|r| r.sharpness.map(|(a, b)| (r.run_id.clone(), r.name.clone(), a, b))).collect();
            let colour: Vec<(String, String, f64, f64)> = rows.iter().filter_map(|r| r.colourfulness.map(|(a, b)| (r.run_id.clone(), r.name.clone(), a, b))).collect();
            view! {
                <h4>"Similarity gain"</h4>
                {bar_chart("style-gains", "similarity gain per style", &gains)}
                {(!sharp.is_empty()).then(|| view! { <h4>"Sharpness, base → style"</h4> {change_chart("style-sharpness", "sharpness", &sharp)} })}
                {(!colour.is_empty()).then(|| view! { <h4>"Colourfulness, base → style"</h4> {change_chart("style-colourfulness", "colourfulness", &colour)} })}
            }
            .into_any()
        };
        let neg = negative_rows(&negatives);
        let neg_view = if neg.is_empty() {
            view! { <p class="muted hint">"No negative-prompt runs yet: optimise one on the Negatives page."</p> }.into_any()
        } else {
            bar_chart("negative-gains", "held-out gain per negative-prompt run", &neg)
        };
        let (order, series) = bench_series(&bench);
        let bench_view = if series.is_empty() {
            view! { <p class="muted hint">"No bench runs yet: run " <code>"atelier bench"</code> "."</p> }.into_any()
        } else {
            bench_chart(&order, &series)
        };
        view! {
            <div class="overview-part styles-part"><h3>"Styles"</h3>{styles_view}</div>
            <div class="overview-part negatives-part"><h3>"Negative prompts: held-out gain"</h3>{neg_view}</div>
            <div class="overview-part bench-part"><h3>"Bench over commits (seconds)"</h3>{bench_view}</div>
        }
        .into_any()
    };
    view! {
        <section class="overview" id="overview" data-ready=move || data.with(Option::is_some).to_string()>
            <h2>"Overview across experiments "
                <button type="button" class="overview-refresh" on:click=move |_| reload.update(|n| *n += 1)>"Refresh"</button>
            </h2>
            {body}
        </section>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, start: i64, params: &[(&str, &str)], tags: &[(&str, &str)], metrics: &[(&str, f64)]) -> RunSummary {
        RunSummary {
            info: crate::dto::RunInfo { run_id: id.into(), experiment_id: 1, name: format!("n-{id}"), status: "FINISHED".into(), start_time: start, end_time: None, artifact_uri: String::new() },
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn style_and_negative_rows_keep_measured_runs_oldest_first() {
        let runs = [
            run("b", 20, &[], &[], &[("similarity_gain", 0.3), ("base_sharpness", 1.0), ("style_sharpness", 0.5)]),
            run("a", 10, &[], &[], &[("similarity_gain", -0.1), ("base_colourfulness", 20.0), ("style_colourfulness", 35.0)]),
            run("c", 5, &[], &[], &[("loss", 0.2)]),
        ];
        let rows = style_rows(&runs);
        assert_eq!(rows.iter().map(|r| (r.run_id.as_str(), r.gain)).collect::<Vec<_>>(), vec![("a", -0.1), ("b", 0.3)]);
        assert_eq!((rows[0].sharpness, rows[0].colourfulness), (None, Some((20.0, 35.0))));
        assert_eq!((rows[1].sharpness, rows[1].colourfulness), (Some((1.0, 0.5)), None));
        let negs = [run("x", 2, &[], &[], &[("holdout_mean_delta", 0.04)]), run("y", 1, &[], &[], &[("baseline_mean_score", 1.0)])];
        assert_eq!(negative_rows(&negs), vec![("x".to_string(), "n-x".to_string(), 0.04)]);
    }

    #[test]
    fn bench_children_group_by_invocation_and_series() {
        let child = |id: &str, parent: &str, start: i64, commit: &str, case: &str, att: &str, m: &str, v: f64| {
            run(id, start, &[("case", case), ("attention", att)], &[("mlflow.parentRunId", parent), ("atelier.commit", commit)], &[(m, v), ("peak_rss_mib", 100.0)])
        };
        let runs = [
            // Newest first, as the API answers; the parents have no case.
            run("p2", 200, &[], &[("atelier.commit", "bbbbbbbbbbbb")], &[]),
            child("c3", "p2", 201, "bbbbbbbbbbbb", "starter-unet", "naive", "seconds_per_step", 0.5),
            child("c4", "p2", 202, "bbbbbbbbbbbb", "e2e", "naive", "seconds_per_image", 3.0),
            run("p1", 100, &[], &[("atelier.commit", "aaaaaaaaaaaa")], &[]),
            child("c1", "p1", 101, "aaaaaaaaaaaa", "starter-unet", "naive", "seconds_per_step", 0.75),
            child("c2", "p1", 102, "aaaaaaaaaaaa", "starter-unet", "flash", "seconds_per_step", 0.25),
            run("lone", 300, &[("case", "starter-unet"), ("attention", "naive")], &[], &[("seconds_per_step", 0.4)]),
        ];
        let (order, series) = bench_series(&runs);
        assert_eq!(order.iter().map(|b| (b.group.as_str(), b.commit.as_str(), b.start_time)).collect::<Vec<_>>(), vec![("p1", "aaaaaaa", 101), ("p2", "bbbbbbb", 201), ("lone", "?", 300)]);
        let got: Vec<(&str, &str, Vec<(usize, f64)>)> = series.iter().map(|s| (s.label.as_str(), s.metric.as_str(), s.points.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("e2e naive", "seconds_per_image", vec![(1, 3.0)]),
                ("starter-unet flash", "seconds_per_step", vec![(0, 0.25)]),
                ("starter-unet naive", "seconds_per_step", vec![(0, 0.75), (1, 0.5), (2, 0.4)]),
            ]
        );
        assert_eq!(bench_series(&[]), (vec![], vec![]));
    }
}
