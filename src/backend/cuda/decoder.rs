//! Decoders on the GPU: a built CPU model's [`DecoderPlan`] uploaded once (every linear
//! layer as its scheme's [`CudaLinear`], norms, embeddings, position tables), and a
//! forward pass whose activations and key/value cache stay on the device; only the
//! tokens go up and the logits come back.
//!
//! [`CudaCausalLm`] wraps the CPU model it was built from: it runs every forward pass on
//! the device, and keeps the CPU model for what is not a forward pass (the byte account,
//! saving, the per-layer comparison, which feeds the CPU layers recorded inputs).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use super::blas::Blas;
use super::fuse::{self, AppendAt, Fuse};
use super::linear::CudaLinear;
use super::ops::{self, CacheShape, DeviceMasking, Unary};
use super::{driver, guard, CudaError, Gpu};
use crate::error::{Error, Result};
use crate::model::plan::{DecoderPlan, MlpPlan, NormPlan, PositionPlan, QkvPlan};
use crate::model::{CausalLm, DeviceLm, DeviceReport, Logits};
use crate::scheme::{Linear, TensorSink};
use crate::tensor::attention::{AttentionShape, KvCache};

/// The kernel path of the tied, unquantized output head (the f32 embedding matrix).
const TIED_HEAD_KERNEL: &str = "cuda-cublas-f32-tied-head";

/// Who gets each block's hidden states (downloaded), if anyone.
type Observer<'a> = Option<&'a mut dyn FnMut(usize, &[f32])>;

/// A norm's parameters on the device.
enum DeviceNorm {
    Layer { weight: CudaSlice<f32>, bias: CudaSlice<f32> },
    Rms { weight: CudaSlice<f32> },
}

impl DeviceNorm {
    fn upload(gpu: &Gpu, plan: &NormPlan) -> Result<Self, CudaError> {
        Ok(match plan {
            NormPlan::Layer { weight, bias } => {
                DeviceNorm::Layer { weight: gpu.upload(weight)?, bias: gpu.upload(bias)? }
            }
            NormPlan::Rms { weight } => DeviceNorm::Rms { weight: gpu.upload(weight)? },
        })
    }

    /// The normalised rows of `x` as a new buffer.
    fn apply(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = gpu.uninit::<f32>(x.len())?;
        match self {
            DeviceNorm::Layer { weight, bias } => ops::layer_norm(gpu, x, weight, bias, rows, eps, &mut out)?,
            DeviceNorm::Rms { weight } => ops::rms_norm(gpu, x, weight, rows, eps, &mut out)?,
        }
        Ok(out)
    }
}

enum DevicePositions {
    Rotary { inv_freq: CudaSlice<f32> },
    Alibi { slopes: CudaSlice<f32> },
    Learned { table: CudaSlice<f32>, count: usize },
}

// One per block, built once and never moved on the hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum DeviceQkv {
    Fused { layer: CudaLinear, run: usize },
    Separate { q: CudaLinear, k: CudaLinear, v: CudaLinear },
}

#[allow(clippy::large_enum_variant)]
enum DeviceMlp {
    GatedSilu { gate: CudaLinear, up: CudaLinear, down: CudaLinear },
    Gelu { up: CudaLinear, down: CudaLinear, act: Unary },
}

struct DeviceBlock {
    attn_norm: DeviceNorm,
    qkv: DeviceQkv,
    out: CudaLinear,
    mlp_norm: DeviceNorm,
    mlp: DeviceMlp,
}

