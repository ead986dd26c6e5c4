//! The A1111 API subset against a real `atelier serve`, driven by the real `webuiapi`
//! client from PyPI (unmodified; `server/tests/a1111/webuiapi_client.py`). The
//! deployment it selects is made with `atelier deploy create` on the data folder, and
//! listed back with `atelier deploy list --server`.
//!
//! Needs `ATELIER_WEBUIAPI_PYTHON`: a Python with `webuiapi==0.9.17` installed
//! (`cargo run -p xtask -- test` makes one); skipped without it unless
//! `ATELIER_REQUIRE_SERVICES=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atelier_server::tracking::Tracker;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> Option<PathBuf> {
    match std::env::var_os("ATELIER_WEBUIAPI_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("ATELIER_REQUIRE_SERVICES").is_some() => panic!("ATELIER_WEBUIAPI_PYTHON is not set"),
        None => {
            eprintln!("skipped: set ATELIER_WEBUIAPI_PYTHON to a Python with webuiapi==0.9.17 (cargo run -p xtask -- test does)");
            None
        }
    }
}

/// Stops the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn atelier(args: &[&str], data: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).arg("--data-dir").arg(data).current_dir(repo()).output().unwrap()
}

#[test]
fn webuiapi_client_works_against_a_running_studio() {
    let Some(python) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Two registered versions of "ink" for the served model, production → 1.
    let hash = atelier_server::blends::model_hash(&repo().join("models/starter")).unwrap();
    let t = Tracker::open(&data.join("tracking")).unwrap();
    for style in ["inkline", "pastel"] {
        let file = tmp.path().join("ink.safetensors");
        std::fs::copy(repo().join(format!("models/styles/{style}/{style}.safetensors")), &file).unwrap();
        t.register_version("ink", "style", &[file], None, &[("base_model_hash".into(), hash.clone())]).unwrap();
    }
    t.set_alias("ink", "production", 1).unwrap();
    drop(t);

    let out = atelier(&["deploy", "create", "ink-prod", "ink@production", "--weight", "0.8", "--steps", "4"], &data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ink@1"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = atelier(&["deploy", "create", "other", "ink@staging"], &data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("known: 2, 1, production"), "{}", String::from_utf8_lossy(&out.stderr));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(tmp.path().join("serve.log")).unwrap();
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--site-root"])
            .arg(tmp.path().join("site"))
            .arg("--data-dir")
            .arg(&data)
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(format!("{url}/api/health")).call().is_err() {
        assert!(Instant::now() < deadline, "the studio did not start (log in {})", tmp.path().display());
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = Command::new(&python).arg(repo().join("server/tests/a1111/webuiapi_client.py")).args(["127.0.0.1", &port.to_string(), "ink-prod"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "webuiapi client failed:\n{stdout}\n{stderr}");
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(seen["version"], "ink@1");

    // The CLI against the running studio, after a promotion through the registry CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_atelier")).args(["registry", "alias", "ink", "production", "2", "--tracking"]).arg(data.join("tracking")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_atelier")).args(["deploy", "list", "--server", &url]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listed.contains("ink-prod") && listed.contains("ink@2"), "{listed}{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_atelier")).args(["deploy", "delete", "ink-prod", "--server", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!data.join("deployments/ink-prod.json").exists());
}
