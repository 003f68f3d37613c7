//! The decoders' forward passes on the GPU (`backend::cuda::decoder`) against the same
//! models on the CPU: every architecture of the fixtures at fp32, and the quantized
//! schemes that need no calibration, for a prefill of every position and decode steps
//! with the key/value cache on the device.

use std::path::PathBuf;

use quantbench::backend::{self, Device};
use quantbench::model::{Logits, Model, ModelFiles, QuantizeFactory};
use quantbench::scheme::{self, FloatStorage};

/// fp32 on both sides: sums in another order (cuBLAS, the attention and norm kernels), a
/// few ulp per op through a handful of layers. Relative L2 of the logits.
const FORWARD_F32_L2: f64 = 1e-5;
/// The quantized schemes: the activations entering each quantizer differ by the fp32
/// budget above, which moves an occasional activation across a rounding boundary; fp16
/// and bf16 also run their products on 16-bit activations on the GPU (the CPU keeps f32
/// activations). Relative L2 of the logits.
const FORWARD_SCHEME_L2: f64 = 5e-2;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn build(files: &ModelFiles, scheme_name: &str) -> Model {
    let s = (scheme::lookup(scheme_name).unwrap().build)(&Default::default()).unwrap();
    files.build(&mut QuantizeFactory::new(&files.store, FloatStorage::F32, s.as_ref(), false)).unwrap()
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() {
            return f64::INFINITY;
        }
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Logits of a prefill (every position, two sequences) then three greedy decode steps.
fn run(model: &Model) -> Vec<Vec<f32>> {
    let Model::Causal(lm) = model else { panic!("a decoder") };
    let vocab = lm.vocab_size();
    let tokens: Vec<u32> = (0..22u32).map(|i| (i * 37 + 5) % vocab.min(500) as u32).collect();
    let mut cache = lm.new_cache(2, 11 + 3);
    let mut out = vec![lm.forward(&tokens, 2, &mut cache, Logits::All).unwrap()];
    let mut next: Vec<u32> = vec![3, 9];
    for _ in 0..3 {
        let logits = lm.forward(&next, 2, &mut cache, Logits::Last).unwrap();
        next = logits.chunks_exact(vocab).map(|r| quantbench::tensor::argmax(r) as u32).collect();
        out.push(logits);
    }
    out
}

fn compare(folder: &str, scheme_name: &str, budget: f64) {
    let files = ModelFiles::open(&fixture(folder)).unwrap();
    let cpu = run(&build(&files, scheme_name));
    let gpu_model = backend::place(build(&files, scheme_name), Device::Cuda, 22).unwrap();
    let gpu = run(&gpu_model);
    let kernels: Vec<&str> = gpu_model.kernels().into_iter().collect();
    for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let err = relative_l2(g, c);
        eprintln!(
            "{folder} {scheme_name} step {step}: relative L2 {err:e} (budget {budget:e}) via {kernels:?}"
        );
        assert!(err <= budget, "{folder} {scheme_name} step {step}: relative L2 {err:e} over {budget:e}");
    }
}

#[test]
fn every_architecture_runs_on_the_gpu_like_on_the_cpu() {
    if super::gpu().is_none() {
        return;
    }
    for folder in ["llama-tiny", "llama-tiny-tied", "qwen2-tiny", "bloom-tiny", "gpt2-tiny"] {
        compare(folder, "fp32", FORWARD_F32_L2);
    }
}

#[test]
fn quantized_schemes_run_on_the_gpu_like_on_the_cpu() {
    if super::gpu().is_none() {
        return;
    }
    let schemes = scheme::SCHEMES.iter().filter(|s| !s.needs_calibration && s.name != "fp32");
    for s in schemes {
        for folder in ["llama-tiny", "bloom-tiny"] {
            compare(folder, s.name, FORWARD_SCHEME_L2);
        }
    }
}

/// Logits of a prefill then `steps` greedy decode steps of `batch` sequences, on a new
/// cache, with the decode graph on or off.
fn decode(model: &Model, batch: usize, steps: usize, graph: bool) -> Vec<Vec<f32>> {
    let Model::Causal(lm) = model else { panic!("a decoder") };
    lm.device().expect("a GPU decoder has device hooks").set_decode_graph(graph);
    let vocab = lm.vocab_size();
    let prompt = 5;
    let tokens: Vec<u32> =
        (0..(batch * prompt) as u32).map(|i| (i * 37 + 5) % vocab.min(500) as u32).collect();
    let mut cache = lm.new_cache(batch, prompt + steps);
    let mut logits = lm.forward(&tokens, batch, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next: Vec<u32> =
            logits.chunks_exact(vocab).map(|r| quantbench::tensor::argmax(r) as u32).collect();
        logits = lm.forward(&next, batch, &mut cache, Logits::Last).unwrap();
        out.push(logits.clone());
    }
    out
}

fn assert_bit_identical(what: &str, graph: &[Vec<f32>], eager: &[Vec<f32>]) {
    assert_eq!(graph.len(), eager.len(), "{what}: steps");
    for (step, (g, e)) in graph.iter().zip(eager).enumerate() {
        let differ = g.iter().zip(e).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(g.len(), e.len(), "{what} step {step}: logits");
        assert_eq!(
            differ,
            0,
            "{what} step {step}: {differ} of {} logits differ from the eager step's",
            g.len()
        );
    }
}

/// The decode graph replays exactly what the eager launches compute: the first decode step
/// of a model runs eagerly (warming its kernels), the first of every later cache captures,
/// the rest replay; each with its own cache, one and two sequences, several steps, every
/// position scheme (rotary, ALiBi, learned), and the linear paths of the schemes that need
/// no calibration.
#[test]
fn the_decode_graph_gives_the_eager_logits_bit_for_bit() {
    if super::gpu().is_none() {
        return;
    }
    let cases = [("llama-tiny", "fp32"), ("bloom-tiny", "fp32"), ("gpt2-tiny", "fp32")].into_iter().chain(
        scheme::SCHEMES
            .iter()
            .filter(|s| !s.needs_calibration && s.name != "fp32")
            .map(|s| ("bloom-tiny", s.name)),
    );
    for (folder, scheme_name) in cases {
        let files = ModelFiles::open(&fixture(folder)).unwrap();
        let model = backend::place(build(&files, scheme_name), Device::Cuda, 10).unwrap();
        for batch in [1, 2] {
            let eager = decode(&model, batch, 6, false);
            // The first run's first decode step warms the model (eager), its second
            // captures; the second run captures on its first step, on a new cache.
            for run in 0..2 {
                let graph = decode(&model, batch, 6, true);
                assert_bit_identical(
                    &format!("{folder} {scheme_name} batch {batch} run {run}"),
                    &graph,
                    &eager,
                );
            }
        }
        let Model::Causal(lm) = &model else { unreachable!() };
        assert_eq!(lm.device().unwrap().report().decode_graph_failed, None, "{folder} {scheme_name}");
        assert!(
            model.kernels().contains("cuda-graph-decode"),
            "{folder} {scheme_name}: {:?}",
            model.kernels()
        );
        eprintln!("{folder} {scheme_name}: graph decode bit-identical to eager");
    }
}
