//! The mirror to a real MLflow server (from PyPI; `cargo run -p xtask -- test` installs it
//! and passes `ATELIER_MLFLOW_BIN`): a style trained with `--tracking-uri` is read back
//! with MLflow's own Python client (run, params, full metric histories, tags, artifacts
//! with the image gallery, the registered version and its alias); everything sent again
//! finds the same runs instead of duplicating them; the server stopped in the middle of a
//! training (followed by the studio's background mirror) loses nothing and gets the rest
//! when it is back; a refusal is shown and not retried; runs longer than one `log-batch`
//! call arrive whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use atelier_engine::starter::styles::{write_dataset, PictureStyle};
use atelier_server::tracking::mlflow::{Background, ServerConfig};
use atelier_server::tracking::Tracker;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `mlflow` executable, or `None` (the test is skipped) outside `xtask test`.
fn mlflow_bin() -> Option<PathBuf> {
    match std::env::var_os("ATELIER_MLFLOW_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("ATELIER_REQUIRE_SERVICES").is_some() => panic!("ATELIER_MLFLOW_BIN is not set"),
        None => {
            eprintln!("skipped: set ATELIER_MLFLOW_BIN to an `mlflow` executable (cargo run -p xtask -- test does)");
            None
        }
    }
}

/// A real `mlflow server` (sqlite backend, local artifact root behind its proxy).
struct MlflowServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl MlflowServer {
    fn start(bin: &Path, dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = Self { bin: bin.to_path_buf(), dir: dir.to_path_buf(), port, child: None };
        s.restart();
        s
    }

    fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::File::create(self.dir.join(format!("server-{}.log", Instant::now().elapsed().as_nanos()))).unwrap();
        let child = Command::new(&self.bin)
            .args(["server", "--host", "127.0.0.1", "--port", &self.port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", self.dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(self.dir.join("artifacts"))
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mlflow server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        let health = format!("{}/health", self.uri());
        while Instant::now() < deadline {
            if ureq::get(&health).call().is_ok_and(|r| r.status() == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("mlflow server not ready at {health} after 120 s (log in {})", self.dir.display());
    }

    /// Stops the server and every process it started (gunicorn/uvicorn workers).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain signal to a child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs Python code with MLflow's client (the venv's interpreter).
    fn python(&self, code: &str) {
        let out = Command::new(self.bin.with_file_name("python")).args(["-c", code]).output().unwrap();
        assert!(out.status.success(), "{code}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// What MLflow's Python client reads back for the given local runs.
    fn read_back(&self, runs: &[&str]) -> Value {
        let python = self.bin.with_file_name("python");
        let out = Command::new(python).arg(repo().join("server/tests/mlflow/readback.py")).arg(self.uri()).args(runs).output().unwrap();
        assert!(out.status.success(), "readback.py failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn atelier(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).current_dir(dir).env_remove("MLFLOW_TRACKING_URI").output().unwrap()
}

/// `atelier train-style` of a small dataset of `style`: `steps` steps, sample sheets every
/// `sample_every`; mirrored at its end when `uri` is given.
fn train_command(tmp: &Path, name: &str, style: PictureStyle, steps: u32, sample_every: u32, uri: Option<&str>) -> Command {
    let images = tmp.join(format!("{name}-images"));
    write_dataset(style, &images, 6, 3).unwrap();
    let model = repo().join("models/starter");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atelier"));
    cmd.args(["train-style", "--name", name, "--trigger", name, "--rank", "2", "--batch", "2", "--library", "styles", "--tracking", "tracking"])
        .arg("--images")
        .arg(&images)
        .arg("--model")
        .arg(&model)
        .args(["--steps", &steps.to_string(), "--sample-every", &sample_every.to_string()])
        .current_dir(tmp)
        .env_remove("MLFLOW_TRACKING_URI");
    if let Some(uri) = uri {
        cmd.args(["--tracking-uri", uri]);
    }
    cmd
}

/// Polls `check` every 200 ms until it gives a value; panics after `limit`.
fn wait_until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn only_run(tracker: &Tracker, name: &str) -> String {
    let exp = tracker.find_experiment("styles").unwrap().unwrap();
    let runs: Vec<_> = tracker.runs(exp).unwrap().into_iter().filter(|r| r.name == name).collect();
    assert_eq!(runs.len(), 1, "{name}");
    runs[0].run_id.clone()
}

/// Checks the server's copy of `run` against the local store, field by field.
fn assert_same(tracker: &Tracker, run: &str, remote: &Value) {
    assert_eq!(remote["copies"], 1, "exactly one copy of {run} on the server: {remote}");
    let local = tracker.run(run).unwrap().unwrap();
    assert_eq!(remote["status"], local.status.as_str());
    assert_eq!(remote["name"], local.name.as_str());
    assert_eq!(remote["experiment"], "styles");
    assert_eq!(remote["start_time"], local.start_time);
    assert_eq!(remote["end_time"], local.end_time.unwrap());
    let params: BTreeMap<String, String> = tracker.params(run).unwrap().into_iter().collect();
    let remote_params: BTreeMap<String, String> = serde_json::from_value(remote["params"].clone()).unwrap();
    assert_eq!(remote_params, params);
    assert!(params.len() > 20 && params["rank"] == "2" && params["optim.lr"] == "0.001", "{params:?}");
    for (k, v) in tracker.tags(run).unwrap() {
        assert_eq!(remote["tags"][&k], v.as_str(), "tag {k}");
    }
    assert_eq!(remote["tags"]["atelier.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(remote["tags"]["device"], "cpu");
    assert_eq!(remote["tags"]["mlflow.loggedImages"], "True");
    let local_summary = tracker.summary(run).unwrap().unwrap();
    assert!(local_summary.metrics.len() >= 10, "{:?}", local_summary.metrics);
    assert_eq!(remote["histories"].as_object().unwrap().len(), local_summary.metrics.len());
    for key in local_summary.metrics.keys() {
        let mine: Vec<(i64, f64, i64)> = tracker.metric_history(run, key).unwrap().iter().map(|p| (p.step, p.value, p.timestamp)).collect();
        let theirs: Vec<(i64, f64, i64)> = serde_json::from_value(remote["histories"][key].clone()).unwrap();
        // Steps and timestamps exactly; values to the last bits (MLflow's server stores a
        // double and may round its last binary digit differently).
        assert_eq!(theirs.len(), mine.len(), "history of {key}: {theirs:?} vs {mine:?}");
        for (t, m) in theirs.iter().zip(&mine) {
            assert!(t.0 == m.0 && t.2 == m.2 && (t.1 - m.1).abs() <= 1e-12 * m.1.abs().max(1.0), "history of {key}: {theirs:?} vs {mine:?}");
        }
    }
    let steps: usize = params["steps"].parse().unwrap();
    let sample_every: usize = params["sample_every"].parse().unwrap();
    assert_eq!(tracker.metric_history(run, "loss").unwrap().len(), steps, "one loss per step");
    // Artifacts: the same files, with the same sizes; samples in the image gallery.
    let root = PathBuf::from(&local.artifact_uri);
    let mine: BTreeMap<String, u64> = tracker.artifacts(run).unwrap().into_iter().map(|a| (a.clone(), std::fs::metadata(root.join(&a)).unwrap().len())).collect();
    let theirs: BTreeMap<String, u64> = serde_json::from_value::<Vec<(String, u64)>>(remote["artifacts"].clone()).unwrap().into_iter().collect();
    assert_eq!(theirs, mine);
    assert!(mine.keys().any(|a| a.ends_with(".safetensors")), "{mine:?}");
    let gallery: Vec<&String> = mine.keys().filter(|a| a.starts_with("images/samples+step+")).collect();
    assert_eq!(gallery.len(), steps / sample_every + 1, "samples at step 0 and every {sample_every}: {mine:?}");
    assert!(gallery.iter().any(|a| a.starts_with(&format!("images/samples+step+{sample_every}+timestamp+")) && a.ends_with(".png")));
}

#[test]
fn styles_are_mirrored_to_a_real_mlflow_server_without_duplicates_or_losses() {
    let Some(bin) = mlflow_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut server = MlflowServer::start(&bin, &tmp.path().join("mlflow"));
    let uri = server.uri();

    // 1. A training with the URI set: mirrored when it ends.
    let out = train_command(tmp.path(), "ink", PictureStyle::Inkline, 6, 3, Some(&uri)).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("mirrored 1 run(s)"), "{}", text(&out));
    let tracker = Tracker::open(&tmp.path().join("tracking")).unwrap();
    let ink = only_run(&tracker, "ink");
    assert!(tracker.pending_runs(&uri).unwrap().is_empty());
    let back = server.read_back(&[&ink]);
    assert_same(&tracker, &ink, &back["runs"][&ink]);
    // Registered as version 1 of the model "ink", with its metadata, in MLflow's registry.
    let v1 = &back["registry"]["ink"]["versions"]["1"];
    assert_eq!(v1["run_id"], back["runs"][&ink]["run_id"], "{back}");
    assert!(v1["source"].as_str().unwrap().starts_with("mlflow-artifacts:/"), "{v1}");
    assert_eq!(v1["tags"]["trigger"], "ink");
    assert_eq!(v1["tags"]["rank"], "2");
    assert_eq!(v1["tags"]["atelier.version"], "1");
    let local = tracker.resolve_version("ink", "1").unwrap();
    assert_eq!(v1["tags"]["dataset_hash"], local.tags["dataset_hash"].as_str());
    assert_eq!(v1["tags"]["similarity_gain"], local.tags["similarity_gain"].as_str());
    let gain: f64 = local.tags["similarity_gain"].parse().unwrap();
    let logged = tracker.metric_history(&ink, "similarity_gain").unwrap();
    assert!((logged[0].value - gain).abs() < 1e-6, "the run's metric and the version's tag agree");

    // An alias set from the CLI reaches the server at once, and prompts can use it.
    let out = atelier(&["registry", "alias", "ink", "production", "1", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(out.status.success() && text(&out).contains("1 alias change(s)"), "{}", text(&out));
    assert_eq!(server.read_back(&[])["registry"]["ink"]["aliases"]["production"], "1");
    let model = repo().join("models/starter");
    let png = tmp.path().join("production.png");
    let out = atelier(
        &["generate", "--prompt", "a red circle, ink style <lora:ink@production:0.8>", "--steps", "4", "--model", model.to_str().unwrap(), "--library", "styles", "--out", png.to_str().unwrap()],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = atelier(
        &["generate", "--prompt", "<lora:ink@staging>", "--steps", "4", "--model", model.to_str().unwrap(), "--library", "styles", "--out", png.to_str().unwrap()],
        tmp.path(),
    );
    assert!(!out.status.success() && text(&out).contains("ink has no version staging (known: 1, production)"), "{}", text(&out));

    // 2. Everything sent again, as after a crash between creating the server's run and
    //    recording its id: the sync finds the run by its `atelier.run_id` tag instead of
    //    making a second one, and no metric point is doubled.
    let out = atelier(&["runs", "sync", "--resend", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 run(s) sent"), "{}", text(&out));
    assert_same(&tracker, &ink, &server.read_back(&[&ink])["runs"][&ink]);
    let out = atelier(&["runs", "sync", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(text(&out).contains("nothing to sync"), "{}", text(&out));

    // 3. The studio's background mirror (serve --tracking-uri) follows a training as it
    //    runs; the server stops in the middle of it: the training finishes, the mirror waits
    //    with the reason, and once the server is back it sends the rest, so the server's
    //    copy is complete and nothing is doubled.
    let mirror = Background::start(tmp.path().join("tracking"), ServerConfig::new(&uri).unwrap());
    let training = train_command(tmp.path(), "pastel", PictureStyle::Pastel, 60, 30, None).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let exp = tracker.find_experiment("styles").unwrap().unwrap();
    let pastel = wait_until(Duration::from_secs(120), || tracker.runs(exp).unwrap().into_iter().find(|r| r.name == "pastel").map(|r| r.run_id));
    wait_until(Duration::from_secs(60), || tracker.remote_run_id(&uri, &pastel).unwrap());
    server.stop();
    assert_eq!(tracker.run(&pastel).unwrap().unwrap().status, "RUNNING", "the server stopped in the middle of the training");
    let waiting = wait_until(Duration::from_secs(60), || Some(mirror.status()).filter(|s| s.last_error.is_some()));
    assert!(waiting.last_error.unwrap().contains("cannot reach the MLflow server"));
    let out = training.wait_with_output().unwrap();
    assert!(out.status.success(), "a training does not need the server: {}", text(&out));
    assert_eq!(tracker.pending_runs(&uri).unwrap(), vec![pastel.clone()]);
    let out = atelier(&["runs", "sync", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(!out.status.success(), "a sync to a stopped server fails");
    assert!(text(&out).contains("cannot reach the MLflow server") && text(&out).contains("1 run(s) still waiting"), "{}", text(&out));
    server.restart();
    mirror.wake();
    let done = wait_until(Duration::from_secs(120), || Some(mirror.status()).filter(|s| s.pending == 0 && s.last_error.is_none()));
    assert!(done.last_sync.is_some(), "{done:?}");
    drop(mirror);
    let out = atelier(&["runs", "sync", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(out.status.success() && text(&out).contains("nothing to sync"), "{}", text(&out));
    let back = server.read_back(&[&ink, &pastel]);
    assert_same(&tracker, &pastel, &back["runs"][&pastel]);
    assert_same(&tracker, &ink, &back["runs"][&ink]);
    assert_eq!(back["registry"]["pastel"]["versions"].as_object().unwrap().len(), 1, "{back}");
    assert_eq!(back["registry"]["ink"]["versions"].as_object().unwrap().len(), 1, "no duplicate versions after --resend");

    // A refusal: someone logged param `reviewer` into the server's copy of ink, and the
    // studio logs another value for it; the sync is refused with the server's message, and
    // not retried until ink changes again.
    let remote_ink = back["runs"][&ink]["run_id"].as_str().unwrap().to_string();
    server.python(&format!("from mlflow import MlflowClient; MlflowClient('{uri}').log_param('{remote_ink}', 'reviewer', 'server')"));
    tracker.log_param(&ink, "reviewer", "studio").unwrap();
    let out = atelier(&["runs", "sync", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused") && text(&out).contains("reviewer"), "the server's message: {}", text(&out));
    assert_eq!(tracker.refused_runs(&uri).unwrap().len(), 1);
    let out = atelier(&["runs", "sync", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(out.status.success() && text(&out).contains("nothing to sync"), "not retried: {}", text(&out));

    // Runs longer than one log-batch call (MLflow takes 1000 metrics, params and tags
    // together per call): every point arrives once, in order.
    let out = atelier(&["runs", "seed", "--tracking", "tracking", "--experiment", "long", "--runs", "2", "--metrics", "3", "--steps", "700"], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let out = atelier(&["runs", "sync", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(out.status.success() && text(&out).contains("2 run(s) sent"), "{}", text(&out));
    let long = tracker.find_experiment("long").unwrap().unwrap();
    let ids: Vec<String> = tracker.runs(long).unwrap().into_iter().map(|r| r.run_id).collect();
    let back = server.read_back(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    for id in &ids {
        let histories = back["runs"][id]["histories"].as_object().unwrap();
        assert_eq!(histories.len(), 3);
        for (key, points) in histories {
            let steps: Vec<i64> = points.as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
            assert_eq!(steps, (1..=700).collect::<Vec<i64>>(), "{key}");
        }
    }

    // Removing the alias removes it on the server.
    let out = atelier(&["registry", "alias", "ink", "production", "--delete", "--tracking", "tracking", "--tracking-uri", &uri], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server.read_back(&[])["registry"]["ink"]["aliases"], serde_json::json!({}));
}
