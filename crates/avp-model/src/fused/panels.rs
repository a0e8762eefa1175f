//! Weight matrices packed once, at load, in the layout `gemm`'s
//! micro-kernels read, and the products that drive those kernels directly.
//!
//! `gemm::gemm` copies ("packs") a block of its left operand into that
//! layout on every call once the product has more than 48 rows: with a
//! row-major output it transposes the product, so its left operand is our
//! weight matrix, packed again for every row tile, every Winograd unit and
//! every batch (in a `perf` profile of ResNet50 on a 2-core AMD EPYC with
//! AVX-512, 8% of the samples at batch 8 and 14% at batch 1; with packing
//! turned off, its kernel reading the weights in place ran no faster).
//! Here each matrix is stored as panels of `MR` columns (`MR` = the
//! kernel's height: 64 floats with AVX-512, 16 with AVX2 + FMA), each panel
//! `k` rows of `MR` consecutive floats, so that the kernel streams it as it
//! is. The products block the depth (`KC` rows of the panel, which stay in
//! the L2 cache) and the output channels (`NC_COLS` at a time), and walk the
//! activation rows six at a time (the kernel's width) as `gemm` does, the
//! activations read in place as `gemm` reads them on x86.
//!
//! Without AVX2 + FMA (or off x86-64), the same panels go through
//! `gemm::gemm`, one panel at a time.

/// Depth block: `KC` rows of a block of panels stay in the L2 cache while
/// every six-row step of activations passes over them (`KC` x `NC_COLS`
/// floats: 256 KB).
///
/// Chosen on a 2-core AMD EPYC with AVX-512 (1 MB of L2 a core), three
/// alternating rounds of `examples/speed` on the runner's ResNet50 per
/// setting: `KC` 512 with `NC_COLS` 128 against 256 with 256 gave 1.06x at
/// batch 1, 1.03x at batch 8, 1.01x at batch 32 in medians; depths of 128,
/// 768 and 1024 and blocks of 512 columns were no better
/// (`docs/panels-blocking-2026-12-07.txt`).
const KC: usize = 512;

/// Output channels per block: the panels one six-row step of activations
/// (in the L1 cache) meets before moving on.
const NC_COLS: usize = 128;

/// Which kernels the panels are laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// `gemm`'s AVX-512 kernels: panels of 64 (4 x 16 lanes), six rows.
    Avx512,
    /// `gemm`'s AVX2 + FMA kernels: panels of 16 (2 x 8 lanes), six rows.
    Fma,
    /// `gemm::gemm` on each panel (panels of 16).
    Portable,
}

impl Kernel {
    /// The widest kernel this processor runs (read once per process).
    pub(super) fn detected() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Kernel::Avx512;
                }
                if std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("avx2")
                {
                    return Kernel::Fma;
                }
            }
            Kernel::Portable
        })
    }

    /// Panel width: the kernel's height in floats.
    fn mr(self) -> usize {
        match self {
            Self::Avx512 => 64,
            Self::Fma | Self::Portable => 16,
        }
    }

    /// Floats per vector register.
    fn lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            Self::Fma | Self::Portable => 8,
        }
    }
}

/// Rows of activations per kernel call (the kernels' width).
const NR: usize = 6;

/// Zeros after the last panel: a kernel reads whole vectors, so a block of
/// columns starting between two vectors of a panel reads up to one vector
/// past its panel (into the next panel, or into these), lanes whose
/// results it does not store.
const SLACK: usize = 16;

/// One of `gemm`'s kernels: `(m, n, k, dst, lhs, rhs, dst_cs, dst_rs,
/// lhs_cs, rhs_rs, rhs_cs, alpha, beta, alpha_status, conj_dst, conj_lhs,
/// conj_rhs, next_lhs)`; `dst = beta · lhs · rhs`, plus `dst` when
/// `alpha_status` is 1.
#[cfg(target_arch = "x86_64")]
type MicroKernel = unsafe fn(
    usize,
    usize,
    usize,
    *mut f32,
    *const f32,
    *const f32,
    isize,
    isize,
    isize,
    isize,
    isize,
    f32,
    f32,
    u8,
    bool,
    bool,
    bool,
    *const f32,
);

/// A row-major `[k, n]` matrix (im2col rows by output channels, or one
/// Winograd point's `[cin, cout]`) as panels of [`Kernel::mr`] columns:
/// `data[(p · k + row) · mr + c]` is column `p · mr + c` of `row`, zero
/// past `n`, and [`SLACK`] zeros after the last panel.
pub(super) struct Panels {
    k: usize,
    n: usize,
    kernel: Kernel,
    data: Vec<f32>,
}

