//! The BERT encoder (all-MiniLM-L6-v2 is one): token + position + type embeddings,
//! post-LayerNorm blocks, bidirectional attention with a padding mask.

use crate::error::{Error, Result};
use crate::scheme::{Linear, StoredTensor, TensorRole, TensorSink};
use crate::tensor;
use crate::tensor::attention::{self, AttentionShape, Masking};

use super::embedding::Embedding;
use super::norm::Norm;
use super::{
    ArchInfo, ArchKind, ConfigJson, Encoder, LinearSpec, Model, TensorKind, TensorSpec, WeightFactory,
};

/// The table row for BERT.
pub const ARCH: ArchInfo = ArchInfo {
    name: "bert",
    model_types: &["bert"],
    kind: ArchKind::Encoder,
    summary: "BERT encoder (all-MiniLM-L6-v2): post-LayerNorm, GELU, mean-pooled sentence embeddings",
    quantizable: "attention query/key/value/output.dense, intermediate.dense, output.dense",
    tensors: tensor_specs,
    build,
    gguf: None,
};

#[derive(Debug, Clone)]
struct BertConfig {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    max_positions: usize,
    type_vocab: usize,
    eps: f32,
}

impl BertConfig {
    fn parse(config: &ConfigJson) -> Result<Self> {
        let hidden = config.usize("hidden_size")?;
        let heads = config.usize("num_attention_heads")?;
        if hidden % heads != 0 {
            let found = config.get("num_attention_heads").cloned().unwrap_or_default();
            return Err(config.unsupported(
                "num_attention_heads",
                &found,
                &format!("a divisor of hidden_size ({hidden})"),
            ));
        }
        if let Some(act) = config.get("hidden_act") {
            if act.as_str() != Some("gelu") {
                return Err(config.unsupported("hidden_act", act, "\"gelu\""));
            }
        }
        if let Some(kind) = config.get("position_embedding_type") {
            if kind.as_str() != Some("absolute") {
                return Err(config.unsupported("position_embedding_type", kind, "\"absolute\""));
            }
        }
        Ok(BertConfig {
            vocab: config.usize("vocab_size")?,
            hidden,
            intermediate: config.usize("intermediate_size")?,
            layers: config.usize("num_hidden_layers")?,
            heads,
            max_positions: config.usize_or("max_position_embeddings", 512)?,
            type_vocab: config.usize_or("type_vocab_size", 2)?,
            eps: config.epsilon_or("layer_norm_eps", 1e-12)?,
        })
    }

    fn linears(&self, i: usize) -> Vec<(String, usize, usize)> {
        let p = format!("encoder.layer.{i}");
        let (h, m) = (self.hidden, self.intermediate);
        vec![
            (format!("{p}.attention.self.query"), h, h),
            (format!("{p}.attention.self.key"), h, h),
            (format!("{p}.attention.self.value"), h, h),
            (format!("{p}.attention.output.dense"), h, h),
            (format!("{p}.intermediate.dense"), m, h),
            (format!("{p}.output.dense"), h, m),
        ]
    }

    fn norms(&self, i: usize) -> [String; 2] {
        let p = format!("encoder.layer.{i}");
        [format!("{p}.attention.output.LayerNorm"), format!("{p}.output.LayerNorm")]
    }
}

const EMBED_NORM: &str = "embeddings.LayerNorm";

fn tensor_specs(config: &ConfigJson) -> Result<Vec<TensorSpec>> {
    let c = BertConfig::parse(config)?;
    let spec = |name: String, shape: Vec<usize>, kind| TensorSpec { name, shape, kind };
    let h = c.hidden;
    let mut specs = vec![
        spec("embeddings.word_embeddings.weight".into(), vec![c.vocab, h], TensorKind::Dense),
        spec("embeddings.position_embeddings.weight".into(), vec![c.max_positions, h], TensorKind::Dense),
        spec("embeddings.token_type_embeddings.weight".into(), vec![c.type_vocab, h], TensorKind::Dense),
    ];
    specs.extend(Norm::specs(EMBED_NORM, h));
    for i in 0..c.layers {
        for (name, rows, cols) in c.linears(i) {
            specs.extend(TensorSpec::linear(&name, [rows, cols], rows, true));
        }
        for norm in c.norms(i) {
            specs.extend(Norm::specs(&norm, h));
        }
    }
    Ok(specs)
}

struct Layer {
    /// query, key, value, attention output, intermediate, output.
    linears: Vec<(String, Box<dyn Linear>)>,
    attn_norm: Norm,
    out_norm: Norm,
}

