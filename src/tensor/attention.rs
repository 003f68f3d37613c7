//! Multi-head attention over a key/value cache (grouped-query aware, causal), shared by
//! every decoder architecture.

use rayon::prelude::*;

/// The shape of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` for multi-head, fewer for grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

/// Which keys each query sees, beyond the plain scaled dot product.
#[derive(Debug, Clone, Copy)]
pub struct Masking<'a> {
    /// Query `t` sees keys `0..=start + t` only (decoders); otherwise every key (encoders).
    pub causal: bool,
    /// ALiBi: `slope[h] · key_position` added to head `h`'s scores (BLOOM).
    pub alibi: Option<&'a [f32]>,
    /// `[batch, keys]`, 0 for padding keys that no query may see (padded encoder batches).
    pub key_mask: Option<&'a [u8]>,
}

impl Masking<'_> {
    /// Causal, no bias, no padding: Llama, Qwen2, GPT-2.
    pub const CAUSAL: Masking<'static> = Masking { causal: true, alibi: None, key_mask: None };
}

/// Keys and values of every layer for a batch of sequences that advance together.
#[derive(Debug)]
pub struct KvCache {
    batch: usize,
    shape: AttentionShape,
    /// Per layer, per `(sequence, kv head)`: keys then values, `len × head_dim` each.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    len: usize,
    /// Keys and values held by a device backend instead (the host vectors stay empty).
    device: Option<DeviceKv>,
}

/// A device backend's own key/value storage, carried by a [`KvCache`].
pub struct DeviceKv(Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for DeviceKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKv")
    }
}

impl KvCache {
    /// An empty cache for `layers` layers and `batch` sequences, with room reserved for
    /// `capacity` positions.
    pub fn new(layers: usize, batch: usize, shape: AttentionShape, capacity: usize) -> Self {
        let per_layer = || {
            (0..batch * shape.kv_heads)
                .map(|_| Vec::with_capacity(capacity * shape.head_dim))
                .collect::<Vec<_>>()
        };
        KvCache {
            batch,
            shape,
            keys: (0..layers).map(|_| per_layer()).collect(),
            values: (0..layers).map(|_| per_layer()).collect(),
            len: 0,
            device: None,
        }
    }

    /// An empty cache for `batch` sequences whose keys and values live in `storage`, a
    /// device backend's own type (see [`KvCache::device_mut`]).
    pub fn on_device<T: std::any::Any + Send + Sync>(
        batch: usize,
        shape: AttentionShape,
        storage: T,
    ) -> Self {
        KvCache { device: Some(DeviceKv(Box::new(storage))), ..KvCache::new(0, batch, shape, 0) }
    }

    /// The device storage of a cache made by [`KvCache::on_device`] with a `T`.
    pub fn device_mut<T: std::any::Any>(&mut self) -> Option<&mut T> {
        self.device.as_mut().and_then(|d| d.0.downcast_mut())
    }

    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Mark `seq` new positions as cached; called once per forward pass after every layer
    /// appended its keys and values.
    pub fn advance(&mut self, seq: usize) {
        self.len += seq;
    }

    /// Append `seq` new positions of layer `layer`; `k` and `v` are
    /// `[batch, seq, kv_heads · head_dim]`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], seq: usize) {
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim);
        for b in 0..self.batch {
            for t in 0..seq {
                let row = (b * seq + t) * kvh * hd;
                for h in 0..kvh {
                    let src = row + h * hd..row + (h + 1) * hd;
                    self.keys[layer][b * kvh + h].extend_from_slice(&k[src.clone()]);
                    self.values[layer][b * kvh + h].extend_from_slice(&v[src]);
                }
            }
        }
    }

    /// Attention of `seq` new queries `q` (`[batch, seq, heads · head_dim]`, already
    /// rotated) against everything cached for `layer` (the new positions included), into
    /// `out` (same layout as `q`). Query `t` sits at position `self.len + t`.
    pub fn attend(&self, layer: usize, q: &[f32], seq: usize, masking: Masking, out: &mut [f32]) {
        let AttentionShape { heads, kv_heads, head_dim } = self.shape;
        let group = heads / kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let start = self.len;
        let row_width = heads * head_dim;
        let attend_row = |(row, out_row): (usize, &mut [f32])| {
            let (b, t) = (row / seq, row % seq);
            let visible = if masking.causal { start + t + 1 } else { start + seq };
            let keys_total = start + seq;
            let mut scores = vec![0.0f32; visible];
            for h in 0..heads {
                let kv = b * kv_heads + h / group;
                let keys = &self.keys[layer][kv];
                let values = &self.values[layer][kv];
                let qh = &q[row * row_width + h * head_dim..][..head_dim];
                for (p, s) in scores.iter_mut().enumerate() {
                    let kp = &keys[p * head_dim..][..head_dim];
                    *s = qh.iter().zip(kp).map(|(a, b)| a * b).sum::<f32>() * scale;
                    if let Some(slopes) = masking.alibi {
                        *s += slopes[h] * p as f32;
                    }
                    // The most negative float, as transformers uses: a fully padded row
                    // then stays finite (uniform) instead of turning into NaN.
                    if masking.key_mask.is_some_and(|m| m[b * keys_total + p] == 0) {
                        *s = f32::MIN;
                    }
                }
                super::softmax_in_place(&mut scores);
                let oh = &mut out_row[h * head_dim..][..head_dim];
                oh.fill(0.0);
                for (p, &w) in scores.iter().enumerate() {
                    let vp = &values[p * head_dim..][..head_dim];
                    oh.iter_mut().zip(vp).for_each(|(o, v)| *o += w * v);
                }
            }
        };
        // One query row (a decode step of one sequence) is too little work to wake the
        // thread pool; waking it leaves workers spinning against this thread.
        if out.len() / row_width < 2 {
            out.chunks_mut(row_width).enumerate().for_each(attend_row);
        } else {
            out.par_chunks_mut(row_width).enumerate().for_each(attend_row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    /// Attention computed position by position must equal one pass over all positions:
    /// the property the decode loop relies on.
    #[test]
    fn incremental_attention_equals_full_prefill() {
        let shape = AttentionShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let (batch, seq, width, kv_width) = (2, 5, 32, 16);
        let mut rng = SeededRng::new(11);
        let q = rng.normal_vec(batch * seq * width, 1.0);
        let k = rng.normal_vec(batch * seq * kv_width, 1.0);
        let v = rng.normal_vec(batch * seq * kv_width, 1.0);

        let mut full = KvCache::new(1, batch, shape, seq);
        full.append(0, &k, &v, seq);
        let mut out_full = vec![f32::NAN; q.len()];
        full.attend(0, &q, seq, Masking::CAUSAL, &mut out_full);

        let mut step = KvCache::new(1, batch, shape, seq);
        for t in 0..seq {
            let pick = |x: &[f32], w: usize| -> Vec<f32> {
                (0..batch).flat_map(|b| x[(b * seq + t) * w..][..w].to_vec()).collect()
            };
            step.append(0, &pick(&k, kv_width), &pick(&v, kv_width), 1);
            let mut out = vec![f32::NAN; batch * width];
            step.attend(0, &pick(&q, width), 1, Masking::CAUSAL, &mut out);
            step.advance(1);
            for b in 0..batch {
                let expect = &out_full[(b * seq + t) * width..][..width];
                let got = &out[b * width..][..width];
                for (e, g) in expect.iter().zip(got) {
                    assert!((e - g).abs() < 1e-6, "position {t} batch {b}: {e} vs {g}");
                }
            }
        }
    }
}
