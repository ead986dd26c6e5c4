//! AUTOMATIC1111 prompt syntax: `<lora:NAME:WEIGHT>` tags and attention weighting.
//!
//! Attention weighting follows A1111's rules: `(text)` multiplies the weight of its
//! tokens by 1.1, `[text]` divides it by 1.1, `(text:1.5)` sets a factor of 1.5, and
//! brackets nest by multiplying. `\(`, `\)`, `\[`, `\]` and `\\` are literal characters.
//! Brackets left open at the end apply to the rest of the prompt. The weights scale
//! the text encoder's output per token, after which the whole embedding is rescaled
//! to its original mean, so a weighted prompt keeps the overall magnitude SD expects.

use crate::{Error, Result};

/// Factor of one level of `( )`; `[ ]` divides by it.
pub const BRACKET_FACTOR: f64 = 1.1;

/// A `<lora:NAME:WEIGHT>` tag found in a prompt; `<lora:NAME:WEIGHT:lbw=D,M,U>` also sets
/// the multipliers of the UNet's down, mid and up blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: f64,
    pub blocks: Option<[f64; 3]>,
}

/// Parses `lbw=D,M,U` (three finite numbers).
pub fn parse_block_weights(text: &str) -> Option<[f64; 3]> {
    let v: Vec<f64> = text.strip_prefix("lbw=")?.split(',').map(|x| x.trim().parse::<f64>().ok().filter(|w| w.is_finite())).collect::<Option<_>>()?;
    <[f64; 3]>::try_from(v).ok()
}

/// Removes every `<lora:NAME>` / `<lora:NAME:WEIGHT>` tag from `prompt` and returns the
/// remaining text and the tags in order (weight 1 when omitted). A malformed tag (an
/// empty name, a weight that is not a number) is an error naming it.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        text.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            return Err(Error::invalid("prompt", format!("the tag \"{}\" is not closed with '>'", &rest[start..])));
        };
        let body = &after[..end];
        let mut parts = body.split(':');
        let name = parts.next().unwrap_or("").trim();
        let weight = match parts.next() {
            None => 1.0,
            Some(w) => w.trim().parse::<f64>().ok().filter(|w| w.is_finite()).ok_or_else(|| {
                Error::invalid("prompt", format!("<lora:{body}>: \"{}\" is not a weight (write e.g. <lora:{name}:0.8>)", w.trim()))
            })?,
        };
        let blocks = match parts.next() {
            None => None,
            Some(b) => Some(parse_block_weights(b.trim()).ok_or_else(|| {
                Error::invalid("prompt", format!("<lora:{body}>: \"{}\" is not lbw=DOWN,MID,UP (e.g. lbw=1,0.5,0)", b.trim()))
            })?),
        };
        if name.is_empty() || parts.next().is_some() {
            return Err(Error::invalid(
                "prompt",
                format!("<lora:{body}> is not of the form <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:WEIGHT:lbw=DOWN,MID,UP>"),
            ));
        }
        tags.push(LoraTag { name: name.to_string(), weight, blocks });
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

