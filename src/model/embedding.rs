//! A token embedding table held at the model's precision: bf16 and f16 references keep
//! their 16-bit values (half the bytes of f32), widened row by row on lookup and inside
//! the product when the table is also the output head.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::profile;
use crate::scheme::{FloatStorage, FloatValues, StoredTensor, TensorRole};

/// A `[vocab, width]` embedding table.
pub struct Embedding {
    vocab: usize,
    width: usize,
    precision: FloatStorage,
    values: FloatValues,
}

impl Embedding {
    /// The table from `values` (`[vocab, width]`, already at `precision`: rounding to a
    /// 16-bit type here is then exact).
    pub fn new(values: Vec<f32>, vocab: usize, width: usize, precision: FloatStorage) -> Self {
        Self::from_values(FloatValues::new(values, precision), vocab, width, precision)
    }

    /// The table from values already held at `precision` (`[vocab, width]`).
    pub fn from_values(values: FloatValues, vocab: usize, width: usize, precision: FloatStorage) -> Self {
        debug_assert_eq!(values.byte_len(), vocab * width * if precision.half().is_some() { 2 } else { 4 });
        Embedding { vocab, width, precision, values }
    }

    /// Rows in the table.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Values per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The row of each token, as f32, or an error for an id outside the vocabulary.
    pub fn rows(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let width = self.width;
        let mut out = vec![0.0; tokens.len() * width];
        for (&t, dst) in tokens.iter().zip(out.chunks_exact_mut(width.max(1))) {
            let t = t as usize;
            if t >= self.vocab {
                return Err(Error::Workload(format!(
                    "token id {t} is outside the model's vocabulary of {}",
                    self.vocab
                )));
            }
            self.values.widen_into(t * width..(t + 1) * width, dst);
        }
        Ok(out)
    }

    /// `hidden` rows (`[rows, width]`) times the table transposed: logits over the
    /// vocabulary, for a head tied to this table.
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Vec<f32> {
        let (vocab, width) = (self.vocab, self.width);
        let mut out = vec![0.0; rows * vocab];
        let work = || profile::Work {
            ops: 2.0 * (rows * width * vocab) as f64,
            bytes: (self.bytes() + 4 * rows * (width + vocab)) as f64,
        };
        let _span = profile::span("linear", self.kernel(), work);
        self.values.matmul_nt(hidden, rows, width, vocab, &mut out);
        out
    }

    /// The table as f32 values: borrowed when held as f32, widened otherwise (for a device
    /// copy).
    pub fn f32_values(&self) -> Cow<'_, [f32]> {
        match &self.values {
            FloatValues::F32(v) => Cow::Borrowed(v),
            FloatValues::Half(bits, _) => {
                let mut wide = vec![0.0; bits.len()];
                self.values.widen_into(0..bits.len(), &mut wide);
                Cow::Owned(wide)
            }
        }
    }

    /// Bytes the table holds.
    pub fn bytes(&self) -> usize {
        self.values.byte_len()
    }

    /// The kernel path of the tied head's product.
    fn kernel(&self) -> &'static str {
        match self.precision {
            FloatStorage::F32 => "f32-gemm (tied head)",
            FloatStorage::F16 => "f16-gemm (tied head)",
            FloatStorage::BF16 => "bf16-gemm (tied head)",
        }
    }

    /// The table as saved and accounted: `name`, at its precision, kept in full precision.
    pub fn stored(&self, name: &str) -> StoredTensor {
        StoredTensor {
            name: name.to_string(),
            role: TensorRole::Unquantized,
            dtype: self.precision.dtype(),
            shape: vec![self.vocab, self.width],
            bytes: self.values.le_bytes(),
            represents: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(precision: FloatStorage) -> (Vec<f32>, Embedding) {
        let (vocab, width) = (5, 3);
        let values: Vec<f32> = (0..vocab * width).map(|i| precision.round(0.1 * i as f32 - 0.7)).collect();
        (values.clone(), Embedding::new(values, vocab, width, precision))
    }

    #[test]
    fn a_16_bit_table_holds_half_the_bytes_and_looks_up_the_same_rows() {
        for precision in [FloatStorage::F32, FloatStorage::BF16, FloatStorage::F16] {
            let (values, e) = table(precision);
            let per_value = if precision == FloatStorage::F32 { 4 } else { 2 };
            assert_eq!(e.bytes(), per_value * values.len());
            assert_eq!(e.rows(&[4, 0, 2]).unwrap(), [&values[12..15], &values[0..3], &values[6..9]].concat());
            assert_eq!(e.f32_values().as_ref(), values.as_slice());
            let stored = e.stored("embed");
            assert_eq!(
                (stored.dtype, stored.bytes.len(), stored.represents),
                (precision.dtype(), e.bytes(), 0)
            );
        }
    }

    #[test]
    fn tied_logits_match_the_f32_product_of_the_same_values() {
        for precision in [FloatStorage::F32, FloatStorage::BF16, FloatStorage::F16] {
            let (values, e) = table(precision);
            let hidden = [0.5, -1.0, 2.0, 0.25, 0.0, -0.75];
            let mut expected = vec![0.0; 2 * 5];
            crate::tensor::matmul_nt(&hidden, 2, 3, &values, 5, &mut expected);
            let got = e.logits(&hidden, 2);
            for (g, x) in got.iter().zip(&expected) {
                assert!((g - x).abs() <= 1e-6, "{precision:?}: {got:?} vs {expected:?}");
            }
        }
    }

    #[test]
    fn a_token_outside_the_vocabulary_is_an_error_naming_it() {
        let (_, e) = table(FloatStorage::BF16);
        let err = e.rows(&[1, 5]).unwrap_err().to_string();
        assert!(err.contains("token id 5 is outside the model's vocabulary of 5"), "{err}");
    }
}
