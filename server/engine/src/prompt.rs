//! AUTOMATIC1111 prompt syntax: extra-network tags (`<lora:NAME:WEIGHT>`), attention
//! weighting, `BREAK` and 75-token chunks.
//!
//! The extra-network tag grammar (`<lora:…>`, `<lyco:…>`, other `<KIND:…>` tags removed)
//! lives in `atelier_blend::tags`, shared with the browser, which writes the tags of a
//! blend; it is re-exported here, and its [`TagError`] becomes [`Error::InvalidInput`]
//! (field `prompt`) with the same message.
//!
//! `BREAK` (the exact uppercase word between non-word characters, A1111 `prompt_parser`
//! `re_break = \s*\bBREAK\b\s*`) ends the current chunk of tokens. Prompts are encoded
//! in chunks of 75 tokens (each wrapped in start/end tokens to CLIP's 77) whose hidden
//! states are concatenated, as A1111's `sd_hijack_clip` does: see [`chunk_tokens`].
//!
//! Attention weighting follows A1111's rules: `(text)` multiplies the weight of its
//! tokens by 1.1, `[text]` divides it by 1.1, `(text:1.5)` sets a factor of 1.5, and
//! brackets nest by multiplying. `\(`, `\)`, `\[`, `\]` and `\\` are literal characters.
//! Brackets left open at the end apply to the rest of the prompt. The weights scale
//! the text encoder's output per token, after which the whole embedding is rescaled
//! to its original mean, so a weighted prompt keeps the overall magnitude SD expects.

use crate::Error;

pub use atelier_blend::tags::{extract_lora_tags, parse_block_weights, parse_extra_networks, ExtraNetworks, LoraTag, TagError};

/// Factor of one level of `( )`; `[ ]` divides by it.
pub const BRACKET_FACTOR: f64 = 1.1;

impl From<TagError> for Error {
    fn from(e: TagError) -> Self {
        Error::invalid("prompt", e.message())
    }
}

/// A1111's `\w`: letters, digits and `_` (what `BREAK` must not touch).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
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

/// The word that ends a chunk.
pub const BREAK: &str = "BREAK";

/// Tokens per chunk, between the start and end tokens (CLIP's 77 − 2).
pub const CHUNK_TOKENS: usize = 75;

/// How far back (in tokens) a full chunk looks for a comma to break at instead of
/// mid-phrase: A1111's `comma_padding_backtrack` setting, default 20.
pub const COMMA_BACKTRACK: usize = 20;

/// A run of prompt text with its attention weight, or a chunk break.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Text(String, f64),
    Break,
}

/// [`parse_attention`], with each `BREAK` (and the whitespace around it) turned into a
/// [`Segment::Break`]. Unlike A1111, whose marker a surrounding bracket turns back into
/// the word, a `BREAK` inside brackets breaks too: it is never encoded as a word.
pub fn parse_segments(prompt: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for (text, weight) in parse_attention(prompt) {
        let mut rest = text.as_str();
        loop {
            let at = rest.match_indices(BREAK).map(|(i, _)| i).find(|&i| {
                let before = rest[..i].chars().next_back();
                let after = rest[i + BREAK.len()..].chars().next();
                !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
            });
            let Some(i) = at else { break };
            let head = rest[..i].trim_end();
            if !head.is_empty() {
                out.push(Segment::Text(head.to_string(), weight));
            }
            out.push(Segment::Break);
            rest = rest[i + BREAK.len()..].trim_start();
        }
        if !rest.is_empty() || out.is_empty() {
            out.push(Segment::Text(rest.to_string(), weight));
        }
    }
    out
}

/// One chunk of a prompt's tokens (without start/end tokens, at most [`CHUNK_TOKENS`]),
/// with each token's attention weight.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

/// A tokenized prompt segment: ids with one weight, or a break.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRun {
    Ids(Vec<u32>, f64),
    Break,
}

