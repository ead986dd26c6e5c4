//! Blends from the command line on the starter model and its shipped styles: a share
//! link and a saved blend render the identical image as the same tags typed by hand;
//! styles are found by hash under another name, missing ones and damaged links are
//! reported; baking (exact, compressed) and merging reproduce the blend.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn atelier(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).current_dir(dir).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pixels(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn links_saved_blends_baking_and_merging() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (lib, data) = (t.join("styles"), t.join("data"));
    // A user style (frame's diffusers-layout file: the same style, other bytes and hash),
    // to be renamed and removed later.
    std::fs::create_dir_all(lib.join("mine")).unwrap();
    std::fs::copy(repo().join("models/styles/frame/frame.diffusers.safetensors"), lib.join("mine/mine.safetensors")).unwrap();
    let model = repo().join("models/starter");
    let common = ["--model", model.to_str().unwrap(), "--library", lib.to_str().unwrap(), "--data-dir", data.to_str().unwrap()];
    let run = |args: &[&str]| atelier(&[args, &common[..]].concat(), &repo());
    let prompt = "a red circle on a blue background";

    let link = ok(run(&["blend", "link", "--style", "inkline:0.6", "--style", "pastel:0.4:lbw=1,0.5,0", "--style", "mine:0.3",
        "--prompt", prompt, "--seed", "5", "--steps", "8", "--save", "mix"]))
    .trim()
    .to_string();
    assert!(link.len() < 300 && !link.contains(' '), "{link}");
    assert!(data.join("blends/mix.json").is_file());

    let by_hand = t.join("hand.png");
    let tagged = format!("{prompt} <lora:inkline:0.6> <lora:pastel:0.4:lbw=1,0.5,0> <lora:mine:0.3>");
    ok(run(&["generate", "--prompt", &tagged, "--seed", "5", "--steps", "8", "--out", by_hand.to_str().unwrap()]));
    let from_link = t.join("link.png");
    ok(run(&["generate", "--blend", &format!("http://studio:3000/blend?b={link}"), "--out", from_link.to_str().unwrap()]));
    let from_name = t.join("name.png");
    ok(run(&["generate", "--blend", "mix", "--out", from_name.to_str().unwrap()]));
    assert_eq!(pixels(&by_hand), pixels(&from_link), "the link renders the identical image");
    assert_eq!(pixels(&by_hand), pixels(&from_name));
    let plain = t.join("plain.png");
    ok(run(&["generate", "--prompt", prompt, "--seed", "5", "--steps", "8", "--out", plain.to_str().unwrap()]));
    assert_ne!(pixels(&plain), pixels(&by_hand));

    // A damaged link is refused with a message, not a crash.
    let mut damaged = link.clone().into_bytes();
    let mid = damaged.len() / 2;
    damaged[mid] = if damaged[mid] == b'A' { b'B' } else { b'A' };
    let out = run(&["generate", "--blend", std::str::from_utf8(&damaged).unwrap(), "--out", t.join("x.png").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged or cut off"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["generate", "--blend", &link[..link.len() - 5], "--out", t.join("x.png").to_str().unwrap()]);
    assert!(!out.status.success());

    // Bake: the exact file alone gives the blend's picture; compressed reports its error.
    let baked = t.join("baked.safetensors");
    let said = ok(run(&["blend", "bake", "mix", "--out", baked.to_str().unwrap()]));
    assert!(said.contains("exact bake of 3 style(s)"), "{said}");
    let from_baked = t.join("baked.png");
    ok(run(&["generate", "--prompt", prompt, "--lora", &format!("{}:1", baked.display()), "--seed", "5", "--steps", "8", "--out", from_baked.to_str().unwrap()]));
    let d = max_diff(&pixels(&by_hand), &pixels(&from_baked));
    assert!(d <= 2, "exact bake differs from the blend by {d}/255");
    let small = t.join("small.safetensors");
    let said = ok(run(&["blend", "bake", &link, "--rank", "2", "--out", small.to_str().unwrap()]));
    let err: f64 = said.split("relative error ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(err > 0.0 && err < 1.0, "{said}");

    // Merge: the merged model with no adapters paints the blend.
    let merged = t.join("merged");
    ok(run(&["blend", "merge", "mix", "--out", merged.to_str().unwrap()]));
    let from_merged = t.join("merged.png");
    let out = atelier(
        &["generate", "--prompt", prompt, "--seed", "5", "--steps", "8", "--model", merged.to_str().unwrap(), "--out", from_merged.to_str().unwrap()],
        &repo(),
    );
    ok(out);
    let d = max_diff(&pixels(&by_hand), &pixels(&from_merged));
    assert!(d <= 2, "merged model differs from the blend by {d}/255");

    // Styles are matched by content: a renamed copy still serves the link; a removed one
    // is named with its hash.
    std::fs::rename(lib.join("mine"), lib.join("yours")).unwrap();
    std::fs::rename(lib.join("yours/mine.safetensors"), lib.join("yours/yours.safetensors")).unwrap();
    let renamed = t.join("renamed.png");
    ok(run(&["generate", "--blend", &link, "--out", renamed.to_str().unwrap()]));
    assert_eq!(pixels(&renamed), pixels(&by_hand));
    std::fs::remove_dir_all(lib.join("yours")).unwrap();
    let out = run(&["generate", "--blend", &link, "--out", t.join("x.png").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs the style mine (hash "), "{err}");
    let shown = ok(run(&["blend", "show", "mix"]));
    assert!(shown.contains("missing style mine"), "{shown}");
}
