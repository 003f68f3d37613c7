//! What the int8 GEMM kernels share: the activation code types, the output pointer the
//! tasks write through, and activations widened to i16 for the AVX2 kernels.

/// An activation code the kernels take: `i8` (symmetric schemes) or `u8` (the affine
/// activations of `int8-static`). Both widen to i16 exactly, and a `vpmaddwd` pair of
/// them with i8 weights is at most 2·255·128 = 65280 in magnitude.
pub trait Code: Copy + Sync + Into<i16> + Into<i32> {
    /// Added to a code to make it unsigned (the VNNI kernel's activation operand).
    const SHIFT: i32;
}
impl Code for i8 {
    const SHIFT: i32 = 128;
}
impl Code for u8 {
    const SHIFT: i32 = 0;
}

/// The output pointer shared by the tasks, each writing its own columns.
#[derive(Clone, Copy)]
pub struct OutPtr(pub *mut i32);
// SAFETY: tasks write disjoint columns of the output (see `int8_gemm::run_blocks`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Activation rows are widened to i16 once per product and padded to a multiple of
/// 16 with zeros, so the inner loop loads whole vectors.
#[cfg(target_arch = "x86_64")]
pub fn widen_rows<T: Code>(a: &[T], m: usize, k: usize) -> Widened {
    let stride = k.div_ceil(16) * 16;
    let mut data = vec![0i16; m * stride];
    if stride == 0 {
        return Widened { data, stride };
    }
    for (dst, src) in data.chunks_exact_mut(stride).zip(a.chunks_exact(k)) {
        dst[..k].iter_mut().zip(src).for_each(|(d, &s)| *d = s.into());
    }
    Widened { data, stride }
}

/// Activations as i16, `stride` values per row.
#[cfg(target_arch = "x86_64")]
pub struct Widened {
    data: Vec<i16>,
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl Widened {
    /// Row `r` with its zero padding (`stride` values, a multiple of 16).
    pub fn row(&self, r: usize) -> &[i16] {
        &self.data[r * self.stride..(r + 1) * self.stride]
    }

    /// The first value of row 0, for kernels that step through rows by [`Widened::stride`].
    pub fn as_ptr(&self) -> *const i16 {
        self.data.as_ptr()
    }

    /// Values per row, a multiple of 16.
    pub fn stride(&self) -> usize {
        self.stride
    }
}
