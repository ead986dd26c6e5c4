//! The A1111 extra-network tag grammar (`<lora:NAME:WEIGHT>`): its one reader and its one
//! writer, for the server (the engine re-exports them from `atelier_engine::prompt`) and
//! for the browser, which writes the tags of a blend.
//!
//! Extra-network tags follow A1111's grammar (`modules/extra_networks.py`,
//! `re_extra_net = <(\w+):([^>]+)>`): every `<KIND:ARGS>` is cut out of the text the text
//! encoder sees. `<lora:…>` and its alias `<lyco:…>` (registered by A1111's built-in Lora
//! extension) name LoRA adapters, case-insensitively; any other kind (`<hypernet:…>`, …)
//! is removed and reported, as A1111 skips extra networks it does not know. This module
//! is the one parser of these tags: every caller goes through [`parse_extra_networks`]
//! (or [`extract_lora_tags`], which uses it).
//!
//! A LoRA tag's arguments are `NAME`, `NAME:WEIGHT` or `NAME:WEIGHT:lbw=DOWN,MID,UP` (the
//! last sets the multipliers of the UNet's down, mid and up blocks, see
//! [`BlockWeights`]); [`LoraTag`]'s `Display` writes that form back, with the weight
//! as the shortest text that parses to the same `f64`.

use std::fmt;

use crate::weights::BlockWeights;

/// A `<lora:NAME:WEIGHT>` tag found in a prompt; `<lora:NAME:WEIGHT:lbw=D,M,U>` also sets
/// the multipliers of the UNet's down, mid and up blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: f64,
    pub blocks: Option<[f64; 3]>,
}

impl LoraTag {
    /// The tag of a style at `weight` with these block multipliers (none written when
    /// they are all 1).
    pub fn new(name: impl Into<String>, weight: f64, blocks: &BlockWeights) -> Self {
        let blocks = (!blocks.is_neutral()).then_some([blocks.down, blocks.mid, blocks.up]);
        Self { name: name.into(), weight, blocks }
    }

    /// The block multipliers (all 1 when the tag sets none).
    pub fn block_weights(&self) -> BlockWeights {
        self.blocks.map_or_else(BlockWeights::default, |[down, mid, up]| BlockWeights { down, mid, up })
    }
}

/// Writes `<lora:NAME:WEIGHT>` or `<lora:NAME:WEIGHT:lbw=DOWN,MID,UP>`, which
/// [`extract_lora_tags`] reads back to an equal tag (Rust prints the shortest text that
/// parses back to the same `f64`).
impl fmt::Display for LoraTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<lora:{}:{}", self.name, self.weight)?;
        if let Some([down, mid, up]) = self.blocks {
            write!(f, ":lbw={down},{mid},{up}")?;
        }
        f.write_str(">")
    }
}

/// A malformed LoRA tag in a prompt; the message names it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid prompt: {message}")]
pub struct TagError {
    message: String,
}

impl TagError {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }

    /// What is wrong, without the "invalid prompt" prefix.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Parses `lbw=D,M,U` (three finite numbers).
pub fn parse_block_weights(text: &str) -> Option<[f64; 3]> {
    let v: Vec<f64> = text.strip_prefix("lbw=")?.split(',').map(|x| x.trim().parse::<f64>().ok().filter(|w| w.is_finite())).collect::<Option<_>>()?;
    <[f64; 3]>::try_from(v).ok()
}

/// Extra-network kinds that name LoRA adapters (A1111: `lora`, and `lyco` as its alias).
const LORA_KINDS: [&str; 2] = ["lora", "lyco"];

/// A prompt with its extra-network tags taken out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExtraNetworks {
    /// The prompt without any `<KIND:…>` tag.
    pub text: String,
    /// The `<lora:…>` / `<lyco:…>` tags, in order.
    pub loras: Vec<LoraTag>,
    /// Every other tag, as written (e.g. `<hypernet:foo:1>`): not supported, removed.
    pub others: Vec<String>,
}

impl ExtraNetworks {
    /// One warning per removed tag that is not a LoRA, naming it.
    pub fn warnings(&self) -> Vec<String> {
        self.others
            .iter()
            .map(|t| {
                let kind = t.trim_start_matches('<').split(':').next().unwrap_or_default();
                format!("{t} was removed from the prompt: '{kind}' extra networks are not supported (only <lora:…> / <lyco:…>)")
            })
            .collect()
    }
}