impl Panels {
    /// `w` (row-major `[k, n]`) packed for this processor's kernel.
    pub(super) fn new(w: &[f32], k: usize, n: usize) -> Self {
        Self::with_kernel(w, k, n, Kernel::detected())
    }

    /// `w` packed for `kernel` (which must run here: see
    /// [`Kernel::detected`]).
    pub(super) fn with_kernel(w: &[f32], k: usize, n: usize, kernel: Kernel) -> Self {
        assert_eq!(w.len(), k * n, "a [k, n] matrix");
        let mr = kernel.mr();
        let panels = n.div_ceil(mr);
        let mut data = vec![0f32; panels * k * mr + SLACK];
        for (p, panel) in data[..panels * k * mr]
            .chunks_exact_mut((k * mr).max(1))
            .enumerate()
        {
            let (c0, c1) = (p * mr, ((p + 1) * mr).min(n));
            for (row, dst) in panel.chunks_exact_mut(mr).enumerate() {
                dst[..c1 - c0].copy_from_slice(&w[row * n + c0..row * n + c1]);
            }
        }
        Self { k, n, kernel, data }
    }

    /// No matrix (a convolution whose weights live elsewhere).
    pub(super) fn empty() -> Self {
        Self::with_kernel(&[], 0, 0, Kernel::Portable)
    }

    /// Rows (the product's depth).
    #[cfg(test)]
    pub(super) fn rows(&self) -> usize {
        self.k
    }

    /// Columns (output channels).
    #[cfg(test)]
    pub(super) fn cols(&self) -> usize {
        self.n
    }

    /// Element `(row, col)` of the matrix.
    #[cfg(test)]
    pub(super) fn get(&self, row: usize, col: usize) -> f32 {
        let mr = self.kernel.mr();
        self.data[((col / mr) * self.k + row) * mr + col % mr]
    }

