//! The translation of a Llama GGUF to what a Hugging Face folder holds: config.json,
//! tokenizer.json, tensor names, and the rows llama.cpp's converter permutes for its RoPE.

use super::*;

/// Token-id keys of the tokenizer metadata, each checked against the vocabulary.
pub(super) const TOKEN_ID_KEYS: [&str; 5] = [
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
];

impl GgufFile {
    /// A Hugging Face `config.json` equivalent of a Llama file's metadata: the `llama` row's
    /// GGUF translation in the architecture table (`model::ARCHS`), which checks
    /// `general.architecture` before calling it.
    pub fn hf_config(&self) -> Result<Value> {
        let heads = self.positive("llama.attention.head_count")?;
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size()?,
            "hidden_size": self.positive("llama.embedding_length")?,
            "intermediate_size": self.positive("llama.feed_forward_length")?,
            "num_hidden_layers": self.positive("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.positive_or("llama.attention.head_count_kv", heads)?,
            "rms_norm_eps": self.number("llama.attention.layer_norm_rms_epsilon")?,
            "rope_theta": self.number_or("llama.rope.freq_base", 10000.0)?,
            "max_position_embeddings": self.positive("llama.context_length")?,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let fields = config.as_object_mut().expect("a json! object literal");
        if self.metadata.contains_key("llama.rope.dimension_count") {
            fields.insert("head_dim".into(), json!(self.positive("llama.rope.dimension_count")?));
        }
        let ids = self.token_ids()?;
        for (key, field) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some((_, id)) = ids.iter().find(|(k, _)| *k == key) {
                fields.insert(field.into(), json!(id));
            }
        }
        if let Some(scaling) = self.rope_scaling()? {
            fields.insert("rope_scaling".into(), scaling);
        }
        Ok(config)
    }

    /// `rope_scaling` when the file declares a scaling other than none, so the model
    /// loader can refuse what it does not implement instead of running it unscaled.
    pub(super) fn rope_scaling(&self) -> Result<Option<Value>> {
        let kind = match self.metadata.get("llama.rope.scaling.type") {
            None => return Ok(None),
            Some(v) => v.as_str().ok_or_else(|| self.expected("llama.rope.scaling.type", v, "a string"))?,
        };
        if kind == "none" {
            return Ok(None);
        }
        let factor = self.number_or("llama.rope.scaling.factor", 1.0)?;
        Ok(Some(json!({ "rope_type": kind, "factor": factor })))
    }

    /// The special token ids the file sets (bos, eos, unknown, padding, separator), each
    /// checked to be an id of the vocabulary.
    pub(super) fn token_ids(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut ids = Vec::new();
        for key in TOKEN_ID_KEYS {
            let Some(value) = self.metadata.get(key) else { continue };
            let id = value.as_u64().ok_or_else(|| self.expected(key, value, "a token id"))?;
            let vocab = self.vocab_size()?;
            if id >= vocab as u64 {
                return Err(self.tokenizer_error(format!(
                    "metadata key {key} is {id}, outside the vocabulary of {vocab} tokens (expected 0 to {})",
                    vocab as i64 - 1
                )));
            }
            ids.push((key, id));
        }
        Ok(ids)
    }

    /// Tokens in the vocabulary, else rows of the embedding.
    pub(super) fn vocab_size(&self) -> Result<usize> {
        if let Some(tokens) = self.metadata.get("tokenizer.ggml.tokens") {
            let items = tokens
                .as_array()
                .ok_or_else(|| self.expected("tokenizer.ggml.tokens", tokens, "an array of strings"))?;
            return Ok(items.len());
        }
        match self.tensor("token_embd.weight") {
            Some(t) if t.shape.len() == 2 => Ok(t.shape[0]),
            Some(t) => Err(Error::Tensor {
                name: t.name.clone(),
                message: format!("shape {}, expected [vocab, hidden]", dims_text(&t.shape)),
            }),
            None => Err(self.format_error(
                "no tokenizer.ggml.tokens and no token_embd.weight: cannot tell the vocabulary size".into(),
            )),
        }
    }

