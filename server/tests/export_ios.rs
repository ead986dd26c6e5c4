//! `atelier export ios-app` and the mobile-vs-desktop benchmark, run as a user runs them.
//!
//! The app tests build an export folder by hand (atelier_export.json and placeholder
//! `.mlpackage` folders: what is checked here is the template, not the models) and check
//! the generated app: its files, that the compiled model names the Swift code loads are the
//! export's packages in the names Apple's `StableDiffusionPipeline(resourcesAt:)` reads,
//! the styles, the pinned package version, and refusals. Every generated Swift file is
//! parsed with the tree-sitter Swift grammar (no Swift toolchain is packaged for Debian 12);
//! with `ATELIER_SWIFTC` set to a Swift compiler, also with `swiftc -parse`.
//!
//! The bench tests run `atelier bench --case coreml-e2e` on the built-in starter model at
//! 64×64 with the shipped inkline style and check the JSON line has exactly the fields the
//! app's `BenchRecord` declares, then `atelier bench compare` on files with known values.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn atelier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).current_dir(repo()).env_remove("ATELIER_STYLES").output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The compiled model names `StableDiffusionPipeline.ResourceURLs(resourcesAt:)` reads in
/// ml-stable-diffusion 1.1.1 (swift/StableDiffusion/pipeline/StableDiffusionPipeline+Resources.swift).
const PIPELINE_MODELS: [&str; 6] =
    ["TextEncoder.mlmodelc", "Unet.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc"];

fn short_hash(path: &Path) -> String {
    atelier_engine::model::short_hash(path).unwrap()
}

