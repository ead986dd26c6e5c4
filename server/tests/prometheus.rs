//! Monitoring with a real Prometheus (Debian's `prometheus` package; `.ci/run` installs
//! it): a running studio (`atelier serve` on the built-in model) is scraped every second,
//! and Prometheus's HTTP API (`/api/v1/query`, `/api/v1/rules`, `/api/v1/alerts`) finds
//! its series with the values the requests made; the shipped alerting rules load and
//! evaluate without error, and `AtelierDown` goes pending once the studio stops. `promtool`
//! checks and unit-tests the shipped rules and the example configuration.
//!
//! The binaries are found through `ATELIER_PROMETHEUS_BIN` / `ATELIER_PROMTOOL_BIN`, else on
//! `PATH`; without them the tests are skipped, unless `ATELIER_REQUIRE_SERVICES` is set
//! (as `cargo run -p xtask -- test` does), where they fail.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The executable `name` from `var`, else from `PATH`; `None` (skip) when neither has it.
fn service_bin(var: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file()));
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("ATELIER_REQUIRE_SERVICES").is_some() => {
            panic!("{name} not found: set {var} or install it (Debian: apt-get install prometheus)")
        }
        None => {
            eprintln!("skipped: {name} not found (set {var} or install Debian's prometheus package)");
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build().into()
}

/// A child process killed (SIGTERM, then waited for) when dropped.
struct Running {
    child: Option<Child>,
    log: PathBuf,
}