/// Splits a tokenized prompt into chunks of at most `size` tokens, as A1111's
/// `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` (`modules/sd_hijack_clip.py`)
/// does: a break ends the current chunk (even an empty one); when a chunk is full and a
/// `comma` token lies within the last [`COMMA_BACKTRACK`] tokens, the tokens after that
/// comma move on to the next chunk; an empty prompt is one empty chunk, and a trailing
/// break adds no chunk.
pub fn chunk_tokens(runs: &[TokenRun], size: usize, comma: Option<u32>) -> Vec<TokenChunk> {
    let size = size.max(1);
    let mut chunks = Vec::new();
    let mut chunk = TokenChunk::default();
    let mut last_comma: Option<usize> = None;
    for run in runs {
        let (ids, weight) = match run {
            TokenRun::Break => {
                chunks.push(std::mem::take(&mut chunk));
                last_comma = None;
                continue;
            }
            TokenRun::Ids(ids, w) => (ids, *w),
        };
        for &id in ids {
            if Some(id) == comma {
                last_comma = Some(chunk.ids.len());
            } else if chunk.ids.len() == size {
                if let Some(c) = last_comma.filter(|c| size - c <= COMMA_BACKTRACK) {
                    let moved = TokenChunk { ids: chunk.ids.split_off(c + 1), weights: chunk.weights.split_off(c + 1) };
                    chunks.push(std::mem::replace(&mut chunk, moved));
                    last_comma = None;
                }
            }
            if chunk.ids.len() == size {
                chunks.push(std::mem::take(&mut chunk));
                last_comma = None;
            }
            chunk.ids.push(id);
            chunk.weights.push(weight);
        }
    }
    if !chunk.ids.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    chunks
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
    fn lyco_tags_are_lora_tags() {
        // A1111's built-in Lora extension registers `lyco` as an alias of `lora`.
        let (text, tags) = extract_lora_tags("a cat <lyco:fur_loha:0.6>, <lora:ink:1.2>").unwrap();
        let (plain, plain_tags) = extract_lora_tags("a cat <lora:fur_loha:0.6>, <lora:ink:1.2>").unwrap();
        assert_eq!((text, tags), (plain, plain_tags.clone()));
        assert_eq!((plain_tags[0].name.as_str(), plain_tags[0].weight), ("fur_loha", 0.6));
        let parsed = parse_extra_networks("<lyco:fur_loha> a cat").unwrap();
        assert_eq!((parsed.loras[0].name.as_str(), parsed.loras[0].weight, parsed.others.len()), ("fur_loha", 1.0, 0));
    }

    #[test]
    fn a_malformed_tag_is_invalid_input_with_the_same_message() {
        let e = Error::from(extract_lora_tags("a <lora:x:abc>").unwrap_err());
        assert!(matches!(&e, Error::InvalidInput { field: "prompt", .. }), "{e:?}");
        assert_eq!(e.to_string(), "invalid prompt: <lora:x:abc>: \"abc\" is not a weight (write e.g. <lora:x:0.8>)");
        assert_eq!(e.to_string(), extract_lora_tags("a <lora:x:abc>").unwrap_err().to_string());
    }

    #[test]
    fn break_splits_segments_only_as_a_word() {
        use Segment::{Break, Text};
        let t = |s: &str, w: f64| Text(s.into(), w);
        assert_eq!(parse_segments("a cat BREAK a dog"), vec![t("a cat", 1.0), Break, t("a dog", 1.0)]);
        assert_eq!(parse_segments("a cat,BREAK,a dog"), vec![t("a cat,", 1.0), Break, t(",a dog", 1.0)]);
        assert_eq!(parse_segments("BREAK a"), vec![Break, t("a", 1.0)]);
        assert_eq!(parse_segments("(red BREAK blue:1.5) x"), vec![t("red", 1.5), Break, t("blue", 1.5), t(" x", 1.0)]);
        for word in ["BREAKFAST", "break", "a_BREAK", "Break"] {
            assert_eq!(parse_segments(word), vec![t(word, 1.0)]);
        }
        assert_eq!(parse_segments(""), vec![t("", 1.0)]);
    }

    #[test]
    fn tokens_are_chunked_as_a1111_does() {
        let ids = |n: u32| TokenRun::Ids((0..n).map(|i| 100 + i).collect(), 1.0);
        let lens = |c: Vec<TokenChunk>| c.iter().map(|c| c.ids.len()).collect::<Vec<_>>();
        assert_eq!(lens(chunk_tokens(&[ids(80)], 75, None)), [75, 5]);
        assert_eq!(lens(chunk_tokens(&[ids(75)], 75, None)), [75]);
        assert_eq!(lens(chunk_tokens(&[], 75, None)), [0]);
        assert_eq!(lens(chunk_tokens(&[ids(3), TokenRun::Break, ids(4)], 75, None)), [3, 4]);
        assert_eq!(lens(chunk_tokens(&[ids(3), TokenRun::Break], 75, None)), [3]);
        assert_eq!(lens(chunk_tokens(&[TokenRun::Break, ids(3)], 75, None)), [0, 3]);
        // A comma within the last 20 tokens of a full chunk: what follows it moves on.
        let comma = 7;
        let with_comma = |at: u32| TokenRun::Ids((0..80).map(|i| if i == at { comma } else { 100 + i }).collect(), 1.0);
        assert_eq!(lens(chunk_tokens(&[with_comma(60)], 75, Some(comma))), [61, 19]);
        assert_eq!(lens(chunk_tokens(&[with_comma(50)], 75, Some(comma))), [75, 5], "too far back");
        // Weights travel with their tokens.
        let c = chunk_tokens(&[ids(74), TokenRun::Ids(vec![1, 2], 1.5)], 75, None);
        assert_eq!((c[0].weights[74], c[1].weights.clone(), c[1].ids.clone()), (1.5, vec![1.5], vec![2]));
    }
}
