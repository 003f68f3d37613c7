//! A device-neutral description of a decoder's forward pass (what a backend other than
//! the CPU needs to run it): the shape, the position scheme, each block's norms, linear
//! layers and MLP form, borrowed from the built CPU model so nothing is copied.

use crate::scheme::Linear;
use crate::tensor::attention::AttentionShape;

/// A normalisation layer's parameters.
#[derive(Clone, Copy)]
pub enum NormPlan<'a> {
    /// LayerNorm with weight and bias.
    Layer {
        /// Scale.
        weight: &'a [f32],
        /// Shift.
        bias: &'a [f32],
    },
    /// RMSNorm with a weight.
    Rms {
        /// Scale.
        weight: &'a [f32],
    },
}

/// How positions enter the model.
#[derive(Clone)]
pub enum PositionPlan<'a> {
    /// Rotary embeddings on queries and keys, with `head_dim / 2` f32 frequencies.
    Rotary {
        /// Inverse frequencies, as `tensor::Rope` rounds them.
        inv_freq: Vec<f32>,
    },
    /// ALiBi score biases, one slope per head (BLOOM).
    Alibi {
        /// Slopes.
        slopes: &'a [f32],
    },
    /// A learned table `[positions, hidden]` added to the token embeddings (GPT-2).
    Learned {
        /// The table.
        table: &'a [f32],
    },
}

/// The attention input projections.
#[derive(Clone, Copy)]
pub enum QkvPlan<'a> {
    /// One fused layer whose output rows are runs of `3 · run` values `[q | k | v]`
    /// (`run` is one head for BLOOM, the hidden width for GPT-2).
    Fused {
        /// The fused layer.
        layer: &'a dyn Linear,
        /// Width of each q, k and v run.
        run: usize,
    },
    /// Separate q, k and v layers (Llama, Qwen2).
    Separate {
        /// Query projection.
        q: &'a dyn Linear,
        /// Key projection.
        k: &'a dyn Linear,
        /// Value projection.
        v: &'a dyn Linear,
    },
}

/// The MLP of a block.
#[derive(Clone, Copy)]
pub enum MlpPlan<'a> {
    /// `down(silu(gate(x)) · up(x))`.
    GatedSilu {
        /// Gate projection.
        gate: &'a dyn Linear,
        /// Up projection.
        up: &'a dyn Linear,
        /// Down projection.
        down: &'a dyn Linear,
    },
    /// `down(gelu(up(x)))`, tanh approximation or exact.
    Gelu {
        /// Up projection.
        up: &'a dyn Linear,
        /// Down projection.
        down: &'a dyn Linear,
        /// Tanh approximation (else the error function).
        tanh: bool,
    },
}

/// One pre-norm decoder block: `h += out(attn(norm(h))); h += mlp(norm(h))`.
#[derive(Clone, Copy)]
pub struct BlockPlan<'a> {
    /// Norm before attention.
    pub attn_norm: NormPlan<'a>,
    /// Query, key and value projections.
    pub qkv: QkvPlan<'a>,
    /// Attention output projection.
    pub out: &'a dyn Linear,
    /// Norm before the MLP.
    pub mlp_norm: NormPlan<'a>,
    /// The MLP.
    pub mlp: MlpPlan<'a>,
}

/// A whole decoder.
#[derive(Clone)]
pub struct DecoderPlan<'a> {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Heads and head width.
    pub attention: AttentionShape,
    /// Epsilon of every norm.
    pub eps: f32,
    /// Token embeddings `[vocab, hidden]`.
    pub embed: std::borrow::Cow<'a, [f32]>,
    /// A norm right after the embedding (BLOOM).
    pub embed_norm: Option<NormPlan<'a>>,
    /// Position scheme.
    pub positions: PositionPlan<'a>,
    /// The blocks in order.
    pub blocks: Vec<BlockPlan<'a>>,
    /// Norm before the head.
    pub final_norm: NormPlan<'a>,
    /// The output head, or `None` for the tied, unquantized embedding.
    pub head: Option<&'a dyn Linear>,
}
