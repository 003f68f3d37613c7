//! Matrix products through NVIDIA's libraries: cuBLAS for f32, f16 and bf16 (f32
//! accumulation), cuBLASLt for int8 × int8 → int32 (cudarc's safe cuBLASLt API covers
//! floats only, so the int8 product uses its raw bindings).
//!
//! Every product here is `out[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major, as the CPU's
//! `matmul_nt`. In cuBLAS's column-major terms that is `outᵀ (n×m) = w (k×n)ᵀ · xᵀ (k×m)`:
//! A = `w` transposed, B = `x` not transposed, which is also the "TN" layout cuBLASLt's
//! int8 kernels require (with `k` and `n` multiples of 4).

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::libs::{self, CudaLib};
use super::{driver, guard, CudaError, Gpu};

/// Make `lib` loadable (by name, else from a known folder) before cudarc touches it.
fn ensure(lib: &CudaLib, present: unsafe fn() -> bool) -> Result<(), CudaError> {
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { present() } {
        return Ok(());
    }
    let opened = libs::preload(lib).map_err(|e| CudaError::Library { lib: lib.name, message: e })?;
    // SAFETY: as above.
    if opened.is_some() && unsafe { present() } {
        return Ok(());
    }
    Err(CudaError::Library {
        lib: lib.name,
        message: format!("not found: looked for {}", libs::searched(lib)),
    })
}

/// The shape check shared by the products.
fn check(
    op: &'static str,
    (m, n, k): (usize, usize, usize),
    lens: [usize; 3],
) -> Result<[i32; 3], CudaError> {
    let [x, w, out] = lens;
    for (what, have, want) in [("x", x, m * k), ("w", w, n * k), ("out", out, m * n)] {
        if have < want {
            return Err(CudaError::Shape {
                op,
                message: format!("{what} holds {have} values, expected at least {want}"),
            });
        }
    }
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| CudaError::Shape {
            op,
            message: format!("dimension {v}, expected at most {}", i32::MAX),
        })
    };
    Ok([int(m)?, int(n)?, int(k)?])
}

/// Whether cuBLASLt's int8 path takes this shape: `k` and `n` multiples of 4 (leading
/// dimensions and the rows of the column-major output).
pub fn lt_int8_supports(n: usize, k: usize) -> bool {
    n.is_multiple_of(4) && k.is_multiple_of(4) && n > 0 && k > 0
}

