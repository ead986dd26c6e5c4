//! Datasets in DVC's layout against real DVC (from PyPI; `cargo run -p xtask -- test`
//! installs it and passes `ATELIER_DVC_BIN`) and a real S3-compatible server (s3s-fs from
//! crates.io, `ATELIER_S3S_BIN`): what Atelier writes, `dvc status` finds clean and
//! `dvc checkout` restores byte for byte; what `dvc push` sends, Atelier pulls, and the
//! other way round, through a folder remote and through S3; a folder `dvc add` tracked is
//! listed with DVC's hash; a damaged cache is reported and nothing is overwritten; an
//! unreachable remote is a clear error that changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use atelier_server::datasets::{manifest, Project};

fn env_bin(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("ATELIER_REQUIRE_SERVICES").is_some() => panic!("{var} is not set"),
        None => {
            eprintln!("skipped: set {var} (cargo run -p xtask -- test does)");
            None
        }
    }
}

fn check(out: Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

/// Runs real `dvc` in `project`.
fn dvc(bin: &Path, project: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .current_dir(project)
        .env("DVC_NO_ANALYTICS", "1")
        .env("DVC_SITE_CACHE_DIR", project.join(".dvc/tmp/site"))
        // botocore's default trailing checksums are newer than what s3s-fs reads.
        .env("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        .env("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
        .output()
        .expect("running dvc");
    check(out, &format!("dvc {}", args.join(" ")))
}

/// Runs the `atelier` binary.
fn atelier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).env_remove("ATELIER_DATA").output().expect("running atelier")
}

