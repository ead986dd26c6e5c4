//! Styles from the command line: `atelier train-style` on a generated dataset with a
//! corrupt file, a duplicate and a non-image in it, then `atelier generate` using the
//! trained style through `<lora:NAME:WEIGHT>` and through `--lora FILE:WEIGHT`.

use std::path::{Path, PathBuf};
use std::process::Command;

use atelier_engine::starter::styles::{write_dataset, PictureStyle};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn atelier(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).current_dir(dir).output().unwrap()
}

#[test]
fn train_a_style_then_paint_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_dataset(PictureStyle::Inkline, &images, 6, 3).unwrap();
    std::fs::copy(images.join("001.png"), images.join("001-copy.png")).unwrap();
    std::fs::write(images.join("broken.png"), &std::fs::read(images.join("002.png")).unwrap()[..60]).unwrap();
    std::fs::write(images.join("readme.md"), "# my style").unwrap();
    let library = tmp.path().join("styles");
    let tracking = tmp.path().join("tracking");
    let lib = library.to_str().unwrap();
    let model = repo().join("models/starter");
    let model = model.to_str().unwrap();
    let imgs = images.to_str().unwrap();

    let out = atelier(
        &["train-style", "--name", "ink", "--images", imgs, "--trigger", "inkline", "--steps", "6", "--rank", "2", "--batch", "2"]
            .iter()
            .chain(&["--sample-every", "0", "--checkpoint-every", "3", "--library", lib, "--model", model, "--tracking", tracking.to_str().unwrap()])
            .copied()
            .collect::<Vec<_>>(),
        tmp.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("6 usable image(s)"), "{stdout}");
    assert!(stdout.contains("skipped broken.png: cannot be decoded"), "{stdout}");
    assert!(stdout.contains("skipped readme.md: not an image"), "{stdout}");
    assert!(stdout.contains("skipped 001.png: near-duplicate of 001-copy.png") || stdout.contains("skipped 001-copy.png: near-duplicate of 001.png"), "{stdout}");
    let style = library.join("ink");
    for f in ["ink.safetensors", "ink.diffusers.safetensors", "card.json", "loss.csv", "loss.png", "fit.json", "training_config.json", "compare.png"] {
        assert!(style.join(f).is_file(), "{f} missing");
    }
    assert!(!style.join("checkpoints").exists());
    let card: serde_json::Value = serde_json::from_slice(&std::fs::read(style.join("card.json")).unwrap()).unwrap();
    assert_eq!(card["trigger"], "inkline");
    assert_eq!(card["dataset_images"], 6);
    assert_eq!(card["dataset_skipped"], 3);
    for who in ["base", "style"] {
        let s = card["metrics"][who]["style_similarity"].as_f64().unwrap();
        assert!(s > 0.0 && s <= 1.0, "{who} similarity {s}");
        assert!(card["metrics"][who]["sharpness"].as_f64().unwrap() > 0.0);
    }

    // The run is in the experiment store: params, the loss per step, metrics, artifacts.
    let store = atelier_server::tracking::Tracker::open(&tracking).unwrap();
    let runs = store.runs(store.experiment("styles").unwrap()).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].name.as_str(), runs[0].status.as_str()), ("ink", "FINISHED"));
    let params = store.params(&runs[0].run_id).unwrap();
    assert!(params.contains(&("rank".to_string(), "2".to_string())), "{params:?}");
    assert_eq!(store.metric_history(&runs[0].run_id, "loss").unwrap().len(), 6);
    assert_eq!(store.metric_history(&runs[0].run_id, "style_style_similarity").unwrap().len(), 1);
    assert!(std::path::Path::new(&runs[0].artifact_uri).join("ink.safetensors").is_file());

    let gen = |prompt: &str, extra: &[&str], name: &str| {
        let png = tmp.path().join(name);
        let mut args = vec!["generate", "--prompt", prompt, "--seed", "5", "--steps", "6", "--model", model, "--library", lib, "--out"];
        args.push(png.to_str().unwrap());
        args.extend_from_slice(extra);
        let out = atelier(&args.iter().map(|s| &**s).collect::<Vec<_>>(), tmp.path());
        (out, png)
    };
    let (out, tagged) = gen("a red circle on a blue background, inkline style <lora:ink:1>", &[], "tagged.png");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&tagged).unwrap();
    let params = atelier_engine::metadata::read_png_parameters(&bytes).unwrap().unwrap();
    assert!(params.starts_with("a red circle on a blue background, inkline style <lora:ink:1>\n"), "{params}");
    assert!(params.contains("Lora hashes: \"ink: "), "{params}");
    let adapter = style.join("ink.safetensors");
    let spec = format!("{}:1", adapter.display());
    let (out, by_file) = gen("a red circle on a blue background, inkline style", &["--lora", &spec], "file.png");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = image::open(&tagged).unwrap().to_rgb8();
    let b = image::open(&by_file).unwrap().to_rgb8();
    assert_eq!(a.as_raw(), b.as_raw(), "the tag and --lora give the same picture");

    let (out, _) = gen("a red circle <lora:nosuch:1>", &[], "bad.png");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("<lora:nosuch> names no style") && err.contains("ink"), "{err}");
}