/// The key/value cache of a [`KvCache`] made by [`CudaCausalLm::new_cache`]: allocated
/// on the first forward pass (where an allocation failure can be reported).
struct DeviceCache {
    shape: CacheShape,
    layers: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// A decoder resident on the device.
pub struct CudaDecoder {
    vocab: usize,
    hidden: usize,
    attention: AttentionShape,
    eps: f32,
    embed: CudaSlice<f32>,
    embed_norm: Option<DeviceNorm>,
    positions: DevicePositions,
    blocks: Vec<DeviceBlock>,
    final_norm: DeviceNorm,
    head: Option<CudaLinear>,
    weight_bytes: usize,
}

/// A device linear layer from a CPU one, adding its device bytes to `bytes`.
fn upload_linear(gpu: &Gpu, layer: &dyn Linear, bytes: &mut usize) -> Result<CudaLinear, CudaError> {
    let l = CudaLinear::from_linear(gpu, layer)?;
    *bytes += l.device_bytes();
    Ok(l)
}

impl CudaDecoder {
    /// Upload everything `plan` describes.
    pub fn upload(gpu: &Gpu, plan: &DecoderPlan) -> Result<CudaDecoder, CudaError> {
        let mut bytes = 0usize;
        let mut up = |l: &dyn Linear| upload_linear(gpu, l, &mut bytes);
        let mut blocks = Vec::with_capacity(plan.blocks.len());
        for b in &plan.blocks {
            let qkv = match b.qkv {
                QkvPlan::Fused { layer, run } => DeviceQkv::Fused { layer: up(layer)?, run },
                QkvPlan::Separate { q, k, v } => DeviceQkv::Separate { q: up(q)?, k: up(k)?, v: up(v)? },
            };
            let out = up(b.out)?;
            let mlp = match b.mlp {
                MlpPlan::GatedSilu { gate, up: u, down } => {
                    DeviceMlp::GatedSilu { gate: up(gate)?, up: up(u)?, down: up(down)? }
                }
                MlpPlan::Gelu { up: u, down, tanh } => DeviceMlp::Gelu {
                    up: up(u)?,
                    down: up(down)?,
                    act: if tanh { Unary::GeluTanh } else { Unary::GeluErf },
                },
            };
            blocks.push(DeviceBlock {
                attn_norm: DeviceNorm::upload(gpu, &b.attn_norm)?,
                qkv,
                out,
                mlp_norm: DeviceNorm::upload(gpu, &b.mlp_norm)?,
                mlp,
            });
        }
        let head = plan.head.map(&mut up).transpose()?;
        let positions = match &plan.positions {
            PositionPlan::Rotary { inv_freq } => DevicePositions::Rotary { inv_freq: gpu.upload(inv_freq)? },
            PositionPlan::Alibi { slopes } => DevicePositions::Alibi { slopes: gpu.upload(slopes)? },
            PositionPlan::Learned { table } => {
                DevicePositions::Learned { table: gpu.upload(table)?, count: table.len() / plan.hidden }
            }
        };
        Ok(CudaDecoder {
            vocab: plan.vocab,
            hidden: plan.hidden,
            attention: plan.attention,
            eps: plan.eps,
            embed: gpu.upload(&plan.embed)?,
            embed_norm: plan.embed_norm.as_ref().map(|n| DeviceNorm::upload(gpu, n)).transpose()?,
            positions,
            blocks,
            final_norm: DeviceNorm::upload(gpu, &plan.final_norm)?,
            head,
            weight_bytes: bytes,
        })
    }