/// An export folder as `atelier export coreml` lays it out, with placeholder packages.
fn fixture_export(dir: &Path, chunked: bool, multifunction: bool) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let unet = if chunked { vec!["UnetChunk1", "UnetChunk2"] } else { vec!["Unet"] };
    let names: Vec<&str> = ["TextEncoder"].into_iter().chain(unet).chain(["VAEDecoder", "VAEEncoder"]).collect();
    let mut packages = Vec::new();
    let mut total = 0;
    for (i, name) in names.iter().enumerate() {
        let pkg = dir.join(format!("{name}.mlpackage"));
        std::fs::create_dir_all(pkg.join("Data/com.apple.CoreML/weights")).unwrap();
        std::fs::write(pkg.join("Manifest.json"), "{}").unwrap();
        std::fs::write(pkg.join("Data/com.apple.CoreML/model.mlmodel"), b"placeholder").unwrap();
        let bytes = 1000 * (i as u64 + 1);
        total += bytes;
        packages.push(serde_json::json!({"name": name, "path": format!("{name}.mlpackage"), "bytes": bytes, "functions": ["ink", "plain"]}));
    }
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(repo().join("models/starter/tokenizer").join(f), dir.join(f)).unwrap();
    }
    let manifest = serde_json::json!({
        "format": "atelier-coreml-export", "version": 1, "atelier_version": "0.1.0", "created": "2026-12-01T02:00:00Z",
        "base_model": {"name": "starter", "hash": short_hash(&repo().join("models/starter/unet/diffusion_pytorch_model.safetensors"))},
        "styles": [
            {"name": "ink \"bold\"", "function": "ink", "kind": "lora", "link": "atelier:blend/abc",
             "components": [{"name": "inkline", "hash": short_hash(&repo().join("models/styles/inkline/inkline.safetensors")), "weight": 0.8}]},
            {"name": "plain", "function": "plain", "kind": "base", "components": []}
        ],
        "default_style": "ink \"bold\"",
        "settings": {"attention": "split-einsum", "precision": "fp16", "palettize": 6, "quantize": null, "chunk_unet": chunked,
                     "target": "ios17", "width": 64, "height": 64, "unet_batch": 2, "latent_scaling_factor": 0.18215, "multifunction": multifunction},
        "packages": packages,
        "compression_errors": [{"package": "Unet", "option": "fp16", "max_abs_error": 0.001, "relative_error": 0.0001}],
        "some_future_field": true
    });
    std::fs::write(dir.join("atelier_export.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    total
}

fn files_under(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The string literals of the Swift array `static let NAME: [String] = [...]`.
fn swift_array(source: &str, name: &str) -> Vec<String> {
    let head = format!("static let {name}: [String] = [");
    let start = source.find(&head).unwrap_or_else(|| panic!("no {name} in GeneratedExport.swift"));
    let after = &source[start + head.len()..];
    let body = &after[..after.find(']').unwrap()];
    body.split(',').map(|s| s.trim().trim_matches('"').to_string()).filter(|s| !s.is_empty()).collect()
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const SWIFT_SOURCES: [&str; 6] =
    ["App/AtelierApp.swift", "App/ContentView.swift", "App/BenchmarkView.swift", "App/ModelStore.swift", "App/ExportManifest.swift", "App/GeneratedExport.swift"];

/// Syntax errors in Swift `source` by the tree-sitter Swift grammar: `LINE:COLUMN: text`
/// of each error or missing node.
fn swift_syntax_errors(source: &str) -> Vec<String> {
    let mut parser = tree_sitter::Parser::new();
    parser.set_language(&tree_sitter_swift::LANGUAGE.into()).unwrap();
    let tree = parser.parse(source, None).unwrap();
    let mut errors = Vec::new();
    let mut stack = vec![tree.root_node()];
    while let Some(node) = stack.pop() {
        if node.is_error() || node.is_missing() {
            let at = node.start_position();
            let line = source.lines().nth(at.row).unwrap_or("").trim();
            errors.push(format!("{}:{}: {}{line}", at.row + 1, at.column + 1, if node.is_missing() { "missing token: " } else { "" }));
            continue;
        }
        stack.extend((0..node.child_count()).filter_map(|i| node.child(i)));
    }
    errors
}

#[test]
fn the_swift_syntax_check_finds_broken_code() {
    assert!(swift_syntax_errors("struct A {\n    var x: Int = 1\n}\n").is_empty());
    let errors = swift_syntax_errors("struct A {\n    var x: Int =\n}\n");
    assert!(errors.iter().any(|e| e.starts_with("2:")), "{errors:?}");
    let errors = swift_syntax_errors("func f() {\n    if true {\n        g()\n    } else\n        h()\n    }\n}\n");
    assert!(!errors.is_empty());
}

/// Every generated Swift file parses by the tree-sitter Swift grammar; with `ATELIER_SWIFTC`
/// naming a Swift compiler, also by `swiftc -parse`.
fn swift_parse(app: &Path) {
    for f in SWIFT_SOURCES.iter().chain(&["Package.swift"]) {
        let errors = swift_syntax_errors(&read(app.join(f)));
        assert!(errors.is_empty(), "{f} does not parse as Swift:\n{}", errors.join("\n"));
    }
    let Ok(swiftc) = std::env::var("ATELIER_SWIFTC") else {
        eprintln!("ATELIER_SWIFTC not set: generated Swift not parsed (no Swift toolchain is packaged for Debian 12)");
        return;
    };
    for f in SWIFT_SOURCES.iter().chain(&["Package.swift"]) {
        let out = Command::new(&swiftc).arg("-parse").arg(app.join(f)).output().unwrap();
        assert!(out.status.success(), "swiftc -parse {f}: {}", text(&out));
    }
}

#[test]
fn ios_app_embedded_has_every_file_and_loads_the_exports_models_by_the_pipelines_names() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let total = fixture_export(&export, false, false);
    let app = tmp.path().join("InkApp");
    let out = atelier(&["export", "ios-app", "--models", export.to_str().unwrap(), "--out", app.to_str().unwrap(), "--name", "Ink Studio", "--embed"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!tmp.path().join("InkApp.partial").exists());

    let files = files_under(&app);
    let code: BTreeSet<String> = files.iter().filter(|f| !f.starts_with("App/Resources/")).cloned().collect();
    let mut expected: BTreeSet<String> = SWIFT_SOURCES.iter().map(|s| s.to_string()).collect();
    expected.extend(["Package.swift".to_string(), "README.md".to_string()]);
    assert_eq!(code, expected);
    // The export folder, bundled as it was written.
    for f in ["atelier_export.json", "vocab.json", "merges.txt", "Unet.mlpackage/Manifest.json", "TextEncoder.mlpackage/Data/com.apple.CoreML/model.mlmodel"] {
        assert!(files.contains(&format!("App/Resources/Models/{f}")), "{f} not bundled: {files:?}");
    }
    assert_eq!(read(app.join("App/Resources/Models/vocab.json")), read(export.join("vocab.json")));

    let generated = read(app.join("App/GeneratedExport.swift"));
    let compiled = swift_array(&generated, "compiledModels");
    assert_eq!(compiled, ["TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc"]);
    assert!(compiled.iter().all(|c| PIPELINE_MODELS.contains(&c.as_str())));
    assert_eq!(swift_array(&generated, "packages"), ["TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"]);
    for p in swift_array(&generated, "packages") {
        assert!(app.join("App/Resources/Models").join(&p).is_dir(), "{p}");
    }
    assert_eq!(swift_array(&generated, "tokenizerFiles"), ["vocab.json", "merges.txt"]);
    assert!(generated.contains(&format!("static let packageBytes: Int64 = {total}")), "{generated}");
    assert!(generated.contains("static let multifunction = false"));
    assert!(generated.contains("static let width = 64") && generated.contains("static let height = 64"));
    assert!(generated.contains("static let modelSource: ModelSource = .bundled"));
    assert!(generated.contains("Bundle.module.url(forResource: \"Models\", withExtension: nil)"));
    // Styles, with their names escaped as Swift string literals.
    assert!(generated.contains(r#"ExportStyle(name: "ink \"bold\"", function: "ink", kind: "lora", link: "atelier:blend/abc", components: [ExportComponent(name: "inkline", hash: "#));
    assert!(generated.contains(r#"ExportStyle(name: "plain", function: "plain", kind: "base", link: nil, components: [])"#));
    assert!(generated.contains(r#"static let defaultStyle = "ink \"bold\"""#));

    let store = read(app.join("App/ModelStore.swift"));
    for needle in ["MLModel.compileModel(at:", "StableDiffusionPipeline(", "resourcesAt: folder", ".mlmodelc", "applicationSupportDirectory"] {
        assert!(store.contains(needle), "ModelStore.swift lacks {needle}");
    }
    let package = read(app.join("Package.swift"));
    assert!(package.contains(r#".package(url: "https://github.com/apple/ml-stable-diffusion.git", exact: "1.1.1")"#), "{package}");
    assert!(package.contains(r#".product(name: "StableDiffusion", package: "ml-stable-diffusion")"#));
    assert!(package.contains(r#".copy("Resources/Models")"#));
    assert!(package.contains(r#"bundleIdentifier: "com.example.inkstudio""#));
    assert!(package.contains(r#".iOS("17.0")"#));
    assert!(read(app.join("App/AtelierApp.swift")).contains("struct InkStudioApp: App"));
    let content = read(app.join("App/ContentView.swift"));
    for needle in ["negativePrompt", "stepCount", "guidanceScale", "config.seed = seed", "ShareLink", "Picker(\"Style\"", "progress.step"] {
        assert!(content.contains(needle), "ContentView.swift lacks {needle}");
    }
    let readme = read(app.join("README.md"));
    assert!(readme.contains("xcrun coremlcompiler compile") && readme.contains("`Unet.mlmodelc`") && readme.contains("`ink \"bold\"`"), "{readme}");
    for f in &expected {
        assert!(!read(app.join(f)).contains("{{"), "{f} has an unfilled placeholder");
    }
    swift_parse(&app);
}

#[test]
fn ios_app_imported_chunked_multifunction_selects_functions_and_bundles_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fixture_export(&export, true, true);
    let app = tmp.path().join("app");
    std::fs::create_dir(&app).unwrap(); // an existing empty folder is fine
    let out = atelier(&["export", "ios-app", "--models", export.to_str().unwrap(), "--out", app.to_str().unwrap(), "--import", "--bundle-id", "org.atelier.ink"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!app.join("App/Resources").exists());
    let generated = read(app.join("App/GeneratedExport.swift"));
    let compiled = swift_array(&generated, "compiledModels");
    assert_eq!(compiled, ["TextEncoder.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc"]);
    assert!(compiled.iter().all(|c| PIPELINE_MODELS.contains(&c.as_str())));
    assert!(generated.contains("static let multifunction = true"));
    assert!(generated.contains("static let modelSource: ModelSource = .imported"));
    let package = read(app.join("Package.swift"));
    assert!(!package.contains("resources:"), "{package}");
    assert!(package.contains(r#".iOS("18.0")"#), "multifunction needs iOS 18: {package}");
    assert!(package.contains(r#"bundleIdentifier: "org.atelier.ink""#));
    // Without resources SwiftPM generates no Bundle.module, so nothing may use it.
    for f in SWIFT_SOURCES {
        assert!(!read(app.join(f)).contains("Bundle.module"), "{f} uses Bundle.module");
    }
    assert!(read(app.join("App/ModelStore.swift")).contains("configuration.functionName = function"));
    assert!(read(app.join("App/ContentView.swift")).contains("fileImporter"));
    swift_parse(&app);
}

#[test]
fn ios_app_refuses_a_used_folder_and_a_missing_or_foreign_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fixture_export(&export, false, false);
    let used = tmp.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("keep.txt"), "mine").unwrap();
    let out = atelier(&["export", "ios-app", "--models", export.to_str().unwrap(), "--out", used.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("exists and is not empty"), "{}", text(&out));
    assert_eq!(files_under(&used), BTreeSet::from(["keep.txt".to_string()]));

    let fresh = tmp.path().join("fresh");
    let run = |models: &Path| atelier(&["export", "ios-app", "--models", models.to_str().unwrap(), "--out", fresh.to_str().unwrap()]);
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(&empty);
    assert!(!out.status.success());
    assert!(text(&out).contains("has no readable atelier_export.json"), "{}", text(&out));

    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("atelier_export.json"), r#"{"format": "something-else", "version": 1}"#).unwrap();
    let out = run(&foreign);
    assert!(text(&out).contains("is not an Atelier Core ML export") && text(&out).contains("something-else"), "{}", text(&out));

    std::fs::write(foreign.join("atelier_export.json"), "not json").unwrap();
    assert!(text(&run(&foreign)).contains("is not valid JSON"));

    // A package listed but not in the folder.
    std::fs::remove_dir_all(export.join("VAEDecoder.mlpackage")).unwrap();
    let out = run(&export);
    assert!(text(&out).contains("VAEDecoder.mlpackage is listed in atelier_export.json but missing"), "{}", text(&out));
    assert!(!fresh.exists() && !tmp.path().join("fresh.partial").exists());

    // Bad names are refused before anything is written.
    fixture_export(&export, false, false);
    let out = atelier(&["export", "ios-app", "--models", export.to_str().unwrap(), "--out", fresh.to_str().unwrap(), "--bundle-id", "nodots"]);
    assert!(text(&out).contains("reverse-DNS"), "{}", text(&out));
    assert!(!fresh.exists());
}

/// The fields of the app's `struct BenchRecord` (BenchmarkView.swift).
fn swift_bench_fields(app: &Path) -> BTreeSet<String> {
    let src = read(app.join("App/BenchmarkView.swift"));
    let start = src.find("struct BenchRecord: Codable {").unwrap();
    let body = &src[start..start + src[start..].find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("var "))
        .map(|rest| rest.split([':', ' ']).next().unwrap().trim_matches('`').to_string())
        .collect()
}

#[test]
fn bench_coreml_e2e_writes_the_apps_line_shape_and_compare_tabulates_files() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let total = fixture_export(&export, false, false);
    let library = tmp.path().join("styles");
    let out = atelier(&[
        "bench", "--case", "coreml-e2e", "--models", export.to_str().unwrap(), "--steps", "3", "--runs", "2", "--no-track", "--library", library.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");

    // Exactly the fields the app's Benchmark screen writes.
    let app = tmp.path().join("app");
    assert!(atelier(&["export", "ios-app", "--models", export.to_str().unwrap(), "--out", app.to_str().unwrap(), "--import"]).status.success());
    let swift_fields = swift_bench_fields(&app);
    assert_eq!(swift_fields.len(), 17, "{swift_fields:?}");
    for l in &lines {
        let keys: BTreeSet<String> = l.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, swift_fields);
        assert_eq!(l["schema"], "atelier-bench-v1");
        assert_eq!(l["case"], "coreml-e2e");
        assert_eq!(l["engine"], "atelier-candle-cpu");
        assert_eq!(l["compute_units"], "cpu");
        assert_eq!(l["model"], "starter");
        assert_eq!(l["style"], "ink \"bold\"");
        assert_eq!((l["width"].as_u64(), l["height"].as_u64(), l["steps"].as_u64()), (Some(64), Some(64), Some(3)));
        assert_eq!(l["package_bytes"].as_u64(), Some(total));
        let per_step = l["seconds_per_step"].as_f64().unwrap();
        let per_image = l["seconds_per_image"].as_f64().unwrap();
        assert!(per_step > 0.0 && per_image > 2.0 * per_step, "{l}");
        assert!(l["peak_memory_bytes"].as_u64().unwrap() > 10 << 20, "{l}");
        assert!(l["date"].as_str().unwrap().ends_with('Z'));
        assert_eq!(l["atelier_version"], env!("CARGO_PKG_VERSION"));
    }

    // The style really is applied: a style missing from the library is an error naming it.
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(export.join("atelier_export.json")).unwrap()).unwrap();
    manifest["styles"][0]["components"][0]["name"] = "nosuchstyle".into();
    std::fs::write(export.join("atelier_export.json"), manifest.to_string()).unwrap();
    let out = atelier(&["bench", "--case", "coreml-e2e", "--models", export.to_str().unwrap(), "--steps", "1", "--runs", "1", "--no-track"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("nosuchstyle"), "{}", text(&out));
    let out = atelier(&["bench", "--case", "coreml-e2e", "--no-track"]);
    assert!(text(&out).contains("needs --models"), "{}", text(&out));

    // compare: the desktop file just measured and a phone's file with known values.
    let desktop = tmp.path().join("desktop.jsonl");
    std::fs::write(&desktop, &stdout).unwrap();
    let phone = tmp.path().join("iphone.jsonl");
    let line = |s: f64, i: f64, peak: u64| {
        let mut v = lines[0].clone();
        v["device"] = "iPhone15,2".into();
        v["os"] = "iOS 18.1.0".into();
        v["engine"] = "coreml".into();
        v["compute_units"] = "cpuAndNeuralEngine".into();
        v["seconds_per_step"] = s.into();
        v["seconds_per_image"] = i.into();
        v["peak_memory_bytes"] = peak.into();
        v.to_string()
    };
    std::fs::write(&phone, format!("{}\n\n{}\n{}\n", line(0.25, 6.0, 900 << 20), line(0.5, 7.5, 1536 << 20), line(0.75, 9.0, 1000 << 20))).unwrap();
    let out = atelier(&["bench", "compare", desktop.to_str().unwrap(), phone.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    let cpu = lines[0]["device"].as_str().unwrap();
    assert!(table.starts_with(&format!("| | {cpu} (atelier-candle-cpu, cpu) | iPhone15,2 (coreml, cpuAndNeuralEngine) |\n|---|---|---|\n")), "{table}");
    assert!(table.contains("| file | desktop.jsonl | iphone.jsonl |"), "{table}");
    assert!(table.contains("| timed images | 2 | 3 |"), "{table}");
    assert!(table.contains("| 0.5000 |\n"), "median s/step of the phone: {table}");
    assert!(table.contains("| 7.500 |\n"), "median s/image of the phone: {table}");
    assert!(table.contains("| 1.50 GiB |\n"), "highest peak of the phone: {table}");
    let pkg = format!("{:.1} MiB", total as f64 / 1048576.0);
    assert!(table.contains(&format!("| package size | {pkg} | {pkg} |")), "{table}");

    // Malformed lines are named by file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, format!("{}\nnot json\n", line(0.1, 1.0, 1))).unwrap();
    let out = atelier(&["bench", "compare", desktop.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad.jsonl:2: not a JSON line"), "{}", text(&out));
    let mut missing = lines[0].clone();
    missing.as_object_mut().unwrap().remove("seconds_per_step");
    std::fs::write(&bad, format!("\n{missing}\n")).unwrap();
    let out = atelier(&["bench", "compare", bad.to_str().unwrap()]);
    assert!(text(&out).contains("bad.jsonl:2: missing field `seconds_per_step`"), "{}", text(&out));
    std::fs::write(&bad, r#"{"schema": "other"}"#).unwrap();
    assert!(text(&atelier(&["bench", "compare", bad.to_str().unwrap()])).contains("bad.jsonl:1: \"schema\" is \"other\""));
    assert!(!atelier(&["bench", "compare"]).status.success(), "compare needs files");

    // The existing cases still run as before.
    let out = atelier(&["bench", "--case", "model-unet", "--attention", "original", "--steps", "1", "--json", "--no-track"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["case"], "model-unet");
    assert!(v["seconds_per_step"].as_f64().unwrap() > 0.0);
}
