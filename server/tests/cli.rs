//! The `atelier` binary as a user runs it: `reference` on the public fixtures and
//! `generate` writing a PNG with A1111 parameters, plus bad-input exits.

use std::path::PathBuf;
use std::process::Command;

use atelier_engine::reference::max_abs_diff;
use candle_core::Device;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/sd-tiny")
}

#[test]
fn reference_command_writes_every_case_within_tolerance() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["reference", "--model"])
        .arg(fixtures().join("pipeline"))
        .arg("--cases")
        .arg(fixtures())
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let got = candle_core::safetensors::load(out.path().join("unet.safetensors"), &Device::Cpu).unwrap();
    let exp = candle_core::safetensors::load(fixtures().join("unet.safetensors"), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&got["noise_pred"], &exp["noise_pred"]).unwrap() < 1e-4);
    let got = candle_core::safetensors::load(out.path().join("tokenizer_ids.safetensors"), &Device::Cpu).unwrap();
    let exp = candle_core::safetensors::load(fixtures().join("tokenizer_ids.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got["input_ids"].to_vec2::<i64>().unwrap(), exp["input_ids"].to_vec2::<i64>().unwrap());
    for case in ["text_encoder", "vae_encode", "vae_decode", "pipeline_ddim", "pipeline_euler", "pipeline_dpmpp2m"] {
        assert!(out.path().join(format!("{case}.safetensors")).is_file(), "{case} missing");
    }
}

/// A single-file checkpoint: `convert-checkpoint` writes a diffusers folder that `generate`
/// uses and that gives the same image as the original folder; `reference --model FILE
/// --config DIR` converts into the cache and reproduces the cases; a second conversion onto
/// an existing folder and an SDXL file are refused with what to do.
#[test]
fn single_file_checkpoints_convert_and_generate_like_their_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = fixtures().join("../single-file/sd-tiny.safetensors");
    let convert = |src: &std::path::Path, out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_atelier"))
            .arg("convert-checkpoint")
            .arg(src)
            .arg("--config")
            .arg(fixtures().join("pipeline"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let folder = dir.path().join("converted");
    let out = convert(&file, &folder);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let image = |model: &std::path::Path, name: &str| {
        let path = dir.path().join(name);
        let out = Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["generate", "--prompt", "a red circle", "--steps", "3", "--seed", "5", "--model"])
            .arg(model)
            .arg("--out")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        image::open(path).unwrap().to_rgb8().into_raw()
    };
    assert_eq!(image(&folder, "file.png"), image(&fixtures().join("pipeline"), "folder.png"), "bit-identical weights give the same image");
    let again = convert(&file, &folder);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let xl = convert(&fixtures().join("../single-file/sdxl-tiny.safetensors"), &dir.path().join("xl"));
    assert!(!xl.status.success());
    assert!(String::from_utf8_lossy(&xl.stderr).contains("SDXL checkpoint"), "{}", String::from_utf8_lossy(&xl.stderr));

    let refs = dir.path().join("ref");
    let out = Command::new(env!("CARGO_BIN_EXE_atelier"))
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .arg("reference")
        .arg("--model")
        .arg(&file)
        .arg("--config")
        .arg(fixtures().join("pipeline"))
        .arg("--cases")
        .arg(fixtures())
        .arg("--out")
        .arg(&refs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(refs.join("unet.safetensors"), &Device::Cpu).unwrap();
    let exp = candle_core::safetensors::load(fixtures().join("unet.safetensors"), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&got["noise_pred"], &exp["noise_pred"]).unwrap() < 1e-4);
    // A1111's short hash of the file names the cache folder.
    assert!(dir.path().join("cache/atelier/checkpoints/d91fae3131-sd-tiny/model_index.json").is_file());
}

/// An SDXL model generates from the command line like any other (two text encoders, micro-
/// conditioning, the zero negative of `force_zeros_for_empty_prompt`), at its native size; a
/// single file of a non-standard architecture is refused naming what it is and `--config`.
#[test]
fn sdxl_models_generate_and_odd_single_files_say_what_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let xl = fixtures().join("../sdxl-tiny/pipeline");
    let run = |model: &std::path::Path, out: &std::path::Path, negative: &str| {
        Command::new(env!("CARGO_BIN_EXE_atelier"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .args(["generate", "--prompt", "a lighthouse at dawn", "--steps", "3", "--seed", "7", "--negative-prompt", negative, "--model"])
            .arg(model)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let out = run(&xl, &a, "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&a).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64), "sample_size 32 × VAE factor 2");
    let out = run(&xl, &b, "blurry");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(img.into_raw(), image::open(&b).unwrap().to_rgb8().into_raw(), "the negative prompt is used");

    let file = fixtures().join("../single-file/sdxl-tiny.safetensors");
    let out = run(&file, &dir.path().join("c.png"), "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a standard") && err.contains("UNet width 32") && err.contains("--config"), "{err}");

    // A truncated download and a pickle are refused before anything is converted.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&cut, &dir.path().join("d.png"), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("truncated") && err.contains("cut.safetensors"), "{err}");
    let pickle = dir.path().join("old.safetensors");
    std::fs::write(&pickle, b"\x80\x02}q\x00(X\x05\x00\x00\x00state").unwrap();
    let out = run(&pickle, &dir.path().join("e.png"), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pickle"), "{err}");
    assert!(!dir.path().join("cache/atelier/checkpoints").exists() || std::fs::read_dir(dir.path().join("cache/atelier/checkpoints")).unwrap().next().is_none(), "nothing converted");
}

#[test]
fn generate_writes_png_with_parameters_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let path = dir.path().join(name);
        let out = Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["generate", "--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "4", "--seed", "11"])
            .args(["--scheduler", "ddim", "--model"])
            .arg(fixtures().join("pipeline"))
            .arg("--out")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(path).unwrap()
    };
    let a = run("a.png");
    let b = run("b.png");
    let img_a = image::load_from_memory(&a).unwrap().to_rgb8();
    let img_b = image::load_from_memory(&b).unwrap().to_rgb8();
    assert_eq!((img_a.width(), img_a.height()), (64, 64));
    assert_eq!(img_a.as_raw(), img_b.as_raw(), "same seed must give the same image");
    let params = atelier_engine::metadata::read_png_parameters(&a).unwrap().unwrap();
    assert!(params.starts_with("a red circle\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 11, Size: 64x64, Model hash: "), "{params}");
}

#[test]
fn generate_rejects_bad_input_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["generate", "--prompt", "x", "--width", "30", "--out", "/tmp/never.png", "--model"])
        .arg(fixtures().join("pipeline"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("30 is not a positive multiple of 8"));
    let out = Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["generate", "--prompt", "x", "--out", "/tmp/never.png", "--model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}

#[test]
fn optimize_negative_picks_the_known_good_candidate_and_keeps_the_run() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["optimize-negative", "--prompt", "a green square on a white background", "--candidates", "0"])
            .args(["--candidate", "low contrast", "--candidate", "on the left, on the right", "--seeds", "2", "--holdout-seeds", "1", "--steps", "8"])
            .arg("--model")
            .arg(repo.join("models/starter"))
            .arg("--shipped")
            .arg(repo.join("models/styles"))
            .arg("--data-dir")
            .arg(data.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: app::dto::OptimizeStatus = serde_json::from_slice(&out.stdout).unwrap();
    let result = status.result.unwrap();
    assert_eq!(result.winner.map(|w| result.candidates[w].negative.as_str()), Some("low contrast"), "{}", result.verdict);
    assert!(result.helped);
    let dir = data.path().join("negatives/runs").join(&status.id);
    assert!(dir.join("status.json").is_file() && dir.join("c1_s11000.png").is_file());
    // The measurements went into the history for the next prompt's suggestions.
    let history: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(data.path().join("negatives/history.json")).unwrap()).unwrap();
    assert_eq!(history.len(), 2);

    let out = run(&["--weights", "sharpness=-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a number ≥ 0"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `atelier runs list` narrows with an MLflow filter and prints a table; a bad filter
/// points at the character; `runs show` takes an id prefix.
#[test]
fn runs_list_and_show() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("tracking");
    let (first, run) = {
        let t = atelier_server::tracking::Tracker::open(&store).unwrap();
        let exp = t.experiment("styles").unwrap();
        let mut ids = Vec::new();
        for (name, rank, gain) in [("ink-r4", "4", 0.2), ("pastel-r8", "8", 0.3)] {
            let id = t.start_run(exp, name).unwrap();
            t.log_param(&id, "rank", rank).unwrap();
            t.log_param(&id, "lr", "0.001").unwrap();
            t.log_metric(&id, "similarity_gain", gain, 10).unwrap();
            t.end_run(&id, atelier_server::tracking::RunStatus::Finished).unwrap();
            ids.push(id);
        }
        (ids[0].clone(), ids[1].clone())
    };
    let atelier = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).arg("--tracking").arg(&store).output().unwrap();
    let out = atelier(&["runs", "list", "--filter", "params.rank = '8'"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("experiment styles (id 1): 1 of 2 run(s)"), "{text}");
    assert!(text.contains("pastel-r8") && !text.contains("ink-r4"), "{text}");
    assert!(text.contains("similarity_gain") && text.contains("0.3000"), "{text}");
    let out = atelier(&["runs", "list", "--filter", "params.rank = 8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid filter at character 15: rank is text") && err.contains("              ^"), "{err}");
    let out = atelier(&["runs", "show", &run[..6]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pastel-r8") && text.contains("rank") && text.contains("(1 points)"), "{text}");

    // compare: side by side, differing rows marked; CSV with a differs column.
    let out = atelier(&["runs", "compare", &first[..8], &run[..8]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |key: &str| text.lines().find(|l| l.trim_start_matches(['*', ' ']).starts_with(key)).unwrap_or_else(|| panic!("{key}: {text}")).to_string();
    assert!(line("params.rank").starts_with("* ") && line("params.rank").contains('4') && line("params.rank").contains('8'), "{text}");
    assert!(line("params.lr").starts_with("  "), "same value, not marked: {text}");
    assert!(line("metrics.similarity_gain").contains("0.200000") && line("metrics.similarity_gain").contains("0.300000"), "{text}");
    let out = atelier(&["runs", "compare", &first, &run, "--csv"]);
    let csv = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(rows[0], format!("key,differs,{first},{run}"));
    assert!(rows.contains(&"params.rank,true,4,8") && rows.contains(&"params.lr,false,0.001,0.001") && rows.contains(&"metrics.similarity_gain,true,0.2,0.3"), "{csv}");
    let out = atelier(&["runs", "compare", &first, "nope"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no run \"nope\""));
}

/// `bench` and `eval-starter` record runs: bench a parent with a child per case and
/// attention (`mlflow.parentRunId`), both with the commit and device tags and their
/// numbers as metrics; `--no-track` records nothing.
/// One `--device` for every command (and `ATELIER_DEVICE`): the CPU works everywhere; a GPU
/// this build lacks is refused before anything runs, naming the build that has it.
#[test]
fn device_choice_is_global_and_refuses_what_the_build_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let generate = |device_args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_atelier"));
        cmd.args(device_args).args(["generate", "--prompt", "a red circle", "--steps", "2", "--model"]).arg(fixtures().join("pipeline"));
        cmd.arg("--out").arg(dir.path().join("x.png")).env_remove("ATELIER_DEVICE");
        if let Some(v) = env {
            cmd.env("ATELIER_DEVICE", v);
        }
        cmd.output().unwrap()
    };
    assert!(generate(&["--device", "cpu"], None).status.success());
    assert!(generate(&[], Some("cpu")).status.success());
    if cfg!(not(any(feature = "cuda", feature = "metal"))) {
        for (args, env, needs) in [(&["--device", "cuda:1"][..], None, "--features cuda"), (&[][..], Some("metal"), "--features metal")] {
            let out = generate(args, env);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains(needs), "{args:?} {env:?}: {err}");
        }
    }
    let out = generate(&["--device", "tpu"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("use auto, cpu, cuda, cuda:N, metal or metal:N"), "{err}");
}

#[test]
fn benchmarks_and_evaluations_are_tracked_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("tracking");
    let atelier = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).arg("--tracking").arg(&store).current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")).env_remove("MLFLOW_TRACKING_URI").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    atelier(&["bench", "--case", "starter-unet", "--steps", "1"]);
    atelier(&["eval-starter", "--limit", "2", "--steps", "4"]);
    atelier(&["bench", "--case", "starter-unet", "--steps", "1", "--attention", "original", "--no-track"]);

    let t = atelier_server::tracking::Tracker::open(&store).unwrap();
    let bench = t.find_experiment("bench").unwrap().expect("experiment bench");
    let runs = t.search(bench, &Default::default()).unwrap();
    assert_eq!(runs.len(), 3, "a parent and two children (original, split-einsum); --no-track added none");
    let parent = runs.iter().find(|r| !r.tags.contains_key("mlflow.parentRunId")).unwrap();
    let children: Vec<_> = runs.iter().filter(|r| r.tags.get("mlflow.parentRunId") == Some(&parent.info.run_id)).collect();
    assert_eq!(children.len(), 2);
    for c in &children {
        assert_eq!(c.info.status, "FINISHED");
        assert_eq!(c.params["case"], "starter-unet");
        assert!(c.metrics["seconds_per_step"] > 0.0 && c.metrics["peak_rss_mib"] > 1.0, "{:?}", c.metrics);
        assert_eq!(c.tags["device"], "cpu");
        assert_eq!(c.tags["atelier.version"], env!("CARGO_PKG_VERSION"));
    }
    let eval = t.find_experiment("eval-starter").unwrap().expect("experiment eval-starter");
    let runs = t.search(eval, &Default::default()).unwrap();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!((r.params["prompts"].as_str(), r.params["steps"].as_str()), ("2", "4"));
    for k in ["plain_colour", "negative_colour", "plain_sharpness", "sharper_fraction", "seconds_per_image"] {
        assert!(r.metrics.contains_key(k), "{k}: {:?}", r.metrics);
    }
    assert!((0.0..=1.0).contains(&r.metrics["plain_colour"]));
    let images: Vec<String> = t.artifacts(&r.info.run_id).unwrap().into_iter().filter(|a| a.starts_with("images/")).collect();
    assert_eq!(images.len(), 2, "contact sheets in the image gallery: {images:?}");
}