/// Writes a small dataset: images (bytes need not decode for versioning), captions, a
/// non-ASCII name and a subfolder.
fn write_pictures(dir: &Path) {
    std::fs::create_dir_all(dir.join("more")).unwrap();
    for i in 0..4u8 {
        std::fs::write(dir.join(format!("img{i}.png")), [b'P', b'N', b'G', i, 0, 255, i.wrapping_mul(37)]).unwrap();
        std::fs::write(dir.join(format!("img{i}.txt")), format!("a picture number {i}")).unwrap();
    }
    std::fs::write(dir.join("café ünï 😀.png"), b"not ascii").unwrap();
    std::fs::write(dir.join("more/deep.jpg"), b"deep jpeg").unwrap();
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = walk(dir).into_iter().map(|p| (p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// A fresh project holding only `.dvc/config` and the `.dvc` files of `from`.
fn fresh_copy(from: &Path, to: &Path, dvc_files: &[&str]) {
    std::fs::create_dir_all(to.join(".dvc")).unwrap();
    std::fs::copy(from.join(".dvc/config"), to.join(".dvc/config")).unwrap();
    for f in dvc_files {
        let dest = to.join(f);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from.join(f), dest).unwrap();
    }
}

const ID: &str = "0f2c3a4e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";

/// A studio-like project with one uploaded dataset committed by Atelier (two versions).
fn studio_project(root: &Path) -> (Project, atelier_server::datasets::Dataset) {
    let project = Project::studio(root).unwrap();
    let ds = project.studio_dataset(ID);
    write_pictures(&ds.folder);
    let v1 = project.commit(&ds, None, &mut |_| {}).unwrap();
    assert!(v1.new);
    let v2 = project.set_caption(&ds, "img1.png", "an edited caption").unwrap();
    assert_eq!(v2.version.number, 2);
    (project, ds)
}

#[test]
fn dvc_agrees_with_what_atelier_writes() {
    let Some(dvc_bin) = env_bin("ATELIER_DVC_BIN") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let (project, ds) = studio_project(&root);
    let status = dvc(&dvc_bin, &root, &["status"]);
    assert!(status.contains("up to date"), "dvc status: {status}");

    // A deleted image comes back byte for byte from the cache Atelier wrote.
    let image = ds.folder.join("café ünï 😀.png");
    let before = std::fs::read(ds.folder.join("img2.png")).unwrap();
    std::fs::remove_file(ds.folder.join("img2.png")).unwrap();
    std::fs::remove_file(&image).unwrap();
    let status = dvc(&dvc_bin, &root, &["status"]);
    assert!(status.contains("modified"), "dvc status after a deletion: {status}");
    dvc(&dvc_bin, &root, &["checkout"]);
    assert_eq!(std::fs::read(ds.folder.join("img2.png")).unwrap(), before);
    assert_eq!(std::fs::read(&image).unwrap(), b"not ascii");
    assert!(dvc(&dvc_bin, &root, &["status"]).contains("up to date"));

    // Atelier's checkout of version 1 is a state DVC also calls clean.
    project.checkout(&ds, Some(1), &mut |_| {}).unwrap();
    assert_eq!(std::fs::read_to_string(ds.folder.join("img1.txt")).unwrap(), "a picture number 1");
    assert!(dvc(&dvc_bin, &root, &["status"]).contains("up to date"));

    // A folder `dvc add` tracked is a dataset with DVC's own hash.
    let pics = root.join("pics");
    write_pictures(&pics);
    std::fs::write(pics.join("quote\"back\\slash.txt"), b"odd name").unwrap();
    dvc(&dvc_bin, &root, &["add", "pics"]);
    let recorded = atelier_server::datasets::DvcFile::read(&root.join("pics.dvc")).unwrap().outs[0].md5.clone().unwrap();
    let (entries, _) = atelier_server::datasets::hash_folder(&pics, &mut |_| {}).unwrap();
    assert_eq!(manifest::dir_hash(&entries), recorded, "Atelier's folder hash is DVC's");
    let listed = project.list();
    let info = listed.iter().find(|d| d.id == "pics").expect("pics listed");
    assert_eq!(info.md5.as_deref(), Some(recorded.as_str()));
    assert_eq!(info.damaged, None);
    assert_eq!(info.nfiles, Some(11));
    assert_eq!(listed.iter().find(|d| d.id == ID).unwrap().version, Some(1));

    // A damaged cache object: reported, and Atelier's checkout refuses without touching anything.
    let dvc_text = std::fs::read(&ds.dvc_path).unwrap();
    let (_, files) = project.files(&ds, Some(2)).unwrap();
    let victim = files.iter().find(|e| e.relpath == "img3.png").unwrap();
    std::fs::write(project.object_path(&victim.md5), b"garbage").unwrap();
    let info = project.list().into_iter().find(|d| d.id == ID).unwrap();
    assert!(info.damaged.as_deref().unwrap_or("").contains("img3.png"), "{info:?}");
    let err = project.checkout(&ds, Some(2), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("damaged") && err.contains("nothing was changed"), "{err}");
    assert_eq!(std::fs::read(&ds.dvc_path).unwrap(), dvc_text);
    let out = atelier(&["datasets", "list", "--project", root.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"), "{out:?}");
}

#[test]
fn a_folder_remote_works_both_ways() {
    let Some(dvc_bin) = env_bin("ATELIER_DVC_BIN") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let (_, ds) = studio_project(&root);
    let remote = tmp.path().join("remote");
    let r = remote.to_str().unwrap();
    let rel_dvc = format!("trainings/datasets/{ID}.dvc");

    // dvc push → Atelier pull into a fresh folder.
    dvc(&dvc_bin, &root, &["remote", "add", "-d", "shared", r]);
    dvc(&dvc_bin, &root, &["push"]);
    let fresh = tmp.path().join("fresh");
    fresh_copy(&root, &fresh, &[&rel_dvc]);
    let out = atelier(&["datasets", "pull", "--project", fresh.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(files_of(&fresh.join(format!("trainings/datasets/{ID}"))), files_of(&ds.folder));
    assert!(dvc(&dvc_bin, &fresh, &["status"]).contains("up to date"));

    // Atelier push (a new version) → dvc pull into another fresh folder.
    std::fs::write(ds.folder.join("new.png"), b"a new picture").unwrap();
    let out = atelier(&["datasets", "add", "--project", root.to_str().unwrap(), ID]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 3"), "{out:?}");
    let remote2 = tmp.path().join("remote2");
    check(atelier(&["datasets", "remote", "add", "--project", root.to_str().unwrap(), "second", remote2.to_str().unwrap(), "--default"]), "remote add");
    let out = check(atelier(&["datasets", "push", "--project", root.to_str().unwrap()]), "atelier push");
    assert!(out.contains("pushed"), "{out}");
    let fresh2 = tmp.path().join("fresh2");
    fresh_copy(&root, &fresh2, &[&rel_dvc]);
    dvc(&dvc_bin, &fresh2, &["pull"]);
    assert_eq!(files_of(&fresh2.join(format!("trainings/datasets/{ID}"))), files_of(&ds.folder));
}

/// A real s3s-fs server on a free port, with one bucket.
struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    fn start(bin: &Path, dir: &Path, bucket: &str) -> Self {
        std::fs::create_dir_all(dir.join(bucket)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "atelierkey", "--secret-key", "ateliersecret"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_s3_remote_works_both_ways() {
    let (Some(dvc_bin), Some(s3s)) = (env_bin("ATELIER_DVC_BIN"), env_bin("ATELIER_S3S_BIN")) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&s3s, &tmp.path().join("s3"), "datasets");
    let root = tmp.path().join("data");
    let (_, ds) = studio_project(&root);
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let project = root.to_str().unwrap();
    check(
        atelier(&[
            "datasets", "remote", "add", "--project", project, "s3", "s3://datasets/store", "--default", "--endpoint-url", &endpoint,
            "--access-key-id", "atelierkey", "--secret-access-key", "ateliersecret", "--region", "us-east-1",
        ]),
        "remote add",
    );
    // Atelier push → dvc pull in a fresh folder.
    let out = check(atelier(&["datasets", "push", "--project", project]), "atelier push");
    assert!(out.contains("pushed"), "{out}");
    assert!(tmp.path().join("s3/datasets/store/files/md5").is_dir(), "objects are in DVC's remote layout");
    let rel_dvc = format!("trainings/datasets/{ID}.dvc");
    let fresh = tmp.path().join("fresh");
    fresh_copy(&root, &fresh, &[&rel_dvc]);
    dvc(&dvc_bin, &fresh, &["pull"]);
    assert_eq!(files_of(&fresh.join(format!("trainings/datasets/{ID}"))), files_of(&ds.folder));

    // dvc add + dvc push → Atelier pull in another fresh folder.
    let pics = root.join("pics");
    write_pictures(&pics);
    dvc(&dvc_bin, &root, &["add", "pics"]);
    dvc(&dvc_bin, &root, &["push", "pics.dvc"]);
    let fresh2 = tmp.path().join("fresh2");
    fresh_copy(&root, &fresh2, &["pics.dvc"]);
    check(atelier(&["datasets", "pull", "--project", fresh2.to_str().unwrap()]), "atelier pull");
    assert_eq!(files_of(&fresh2.join("pics")), files_of(&pics));

    // An unreachable remote: a clear error, nothing local changes.
    drop(server);
    let dvc_before = std::fs::read(root.join("pics.dvc")).unwrap();
    let out = atelier(&["datasets", "push", "--project", project]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("remote s3") && err.contains("local data untouched"), "{err}");
    assert_eq!(std::fs::read(root.join("pics.dvc")).unwrap(), dvc_before);
    let fresh3 = tmp.path().join("fresh3");
    fresh_copy(&root, &fresh3, &["pics.dvc"]);
    let out = atelier(&["datasets", "pull", "--project", fresh3.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("local data untouched"), "{err}");
    assert!(!fresh3.join("pics").exists(), "nothing checked out");
    assert_eq!(std::fs::read(fresh3.join("pics.dvc")).unwrap(), dvc_before);
}