impl Running {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Self { child: Some(child), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `url` answers 200, failing (with the log) if the process exits or after `limit`.
    fn wait_ready(&mut self, url: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("exited with {status} before {url} answered:\n{}", self.log());
            }
            if agent().get(url).call().is_ok_and(|r| r.status() == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{url} did not answer in {limit:?}:\n{}", self.log());
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: a plain signal to a child this test started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prometheus's answer to the instant query `query`: the result vector.
fn query(prometheus: &str, query: &str) -> Vec<Value> {
    let mut r = agent().get(format!("{prometheus}/api/v1/query")).query("query", query).call().unwrap();
    let body: Value = r.body_mut().read_json().unwrap();
    assert_eq!(body["status"], "success", "{query}: {body}");
    body["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The single value of `q`, if the query has exactly one series.
fn value(prometheus: &str, q: &str) -> Option<f64> {
    match query(prometheus, q).as_slice() {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

#[test]
fn a_real_prometheus_scrapes_the_studio_and_finds_every_series() {
    let Some(prometheus_bin) = service_bin("ATELIER_PROMETHEUS_BIN", "prometheus") else { return };
    let tmp = tempfile::tempdir().unwrap();

    // The studio, on the built-in model, on a free port.
    let port = free_port();
    let studio_url = format!("http://127.0.0.1:{port}");
    let mut studio = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--model")
            .arg(repo().join("models/starter"))
            .arg("--site-root")
            .arg(tmp.path().join("site"))
            .current_dir(repo())
            .env("RUST_LOG", "info")
            .env_remove("MLFLOW_TRACKING_URI"),
        tmp.path().join("atelier.log"),
    );
    studio.wait_ready(&format!("{studio_url}/api/health"), Duration::from_secs(120));

    // Requests: three health checks, a 404, and a generation of 4 steps.
    let http = agent();
    for _ in 0..3 {
        assert_eq!(http.get(format!("{studio_url}/api/health")).call().unwrap().status(), 200);
    }
    assert_eq!(http.get(format!("{studio_url}/no/such/page")).call().unwrap().status(), 404);
    let mut r = http.post(format!("{studio_url}/api/generate")).send_json(json!({"prompt": "a red circle", "steps": 4, "seed": 7})).unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.body_mut().read_json().unwrap();
    let job_url = format!("{studio_url}/api/jobs/{}", job["job_id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status: Value = http.get(&job_url).call().unwrap().body_mut().read_json().unwrap();
        match status["state"].as_str() {
            Some("done") => break,
            Some("failed" | "cancelled") => panic!("generation ended: {status}"),
            _ => assert!(Instant::now() < deadline, "generation stuck: {status}\n{}", studio.log()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Prometheus, scraping it every second, with the shipped rules evaluated every second.
    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: atelier\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            rules = repo().join("monitoring/alerts.yml").display()
        ),
    )
    .unwrap();
    let mut prom = Running::spawn(
        Command::new(&prometheus_bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}")),
        tmp.path().join("prometheus.log"),
    );
    prom.wait_ready(&format!("{prom_url}/-/ready"), Duration::from_secs(60));

    let commit = env!("ATELIER_COMMIT");
    let version = env!("CARGO_PKG_VERSION");
    let expectations: Vec<(String, Box<dyn Fn(f64) -> bool>)> = vec![
        (r#"up{job="atelier"}"#.into(), Box::new(|v| v == 1.0)),
        (r#"atelier_http_requests_total{job="atelier",method="GET",route="/api/health",status="200"}"#.into(), Box::new(|v| v >= 3.0)),
        (r#"atelier_http_requests_total{job="atelier",route="(fallback)",status="404"}"#.into(), Box::new(|v| v >= 1.0)),
        (r#"atelier_http_requests_total{job="atelier",method="POST",route="/api/generate",status="202"}"#.into(), Box::new(|v| v == 1.0)),
        (r#"atelier_http_request_duration_seconds_count{job="atelier",route="/api/health"}"#.into(), Box::new(|v| v >= 3.0)),
        (r#"atelier_images_generated_total{job="atelier"}"#.into(), Box::new(|v| v >= 1.0)),
        (r#"atelier_generation_step_seconds_count{job="atelier"}"#.into(), Box::new(|v| v >= 4.0)),
        (r#"atelier_generations_total{job="atelier",outcome="done"}"#.into(), Box::new(|v| v == 1.0)),
        (r#"atelier_queue_wait_seconds_count{job="atelier",kind="job"}"#.into(), Box::new(|v| v == 1.0)),
        (r#"atelier_queue_length{job="atelier",kind="job"}"#.into(), Box::new(|v| v == 0.0)),
        (r#"atelier_queue_length{job="atelier",kind="training"}"#.into(), Box::new(|v| v == 0.0)),
        (r#"atelier_model_load_seconds{job="atelier",purpose="generation"}"#.into(), Box::new(|v| v > 0.0 && v < 120.0)),
        (r#"process_resident_memory_bytes{job="atelier"}"#.into(), Box::new(|v| v > 1e6)),
        (r#"atelier_memory_limit_bytes{job="atelier"}"#.into(), Box::new(|v| v > 1e6)),
        (format!(r#"atelier_build_info{{job="atelier",version="{version}",commit="{commit}"}}"#), Box::new(|v| v == 1.0)),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let unmet: Vec<String> = expectations
            .iter()
            .filter(|(q, ok)| !value(&prom_url, q).is_some_and(ok))
            .map(|(q, _)| format!("{q} = {:?}", query(&prom_url, q)))
            .collect();
        if unmet.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus lacks:\n{}\nprometheus log:\n{}", unmet.join("\n"), prom.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    // Only route templates became labels: the 404's raw path did not.
    assert!(query(&prom_url, r#"atelier_http_requests_total{route=~".*no/such.*"}"#).is_empty());

    // The shipped rules loaded and evaluated against the real series without an error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut r = agent().get(format!("{prom_url}/api/v1/rules")).call().unwrap();
        let body: Value = r.body_mut().read_json().unwrap();
        let rules: Vec<Value> = body["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect();
        let shipped = std::fs::read_to_string(repo().join("monitoring/alerts.yml")).unwrap().lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
        assert_eq!(rules.len(), shipped, "{body}");
        if rules.iter().all(|r| r["health"] == "ok") {
            assert!(rules.iter().all(|r| r["state"] == "inactive"), "an alert is active on a healthy studio: {body}");
            break;
        }
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(bad.is_empty(), "rules failing: {bad:?}");
        assert!(Instant::now() < deadline, "rules not evaluated: {body}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // The studio stops: `up` drops to 0 and AtelierDown goes pending (it fires after a minute).
    studio.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut r = agent().get(format!("{prom_url}/api/v1/alerts")).call().unwrap();
        let body: Value = r.body_mut().read_json().unwrap();
        let down = body["data"]["alerts"].as_array().unwrap().iter().find(|a| a["labels"]["alertname"] == "AtelierDown").cloned();
        if let Some(a) = down {
            assert_eq!(a["state"], "pending", "{a}");
            assert_eq!(a["labels"]["instance"], format!("127.0.0.1:{port}"));
            break;
        }
        assert!(Instant::now() < deadline, "AtelierDown not pending 30 s after the studio stopped: {body}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn promtool(args: &[&str]) {
    let Some(bin) = service_bin("ATELIER_PROMTOOL_BIN", "promtool") else { return };
    let out = Command::new(&bin).args(args).current_dir(repo()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
}

#[test]
fn promtool_accepts_the_shipped_rules() {
    promtool(&["check", "rules", "monitoring/alerts.yml"]);
}

#[test]
fn promtool_accepts_the_example_config() {
    promtool(&["check", "config", "monitoring/prometheus.yml"]);
}

#[test]
fn the_shipped_rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "monitoring/alerts_test.yml"]);
}

#[test]
fn promtool_refuses_a_broken_rule() {
    // The checks above can fail: a rule with a syntax error in its expression is refused.
    let Some(bin) = service_bin("ATELIER_PROMTOOL_BIN", "promtool") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("broken.yml");
    std::fs::write(&rules, "groups:\n  - name: broken\n    rules:\n      - alert: Broken\n        expr: up{job=\"atelier\" == 0\n").unwrap();
    let out = Command::new(bin).args(["check", "rules"]).arg(&rules).output().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
