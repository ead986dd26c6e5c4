//! CLIP text encoder (transformers' `CLIPTextModel`), configured from its `config.json`.
//! SD 1.x uses OpenAI CLIP ViT-L/14 (quick_gelu), SD 2.x OpenCLIP ViT-H (gelu, 23 layers).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::attention::{multi_head, AttentionKind};
use crate::layers::{layer_norm, LayerNorm, Activation, Linear};

/// The fields of a transformers `CLIPTextConfig` that shape the model.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// Width of `text_projection` in `CLIPTextModelWithProjection` (SDXL's second text
    /// encoder: 1280); `None` for a plain `CLIPTextModel`.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// transformers' class names; `CLIPTextModelWithProjection` has a `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

impl ClipConfig {
    /// SD 1.5's text encoder (openai/clip-vit-large-patch14, `text_encoder/config.json`).
    pub fn v1_5() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
            projection_dim: None,
            architectures: vec!["CLIPTextModel".into()],
        }
    }

    /// Whether the model has a `text_projection` (transformers `CLIPTextModelWithProjection`).
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: Linear::new(h, h, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, h, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, h, vb.pp("v_proj"))?,
            out_proj: Linear::new(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let q = self.q_proj.forward(xs)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        let kind = if attn == AttentionKind::Flash { AttentionKind::Original } else { attn };
        let o = multi_head(kind, &q, &k, &v, self.heads, Some(mask), (self.head_dim as f64).powf(-0.5))?;
        self.out_proj.forward(&o)
    }
}

struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipLayer {
    fn new(c: &ClipConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(c, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(c.hidden_size, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: Linear::new(c.intermediate_size, c.hidden_size, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, attn: AttentionKind) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask, attn)?;
        let xs = (xs + h)?;
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?)?;
        xs + h
    }
}

/// Output of the text encoder.
pub struct ClipOutput {
    /// (batch, tokens, hidden) after the final layer norm: SD's `encoder_hidden_states`.
    pub last_hidden_state: Tensor,
    /// (batch, hidden): the state at the end-of-text token.
    pub pooler_output: Tensor,
}

/// SDXL's view of a text encoder (diffusers `StableDiffusionXLPipeline.encode_prompt`).
pub struct PenultimateOutput {
    /// (batch, tokens, hidden): `hidden_states[-2]`, the output of the second-to-last
    /// layer without the final layer norm.
    pub penultimate: Tensor,
    /// (batch, projection_dim): `text_embeds`, the final-layer-normed end-of-text state
    /// through `text_projection`; only from a model with a projection.
    pub text_embeds: Option<Tensor>,
}

/// `CLIPTextModel` with weights under `text_model.` (and `CLIPTextModelWithProjection`'s
/// bias-free `text_projection.weight` [projection_dim, hidden] when the config names it).
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Tensor>,
    eos_token_id: i64,
}

impl ClipTextModel {
    /// Builds the model from `vb` rooted at the checkpoint's top level (keys `text_model.…`).
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let act = Activation::from_name(&c.hidden_act)
            .ok_or_else(|| candle_core::Error::Msg(format!("unsupported hidden_act {:?}", c.hidden_act)))?;
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let token_embedding = emb.get((c.vocab_size, c.hidden_size), "token_embedding.weight")?;
        let position_embedding =
            emb.get((c.max_position_embeddings, c.hidden_size), "position_embedding.weight")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipLayer::new(c, act, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        let text_projection = if c.with_projection() {
            let p = c.projection_dim.unwrap_or(c.hidden_size);
            Some(vb.root().get((p, c.hidden_size), "text_projection.weight")?)
        } else {
            None
        };
        Ok(Self { token_embedding, position_embedding, layers, final_layer_norm, text_projection, eos_token_id: c.eos_token_id })
    }

    /// Token plus position embeddings of `ids` and the causal mask.
    fn embed(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = ids.dims2()?;
        let tok = self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, ()))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let xs = tok.broadcast_add(&pos)?;
        let mask = causal_mask(t, xs.dtype(), ids.device())?;
        Ok((xs, mask))
    }

    /// Encodes token ids (batch, tokens) of dtype u32 or i64 with the causal mask only.
    pub fn forward(&self, ids: &Tensor, attn: AttentionKind) -> Result<ClipOutput> {
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let (mut xs, mask) = self.embed(&ids_u32)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask, attn)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        let pooler_output = self.pool(&last_hidden_state, &ids_u32)?;
        Ok(ClipOutput { last_hidden_state, pooler_output })
    }

    /// SDXL's encoding: `hidden_states[-2]` and, when `with_text_embeds` (the model must
    /// have a `text_projection`), the projected pooled output. Without `with_text_embeds`
    /// the last layer is not run at all.
    pub fn forward_penultimate(&self, ids: &Tensor, with_text_embeds: bool, attn: AttentionKind) -> Result<PenultimateOutput> {
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let (mut xs, mask) = self.embed(&ids_u32)?;
        let n = self.layers.len();
        if n < 2 {
            candle_core::bail!("a text encoder with {n} layer(s) has no penultimate hidden state");
        }
        for layer in &self.layers[..n - 1] {
            xs = layer.forward(&xs, &mask, attn)?;
        }
        let text_embeds = if with_text_embeds {
            let Some(proj) = &self.text_projection else {
                candle_core::bail!("this text encoder has no text_projection (it is not a CLIPTextModelWithProjection)")
            };
            let last = self.final_layer_norm.forward(&self.layers[n - 1].forward(&xs, &mask, attn)?)?;
            Some(self.pool(&last, &ids_u32)?.matmul(&proj.t()?)?)
        } else {
            None
        };
        Ok(PenultimateOutput { penultimate: xs, text_embeds })
    }

    /// Width of [`PenultimateOutput::text_embeds`], when the model has a projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection.as_ref().map(|p| p.dims()[0])
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.position_embedding.dims()[1]
    }

    /// transformers' pooling: with the legacy config eos id 2 the end token is
    /// `argmax(ids)` (the highest id, `<|endoftext|>`); otherwise the first eos id.
    fn pool(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let rows = ids.to_vec2::<u32>()?;
        let idx: Vec<u32> = rows
            .iter()
            .map(|r| {
                let pos = if self.eos_token_id == 2 {
                    // first position of the maximum, as torch.argmax does
                    let max = r.iter().copied().max().unwrap_or(0);
                    r.iter().position(|&x| x == max)
                } else {
                    r.iter().position(|&x| x as i64 == self.eos_token_id)
                };
                pos.unwrap_or(r.len().saturating_sub(1)) as u32
            })
            .collect();
        let pooled = idx
            .iter()
            .enumerate()
            .map(|(i, &p)| hidden.get(i)?.get(p as usize))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&pooled, 0)
    }
}

fn causal_mask(t: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_slice(&mask, (1, 1, t, t), dev)?.to_dtype(dtype)
}

