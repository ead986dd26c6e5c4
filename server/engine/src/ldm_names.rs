//! The original Stable Diffusion (CompVis LDM / Stability SGM) names of UNet layers, from
//! their diffusers names. kohya sd-scripts names SDXL LoRA modules this way
//! (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and some SD 1.x LoCon
//! files do the same for resnets.
//!
//! Mapping (L = `layers_per_block`, so every level has L + 1 LDM blocks; the table of
//! `../shared/fixtures/single-file/README.md`, the inverse of [`crate::single_file`]'s):
//! `conv_in` → `input_blocks.0.0`; `time_embedding.linear_{1,2}` → `time_embed.{0,2}`;
//! `add_embedding.linear_{1,2}` → `label_emb.0.{0,2}`; `down_blocks.i.{resnets,attentions}.j`
//! → `input_blocks.{1 + (L+1)i + j}.{0,1}`; `down_blocks.i.downsamplers.0.conv` →
//! `input_blocks.{(L+1)(i+1)}.0.op`; `mid_block.{resnets.0, attentions.0, resnets.1}` →
//! `middle_block.{0,1,2}`; `up_blocks.i.{resnets,attentions}.j` → `output_blocks.{(L+1)i + j}.{0,1}`;
//! `up_blocks.i.upsamplers.0.conv` → `output_blocks.{(L+1)i + L}.{2 if the block has
//! attentions, else 1}.conv`; `conv_norm_out`/`conv_out` → `out.0`/`out.2`; inside resnets
//! `norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut` → `in_layers.0, in_layers.2,
//! emb_layers.1, out_layers.0, out_layers.3, skip_connection`; names inside attentions
//! (Transformer2DModel) are the same in both.

use crate::unet::UNetConfig;

/// The LDM name of the diffusers UNet layer `name` (dotted, without `.weight`), or `None`
/// for a name outside the mapping.
pub fn unet_to_ldm(name: &str, config: &UNetConfig) -> Option<String> {
    let per_level = config.layers_per_block + 1;
    let simple = [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ];
    if let Some((_, ldm)) = simple.iter().find(|(d, _)| *d == name) {
        return Some(ldm.to_string());
    }
    let mut parts = name.splitn(5, '.');
    let (a, b, c, d) = (parts.next()?, parts.next()?, parts.next()?, parts.next());
    let rest = parts.next();
    // `{resnets,attentions}.j.REST` of a level whose first LDM block is `first`.
    let member = |blocks: &str, first: usize| -> Option<String> {
        let j: usize = d?.parse().ok()?;
        let (slot, sub) = if c == "resnets" { (0, resnet_sub(rest?)?) } else { (1, rest?.to_string()) };
        Some(format!("{blocks}.{}.{slot}.{sub}", first + j))
    };
    match (a, b) {
        ("down_blocks", i) => {
            let i: usize = i.parse().ok()?;
            match c {
                "resnets" | "attentions" => member("input_blocks", 1 + per_level * i),
                "downsamplers" if d == Some("0") && rest == Some("conv") => Some(format!("input_blocks.{}.0.op", per_level * (i + 1))),
                _ => None,
            }
        }
        ("mid_block", kind) => {
            let (j, sub) = (c, d.map(|d| rest.map_or(d.to_string(), |r| format!("{d}.{r}")))?);
            match (kind, j) {
                ("resnets", "0") => Some(format!("middle_block.0.{}", resnet_sub(&sub)?)),
                ("attentions", "0") => Some(format!("middle_block.1.{sub}")),
                ("resnets", "1") => Some(format!("middle_block.2.{}", resnet_sub(&sub)?)),
                _ => None,
            }
        }
        ("up_blocks", i) => {
            let i: usize = i.parse().ok()?;
            match c {
                "resnets" | "attentions" => member("output_blocks", per_level * i),
                "upsamplers" if d == Some("0") && rest == Some("conv") => {
                    let has_attention = config.up_block_types.get(i)? == "CrossAttnUpBlock2D";
                    Some(format!("output_blocks.{}.{}.conv", per_level * i + per_level - 1, if has_attention { 2 } else { 1 }))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A resnet's inner layer name in LDM.
fn resnet_sub(sub: &str) -> Option<String> {
    let (head, tail) = sub.split_once('.').map_or((sub, None), |(h, t)| (h, Some(t)));
    let ldm = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(tail.map_or(ldm.to_string(), |t| format!("{ldm}.{t}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL base's block names as kohya writes them (sd-scripts `sdxl_model_util` /
    /// the sdxl-tiny fixture's kohya LoRA keys).
    #[test]
    fn sdxl_names() {
        let c = UNetConfig::sdxl();
        let cases = [
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
            ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
            ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
            ("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "output_blocks.2.1.transformer_blocks.9.ff.net.2"),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
            ("up_blocks.2.upsamplers.0.conv", "output_blocks.8.1.conv"),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
            ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
            ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_out", "out.2"),
        ];
        for (d, ldm) in cases {
            assert_eq!(unet_to_ldm(d, &c).as_deref(), Some(ldm), "{d}");
        }
        assert_eq!(unet_to_ldm("down_blocks.0.attentions", &c), None);
    }
}