    /// A `tokenizers`-crate `tokenizer.json` equivalent of the file's tokenizer metadata
    /// (byte-level BPE, `tokenizer.ggml.model` = `gpt2`, only).
    pub fn tokenizer_json(&self) -> Result<Value> {
        let model = self.str_key("tokenizer.ggml.model");
        if model != Some("gpt2") {
            let found = self.metadata.get("tokenizer.ggml.model").map(GgufValue::describe);
            return Err(self.tokenizer_error(format!(
                "tokenizer.ggml.model is {}, but only \"gpt2\" (byte-level BPE) is supported from GGUF",
                found.unwrap_or_else(|| "missing".into())
            )));
        }
        let pre_tokenizer = self.pre_tokenizer()?;
        self.token_ids()?;
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let merges = self.string_array("tokenizer.ggml.merges")?;
        let added = added_tokens(&tokens, &self.token_types(tokens.len())?);
        let vocab = self.bpe_vocab(&tokens)?;
        self.check_merges(&merges)?;
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges
            }
        }))
    }

    /// Token → id; a token listed twice is an error, since a BPE vocabulary maps each
    /// token to one id and the second id would silently never be produced.
    pub(super) fn bpe_vocab(&self, tokens: &[&str]) -> Result<serde_json::Map<String, Value>> {
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            if let Some(first) = vocab.insert((*token).to_string(), json!(id)) {
                return Err(self.tokenizer_error(format!(
                    "tokenizer.ggml.tokens holds {token:?} twice (ids {first} and {id}); a BPE vocabulary \
                     needs each token once"
                )));
            }
        }
        Ok(vocab)
    }

    /// Each merge must be `left right`, the form tokenizer.json's BPE reads.
    pub(super) fn check_merges(&self, merges: &[&str]) -> Result<()> {
        match merges.iter().enumerate().find(|(_, m)| m.split(' ').count() != 2) {
            Some((i, merge)) => Err(self.tokenizer_error(format!(
                "tokenizer.ggml.merges element {i} is {merge:?}, expected two tokens separated by one space"
            ))),
            None => Ok(()),
        }
    }

    /// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, written the way Hugging
    /// Face's tokenizer.json for the same models writes it.
    pub(super) fn pre_tokenizer(&self) -> Result<Value> {
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                                "use_regex": true});
        match self.str_key("tokenizer.ggml.pre") {
            None | Some("gpt2") | Some("default") => Ok(byte_level),
            // llama.cpp splits every digit (\p{N}) before GPT-2's regex; SmolLM2's own
            // tokenizer.json says the same with Digits(individual_digits) then ByteLevel.
            Some("smollm") => Ok(json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]})),
            Some(other) => Err(self.tokenizer_error(format!(
                "tokenizer.ggml.pre is {other:?}; the supported pre-tokenizers are \"gpt2\", \"default\" \
                 and \"smollm\""
            ))),
        }
    }

    /// `tokenizer.ggml.token_type`, one per token; all normal when absent.
    pub(super) fn token_types(&self, tokens: usize) -> Result<Vec<i64>> {
        let key = "tokenizer.ggml.token_type";
        let Some(value) = self.metadata.get(key) else {
            return Ok(vec![1; tokens]);
        };
        let items = value.as_array().ok_or_else(|| self.expected(key, value, "an array of integers"))?;
        if items.len() != tokens {
            return Err(self.tokenizer_error(format!(
                "{key} has {} entries but tokenizer.ggml.tokens has {tokens}",
                items.len()
            )));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| self.expected(&format!("{key}[{i}]"), &v, "an integer token type"))
            })
            .collect()
    }
}

/// `tokenizer.ggml.token_type` of control tokens (added tokens, special).
pub(super) const TOKEN_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of user-defined tokens (added tokens, not special).
pub(super) const TOKEN_USER_DEFINED: i64 = 4;

/// Control and user-defined tokens as tokenizer.json added tokens, matched before
/// pre-tokenization; only control tokens are special (skipped when decoding).
pub(super) fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
    let added = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &kind))| kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED);
    added
        .map(|(id, (token, &kind))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": kind == TOKEN_CONTROL})
        })
        .collect()
}

