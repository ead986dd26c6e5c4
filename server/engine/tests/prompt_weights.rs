//! A1111 attention weighting on the fixture pipeline's text encoder: unweighted prompts
//! encode exactly as diffusers does, and `(word:w)` scales that word's vectors by w
//! relative to the rest, with the overall mean kept.

use std::path::PathBuf;

use atelier_engine::attention::AttentionKind;
use atelier_engine::pipeline::StableDiffusion;
use candle_core::{Device, Tensor};

fn model() -> StableDiffusion {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/sd-tiny/pipeline");
    StableDiffusion::load(&dir, &Device::Cpu).expect("fixture pipeline")
}

fn encode(sd: &StableDiffusion, prompt: &str, weighted: bool) -> Tensor {
    let mut w = Vec::new();
    let out = if weighted {
        sd.encode_weighted_prompt(prompt, AttentionKind::Original, &mut w)
    } else {
        sd.encode_prompt(prompt, AttentionKind::Original, &mut w)
    };
    out.unwrap().context.squeeze(0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn unweighted_prompts_encode_literally() {
    let sd = model();
    let plain = encode(&sd, "a photograph of an astronaut riding a horse", false);
    for p in ["a photograph of an astronaut riding a horse", "a photograph of an (astronaut:1.0) riding a horse"] {
        assert_eq!(max_diff(&encode(&sd, p, true), &plain), 0.0, "{p}");
    }
    let escaped = encode(&sd, r"a \(photograph\)", true);
    assert_eq!(max_diff(&escaped, &encode(&sd, "a (photograph)", false)), 0.0);
}

#[test]
fn a_weighted_word_is_scaled_against_the_rest() {
    let sd = model();
    let plain = encode(&sd, "a photograph of an astronaut riding a horse", false);
    let weighted = encode(&sd, "a photograph of an (astronaut:1.5) riding a horse", true);
    // Token 5 is "astronaut" (after <start>, a, photograph, of, an); token 2 is "photograph".
    let ratio = |i: usize| {
        let w = weighted.get(i).unwrap();
        let p = plain.get(i).unwrap();
        (w.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() / p.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    };
    let (word, other) = (ratio(5), ratio(2));
    assert!((word / other - 1.5).abs() < 1e-4, "astronaut scaled {word}, photograph {other}");
    let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((mean(&weighted) - mean(&plain)).abs() < 1e-6, "mean kept");
}
