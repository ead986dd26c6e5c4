//! A1111 prompt chunks on the fixture pipeline: prompts longer than 75 tokens and
//! `BREAK` encode to 77-token chunks concatenated along the token axis (each chunk equal
//! to the plain encoding of its own text), weights keep working per token in every
//! chunk, extra-network tags other than LoRA are removed with a warning, and a
//! generation pads the shorter of prompt and negative prompt with empty chunks.

use std::path::PathBuf;

use atelier_engine::attention::AttentionKind;
use atelier_engine::pipeline::{GenerateParams, StableDiffusion, TextConditioning};
use candle_core::{Device, Tensor};

fn model() -> StableDiffusion {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/sd-tiny/pipeline");
    StableDiffusion::load(&dir, &Device::Cpu).expect("fixture pipeline")
}

fn plain(sd: &StableDiffusion, prompt: &str) -> Tensor {
    sd.encode_prompt(prompt, AttentionKind::Original, &mut Vec::new()).unwrap().context
}

fn weighted(sd: &StableDiffusion, prompt: &str) -> (Tensor, Vec<String>) {
    let mut w = Vec::new();
    let t = sd.encode_weighted_prompt(prompt, AttentionKind::Original, &mut w).unwrap().context;
    (t, w)
}

fn chunk(t: &Tensor, i: usize) -> Tensor {
    t.narrow(1, 77 * i, 77).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn long_prompts_are_encoded_in_chunks_without_truncation() {
    let sd = model();
    assert_eq!(sd.tokenizer().encode_unpadded("red").len(), 1, "one token per word");
    let long = vec!["red"; 100].join(" ");
    let (z, warnings) = weighted(&sd, &long);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(z.dims(), &[1, 154, 32]);
    assert_eq!(max_diff(&chunk(&z, 0), &plain(&sd, &vec!["red"; 75].join(" "))), 0.0);
    assert_eq!(max_diff(&chunk(&z, 1), &plain(&sd, &vec!["red"; 25].join(" "))), 0.0);

    // A weight in the second chunk scales that token there (relative to the chunk's others).
    let (w, _) = weighted(&sd, &format!("{} (blue:1.5) circle", vec!["red"; 75].join(" ")));
    let (u, _) = weighted(&sd, &format!("{} blue circle", vec!["red"; 75].join(" ")));
    assert_eq!(max_diff(&chunk(&w, 0), &chunk(&u, 0)), 0.0, "the first chunk has no weights");
    let norm = |t: &Tensor, i: usize| t.get(0).unwrap().get(i).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let (c1w, c1u) = (chunk(&w, 1), chunk(&u, 1));
    // Token 1 of chunk 2 is "blue", token 2 "circle".
    let ratio = (norm(&c1w, 1) / norm(&c1u, 1)) / (norm(&c1w, 2) / norm(&c1u, 2));
    assert!((ratio - 1.5).abs() < 1e-4, "blue scaled {ratio} relative to circle");
}

#[test]
fn break_starts_a_new_chunk_and_is_never_a_word() {
    let sd = model();
    let (z, warnings) = weighted(&sd, "a red circle BREAK on a blue background");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(z.dims(), &[1, 154, 32]);
    assert_eq!(max_diff(&chunk(&z, 0), &plain(&sd, "a red circle")), 0.0);
    assert_eq!(max_diff(&chunk(&z, 1), &plain(&sd, "on a blue background")), 0.0);
    // A trailing BREAK adds nothing.
    let (t, _) = weighted(&sd, "a red circle BREAK");
    assert_eq!(max_diff(&t, &plain(&sd, "a red circle")), 0.0);
}

#[test]
fn other_extra_network_tags_are_removed_with_a_warning() {
    let sd = model();
    let (z, warnings) = weighted(&sd, "a red circle <hypernet:foo:1>");
    assert_eq!(max_diff(&z, &plain(&sd, "a red circle")), 0.0);
    assert_eq!(
        warnings,
        vec!["<hypernet:foo:1> was removed from the prompt: 'hypernet' extra networks are not supported (only <lora:…> / <lyco:…>)".to_string()]
    );
}

#[test]
fn a_short_negative_prompt_is_padded_with_empty_chunks() {
    let sd = model();
    let (cond, _) = weighted(&sd, "a red circle BREAK blue BREAK green");
    let (uncond, _) = weighted(&sd, "blurry");
    let as_cond = |t: &Tensor| TextConditioning { context: t.clone(), pooled: None };
    let (c, u) = sd.pad_to_same_chunks(as_cond(&cond), as_cond(&uncond), AttentionKind::Original).unwrap();
    let (c, u) = (c.context, u.context);
    assert_eq!((c.dims(), u.dims()), (&[1, 231, 32][..], &[1, 231, 32][..]));
    assert_eq!(max_diff(&c, &cond), 0.0);
    assert_eq!(max_diff(&chunk(&u, 0), &uncond), 0.0);
    let empty = plain(&sd, "");
    assert_eq!(max_diff(&chunk(&u, 1), &empty) + max_diff(&chunk(&u, 2), &empty), 0.0);

    // A generation with a long prompt and a short negative one runs, without warnings.
    let params = GenerateParams {
        prompt: "a red circle BREAK on a blue background".into(),
        negative_prompt: "blurry".into(),
        steps: 2,
        width: 16,
        height: 16,
        ..Default::default()
    };
    let out = sd.generate(&params, &mut |_| true).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let joined = GenerateParams { prompt: "a red circle on a blue background".into(), ..params.clone() };
    assert_ne!(out.images[0], sd.generate(&joined, &mut |_| true).unwrap().images[0], "BREAK changes the encoding");
}