    /// Bytes of the linear layers' device representation (the embedding, norms and
    /// position tables not counted).
    pub fn linear_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Every device linear layer.
    fn linears(&self) -> impl Iterator<Item = &CudaLinear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let qkv: Vec<&CudaLinear> = match &b.qkv {
                    DeviceQkv::Fused { layer, .. } => vec![layer],
                    DeviceQkv::Separate { q, k, v } => vec![q, k, v],
                };
                let mlp: Vec<&CudaLinear> = match &b.mlp {
                    DeviceMlp::GatedSilu { gate, up, down } => vec![gate, up, down],
                    DeviceMlp::Gelu { up, down, .. } => vec![up, down],
                };
                qkv.into_iter().chain([&b.out]).chain(mlp)
            })
            .chain(self.head.iter())
    }

    /// The kernel paths a decode step (one row per sequence) and a prefill of
    /// `prefill_rows` rows take.
    pub fn kernels(&self, prefill_rows: usize) -> BTreeSet<&'static str> {
        let mut out: BTreeSet<&'static str> =
            self.linears().flat_map(|l| [l.kernel(1), l.kernel(prefill_rows)]).collect();
        if self.head.is_none() {
            out.insert(TIED_HEAD_KERNEL);
        }
        out
    }

    fn cache_shape(&self, batch: usize, capacity: usize) -> CacheShape {
        let AttentionShape { heads, kv_heads, head_dim } = self.attention;
        CacheShape { batch, heads, kv_heads, head_dim, capacity }
    }

    /// Run one linear layer on `rows` rows of `x`.
    fn linear(
        gpu: &Gpu,
        blas: &Blas,
        layer: &CudaLinear,
        x: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<CudaSlice<f32>, CudaError> {
        let mut out = gpu.uninit::<f32>(rows * layer.out_features())?;
        layer.forward(gpu, blas, x, rows, &mut out)?;
        Ok(out)
    }

    /// The forward pass of `step`'s tokens (`[batch, seq]`) after the positions `cache`
    /// holds, the logits (`logits` rows) written to `out`; `observe` gets each block's
    /// hidden states (downloaded) when given.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        step: Step,
        batch: usize,
        cache: &mut DeviceCache,
        logits: Logits,
        mut observe: Observer,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (rows, h) = (step.rows(), self.hidden);
        let seq = rows / batch;
        let AttentionShape { heads, kv_heads, head_dim } = self.attention;
        let mut hidden = gpu.uninit::<f32>(rows * h)?;
        // Positions: computed and uploaded here, or the graph inputs' second run of rows.
        let (host_positions, uploaded): (Vec<u32>, Option<CudaSlice<i32>>) = match step {
            Step::Host { tokens, start } => {
                ops::embedding(gpu, &self.embed, (self.vocab, h), tokens, &mut hidden)?;
                let p: Vec<u32> = (0..rows).map(|r| (start + r % seq) as u32).collect();
                let up = match &self.positions {
                    DevicePositions::Rotary { .. } => {
                        Some(gpu.upload(&p.iter().map(|&p| p as i32).collect::<Vec<i32>>())?)
                    }
                    _ => None,
                };
                (p, up)
            }
            Step::Device { inputs, rows } => {
                ops::embedding_device(
                    gpu,
                    &self.embed,
                    (self.vocab, h),
                    &inputs.slice(0..rows),
                    &mut hidden,
                )?;
                (Vec::new(), None)
            }
        };
        let device_positions = match (step, &uploaded) {
            (Step::Device { inputs, rows }, _) => Some(inputs.slice(rows..2 * rows)),
            (Step::Host { .. }, Some(up)) => Some(up.as_view()),
            (Step::Host { .. }, None) => None,
        };
        // The cache length: a kernel argument, or the graph inputs' last value.
        let (start, start_at) = match step {
            Step::Host { start, .. } => (start, None),
            Step::Device { inputs, rows } => (0, Some(inputs.slice(2 * rows..2 * rows + 1))),
        };
        let rotary = match &self.positions {
            DevicePositions::Learned { table, count } => {
                let mut pos = gpu.uninit::<f32>(rows * h)?;
                match &device_positions {
                    Some(p) => ops::embedding_device(gpu, table, (*count, h), p, &mut pos)?,
                    None => ops::embedding(gpu, table, (*count, h), &host_positions, &mut pos)?,
                }
                ops::add_in_place(gpu, &mut hidden, &pos)?;
                None
            }
            DevicePositions::Rotary { inv_freq } => {
                let pos = device_positions.as_ref().ok_or(CudaError::Shape {
                    op: "decoder forward",
                    message: "rotary positions missing, expected them on the device".into(),
                })?;
                Some((pos, inv_freq))
            }
            DevicePositions::Alibi { .. } => None,
        };
        if let Some(norm) = &self.embed_norm {
            hidden = norm.apply(gpu, &hidden, rows, self.eps)?;
        }
        let masking = DeviceMasking {
            causal: true,
            alibi: match &self.positions {
                DevicePositions::Alibi { slopes } => Some(slopes),
                _ => None,
            },
            key_mask: None,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let x = block.attn_norm.apply(gpu, &hidden, rows, self.eps)?;
            let (kc, vc) = &mut cache.layers[i];
            let at = match &start_at {
                Some(d) => AppendAt::Device(d),
                None => AppendAt::Host(start),
            };
            let width = heads * head_dim;
            let q = match &block.qkv {
                // One launch splits q off and appends k and v (no rotation in between).
                DeviceQkv::Fused { layer, run } if rotary.is_none() && kv_heads == heads => {
                    let fused = Self::linear(gpu, blas, layer, &x, rows)?;
                    let mut q = gpu.uninit::<f32>(rows * width)?;
                    fuse::split_qkv_append(gpu, &fused, *run, &mut q, (kc, vc), cache.shape, seq, at)?;
                    q
                }
                qkv => {
                    let (mut q, mut k, v) = match qkv {
                        DeviceQkv::Fused { layer, run } => {
                            let fused = Self::linear(gpu, blas, layer, &x, rows)?;
                            let mut parts = [
                                gpu.uninit::<f32>(rows * width)?,
                                gpu.uninit(rows * width)?,
                                gpu.uninit(rows * width)?,
                            ];
                            let [q, k, v] = &mut parts;
                            ops::split_qkv(gpu, &fused, (rows, width, *run), q, k, v)?;
                            let [q, k, v] = parts;
                            (q, k, v)
                        }
                        DeviceQkv::Separate { q, k, v } => (
                            Self::linear(gpu, blas, q, &x, rows)?,
                            Self::linear(gpu, blas, k, &x, rows)?,
                            Self::linear(gpu, blas, v, &x, rows)?,
                        ),
                    };
                    if let Some((pos, inv_freq)) = &rotary {
                        ops::rotary_view(gpu, &mut q, pos, inv_freq, (rows, heads, head_dim))?;
                        ops::rotary_view(gpu, &mut k, pos, inv_freq, (rows, kv_heads, head_dim))?;
                    }
                    fuse::kv_append_pair(gpu, (&k, &v), (kc, vc), cache.shape, seq, at)?;
                    q
                }
            };
            let mut context = gpu.uninit::<f32>(rows * width)?;
            match &start_at {
                Some(at) => ops::attention_at(gpu, &q, kc, vc, cache.shape, seq, at, masking, &mut context)?,
                None => ops::attention(gpu, &q, kc, vc, cache.shape, (start, seq), masking, &mut context)?,
            }
            // hidden += out(context) + bias, in the product's epilogue.
            block.out.forward_fused(gpu, blas, &context, rows, Fuse::RESIDUAL, &mut hidden)?;

            let x = block.mlp_norm.apply(gpu, &hidden, rows, self.eps)?;
            let inner = match &block.mlp {
                DeviceMlp::GatedSilu { gate, up, .. } => {
                    let g = Self::linear(gpu, blas, gate, &x, rows)?;
                    let u = Self::linear(gpu, blas, up, &x, rows)?;
                    let mut a = gpu.uninit::<f32>(g.len())?;
                    ops::silu_mul(gpu, &g, &u, &mut a)?;
                    a
                }
                DeviceMlp::Gelu { up, act, .. } => {
                    let mut a = gpu.uninit::<f32>(rows * up.out_features())?;
                    up.forward_fused(gpu, blas, &x, rows, Fuse::activation(*act), &mut a)?;
                    a
                }
            };
            let down = match &block.mlp {
                DeviceMlp::GatedSilu { down, .. } | DeviceMlp::Gelu { down, .. } => down,
            };
            down.forward_fused(gpu, blas, &inner, rows, Fuse::RESIDUAL, &mut hidden)?;
            if let Some(observe) = observe.as_deref_mut() {
                observe(i, &gpu.download(&hidden)?);
            }
        }
        let (hidden, out_rows) = match logits {
            Logits::All => (hidden, rows),
            Logits::Last => {
                let mut last = gpu.uninit::<f32>(batch * h)?;
                ops::last_rows(gpu, &hidden, (batch, seq, h), &mut last)?;
                (last, batch)
            }
        };
        let x = self.final_norm.apply(gpu, &hidden, out_rows, self.eps)?;
        match &self.head {
            Some(head) => {
                head.forward(gpu, blas, &x, out_rows, out)?;
            }
            None => blas.gemm(&x, &self.embed, out, (out_rows, self.vocab, h))?,
        }
        Ok(())
    }
}