/// cuBLASLt workspace: 32 MiB on Hopper and later, 4 MiB before (NVIDIA's advice).
pub fn workspace_bytes(capability: (i32, i32)) -> usize {
    if capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// cuBLAS and cuBLASLt handles on a [`Gpu`]'s stream.
pub struct Blas {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    lt: LtHandle,
    workspace: CudaSlice<u8>,
    /// The int8 product's descriptors and chosen algorithm per `(m, n, k)`.
    lt_plans: Mutex<HashMap<(usize, usize, usize), LtPlan>>,
}

/// Algorithms cuBLASLt's heuristic is asked for, then timed, per int8 product shape.
const LT_CANDIDATES: usize = 8;

/// One shape's int8 product: descriptors and the algorithm chosen for it.
struct LtPlan {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are host-side cuBLASLt objects, not tied to a thread; a plan is
// only used under its `Blas`'s lock.
unsafe impl Send for LtPlan {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("workspace_bytes", &self.workspace.len()).finish()
    }
}

/// A cuBLASLt handle, destroyed on drop (errors there are ignored: nothing to do).
struct LtHandle(lt_sys::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle is not tied to the thread that created it; this crate uses
// each handle from one thread at a time (a device model keeps its `Blas` behind a lock).
unsafe impl Send for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate and destroyed once.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

struct Layout(lt_sys::cublasLtMatrixLayout_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate and destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(lt_sys::cublasLtMatmulDesc_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate and destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(lt_sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate and destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn lt_err(op: &'static str) -> impl Fn(lt::CublasError) -> CudaError {
    move |e| CudaError::Blas { op, message: format!("{e:?}") }
}

/// A float type cuBLAS multiplies.
pub trait BlasFloat: cudarc::driver::DeviceRepr + Copy {
    /// 1 and 0 in this type (alpha and beta).
    const ONE_ZERO: (Self, Self);
}

impl BlasFloat for f32 {
    const ONE_ZERO: (f32, f32) = (1.0, 0.0);
}

impl BlasFloat for half::f16 {
    const ONE_ZERO: (half::f16, half::f16) = (half::f16::ONE, half::f16::ZERO);
}

impl BlasFloat for half::bf16 {
    const ONE_ZERO: (half::bf16, half::bf16) = (half::bf16::ONE, half::bf16::ZERO);
}

impl Blas {
    /// Handles and a workspace on `gpu`'s stream.
    pub fn new(gpu: &Gpu) -> Result<Blas, CudaError> {
        ensure(&libs::CUBLAS, cudarc::cublas::sys::is_culib_present)?;
        ensure(&libs::CUBLASLT, cudarc::cublaslt::sys::is_culib_present)?;
        guard("cublas handles", || {
            let stream = gpu.stream().clone();
            let blas = CudaBlas::new(stream.clone())
                .map_err(|e| CudaError::Blas { op: "cublasCreate", message: format!("{e:?}") })?;
            let lt = LtHandle(lt::create_handle().map_err(lt_err("cublasLtCreate"))?);
            let bytes = workspace_bytes(gpu.capability());
            let workspace = stream.alloc_zeros::<u8>(bytes).map_err(driver("cublasLt workspace"))?;
            // cuBLAS gets the same workspace: without one of its own it may allocate
            // during a call, which a captured decode graph cannot hold, and its choice of
            // algorithm then follows one fixed workspace in eager and captured steps alike.
            // Both handles run on the one stream, in order, so they never use it at once.
            {
                let (ptr, _record) = workspace.device_ptr(&stream);
                // SAFETY: a live handle, and a device buffer of `bytes` bytes that lives as
                // long as the handle (both are fields of the `Blas`, the buffer dropped last).
                unsafe {
                    cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut c_void, bytes)
                }
                .result()
                .map_err(|e| CudaError::Blas { op: "cublasSetWorkspace", message: format!("{e:?}") })?;
            }
            Ok(Blas { stream, blas, lt, workspace, lt_plans: Mutex::new(HashMap::new()) })
        })
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` with cuBLAS in `T` (f32, f16 or bf16; f32
    /// accumulation for the 16-bit types).
    pub fn gemm<T: BlasFloat>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        dims: (usize, usize, usize),
    ) -> Result<(), CudaError>
    where
        CudaBlas: Gemm<T>,
    {
        const OP: &str = "cublas gemm";
        let [m, n, k] = check(OP, dims, [x.len(), w.len(), out.len()])?;
        let (alpha, beta) = T::ONE_ZERO;
        let cfg = GemmConfig {
            transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
            transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            m: n,
            n: m,
            k,
            alpha,
            lda: k,
            ldb: k,
            beta,
            ldc: n,
        };
        guard(OP, || {
            // SAFETY: the buffers were checked against the shape above.
            unsafe { self.blas.gemm(cfg, w, x, out) }
                .map_err(|e| CudaError::Blas { op: OP, message: format!("{e:?}") })
        })
    }

    /// `acc[m, n] = qx[m, k] · w[n, k]ᵀ` in int32 through cuBLASLt (int8 inputs, int32
    /// accumulation and output). Needs [`lt_int8_supports`]`(n, k)`; the caller uses
    /// `ops::gemm_i8_tiled` otherwise.
    pub fn gemm_i8(
        &self,
        qx: &CudaSlice<i8>,
        w: &CudaSlice<i8>,
        acc: &mut CudaSlice<i32>,
        dims: (usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "cublasLt int8 gemm";
        let [_, _, _] = check(OP, dims, [qx.len(), w.len(), acc.len()])?;
        let (_, n, k) = dims;
        if !lt_int8_supports(n, k) {
            return Err(CudaError::Shape {
                op: OP,
                message: format!("n = {n} and k = {k}, expected multiples of 4 (cuBLASLt int8 layout rules)"),
            });
        }
        guard(OP, || {
            let mut plans = self.lt_plans.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(dims) {
                slot.insert(self.plan_i8(dims, qx, w, acc)?);
            }
            let plan = &plans[&dims];
            self.run_i8(plan, qx, w, acc)
        })
    }

    /// Descriptors for the int8 product of `dims` and its fastest algorithm: cuBLASLt's
    /// heuristic proposes up to [`LT_CANDIDATES`], each is timed on the call's own buffers
    /// (CUDA events, after a warm-up) and the fastest kept, since the heuristic's first
    /// choice is not always the fastest for a shape. While the stream is being captured
    /// into a graph nothing may synchronise, so the first proposal is taken untimed.
    fn plan_i8(
        &self,
        (m, n, k): (usize, usize, usize),
        qx: &CudaSlice<i8>,
        w: &CudaSlice<i8>,
        acc: &mut CudaSlice<i32>,
    ) -> Result<LtPlan, CudaError> {
        use lt_sys::cudaDataType_t::{CUDA_R_32I, CUDA_R_8I};
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        // Column-major: A = w as k×n (transposed by the op), B = x as k×m, D = n×m.
        let a = Layout(lt::create_matrix_layout(CUDA_R_8I, k64, n64, k as i64).map_err(lt_err("layout A"))?);
        let b = Layout(lt::create_matrix_layout(CUDA_R_8I, k64, m64, k as i64).map_err(lt_err("layout B"))?);
        let d = Layout(lt::create_matrix_layout(CUDA_R_32I, n64, m64, n as i64).map_err(lt_err("layout D"))?);
        let desc = Desc(
            lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32I, CUDA_R_32I)
                .map_err(lt_err("matmul desc"))?,
        );
        let (op_t, op_n): (i32, i32) = (1, 0);
        // SAFETY: live descriptor; the attribute values are i32 as cuBLASLt expects.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc.0,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&op_t) as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(lt_err("transa"))?;
            lt::set_matmul_desc_attribute(
                desc.0,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                (&op_n) as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(lt_err("transb"))?;
        }
        let pref = Pref(lt::create_matmul_pref().map_err(lt_err("preference"))?);
        let ws = self.workspace.len();
        // SAFETY: live preference; the value is a usize as documented.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                size_of::<usize>(),
            )
            .map_err(lt_err("workspace size"))?;
        }
        // SAFETY: zeroed results are plain data the call overwrites.
        let mut found: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; LT_CANDIDATES];
        let mut returned = 0i32;
        // SAFETY: every descriptor is live; `found` has room for LT_CANDIDATES results.
        unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.lt.0,
                desc.0,
                a.0,
                b.0,
                d.0,
                d.0,
                pref.0,
                LT_CANDIDATES as i32,
                found.as_mut_ptr(),
                &mut returned,
            )
        }
        .result()
        .map_err(lt_err("no cuBLASLt int8 algorithm for this shape"))?;
        let candidates: Vec<_> = found
            .into_iter()
            .take(returned.max(0) as usize)
            .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        let Some(&first) = candidates.first() else {
            return Err(CudaError::Blas {
                op: "cublasLt int8 gemm",
                message: "no algorithm for this shape".into(),
            });
        };
        let mut plan = LtPlan { desc, a, b, d, algo: first };
        if candidates.len() == 1 || self.capturing()? {
            return Ok(plan);
        }
        let mut best = (f32::INFINITY, first);
        for algo in candidates {
            plan.algo = algo;
            // A candidate that fails to run is skipped, not fatal: the next may run.
            if let Ok(ms) = self.time_i8(&plan, qx, w, acc) {
                if ms < best.0 {
                    best = (ms, algo);
                }
            }
        }
        plan.algo = best.1;
        Ok(plan)
    }

    /// True while the stream is being captured into a graph.
    fn capturing(&self) -> Result<bool, CudaError> {
        use cudarc::driver::sys::{cuStreamIsCapturing, CUstreamCaptureStatus};
        let mut status = CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a live stream; writes one status.
        unsafe { cuStreamIsCapturing(self.stream.cu_stream(), &mut status) }
            .result()
            .map_err(driver("cuStreamIsCapturing"))?;
        Ok(status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Median milliseconds of a few runs of `plan` (after one warm-up), CUDA events.
    fn time_i8(
        &self,
        plan: &LtPlan,
        qx: &CudaSlice<i8>,
        w: &CudaSlice<i8>,
        acc: &mut CudaSlice<i32>,
    ) -> Result<f32, CudaError> {
        let ctx = self.stream.context();
        self.run_i8(plan, qx, w, acc)?;
        let mut times = Vec::with_capacity(3);
        for _ in 0..3 {
            let start = ctx.new_event(None).map_err(driver("create event"))?;
            let end = ctx.new_event(None).map_err(driver("create event"))?;
            start.record(&self.stream).map_err(driver("record event"))?;
            self.run_i8(plan, qx, w, acc)?;
            end.record(&self.stream).map_err(driver("record event"))?;
            end.synchronize().map_err(driver("event synchronize"))?;
            times.push(start.elapsed_ms(&end).map_err(driver("event elapsed time"))?);
        }
        times.sort_by(f32::total_cmp);
        Ok(times[1])
    }

    /// Queue the product `plan` describes.
    fn run_i8(
        &self,
        plan: &LtPlan,
        qx: &CudaSlice<i8>,
        w: &CudaSlice<i8>,
        acc: &mut CudaSlice<i32>,
    ) -> Result<(), CudaError> {
        let (alpha, beta): (i32, i32) = (1, 0);
        let ws = self.workspace.len();
        let (wp, _rw) = w.device_ptr(&self.stream);
        let (xp, _rx) = qx.device_ptr(&self.stream);
        let (dp, _rd) = acc.device_ptr_mut(&self.stream);
        let (sp, _rs) = self.workspace.device_ptr(&self.stream);
        // SAFETY: the plan's descriptors describe these buffers (checked by the caller);
        // alpha/beta are i32 for the 32I scale type.
        unsafe {
            lt::matmul(
                self.lt.0,
                plan.desc.0,
                (&alpha) as *const i32 as *const c_void,
                (&beta) as *const i32 as *const c_void,
                wp as *const c_void,
                plan.a.0,
                xp as *const c_void,
                plan.b.0,
                dp as *const c_void,
                plan.d.0,
                dp as *mut c_void,
                plan.d.0,
                (&plan.algo) as *const _,
                sp as *mut c_void,
                ws,
                self.stream.cu_stream() as *mut _,
            )
        }
        .map_err(lt_err("cublasLtMatmul"))
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` with 16-bit inputs (bits of bf16 when `bf16`, else
    /// f16), f32 accumulation and f32 output (`cublasGemmEx`, compute type 32F): the
    /// product is never rounded to 16 bits.
    pub fn gemm_16_f32(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        bf16: bool,
        out: &mut CudaSlice<f32>,
        dims: (usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "cublasGemmEx 16-bit";
        let [m, n, k] = check(OP, dims, [x.len(), w.len(), out.len()])?;
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
        let input = if bf16 { cudaDataType_t::CUDA_R_16BF } else { cudaDataType_t::CUDA_R_16F };
        let (alpha, beta) = (1.0f32, 0.0f32);
        guard(OP, || {
            let (wp, _rw) = w.device_ptr(&self.stream);
            let (xp, _rx) = x.device_ptr(&self.stream);
            let (op, _ro) = out.device_ptr_mut(&self.stream);
            // SAFETY: the buffers were checked against the shape above; the layout is
            // `gemm`'s (A = w transposed, B = x, column-major n×m output); alpha and beta
            // are f32 as compute type 32F requires.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *self.blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    n,
                    m,
                    k,
                    (&alpha) as *const f32 as *const c_void,
                    wp as *const c_void,
                    input,
                    k,
                    xp as *const c_void,
                    input,
                    k,
                    (&beta) as *const f32 as *const c_void,
                    op as *mut c_void,
                    cudaDataType_t::CUDA_R_32F,
                    n,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| CudaError::Blas { op: OP, message: format!("{e:?}") })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_layout_rules_and_workspace_sizes() {
        assert!(lt_int8_supports(4096, 4096));
        assert!(!lt_int8_supports(4098, 4096 + 2));
        assert!(!lt_int8_supports(0, 4));
        assert_eq!(workspace_bytes((9, 0)), 32 << 20);
        assert_eq!(workspace_bytes((8, 0)), 4 << 20);
    }

    #[test]
    fn shape_checks_name_the_buffer() {
        let e = check("cublas gemm", (2, 3, 4), [8, 11, 6]).unwrap_err().to_string();
        assert_eq!(e, "cuda op cublas gemm: w holds 11 values, expected at least 12");
        assert_eq!(check("x", (2, 3, 4), [8, 12, 6]).unwrap(), [2, 3, 4]);
    }
}
