//! Pieces every decoder's forward pass shares: batch checks, picking the rows whose logits
//! are wanted, the output head (its own layer or the tied embedding), and the fused-q/k/v
//! LayerNorm block of BLOOM and GPT-2.

use crate::error::{Error, Result};
use crate::profile;
use crate::scheme::{Linear, TensorSink};
use crate::tensor;
use crate::tensor::attention::{KvCache, Masking};

use super::embedding::Embedding;
use super::norm::Norm;
use super::plan::{BlockPlan, MlpPlan, QkvPlan};
use super::{LinearSpec, Logits, WeightFactory};

/// Check that `tokens` form `batch` equal sequences matching `cache`; returns
/// `(rows, seq)`.
pub fn check_batch(tokens: &[u32], batch: usize, cache: &KvCache) -> Result<(usize, usize)> {
    if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) || cache.batch() != batch {
        return Err(Error::Workload(format!(
            "{} tokens cannot form a batch of {batch} equal sequences for a cache of {}",
            tokens.len(),
            cache.batch()
        )));
    }
    Ok((tokens.len(), tokens.len() / batch))
}

/// The hidden rows whose logits are wanted: all, or the last of each sequence.
pub fn select_rows(hidden: Vec<f32>, seq: usize, width: usize, logits: Logits) -> Vec<f32> {
    match logits {
        Logits::All => hidden,
        Logits::Last => {
            hidden.chunks_exact(seq * width).flat_map(|s| s[(seq - 1) * width..].to_vec()).collect()
        }
    }
}

/// Logits of normalised `hidden` rows through `head`, or through the embedding table
/// when the head is tied and unquantized.
pub fn head_logits(hidden: &[f32], head: Option<&dyn Linear>, embed: &Embedding) -> Vec<f32> {
    let Some(head) = head else {
        return embed.logits(hidden, hidden.len() / embed.width());
    };
    let rows = hidden.len() / head.in_features();
    let mut out = vec![0.0; rows * head.out_features()];
    let _span = profile::span("linear", head.kernel(), || linear_work(head, rows));
    head.forward(hidden, rows, &mut out);
    out
}

/// Run the linear layer `layer` on `rows` rows of `x`, into a buffer from
/// [`tensor::scratch`] (give it back with [`tensor::scratch::recycle`] when done).
pub fn run_linear(layer: &dyn Linear, x: &[f32], rows: usize) -> Vec<f32> {
    let mut out = tensor::scratch::take(rows * layer.out_features());
    let _span = profile::span("linear", layer.kernel(), || linear_work(layer, rows));
    layer.forward(x, rows, &mut out);
    out
}

/// A linear layer's work on `rows` rows: its multiply-adds, its weight representation read
/// once, f32 inputs and outputs.
fn linear_work(layer: &dyn Linear, rows: usize) -> profile::Work {
    let (k, n) = (layer.in_features(), layer.out_features());
    profile::Work {
        ops: 2.0 * (rows * k * n) as f64,
        bytes: (layer.parts().weights.bytes() + 4 * rows * (k + n)) as f64,
    }
}

/// What differs between the pre-LayerNorm, fused-q/k/v blocks of BLOOM and GPT-2.
pub struct FusedBlockOps<'a> {
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Width of each q, k and v run in the fused output: one head (BLOOM's per-head
    /// interleave) or the whole hidden size (GPT-2's `[q | k | v]`).
    pub qkv_run: usize,
    /// Causal masking, with ALiBi for BLOOM.
    pub masking: Masking<'a>,
    /// The activation between the two MLP layers.
    pub gelu: fn(&mut [f32]),
}

/// A decoder block `h += attn(LN(h)); h += mlp(LN(h))` whose attention input is one fused
/// q/k/v layer: BLOOM's and GPT-2's.
pub struct FusedBlock {
    attn_norm: Norm,
    mlp_norm: Norm,
    /// Fused q/k/v, attention output, MLP up, MLP down.
    linears: Vec<(String, Box<dyn Linear>)>,
}

impl FusedBlock {
    /// Load the block's norms (`[attention, mlp]`) and its four linear layers
    /// (`(name, out, in)`, with biases; `stored_in_out` for GPT-2's Conv1D).
    pub fn load(
        factory: &mut dyn WeightFactory,
        norms: [String; 2],
        hidden: usize,
        linears: Vec<(String, usize, usize)>,
        stored_in_out: bool,
    ) -> Result<Self> {
        let [attn, mlp] = norms;
        let (attn_norm, mlp_norm) = (Norm::load(factory, &attn, hidden)?, Norm::load(factory, &mlp, hidden)?);
        let linears = linears
            .into_iter()
            .map(|(name, rows, cols)| {
                let spec = LinearSpec::new(&name, rows, cols, true);
                let layer = factory.linear(if stored_in_out { spec.stored_in_out() } else { spec })?;
                Ok((name, layer))
            })
            .collect::<Result<_>>()?;
        Ok(FusedBlock { attn_norm, mlp_norm, linears })
    }

    /// Run block `index` on `hidden` (`[rows, width]`, `seq` new positions per sequence).
    pub fn forward(
        &self,
        index: usize,
        hidden: &mut [f32],
        rows: usize,
        seq: usize,
        cache: &mut KvCache,
        ops: &FusedBlockOps,
    ) {
        tensor::awake::keep_awake();
        let run = |i: usize, x: &[f32]| run_linear(self.linears[i].1.as_ref(), x, rows);
        let mut x = hidden.to_vec();
        self.attn_norm.apply(&mut x, ops.eps);
        let fused = run(0, &x);
        let third = fused.len() / 3;
        let (mut q, mut k, mut v) =
            (Vec::with_capacity(third), Vec::with_capacity(third), Vec::with_capacity(third));
        let w = ops.qkv_run;
        for group in fused.chunks_exact(3 * w) {
            q.extend_from_slice(&group[..w]);
            k.extend_from_slice(&group[w..2 * w]);
            v.extend_from_slice(&group[2 * w..]);
        }
        cache.append(index, &k, &v, seq);
        let mut context = vec![0.0; q.len()];
        cache.attend(index, &q, seq, ops.masking, &mut context);
        tensor::add_in_place(hidden, &run(1, &context));

        let mut x = hidden.to_vec();
        self.mlp_norm.apply(&mut x, ops.eps);
        let mut inner = run(2, &x);
        (ops.gelu)(&mut inner);
        tensor::add_in_place(hidden, &run(3, &inner));
    }

    /// Append the block's tensors for saving.
    pub fn export(&self, sink: &mut TensorSink) {
        self.attn_norm.export(sink);
        self.mlp_norm.export(sink);
        for (name, linear) in &self.linears {
            linear.export(name).into_iter().for_each(&mut *sink);
        }
    }

    /// The block for a device forward pass: `run` and `mlp` as in [`FusedBlockOps`].
    pub fn plan(&self, run: usize, tanh_gelu: bool) -> BlockPlan<'_> {
        let layer = |i: usize| self.linears[i].1.as_ref();
        BlockPlan {
            attn_norm: self.attn_norm.plan(),
            qkv: QkvPlan::Fused { layer: layer(0), run },
            out: layer(1),
            mlp_norm: self.mlp_norm.plan(),
            mlp: MlpPlan::Gelu { up: layer(2), down: layer(3), tanh: tanh_gelu },
        }
    }

    /// The block's linear layers with their names.
    pub fn linears(&self) -> impl Iterator<Item = (&str, &dyn Linear)> {
        self.linears.iter().map(|(n, l)| (n.as_str(), l.as_ref()))
    }
}