/// Where a forward pass finds what changes from one step to the next.
#[derive(Clone, Copy)]
enum Step<'a> {
    /// On the host: the tokens, uploaded by the pass, and the cache length, passed to the
    /// kernels as an argument (eager passes).
    Host { tokens: &'a [u32], start: usize },
    /// In a device buffer `[tokens | positions | start]` (`rows`, `rows` and one i32) that
    /// the kernels read: a captured decode graph replays with new values written there.
    Device { inputs: &'a CudaSlice<i32>, rows: usize },
}

impl Step<'_> {
    fn rows(&self) -> usize {
        match self {
            Step::Host { tokens, .. } => tokens.len(),
            Step::Device { rows, .. } => *rows,
        }
    }
}

/// What a forward pass needs on the device, behind one lock (one stream).
struct DeviceState {
    gpu: Arc<Gpu>,
    blas: Blas,
    decoder: CudaDecoder,
    /// Device milliseconds of the last forward pass (CUDA events around it).
    last_ms: Option<f64>,
    /// Decode steps are captured in a CUDA graph and replayed ([`DeviceLm::set_decode_graph`]).
    graph: bool,
    /// Batch sizes whose decode step already ran eagerly on this model. A capture records
    /// launches without running them, so the first decode step of a batch size runs
    /// eagerly: it loads the kernels and cuBLAS's, and allocates the linear layers' scratch
    /// buffers, none of which may happen inside a graph.
    warm: BTreeSet<usize>,
    /// Why a capture failed; decode steps run eagerly from then on.
    graph_failed: Option<String>,
}

