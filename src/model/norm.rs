//! A LayerNorm's parameters, shared by the architectures that use LayerNorm.

use crate::error::Result;
use crate::scheme::{StoredTensor, TensorRole, TensorSink};
use crate::tensor;

use super::{TensorKind, TensorSpec, WeightFactory};

/// A LayerNorm: `{name}.weight` and `{name}.bias`, full precision.
pub struct Norm {
    name: String,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Norm {
    /// Read `{name}.weight` and `{name}.bias` of width `h`.
    pub fn load(factory: &mut dyn WeightFactory, name: &str, h: usize) -> Result<Norm> {
        Ok(Norm {
            name: name.to_string(),
            weight: factory.dense(&format!("{name}.weight"), &[h])?,
            bias: factory.dense(&format!("{name}.bias"), &[h])?,
        })
    }

    /// The two tensors a LayerNorm `name` of width `h` expects in a checkpoint.
    pub fn specs(name: &str, h: usize) -> [TensorSpec; 2] {
        let spec = |suffix: &str| TensorSpec {
            name: format!("{name}.{suffix}"),
            shape: vec![h],
            kind: TensorKind::Dense,
        };
        [spec("weight"), spec("bias")]
    }

    /// Normalise every row of `x` in place.
    pub fn apply(&self, x: &mut [f32], eps: f32) {
        tensor::layer_norm_rows(x, &self.weight, &self.bias, eps);
    }

    /// Its parameters for a device forward pass.
    pub fn plan(&self) -> super::plan::NormPlan<'_> {
        super::plan::NormPlan::Layer { weight: &self.weight, bias: &self.bias }
    }

    /// Append its tensors for saving.
    pub fn export(&self, sink: &mut TensorSink) {
        let n = self.weight.len();
        let name = &self.name;
        sink(StoredTensor::f32(format!("{name}.weight"), TensorRole::Unquantized, vec![n], &self.weight));
        sink(StoredTensor::f32(format!("{name}.bias"), TensorRole::Unquantized, vec![n], &self.bias));
    }
}
