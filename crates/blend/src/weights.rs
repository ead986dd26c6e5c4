//! Blend weights: which block group a layer belongs to, per-block multipliers, the
//! normalisation modes and the 2-D pad.

use serde::{Deserialize, Serialize};

/// The part of the model a layer belongs to, for per-block weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    TextEncoder,
    Down,
    Mid,
    Up,
    /// UNet layers outside the three block groups (conv_in, time embedding, conv_out).
    Other,
}

impl Block {
    /// The block of a layer by its diffusers name (`down_blocks.1.attentions.0…`).
    pub fn of_layer(text_encoder: bool, name: &str) -> Self {
        if text_encoder {
            Block::TextEncoder
        } else if name.starts_with("down_blocks") {
            Block::Down
        } else if name.starts_with("mid_block") {
            Block::Mid
        } else if name.starts_with("up_blocks") {
            Block::Up
        } else {
            Block::Other
        }
    }
}

/// Multipliers per UNet block group, on top of an adapter's weight (A1111's "LoRA block
/// weight" idea at the coarsest level). The text encoder and layers outside the groups
/// use the adapter weight alone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlockWeights {
    pub down: f64,
    pub mid: f64,
    pub up: f64,
}

impl Default for BlockWeights {
    fn default() -> Self {
        Self { down: 1.0, mid: 1.0, up: 1.0 }
    }
}

impl BlockWeights {
    pub fn of(&self, block: Block) -> f64 {
        match block {
            Block::Down => self.down,
            Block::Mid => self.mid,
            Block::Up => self.up,
            Block::TextEncoder | Block::Other => 1.0,
        }
    }

    /// All three at 1: the adapter weight alone.
    pub fn is_neutral(&self) -> bool {
        *self == Self::default()
    }
}

/// The scale an adapter gets on a layer of `block`: its weight times the block multiplier.
pub fn effective_scale(weight: f64, blocks: &BlockWeights, block: Block) -> f64 {
    weight * blocks.of(block)
}

/// For each layer (text encoder?, diffusers name), the scale of each style given as
/// (weight, block multipliers): `map[layer][style]`.
pub fn layer_scale_map(styles: &[(f64, BlockWeights)], layers: &[(bool, &str)]) -> Vec<Vec<f64>> {
    layers
        .iter()
        .map(|(te, name)| {
            let block = Block::of_layer(*te, name);
            styles.iter().map(|(w, b)| effective_scale(*w, b, block)).collect()
        })
        .collect()
}

/// How slider values become weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Normalise {
    /// Scaled so the weights add up to 1 (left as they are when they add up to 0 or less).
    #[default]
    SumToOne,
    /// Used as set.
    Free,
}

/// Applies `mode` to slider values.
pub fn normalise(raw: &[f64], mode: Normalise) -> Vec<f64> {
    match mode {
        Normalise::Free => raw.to_vec(),
        Normalise::SumToOne => {
            let sum: f64 = raw.iter().sum();
            if sum > 1e-12 {
                raw.iter().map(|w| w / sum).collect()
            } else {
                raw.to_vec()
            }
        }
    }
}