    /// `c = a · self[.., lo .. hi]` (`c` is written, not read): `a` is
    /// `[rows, k]` with rows `a_rs` apart, `c` is `[rows, hi - lo]` with
    /// rows `c_rs` apart (column 0 is `lo`).
    #[allow(unsafe_code)]
    pub(super) fn product(
        &self,
        rows: usize,
        (a, a_rs): (&[f32], usize),
        (lo, hi): (usize, usize),
        (c, c_rs): (&mut [f32], usize),
    ) {
        let k = self.k;
        if rows == 0 || hi <= lo || k == 0 {
            return;
        }
        assert!(hi <= self.n, "columns {lo}..{hi} of {}", self.n);
        assert!(
            a_rs >= k && a.len() >= (rows - 1) * a_rs + k,
            "left operand"
        );
        assert!(
            c_rs >= hi - lo && c.len() >= (rows - 1) * c_rs + (hi - lo),
            "output"
        );
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                // SAFETY: `Panels` holds `Kernel::Avx512` only where
                // `Kernel::detected` found AVX-512F (`with_kernel` is
                // called with it from tests alone, after the same check);
                // the assertions above bound every access (`drive`).
                unsafe {
                    self.drive(
                        &gemm_f32::microkernel::avx512f::f32::UKR,
                        rows,
                        (a, a_rs),
                        (lo, hi),
                        (c, c_rs),
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Fma => {
                // SAFETY: as above, for AVX2 + FMA.
                unsafe {
                    self.drive(
                        &gemm_f32::microkernel::fma::f32::UKR,
                        rows,
                        (a, a_rs),
                        (lo, hi),
                        (c, c_rs),
                    );
                }
            }
            _ => self.portable(rows, (a, a_rs), (lo, hi), (c, c_rs)),
        }
    }

    /// [`Panels::product`] through `gemm`'s kernels `ukr` (`ukr[v - 1][n -
    /// 1]`: `v` vectors high, `n` rows wide).
    ///
    /// # Safety
    /// The kernels must run on this processor, and the operands must pass
    /// [`Panels::product`]'s assertions.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn drive<const V: usize>(
        &self,
        ukr: &[[MicroKernel; NR]; V],
        rows: usize,
        (a, a_rs): (&[f32], usize),
        (lo, hi): (usize, usize),
        (c, c_rs): (&mut [f32], usize),
    ) {
        let (k, mr, lanes) = (self.k, self.kernel.mr(), self.kernel.lanes());
        debug_assert_eq!(V * lanes, mr);
        let (a, c, w) = (a.as_ptr(), c.as_mut_ptr(), self.data.as_ptr());
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // The first depth block writes the output, the others add to it.
            let status = u8::from(k0 > 0);
            for c0 in (lo..hi).step_by(NC_COLS) {
                let c1 = (c0 + NC_COLS).min(hi);
                for r0 in (0..rows).step_by(NR) {
                    let n = NR.min(rows - r0);
                    let rhs = a.wrapping_add(r0 * a_rs + k0);
                    let mut col = c0;
                    while col < c1 {
                        let (p, off) = (col / mr, col % mr);
                        let m = (mr - off).min(c1 - col);
                        let lhs = w.wrapping_add((p * k + k0) * mr + off);
                        let dst = c.wrapping_add(r0 * c_rs + (col - lo));
                        // SAFETY: `lhs` reads `kc` rows of `m.div_ceil(lanes)`
                        // vectors from `off` in a panel `mr` wide, `m ≤ mr -
                        // off`: at most one vector past the panel's row, so
                        // inside `data` (`SLACK`). `rhs`
                        // reads `n` rows of `kc` values, `a_rs` apart, from
                        // row `r0`, column `k0`: inside `a` (asserted). `dst`
                        // writes `n` rows of `m` values, `c_rs` apart, from
                        // row `r0`, column `col - lo`: inside `c` (asserted).
                        unsafe {
                            ukr[m.div_ceil(lanes) - 1][n - 1](
                                m,
                                n,
                                kc,
                                dst,
                                lhs,
                                rhs,
                                c_rs as isize,
                                1,
                                mr as isize,
                                1,
                                a_rs as isize,
                                1.0,
                                1.0,
                                status,
                                false,
                                false,
                                false,
                                lhs,
                            );
                        }
                        col += m;
                    }
                }
            }
        }
    }

    /// [`Panels::product`] with `gemm::gemm`, one panel's columns at a time.
    fn portable(
        &self,
        rows: usize,
        (a, a_rs): (&[f32], usize),
        (lo, hi): (usize, usize),
        (c, c_rs): (&mut [f32], usize),
    ) {
        let (k, mr) = (self.k, self.kernel.mr());
        let mut col = lo;
        while col < hi {
            let (p, off) = (col / mr, col % mr);
            let m = (mr - off).min(hi - col);
            let panel = &self.data[p * k * mr + off..(p + 1) * k * mr];
            super::conv::gemm_strided(
                (rows, m, k),
                (a, a_rs),
                (panel, mr),
                (&mut c[col - lo..], c_rs),
            );
            col += m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::tests::fill;
    use super::*;

    /// `a · w[.., lo .. hi]` in f64.
    fn exact(
        a: &[f32],
        w: &[f32],
        (rows, k, n): (usize, usize, usize),
        (lo, hi): (usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * (hi - lo)];
        for r in 0..rows {
            for col in lo..hi {
                let s: f64 = (0..k)
                    .map(|i| a[r * k + i] as f64 * w[i * n + col] as f64)
                    .sum();
                out[r * (hi - lo) + col - lo] = s as f32;
            }
        }
        out
    }

    /// Every kernel this processor runs, and the portable path, give the
    /// product: depths across the `KC` blocks, row counts that are not a
    /// multiple of six, columns that are not a multiple of the panel
    /// width, blocks of columns starting inside a panel, strided output.
    #[test]
    fn products_equal_the_exact_product() {
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detected() != Kernel::Portable {
            kernels.push(Kernel::Fma);
        }
        if Kernel::detected() == Kernel::Avx512 {
            kernels.push(Kernel::Avx512);
        }
        for kernel in kernels {
            for (rows, k, n, lo, hi) in [
                (1, 3, 1, 0, 1),
                (7, 147, 64, 0, 64),
                (13, 300, 40, 16, 40),
                (49, 600, 160, 64, 160),
                (256, 64, 256, 0, 256),
                (30, 513, 100, 32, 96),
                (20, 70, 24, 8, 24),
            ] {
                let a = fill(rows * k, 3);
                let w = fill(k * n, 5);
                let panels = Panels::with_kernel(&w, k, n, kernel);
                assert_eq!((panels.rows(), panels.cols()), (k, n));
                assert_eq!(panels.get(k - 1, n - 1), w[k * n - 1]);
                let want = exact(&a, &w, (rows, k, n), (lo, hi));
                // The output rows wider than the block, and poisoned: the
                // product writes its block and nothing else.
                let c_rs = hi - lo + 3;
                let mut c = vec![f32::NAN; rows * c_rs];
                panels.product(rows, (&a, k), (lo, hi), (&mut c, c_rs));
                for r in 0..rows {
                    for j in 0..hi - lo {
                        let (got, want) = (c[r * c_rs + j], want[r * (hi - lo) + j]);
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{kernel:?} {rows}x{k}x{n} [{lo}, {hi}): ({r}, {j}) {got} vs {want}"
                        );
                    }
                    assert!(
                        c[r * c_rs + hi - lo..(r + 1) * c_rs]
                            .iter()
                            .all(|v| v.is_nan()),
                        "{kernel:?}: wrote past the block"
                    );
                }
            }
        }
    }
}
