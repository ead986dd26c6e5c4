//! Negative-prompt optimisation over HTTP on the real starter model: analysis with
//! contradictions, the editable knowledge base, a run that must pick a known-good
//! candidate over a known-bad one on fixed seeds and confirm it on new seeds, its images,
//! its record in the experiment store, suggestions re-ranked by that history, a style run
//! scored for style similarity, cancel, and refusals.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use app::dto::{NegativeAnalysis, OptimizeState, OptimizeStatus};
use atelier_server::negatives::{Context, NegativeService};
use atelier_server::styles::StyleLibrary;
use atelier_server::tracking::Tracker;
use atelier_server::{app, AppState, Generator, LoadedModel};
use axum::http::{Method, StatusCode};
use axum::Router;
use common::{expect_error, get_json, send};
use leptos::config::LeptosOptions;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn setup(data: &Path) -> Router {
    let library = StyleLibrary::new(data.join("styles")).with_shipped(repo().join("models/styles"));
    let model = LoadedModel::load(&repo().join("models/starter"), &candle_core::Device::Cpu).unwrap().with_styles(library.clone());
    let generator: Arc<dyn Generator> = Arc::new(model);
    let options = LeptosOptions::builder().output_name("atelier").site_root(data.join("site").to_string_lossy().as_ref()).build();
    let state = AppState::new(options, generator.clone(), data, (64, 64), None).unwrap().with_styles(library);
    let ctx = Context::new(data.join("negatives"), generator, state.styles.clone(), data.join("tracking"), (64, 64));
    let service = Arc::new(NegativeService::start(ctx, &state.workers).unwrap());
    let state = state.with_negatives(service);
    app(state)
}