/// A1111's `\w`: letters, digits and `_`.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A piece of a prompt: plain text, a LoRA tag, or another extra-network tag.
enum Piece<'a> {
    Text(&'a str),
    Lora(LoraTag),
    Other(&'a str),
}

/// Splits `prompt` at its extra-network tags (see the module doc for the grammar).
fn scan(prompt: &str) -> Result<Vec<Piece<'_>>, TagError> {
    let mut pieces = Vec::new();
    let mut text_start = 0;
    let mut i = 0;
    while let Some(off) = prompt[i..].find('<') {
        let start = i + off;
        let after = &prompt[start + 1..];
        let kind_len = after.find(|c: char| !is_word_char(c)).unwrap_or(after.len());
        let kind = &after[..kind_len];
        let is_lora = LORA_KINDS.iter().any(|k| kind.eq_ignore_ascii_case(k));
        let args = after[kind_len..].strip_prefix(':').filter(|_| kind_len > 0);
        // The body ends at the first '>'; a '<' before it starts another tag instead.
        let end = args.and_then(|a| a.find(['>', '<']).filter(|&e| a.as_bytes()[e] == b'>' && (e > 0 || is_lora)));
        let (Some(args), Some(end)) = (args, end) else {
            if is_lora && args.is_some() {
                return Err(TagError::new(format!("the tag \"{}\" is not closed with '>'", &prompt[start..])));
            }
            i = start + 1;
            continue;
        };
        let tag_end = start + 1 + kind_len + 1 + end + 1;
        pieces.push(Piece::Text(&prompt[text_start..start]));
        pieces.push(if is_lora { Piece::Lora(parse_lora_body(kind, &args[..end])?) } else { Piece::Other(&prompt[start..tag_end]) });
        text_start = tag_end;
        i = tag_end;
    }
    pieces.push(Piece::Text(&prompt[text_start..]));
    Ok(pieces)
}

/// Takes every extra-network tag out of `prompt` (see the module doc for the grammar).
/// LoRA tags are parsed ([`LoraTag`]); a malformed one (unclosed, an empty name, a weight
/// that is not a number) is an error naming it. Other tags are collected in `others`.
pub fn parse_extra_networks(prompt: &str) -> Result<ExtraNetworks, TagError> {
    let mut out = ExtraNetworks { text: String::with_capacity(prompt.len()), ..Default::default() };
    for piece in scan(prompt)? {
        match piece {
            Piece::Text(t) => out.text.push_str(t),
            Piece::Lora(tag) => out.loras.push(tag),
            Piece::Other(t) => out.others.push(t.to_string()),
        }
    }
    Ok(out)
}

/// Removes every `<lora:…>` / `<lyco:…>` tag (`<lora:NAME>`, `<lora:NAME:WEIGHT>`,
/// `<lora:NAME:WEIGHT:lbw=D,M,U>`) from `prompt` and returns the remaining text and the
/// tags in order (weight 1 when omitted). Other extra-network tags stay in the text (the
/// pipeline removes them with a warning). A malformed tag is an error naming it.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), TagError> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    for piece in scan(prompt)? {
        match piece {
            Piece::Text(t) | Piece::Other(t) => text.push_str(t),
            Piece::Lora(tag) => tags.push(tag),
        }
    }
    Ok((text, tags))
}

/// Parses the arguments of a LoRA tag alone (`NAME[:WEIGHT[:lbw=D,M,U]]`, what comes
/// between `<lora:` and `>`), e.g. a command line's `--style NAME:WEIGHT`. Errors as
/// [`extract_lora_tags`] would for `<lora:ARGS>`.
pub fn parse_lora_args(args: &str) -> Result<LoraTag, TagError> {
    parse_lora_body("lora", args)
}