pub(super) fn unpermute_tensor(tensor: &GgufTensor, values: &[f32], heads: usize) -> Result<Vec<f32>> {
    let rows = tensor.shape.first().copied().unwrap_or(0);
    if values.is_empty() && tensor.shape.len() == 2 {
        // No elements (a zero dimension): nothing to permute, whatever the row count says.
        return Ok(Vec::new());
    }
    if tensor.shape.len() != 2 {
        return Err(Error::Tensor {
            name: tensor.name.clone(),
            message: format!(
                "shape {}, expected [rows, cols] for a query/key projection",
                dims_text(&tensor.shape)
            ),
        });
    }
    unpermute_qk_rows(values, rows, heads).ok_or_else(|| Error::Tensor {
        name: tensor.name.clone(),
        message: format!(
            "{rows} rows do not split into {heads} heads of an even size; cannot undo llama.cpp's \
             rotary permutation"
        ),
    })
}

/// For each output row of llama.cpp's permutation, the input row it takes.
///
/// The converter reshapes the rows as `[n_head, 2, head_dim / 2]` and swaps the last two
/// axes, so within a head output row `2i + j` is input row `j·head_dim/2 + i`: the two
/// rotary halves of Hugging Face's layout become interleaved pairs. `None` when the rows
/// do not split into `n_head` heads of an even size.
pub(super) fn rope_source_rows(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    // A head count near usize::MAX (a corrupt file) must not overflow the doubling.
    if n_head.checked_mul(2).is_none_or(|pair_rows| n_head == 0 || !rows.is_multiple_of(pair_rows)) {
        return None;
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    Some(
        (0..rows)
            .map(|r| {
                let (head, within) = (r / head_dim, r % head_dim);
                head * head_dim + (within % 2) * half + within / 2
            })
            .collect(),
    )
}

/// llama.cpp's permutation of a query/key weight `[rows, cols]` (Hugging Face rotate-half
/// layout → interleaved pairs). `None` when the shape does not fit `n_head`.
pub fn permute_qk_rows(data: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    let cols = row_len(data, rows)?;
    let source = rope_source_rows(rows, n_head)?;
    Some(source.iter().flat_map(|&src| &data[src * cols..(src + 1) * cols]).copied().collect())
}

/// The inverse of [`permute_qk_rows`]: a weight as llama.cpp stores it, back in Hugging
/// Face's layout.
pub fn unpermute_qk_rows(data: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    let cols = row_len(data, rows)?;
    let source = rope_source_rows(rows, n_head)?;
    let mut out = vec![0f32; data.len()];
    for (row, &dst) in data.chunks_exact(cols.max(1)).zip(&source) {
        out[dst * cols..(dst + 1) * cols].copy_from_slice(row);
    }
    Some(out)
}

/// Columns of a `rows`-row matrix held in `data`, if it divides evenly (an empty `data`
/// has no rows: `rows` must not size anything it does not hold).
pub(super) fn row_len(data: &[f32], rows: usize) -> Option<usize> {
    (rows > 0 && rows <= data.len() && data.len().is_multiple_of(rows)).then(|| data.len() / rows)
}

/// Per-layer tensors: llama.cpp's suffix after `blk.N.` → Hugging Face's after
/// `model.layers.N.`.
pub(super) const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Tensors outside the layers.
pub(super) const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// `blk.N.rest` → (N, rest).
pub(super) fn layer_part(gguf_name: &str) -> Option<(usize, &str)> {
    let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    // parse() accepts a leading '+', which no llama.cpp name has.
    if !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((layer.parse().ok()?, rest))
}

/// The Hugging Face name of llama.cpp's Llama tensor `gguf_name`; `None` for tensors with
/// no Hugging Face counterpart (e.g. `rope_freqs.weight`).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    if let Some((layer, rest)) = layer_part(gguf_name) {
        let (_, hf) = LAYER_NAMES.iter().find(|(gguf, _)| *gguf == rest)?;
        return Some(format!("model.layers.{layer}.{hf}"));
    }
    GLOBAL_NAMES.iter().find(|(gguf, _)| *gguf == gguf_name).map(|(_, hf)| hf.to_string())
}