/// A decoder whose forward passes run on the GPU.
pub struct CudaCausalLm {
    cpu: Box<dyn CausalLm>,
    state: Mutex<DeviceState>,
    /// Rows of the largest prefill the kernels are listed for.
    prefill_rows: usize,
}

/// The kernel path listed while decode steps replay a CUDA graph.
const GRAPH_KERNEL: &str = "cuda-graph-decode";
/// The kernel path listed when a capture failed and decode steps fell back to eager launches.
const GRAPH_FAILED_KERNEL: &str = "cuda-graph-decode-failed-eager";

impl CudaCausalLm {
    /// Upload `cpu` to `gpu`. `prefill_rows`: the row count whose kernel path is listed
    /// next to the decode path in [`CausalLm::kernels`]. Decode steps replay a CUDA graph
    /// ([`DeviceLm::set_decode_graph`] turns that off).
    pub fn new(cpu: Box<dyn CausalLm>, gpu: Arc<Gpu>, prefill_rows: usize) -> Result<CudaCausalLm> {
        let plan = cpu.plan().ok_or_else(|| Error::Device {
            device: "cuda",
            message: "this architecture has no CUDA forward pass yet (it describes no decoder plan)".into(),
        })?;
        let blas = Blas::new(&gpu)?;
        let decoder = CudaDecoder::upload(&gpu, &plan)?;
        drop(plan);
        gpu.synchronize()?;
        let state = Mutex::new(DeviceState {
            gpu,
            blas,
            decoder,
            last_ms: None,
            graph: true,
            warm: BTreeSet::new(),
            graph_failed: None,
        });
        Ok(CudaCausalLm { cpu, state, prefill_rows })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        logits: Logits,
        observe: Observer,
    ) -> Result<Vec<f32>> {
        let (_, seq) = crate::model::check_batch(tokens, batch, cache)?;
        let start = cache.len();
        let mut state = self.state();
        let DeviceState { gpu, blas, decoder, last_ms, graph, warm, graph_failed } = &mut *state;
        let slot = cache.device_mut::<CacheSlot>().ok_or_else(|| Error::Device {
            device: "cuda",
            message: "the key/value cache was not made by this model's new_cache".into(),
        })?;
        slot.allocate(gpu, decoder, batch)?;
        let CacheSlot { capacity, graph: slot_graph, cache: Some(device_cache) } = slot else {
            return Err(Error::from(CudaError::Shape {
                op: "decoder forward",
                message: "device cache missing after allocation".into(),
            }));
        };
        // A decode step the graph can replay; anything else (and a step the eager path
        // would reject, so that it reports why) runs eagerly.
        let decode = *graph
            && graph_failed.is_none()
            && observe.is_none()
            && seq == 1
            && logits == Logits::Last
            && decoder.replayable(tokens, start, *capacity);
        let replay = decode && warm.contains(&batch);
        let mut out = Ok(Vec::new());
        let ms = gpu.time_ms(|| {
            out = if replay {
                decoder.graph_step(gpu, blas, device_cache, slot_graph, tokens, start, graph_failed)
            } else {
                decoder.eager_step(
                    gpu,
                    blas,
                    Step::Host { tokens, start },
                    batch,
                    device_cache,
                    logits,
                    observe,
                )
            };
            out.as_ref().map(|_| ()).map_err(Clone::clone)
        })?;
        *last_ms = Some(f64::from(ms));
        let out = out?;
        if decode {
            warm.insert(batch);
        }
        cache.advance(seq);
        Ok(out)
    }
}