/// Splits a prompt into runs of text with their attention weights. Runs with equal
/// weights are merged; a prompt without brackets is one run of weight 1.
pub fn parse_attention(prompt: &str) -> Vec<(String, f64)> {
    let mut runs: Vec<(String, f64)> = Vec::new();
    // Start index into `runs` of each open bracket.
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let scale = |runs: &mut Vec<(String, f64)>, from: usize, factor: f64| {
        for r in &mut runs[from..] {
            r.1 *= factor;
        }
    };
    let push_text = |runs: &mut Vec<(String, f64)>, s: &str| runs.push((s.to_string(), 1.0));
    let chars: Vec<char> = prompt.chars().collect();
    let mut i = 0;
    let mut literal = String::new();
    let flush = |runs: &mut Vec<(String, f64)>, literal: &mut String| {
        if !literal.is_empty() {
            push_text(runs, literal);
            literal.clear();
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() && matches!(chars[i + 1], '(' | ')' | '[' | ']' | '\\') => {
                literal.push(chars[i + 1]);
                i += 2;
                continue;
            }
            '(' => {
                flush(&mut runs, &mut literal);
                round.push(runs.len());
            }
            '[' => {
                flush(&mut runs, &mut literal);
                square.push(runs.len());
            }
            ':' if !round.is_empty() => {
                // `:NUMBER)` closes the innermost round bracket with that factor.
                let tail: String = chars[i + 1..].iter().collect();
                let trimmed = tail.trim_start();
                let num_len = trimmed
                    .char_indices()
                    .take_while(|(k, ch)| ch.is_ascii_digit() || *ch == '.' || (*k == 0 && (*ch == '-' || *ch == '+')))
                    .count();
                let after_num = trimmed[num_len..].trim_start();
                match (trimmed[..num_len].parse::<f64>(), after_num.starts_with(')')) {
                    (Ok(w), true) => {
                        flush(&mut runs, &mut literal);
                        let open = round.pop().unwrap_or(0);
                        scale(&mut runs, open, w);
                        let consumed = tail.len() - after_num.len() + 1;
                        i += 1 + tail[..consumed].chars().count();
                        continue;
                    }
                    _ => literal.push(':'),
                }
            }
            ')' if !round.is_empty() => {
                flush(&mut runs, &mut literal);
                let open = round.pop().unwrap_or(0);
                scale(&mut runs, open, BRACKET_FACTOR);
            }
            ']' if !square.is_empty() => {
                flush(&mut runs, &mut literal);
                let open = square.pop().unwrap_or(0);
                scale(&mut runs, open, 1.0 / BRACKET_FACTOR);
            }
            _ => literal.push(c),
        }
        i += 1;
    }
    flush(&mut runs, &mut literal);
    for open in round.drain(..) {
        scale(&mut runs, open, BRACKET_FACTOR);
    }
    for open in square.drain(..) {
        scale(&mut runs, open, 1.0 / BRACKET_FACTOR);
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(runs.len());
    for (text, w) in runs {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&text),
            _ => merged.push((text, w)),
        }
    }
    if merged.is_empty() {
        merged.push((String::new(), 1.0));
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(runs: &[(String, f64)], expected: &[(&str, f64)]) {
        assert_eq!(runs.len(), expected.len(), "{runs:?}");
        for ((t, w), (et, ew)) in runs.iter().zip(expected) {
            assert_eq!(t, et, "{runs:?}");
            assert!((w - ew).abs() < 1e-9, "{t}: {w} vs {ew}");
        }
    }

    #[test]
    fn plain_text_is_one_run() {
        close(&parse_attention("a red circle on a blue background"), &[("a red circle on a blue background", 1.0)]);
        close(&parse_attention(""), &[("", 1.0)]);
    }

    #[test]
    fn brackets_and_explicit_weights() {
        close(&parse_attention("a (red) circle"), &[("a ", 1.0), ("red", 1.1), (" circle", 1.0)]);
        close(&parse_attention("a [red] circle"), &[("a ", 1.0), ("red", 1.0 / 1.1), (" circle", 1.0)]);
        close(&parse_attention("(red:1.5) circle"), &[("red", 1.5), (" circle", 1.0)]);
        close(&parse_attention("((red)) circle"), &[("red", 1.21), (" circle", 1.0)]);
        close(&parse_attention("(a (red:2) circle:0.5)"), &[("a ", 0.5), ("red", 1.0), (" circle", 0.5)]);
        close(&parse_attention("(red : 1.25 ) x"), &[("red ", 1.25), (" x", 1.0)]);
    }

    #[test]
    fn escapes_unmatched_and_colons() {
        close(&parse_attention(r"a \(literal\) [x"), &[("a (literal) ", 1.0), ("x", 1.0 / 1.1)]);
        close(&parse_attention("a) b] c"), &[("a) b] c", 1.0)]);
        close(&parse_attention("time: 5pm"), &[("time: 5pm", 1.0)]);
        close(&parse_attention("(a:b)"), &[("a:b", 1.1)]);
        close(&parse_attention("(open"), &[("open", 1.1)]);
    }

    #[test]
    fn lora_tags() {
        let (text, tags) = extract_lora_tags("a circle <lora:stripes:0.7>, <lora:dots> on red").unwrap();
        assert_eq!(text, "a circle ,  on red");
        assert_eq!(
            tags,
            vec![LoraTag { name: "stripes".into(), weight: 0.7, blocks: None }, LoraTag { name: "dots".into(), weight: 1.0, blocks: None }]
        );
        let (_, lbw) = extract_lora_tags("<lora:ink:0.8:lbw=1,0.5,0>").unwrap();
        assert_eq!(lbw[0].blocks, Some([1.0, 0.5, 0.0]));
        let (_, neg) = extract_lora_tags("<lora:ink:-0.5>").unwrap();
        assert_eq!(neg[0].weight, -0.5);
        for bad in ["<lora:x:abc>", "<lora::1>", "<lora:x:1", "<lora:x:1:2:3>", "<lora:x:1:lbw=1,2>", "<lora:x:1:lbw=a,b,c>"] {
            assert!(extract_lora_tags(bad).is_err(), "{bad}");
        }
        assert_eq!(extract_lora_tags("no tags").unwrap(), ("no tags".to_string(), vec![]));
    }
}