/// A built BERT encoder.
pub struct Bert {
    config: BertConfig,
    word: Embedding,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

fn build(config: &ConfigJson, factory: &mut dyn WeightFactory) -> Result<Model> {
    let c = BertConfig::parse(config)?;
    let h = c.hidden;
    let word = factory.embedding("embeddings.word_embeddings.weight", c.vocab, h)?;
    let position = factory.dense("embeddings.position_embeddings.weight", &[c.max_positions, h])?;
    let token_type = factory.dense("embeddings.token_type_embeddings.weight", &[c.type_vocab, h])?;
    let embed_norm = Norm::load(factory, EMBED_NORM, h)?;
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let linears = c
            .linears(i)
            .into_iter()
            .map(|(name, rows, cols)| {
                let layer = factory.linear(LinearSpec::new(&name, rows, cols, true))?;
                Ok((name, layer))
            })
            .collect::<Result<_>>()?;
        let [attn, out] = c.norms(i);
        layers.push(Layer {
            linears,
            attn_norm: Norm::load(factory, &attn, h)?,
            out_norm: Norm::load(factory, &out, h)?,
        });
    }
    Ok(Model::Encoder(Box::new(Bert { config: c, word, position, token_type, embed_norm, layers })))
}

impl Bert {
    fn embed(&self, tokens: &[u32], seq: usize) -> Result<Vec<f32>> {
        let h = self.config.hidden;
        // The word rows (an error for an id outside the vocabulary), then the position's
        // and token type 0's rows added: single-sentence inputs.
        let mut out = self.word.rows(tokens)?;
        for (i, row) in out.chunks_exact_mut(h).enumerate() {
            let position = &self.position[(i % seq) * h..][..h];
            for ((x, p), t) in row.iter_mut().zip(position).zip(&self.token_type[..h]) {
                *x = *x + p + t;
            }
        }
        self.embed_norm.apply(&mut out, self.config.eps);
        Ok(out)
    }

    fn layer(&self, index: usize, hidden: &mut [f32], rows: usize, seq: usize, mask: &[u8]) {
        let c = &self.config;
        let layer = &self.layers[index];
        let run = |i: usize, x: &[f32]| super::decoder::run_linear(layer.linears[i].1.as_ref(), x, rows);
        let (q, k, v) = (run(0, hidden), run(1, hidden), run(2, hidden));
        let shape = AttentionShape { heads: c.heads, kv_heads: c.heads, head_dim: c.hidden / c.heads };
        let mut context = tensor::scratch::take(q.len());
        let masking = Masking { causal: false, alibi: None, key_mask: Some(mask) };
        attention::self_attention(shape, rows / seq, &q, &k, &v, seq, masking, &mut context);
        let mut attn = run(3, &context);
        tensor::add_in_place(&mut attn, hidden);
        layer.attn_norm.apply(&mut attn, c.eps);
        let mut inner = run(4, &attn);
        tensor::gelu_erf_in_place(&mut inner);
        let mut out = run(5, &inner);
        tensor::add_in_place(&mut out, &attn);
        layer.out_norm.apply(&mut out, c.eps);
        hidden.copy_from_slice(&out);
        [q, k, v, context, attn, inner, out].into_iter().for_each(tensor::scratch::recycle);
    }
}

impl Encoder for Bert {
    fn hidden_size(&self) -> usize {
        self.config.hidden
    }

    fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    fn encode_observed(
        &self,
        tokens: &[u32],
        mask: &[u8],
        batch: usize,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        if batch == 0
            || tokens.is_empty()
            || !tokens.len().is_multiple_of(batch)
            || mask.len() != tokens.len()
        {
            return Err(Error::Workload(format!(
                "{} tokens with a mask of {} cannot form a batch of {batch} equal sequences",
                tokens.len(),
                mask.len()
            )));
        }
        let seq = tokens.len() / batch;
        if seq > self.config.max_positions {
            return Err(Error::Workload(format!(
                "sequences of {seq} tokens exceed max_position_embeddings ({})",
                self.config.max_positions
            )));
        }
        let mut hidden = self.embed(tokens, seq)?;
        for i in 0..self.layers.len() {
            crate::tensor::awake::keep_awake();
            self.layer(i, &mut hidden, tokens.len(), seq, mask);
            observe(i, &hidden);
        }
        Ok(hidden)
    }

    fn export_to(&self, sink: &mut TensorSink) {
        let c = &self.config;
        let dense = |name: &str, shape: Vec<usize>, data: &[f32]| {
            StoredTensor::f32(name, TensorRole::Unquantized, shape, data)
        };
        sink(self.word.stored("embeddings.word_embeddings.weight"));
        sink(dense("embeddings.position_embeddings.weight", vec![c.max_positions, c.hidden], &self.position));
        sink(dense(
            "embeddings.token_type_embeddings.weight",
            vec![c.type_vocab, c.hidden],
            &self.token_type,
        ));
        self.embed_norm.export(sink);
        for layer in &self.layers {
            for (name, linear) in &layer.linears {
                linear.export(name).into_iter().for_each(&mut *sink);
            }
            layer.attn_norm.export(sink);
            layer.out_norm.export(sink);
        }
    }

    fn linears(&self) -> Vec<(&str, &dyn Linear)> {
        self.layers.iter().flat_map(|l| l.linears.iter().map(|(n, x)| (n.as_str(), x.as_ref()))).collect()
    }
}