impl CudaDecoder {
    /// Whether a decode step of `tokens` after `start` cached positions fits what the graph
    /// reads from the device unchecked: ids within the vocabulary, a free position in the
    /// cache (and in a learned position table), every value an i32.
    fn replayable(&self, tokens: &[u32], start: usize, capacity: usize) -> bool {
        let positions = match &self.positions {
            DevicePositions::Learned { count, .. } => *count,
            _ => usize::MAX,
        };
        i32::try_from(self.vocab).is_ok()
            && i32::try_from(capacity).is_ok()
            && start < capacity.min(positions)
            && tokens.iter().all(|&t| (t as usize) < self.vocab)
    }

    /// One forward pass with every kernel launched from the host; the logits downloaded.
    #[allow(clippy::too_many_arguments)]
    fn eager_step(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        step: Step,
        batch: usize,
        cache: &mut DeviceCache,
        logits: Logits,
        observe: Observer,
    ) -> Result<Vec<f32>, CudaError> {
        let rows = match logits {
            Logits::All => step.rows(),
            Logits::Last => batch,
        };
        let mut out = gpu.uninit::<f32>(rows * self.vocab)?;
        self.forward(gpu, blas, step, batch, cache, logits, observe, &mut out)?;
        gpu.download(&out)
    }

    /// One decode step (one token per sequence) as a replay of the cache's graph, captured
    /// first when the cache has none. A failed capture is recorded in `failed` and the
    /// step runs eagerly: the capture ran nothing, so the cache is as before.
    #[allow(clippy::too_many_arguments)]
    fn graph_step(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        cache: &mut DeviceCache,
        graph: &mut Option<DecodeGraph>,
        tokens: &[u32],
        start: usize,
        failed: &mut Option<String>,
    ) -> Result<Vec<f32>, CudaError> {
        let batch = tokens.len();
        if graph.as_ref().is_none_or(|g| g.batch != batch) {
            *graph = None;
            match DecodeGraph::capture(gpu, blas, self, cache, batch) {
                Ok(g) => *graph = Some(g),
                Err(e) => {
                    *failed = Some(e.to_string());
                    return self.eager_step(
                        gpu,
                        blas,
                        Step::Host { tokens, start },
                        batch,
                        cache,
                        Logits::Last,
                        None,
                    );
                }
            }
        }
        let g = graph.as_mut().ok_or(CudaError::Shape {
            op: "decode graph",
            message: "no graph after the capture, expected one".into(),
        })?;
        g.replay(gpu, tokens, start)
    }
}

/// A [`cudarc::driver::CudaGraph`] that may move between threads.
struct SendGraph(cudarc::driver::CudaGraph);

// SAFETY: a graph is only used through `&mut CacheSlot` inside `CudaCausalLm::run`, which
// holds the model's lock: never from two threads at once, which is all CUDA asks of graph
// objects (their calls must be serialised, not made from the creating thread).
unsafe impl Send for SendGraph {}
// SAFETY: as above; no method reads the graph through a shared reference.
unsafe impl Sync for SendGraph {}

/// A decode step captured as a CUDA graph for one device cache and batch size. Its
/// kernels read the step's tokens, positions and cache length from `inputs` and write the
/// logits to `logits`, both allocated before the capture: their addresses, and the cache's,
/// are baked into the graph. Every buffer allocated inside the capture is freed inside it
/// (graph memory nodes), so the graph can be launched again and again.
struct DecodeGraph {
    batch: usize,
    /// `[tokens | positions | start]`: `batch`, `batch` and one i32.
    inputs: CudaSlice<i32>,
    /// `[batch, vocab]`.
    logits: CudaSlice<f32>,
    graph: SendGraph,
}

impl DecodeGraph {
    /// Record a decode step of `batch` sequences on `cache` (nothing runs).
    fn capture(
        gpu: &Gpu,
        blas: &Blas,
        decoder: &CudaDecoder,
        cache: &mut DeviceCache,
        batch: usize,
    ) -> Result<DecodeGraph, CudaError> {
        let inputs = gpu.zeros::<i32>(2 * batch + 1)?;
        let mut logits = gpu.zeros::<f32>(batch * decoder.vocab)?;
        let step = Step::Device { inputs: &inputs, rows: batch };
        let graph =
            gpu.capture(|| decoder.forward(gpu, blas, step, batch, cache, Logits::Last, None, &mut logits))?;
        Ok(DecodeGraph { batch, inputs, logits, graph: SendGraph(graph) })
    }