async fn wait(app: &Router, id: &str, limit: Duration) -> OptimizeStatus {
    let start = Instant::now();
    loop {
        let s: OptimizeStatus = get_json(app, &format!("/api/negatives/runs/{id}")).await;
        if s.state.is_finished() {
            return s;
        }
        assert!(start.elapsed() < limit, "optimisation {id} stuck: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn analysis_optimisation_history_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let app = setup(tmp.path());
    let prompt = "a green square on a white background";

    // Analysis: subject, categories, suggestions, contradictions with their explanation.
    let r = send(&app, Method::POST, "/api/negatives/analyze", Some(json!({"prompt": prompt, "negative_prompt": "white, square frame"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let a: NegativeAnalysis = r.json();
    assert_eq!(a.subject, ["square"]);
    assert!(a.categories.contains(&"shapes".to_string()));
    let words: Vec<(&str, &str)> = a.contradictions.iter().map(|c| (c.word.as_str(), c.kind.as_str())).collect();
    assert_eq!(words, [("white", "both"), ("square", "subject")]);
    assert!(a.suggestions.iter().any(|s| s.negative == "low contrast"));

    // The knowledge base is editable; a bad edit is refused and changes nothing.
    let mut kb: Value = get_json(&app, "/api/negatives/knowledge").await;
    kb["categories"][2]["negatives"].as_array_mut().unwrap().push(json!("tiny"));
    let r = send(&app, Method::PUT, "/api/negatives/knowledge", Some(kb.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let mut bad = kb.clone();
    bad["categories"][2]["cues"] = json!([]);
    expect_error(&app, Method::PUT, "/api/negatives/knowledge", Some(bad), StatusCode::BAD_REQUEST, "needs cue words").await;
    let now: Value = get_json(&app, "/api/negatives/knowledge").await;
    assert_eq!(now, kb);
    let a: NegativeAnalysis = send(&app, Method::POST, "/api/negatives/analyze", Some(json!({"prompt": prompt}))).await.json();
    assert!(a.suggestions.iter().any(|s| s.negative == "tiny" && s.category == "shapes"));
    // A hand-broken copy is reported (503, naming the file and what to do), never replaced.
    let file = tmp.path().join("negatives/knowledge.json");
    let saved = std::fs::read(&file).unwrap();
    std::fs::write(&file, "{ not json").unwrap();
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    expect_error(&app, Method::GET, "/api/negatives/knowledge", None, unavailable, "fix or delete it").await;
    expect_error(&app, Method::POST, "/api/negatives/analyze", Some(json!({"prompt": prompt})), unavailable, "fix or delete it").await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{ not json");
    std::fs::write(&file, saved).unwrap();

    // Refusals.
    expect_error(&app, Method::POST, "/api/negatives/optimize", Some(json!({"prompt": ""})), StatusCode::BAD_REQUEST, "type a prompt").await;
    expect_error(&app, Method::POST, "/api/negatives/optimize", Some(json!({"prompt": prompt, "seeds": 0})), StatusCode::BAD_REQUEST, "seeds").await;
    expect_error(&app, Method::POST, "/api/negatives/optimize", Some(json!({"prompt": prompt, "candidates": 0})), StatusCode::BAD_REQUEST, "nothing to try").await;
    expect_error(&app, Method::POST, "/api/negatives/optimize", Some(json!({"prompt": prompt, "style": "nope"})), StatusCode::BAD_REQUEST, "known: frame, inkline, pastel").await;
    expect_error(&app, Method::POST, "/api/negatives/optimize", Some(json!({"prompt": prompt, "weights": {"sharpnes": 1}})), StatusCode::BAD_REQUEST, "no metric named").await;
    expect_error(&app, Method::GET, "/api/negatives/runs/nope", None, StatusCode::NOT_FOUND, "no optimisation").await;

    // A known-good candidate ("low contrast": the model learnt that caption, so steering
    // away from it raises contrast) against a known-bad one (pushing the square off-centre
    // cuts it at the border), on 3 fixed seeds, confirmed on 2 new ones.
    let body = json!({
        "prompt": prompt, "candidates": 0, "own": ["on the left, on the right", "low contrast"],
        "seeds": 3, "holdout_seeds": 2, "seed": 1000,
    });
    let r = send(&app, Method::POST, "/api/negatives/optimize", Some(body)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let queued: OptimizeStatus = r.json();
    let done = wait(&app, &queued.id, Duration::from_secs(300)).await;
    assert_eq!(done.state, OptimizeState::Done, "{done:?}");
    let result = done.result.clone().unwrap();
    let names: Vec<&str> = result.candidates.iter().map(|c| c.negative.as_str()).collect();
    assert_eq!(names, ["on the left, on the right", "low contrast"], "no combination: only one helps");
    assert_eq!(result.winner, Some(1), "{}", result.verdict);
    assert!(result.candidates[0].mean_delta < 0.0 && result.candidates[1].mean_delta > 0.0);
    assert_eq!(result.candidates[1].improved, 3);
    assert!(result.candidates[1].metric_deltas["contrast"] > 0.1, "{:?}", result.candidates[1].metric_deltas);
    assert!(result.helped && result.holdout_mean_delta.unwrap() > 0.0, "{}", result.verdict);
    assert_eq!(result.search_seeds, [1000, 1001, 1002]);
    assert_eq!(result.holdout_seeds, [11000, 11001]);
    assert_eq!(result.comparisons.len(), 5);
    assert!(result.verdict.starts_with("“low contrast” raises the combined score"), "{}", result.verdict);
    assert_eq!((done.done, done.total), (3 * 3 + 2 * 2, 3 * 3 + 2 * 2));
    // Scores are the images' scores: recompute one from the served PNG.
    let c = &result.comparisons[0];
    let png = send(&app, Method::GET, &format!("/api/negatives/runs/{}/images/{}", done.id, c.winner_image), None).await;
    assert_eq!(png.status, StatusCode::OK);
    let img = image::load_from_memory(&png.body).unwrap().to_rgb8();
    let again = atelier_engine::quality::assess(&img, None, &Default::default()).combined;
    assert!((again - c.winner_score).abs() < 1e-12, "{again} vs {}", c.winner_score);
    expect_error(&app, Method::GET, &format!("/api/negatives/runs/{}/images/..%2Fstatus.json", done.id), None, StatusCode::NOT_FOUND, "no image").await;

    // Recorded in the experiment store with params, metrics, tags and artifacts.
    let tracker = Tracker::open(&tmp.path().join("tracking")).unwrap();
    let run = done.tracking_run.clone().unwrap();
    let params = tracker.params(&run).unwrap();
    assert!(params.contains(&("prompt".into(), prompt.into())));
    assert_eq!(tracker.metric_history(&run, "candidate_mean_delta").unwrap().len(), 3, "baseline + 2 candidates");
    assert!(tracker.tags(&run).unwrap().contains(&("winner".into(), "low contrast".into())));
    let info = tracker.run(&run).unwrap().unwrap();
    assert_eq!(info.status, "FINISHED");
    assert!(Path::new(&info.artifact_uri).join("comparison.png").is_file());

    // The history now ranks "low contrast" first for a similar prompt, and the harmful one last.
    let a: NegativeAnalysis =
        send(&app, Method::POST, "/api/negatives/analyze", Some(json!({"prompt": "a green square on a black background"}))).await.json();
    assert_eq!(a.suggestions[0].negative, "low contrast");
    assert_eq!(a.suggestions[0].category, "history");
    assert_eq!(a.suggestions.last().unwrap().negative, "on the left, on the right");

    // A styled run is scored for style similarity too.
    let body = json!({"prompt": prompt, "style": "inkline", "candidates": 0, "own": ["noisy"], "seeds": 1, "holdout_seeds": 0, "steps": 6});
    let queued: OptimizeStatus = send(&app, Method::POST, "/api/negatives/optimize", Some(body)).await.json();
    let done = wait(&app, &queued.id, Duration::from_secs(120)).await;
    let result = done.result.unwrap_or_else(|| panic!("{:?}", done.state));
    assert!(result.candidates[0].metric_deltas.contains_key("style"), "{:?}", result.candidates[0].metric_deltas);

    // Cancel: a long run stops, and its stream ends as cancelled.
    let body = json!({"prompt": prompt, "candidates": 6, "seeds": 16, "holdout_seeds": 0});
    let queued: OptimizeStatus = send(&app, Method::POST, "/api/negatives/optimize", Some(body)).await.json();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send(&app, Method::POST, &format!("/api/negatives/runs/{}/cancel", queued.id), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let done = wait(&app, &queued.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, OptimizeState::Cancelled);
    assert!(done.done < done.total);
    let list: Vec<OptimizeStatus> = get_json(&app, "/api/negatives/runs").await;
    assert_eq!(list.len(), 3);
}