/// Where each style sits on the blend pad (unit square, y down), for `n` styles.
/// 2: the ends of a horizontal line; 3: a triangle (two top corners, bottom middle);
/// 4: the corners (top-left, top-right, bottom-left, bottom-right).
pub fn pad_anchors(n: usize) -> Option<Vec<(f64, f64)>> {
    match n {
        2 => Some(vec![(0.0, 0.5), (1.0, 0.5)]),
        3 => Some(vec![(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]),
        4 => Some(vec![(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]),
        _ => None,
    }
}

/// The weights of a point on the pad for `n` styles (2–4), summing to 1: linear along the
/// line, barycentric in the triangle (points outside are moved to the nearest point of
/// the triangle), bilinear in the square. The point is clamped to the unit square.
pub fn pad_weights(n: usize, point: (f64, f64)) -> Option<Vec<f64>> {
    let (x, y) = (point.0.clamp(0.0, 1.0), point.1.clamp(0.0, 1.0));
    match n {
        2 => Some(vec![1.0 - x, x]),
        3 => {
            let a = pad_anchors(3)?;
            Some(barycentric((x, y), [a[0], a[1], a[2]]).to_vec())
        }
        4 => Some(vec![(1.0 - x) * (1.0 - y), x * (1.0 - y), (1.0 - x) * y, x * y]),
        _ => None,
    }
}

/// Barycentric coordinates of `p` in the triangle `t`, for the closest point of the
/// triangle to `p` (so all three are in 0..=1 and add up to 1).
pub fn barycentric(p: (f64, f64), t: [(f64, f64); 3]) -> [f64; 3] {
    let raw = |p: (f64, f64)| {
        let [(x1, y1), (x2, y2), (x3, y3)] = t;
        let det = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3);
        let l1 = ((y2 - y3) * (p.0 - x3) + (x3 - x2) * (p.1 - y3)) / det;
        let l2 = ((y3 - y1) * (p.0 - x3) + (x1 - x3) * (p.1 - y3)) / det;
        [l1, l2, 1.0 - l1 - l2]
    };
    let l = raw(p);
    if l.iter().all(|v| *v >= 0.0) {
        return l;
    }
    // Outside: the nearest point on the three edges.
    let nearest_on = |a: (f64, f64), b: (f64, f64)| {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let s = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
        (a.0 + s * dx, a.1 + s * dy)
    };
    let candidates = [nearest_on(t[0], t[1]), nearest_on(t[1], t[2]), nearest_on(t[2], t[0])];
    let d2 = |q: (f64, f64)| (q.0 - p.0).powi(2) + (q.1 - p.1).powi(2);
    let best = candidates.iter().copied().fold(candidates[0], |acc, q| if d2(q) < d2(acc) { q } else { acc });
    raw(best).map(|v| v.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn blocks_by_layer_name() {
        assert_eq!(Block::of_layer(false, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), Block::Down);
        assert_eq!(Block::of_layer(false, "mid_block.attentions.0.proj_in"), Block::Mid);
        assert_eq!(Block::of_layer(false, "up_blocks.3.resnets.2.conv1"), Block::Up);
        assert_eq!(Block::of_layer(false, "conv_in"), Block::Other);
        assert_eq!(Block::of_layer(true, "text_model.encoder.layers.0.self_attn.q_proj"), Block::TextEncoder);
    }

    #[test]
    fn scale_map_multiplies_weight_by_block() {
        let styles = [(0.5, BlockWeights { down: 0.0, mid: 2.0, up: 1.0 }), (-1.0, BlockWeights::default())];
        let layers = [(false, "down_blocks.1.x"), (false, "mid_block.y"), (false, "up_blocks.0.z"), (true, "q_proj"), (false, "conv_in")];
        let m = layer_scale_map(&styles, &layers);
        assert_eq!(m, vec![vec![0.0, -1.0], vec![1.0, -1.0], vec![0.5, -1.0], vec![0.5, -1.0], vec![0.5, -1.0]]);
    }

    #[test]
    fn normalisation_modes() {
        assert!(close(&normalise(&[1.0, 3.0], Normalise::SumToOne), &[0.25, 0.75]));
        assert!(close(&normalise(&[2.0, -1.0], Normalise::SumToOne), &[2.0, -1.0]));
        assert!(close(&normalise(&[1.5, -0.5], Normalise::SumToOne), &[1.5, -0.5]));
        assert!(close(&normalise(&[0.0, 0.0], Normalise::SumToOne), &[0.0, 0.0]));
        assert!(close(&normalise(&[0.7, 0.9], Normalise::Free), &[0.7, 0.9]));
    }

    #[test]
    fn pad_corners_give_one_style_and_centres_mix_evenly() {
        for n in 2..=4 {
            let anchors = pad_anchors(n).unwrap();
            for (i, a) in anchors.iter().enumerate() {
                let w = pad_weights(n, *a).unwrap();
                let mut want = vec![0.0; n];
                want[i] = 1.0;
                assert!(close(&w, &want), "n={n} corner {i}: {w:?}");
            }
        }
        assert!(close(&pad_weights(2, (0.25, 0.9)).unwrap(), &[0.75, 0.25]));
        assert!(close(&pad_weights(4, (0.5, 0.5)).unwrap(), &[0.25; 4]));
        assert!(close(&pad_weights(4, (0.25, 0.0)).unwrap(), &[0.75, 0.25, 0.0, 0.0]));
        // The triangle's centroid mixes the three evenly.
        let c = pad_weights(3, (0.5, 1.0 / 3.0)).unwrap();
        assert!(close(&c, &[1.0 / 3.0; 3]), "{c:?}");
        // A point outside the triangle (bottom-left corner) lands on its nearest edge.
        let w = pad_weights(3, (0.0, 1.0)).unwrap();
        assert!(w.iter().all(|v| (0.0..=1.0).contains(v)) && (w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
        assert!(w[1] < 1e-12, "nearest edge is the left one: {w:?}");
        // Out-of-pad points are clamped, every weight set sums to 1.
        for n in 2..=4 {
            for p in [(-1.0, -1.0), (2.0, 0.3), (0.3, 0.7)] {
                let w = pad_weights(n, p).unwrap();
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "n={n} {p:?}: {w:?}");
            }
        }
        assert!(pad_weights(5, (0.5, 0.5)).is_none());
    }
}