    /// Run the step for `tokens` (one per sequence, checked by `replayable`) after `start`
    /// cached positions: the inputs uploaded, one graph launch, the logits downloaded.
    fn replay(&mut self, gpu: &Gpu, tokens: &[u32], start: usize) -> Result<Vec<f32>, CudaError> {
        let start = start as i32;
        let mut host: Vec<i32> = Vec::with_capacity(2 * self.batch + 1);
        host.extend(tokens.iter().map(|&t| t as i32));
        host.extend(std::iter::repeat_n(start, self.batch));
        host.push(start);
        if host.len() != self.inputs.len() {
            return Err(CudaError::Shape {
                op: "decode graph",
                message: format!("{} tokens, expected {} (the captured batch)", tokens.len(), self.batch),
            });
        }
        let stream = gpu.stream();
        guard("graph inputs", || {
            stream.memcpy_htod(&host, &mut self.inputs).map_err(driver("copy graph inputs to device"))
        })?;
        guard("graph launch", || self.graph.0.launch().map_err(driver("cuGraphLaunch")))?;
        gpu.download(&self.logits)
    }
}

/// The device cache of a [`KvCache`], allocated on first use, and the decode graph
/// captured on it (which is only valid for these buffers: a new cache captures anew).
struct CacheSlot {
    capacity: usize,
    /// Declared before the cache so it is destroyed first: it refers to the cache's buffers.
    graph: Option<DecodeGraph>,
    cache: Option<DeviceCache>,
}

impl CacheSlot {
    fn allocate(&mut self, gpu: &Gpu, decoder: &CudaDecoder, batch: usize) -> Result<(), CudaError> {
        if self.cache.is_none() {
            let shape = decoder.cache_shape(batch, self.capacity);
            let layers = (0..decoder.blocks.len())
                .map(|_| Ok((gpu.zeros::<f32>(shape.len())?, gpu.zeros::<f32>(shape.len())?)))
                .collect::<Result<_, CudaError>>()?;
            self.cache = Some(DeviceCache { shape, layers });
        }
        Ok(())
    }
}

impl CausalLm for CudaCausalLm {
    fn vocab_size(&self) -> usize {
        self.cpu.vocab_size()
    }

    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let shape = self.state().decoder.attention;
        KvCache::on_device(batch, shape, CacheSlot { capacity, graph: None, cache: None })
    }

    fn forward(&self, tokens: &[u32], batch: usize, cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>> {
        self.run(tokens, batch, cache, logits, None)
    }

    fn forward_observed(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        logits: Logits,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        self.run(tokens, batch, cache, logits, Some(observe))
    }

    fn export_to(&self, sink: &mut TensorSink) {
        self.cpu.export_to(sink)
    }

    fn linears(&self) -> Vec<(&str, &dyn Linear)> {
        self.cpu.linears()
    }

    fn plan(&self) -> Option<DecoderPlan<'_>> {
        self.cpu.plan()
    }

    fn kernels(&self) -> BTreeSet<&'static str> {
        let state = self.state();
        let mut out = state.decoder.kernels(self.prefill_rows);
        match (state.graph, &state.graph_failed) {
            (true, None) => out.insert(GRAPH_KERNEL),
            (true, Some(_)) => out.insert(GRAPH_FAILED_KERNEL),
            (false, _) => false,
        };
        out
    }

    fn device(&self) -> Option<&dyn DeviceLm> {
        Some(self)
    }

    /// The device layers' own observations (counted on the GPU), under the CPU layers'
    /// names: the device layers are listed in the same order. A read that fails leaves
    /// the layer out rather than reporting a number the device did not give.
    fn layer_stats(&self) -> Vec<(String, Vec<(&'static str, f64)>)> {
        let state = self.state();
        let names = self.cpu.linears().into_iter().map(|(n, _)| n.to_string());
        names
            .zip(state.decoder.linears())
            .filter_map(|(name, l)| l.stats(&state.gpu).ok().map(|s| (name, s)))
            .filter(|(_, s)| !s.is_empty())
            .collect()
    }
}

impl DeviceLm for CudaCausalLm {
    fn report(&self) -> DeviceReport {
        let state = self.state();
        let d = &state.decoder;
        let head = if d.head.is_none() { d.embed.len() * 4 } else { 0 };
        DeviceReport {
            last_forward_ms: state.last_ms,
            decode_graph_failed: state.graph_failed.clone(),
            weight_bytes_per_token: (d.linear_bytes() + head) as u64,
        }
    }

    fn set_decode_graph(&self, on: bool) -> bool {
        std::mem::replace(&mut self.state().graph, on)
    }
}