/// Parses the body of a LoRA tag (the part after `<lora:`).
fn parse_lora_body(kind: &str, body: &str) -> Result<LoraTag, TagError> {
    let mut parts = body.split(':');
    let name = parts.next().unwrap_or("").trim();
    let weight = match parts.next() {
        None => 1.0,
        Some(w) => w.trim().parse::<f64>().ok().filter(|w| w.is_finite()).ok_or_else(|| {
            TagError::new(format!("<{kind}:{body}>: \"{}\" is not a weight (write e.g. <lora:{name}:0.8>)", w.trim()))
        })?,
    };
    let blocks = match parts.next() {
        None => None,
        Some(b) => Some(parse_block_weights(b.trim()).ok_or_else(|| {
            TagError::new(format!("<{kind}:{body}>: \"{}\" is not lbw=DOWN,MID,UP (e.g. lbw=1,0.5,0)", b.trim()))
        })?),
    };
    if name.is_empty() || parts.next().is_some() {
        return Err(TagError::new(format!(
            "<{kind}:{body}> is not of the form <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:WEIGHT:lbw=DOWN,MID,UP>"
        )));
    }
    Ok(LoraTag { name: name.to_string(), weight, blocks })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn lyco_is_lora_and_other_extra_networks_are_removed_by_name() {
        let tag = |name: &str, weight: f64| LoraTag { name: name.into(), weight, blocks: None };
        let p = parse_extra_networks("a <lyco:pastel:0.8> cat <hypernet:foo:1>, <LoRA:ink> <lyco:x:1:lbw=1,0,0>").unwrap();
        assert_eq!(p.text, "a  cat ,  ");
        assert_eq!(p.loras[..2], [tag("pastel", 0.8), tag("ink", 1.0)]);
        assert_eq!(p.loras[2].blocks, Some([1.0, 0.0, 0.0]));
        assert_eq!(p.others, vec!["<hypernet:foo:1>".to_string()]);
        assert_eq!(
            p.warnings(),
            vec!["<hypernet:foo:1> was removed from the prompt: 'hypernet' extra networks are not supported (only <lora:…> / <lyco:…>)".to_string()]
        );
        // extract_lora_tags takes LoRA tags (both spellings) and leaves the others to the pipeline.
        let (text, tags) = extract_lora_tags("<lyco:pastel:0.8> a <hypernet:foo:1> <lora:ink:0.5>").unwrap();
        assert_eq!((text.as_str(), tags), (" a <hypernet:foo:1> ", vec![tag("pastel", 0.8), tag("ink", 0.5)]));
        // Text that is no tag stays; a '<' inside a tag's body starts the next tag.
        for plain in ["a <3 b", "x < y: z", "<:x>", "<a:>", "a <b c:d>", "<lora>"] {
            assert_eq!(parse_extra_networks(plain).unwrap(), ExtraNetworks { text: plain.into(), ..Default::default() }, "{plain}");
        }
        let p = parse_extra_networks("<a:b <lora:x:1>").unwrap();
        assert_eq!((p.text.as_str(), p.loras.len()), ("<a:b ", 1));
        for bad in ["<lyco:x:abc>", "<lyco::1>", "<lyco:x", "<LORA:x:1:2:3>"] {
            assert!(parse_extra_networks(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_tag() {
        let e = extract_lora_tags("a <lora:x:abc>").unwrap_err();
        assert_eq!(e.to_string(), "invalid prompt: <lora:x:abc>: \"abc\" is not a weight (write e.g. <lora:x:0.8>)");
        assert_eq!(e.message(), "<lora:x:abc>: \"abc\" is not a weight (write e.g. <lora:x:0.8>)");
        assert_eq!(extract_lora_tags("<lora:x:1").unwrap_err().message(), "the tag \"<lora:x:1\" is not closed with '>'");
    }

    #[test]
    fn lora_args_alone() {
        assert_eq!(parse_lora_args("ink:0.5:lbw=1,0,0.5").unwrap(), LoraTag { name: "ink".into(), weight: 0.5, blocks: Some([1.0, 0.0, 0.5]) });
        assert_eq!(parse_lora_args("ink").unwrap().weight, 1.0);
        for bad in ["", ":1", "x:abc", "x:1:lbw=1", "x:1:lbw=1,1,1:2"] {
            assert_eq!(parse_lora_args(bad), extract_lora_tags(&format!("<lora:{bad}>")).map(|(_, t)| t[0].clone()), "{bad}");
            assert!(parse_lora_args(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn written_tags_read_back_exactly() {
        let neutral = BlockWeights::default();
        assert_eq!(LoraTag::new("ink", 1.0, &neutral).to_string(), "<lora:ink:1>");
        assert_eq!(LoraTag::new("ink", 0.1 + 0.2, &neutral).to_string(), "<lora:ink:0.30000000000000004>");
        let blocks = BlockWeights { down: 0.0, mid: 1.0, up: 0.25 };
        let tag = LoraTag::new("pastel", -0.5, &blocks);
        assert_eq!(tag.to_string(), "<lora:pastel:-0.5:lbw=0,1,0.25>");
        assert_eq!(tag.block_weights(), blocks);
        for t in [tag, LoraTag::new("ink", 0.1 + 0.2, &neutral), LoraTag::new("x", 1e-300, &BlockWeights { down: 1.0 / 3.0, mid: 2.0, up: -1.0 })] {
            let (text, back) = extract_lora_tags(&format!("a {t} b")).unwrap();
            assert_eq!((text.as_str(), back), ("a  b", vec![t]));
        }
    }
}
