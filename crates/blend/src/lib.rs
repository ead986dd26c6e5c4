//! Style blends: the weight maths and the share-link format, in one crate that compiles
//! for the server and for the browser (WASM), so both compute exactly the same numbers.
//!
//! - [`defaults`]: default settings of a generation and of a style training;
//! - [`weights`]: block groups, per-block multipliers, normalisation, the 2-D blend pad
//!   (segment, triangle, square) and per-layer scale maps;
//! - [`link`]: a blend as a compact, checksummed, URL-safe string;
//! - [`preview`]: mixing already-rendered anchor images for an instant preview;
//! - [`resolve`]: matching a blend's styles to a studio's styles (by hash);
//! - [`tags`]: the `<lora:NAME:WEIGHT[:lbw=D,M,U]>` prompt tag grammar (reader and writer).

pub mod defaults;
pub mod link;
pub mod preview;
pub mod resolve;
pub mod tags;
pub mod weights;

use serde::{Deserialize, Serialize};

pub use link::{decode, encode, LinkError};
pub use weights::{Block, BlockWeights, Normalise};

/// One style in a blend: which adapter (by library name and A1111 short hash of its
/// kohya file), its weight, and its per-block multipliers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendStyle {
    pub name: String,
    pub hash: String,
    pub weight: f64,
    #[serde(default)]
    pub blocks: BlockWeights,
}

/// Everything needed to render a blend again: the model, the styles and the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blend {
    /// A1111 short hash of the base model.
    pub model_hash: String,
    pub styles: Vec<BlendStyle>,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub guidance: f64,
    pub scheduler: String,
    pub width: u32,
    pub height: u32,
}

impl Blend {
    /// The prompt with one `<lora:NAME:WEIGHT[:lbw=D,M,U]>` tag per style, the form the
    /// generator reads (styles with weight 0 are left out: they change nothing).
    pub fn tagged_prompt(&self) -> String {
        let mut out = self.prompt.trim_end().to_string();
        for s in self.styles.iter().filter(|s| s.weight != 0.0) {
            out.push(' ');
            out.push_str(&tags::LoraTag::new(s.name.as_str(), s.weight, &s.blocks).to_string());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_weights_exactly() {
        let b = Blend {
            model_hash: "0123456789".into(),
            styles: vec![
                BlendStyle { name: "ink".into(), hash: "aa".into(), weight: 0.1 + 0.2, blocks: BlockWeights::default() },
                BlendStyle { name: "off".into(), hash: "bb".into(), weight: 0.0, blocks: BlockWeights::default() },
                BlendStyle { name: "pastel".into(), hash: "cc".into(), weight: -0.5, blocks: BlockWeights { down: 0.0, mid: 1.0, up: 0.25 } },
            ],
            prompt: "a red circle ".into(),
            negative_prompt: String::new(),
            seed: 1,
            steps: 20,
            guidance: 7.5,
            scheduler: "ddim".into(),
            width: 64,
            height: 64,
        };
        let p = b.tagged_prompt();
        assert_eq!(p, "a red circle <lora:ink:0.30000000000000004> <lora:pastel:-0.5:lbw=0,1,0.25>");
        // Rust prints the shortest text that parses back to the same f64.
        assert_eq!("0.30000000000000004".parse::<f64>().unwrap(), 0.1 + 0.2);
    }
}
