//! Winograd F(m x m, 3x3) for the stride-1 3x3 convolutions, in two
//! sizes: F(2x2, 3x3) and F(4x4, 3x3) ([`Variant`]). Each m x m block of
//! output pixels (a *tile*) comes from an α x α input patch (α = m + 2)
//! through α² element-wise products per channel pair instead of 9·m²
//! multiply-adds: 16/36 of the direct convolution's multiplications for
//! F(2x2), 36/144 for F(4x4). The transforms add passes over memory, not
//! arithmetic that counts.
//!
//! With `V = Bᵀ d B` (the input patch transformed), `U = G g Gᵀ` (the
//! weights, transformed once when the network is packed) and
//! `Y = Aᵀ (U ⊙ V) A`, the α² element-wise products over all channels
//! become α² matrix products `M[ξ] = V[ξ] · U[ξ]` of shape `[tiles, cin] ·
//! [cin, cout]`, one per position ξ in the patch, run by the same kernels
//! as the direct convolution (each `U[ξ]` packed once, `panels.rs`).
//! F(2x2)'s coefficients are 0, ±1 and ½, exact in
//! floating point. F(4x4) interpolates at 0, 1, -1, ½ and -2 (with ±2 in
//! place of ½, the common choice, its worst error on the tests below was
//! twice as large): `Bᵀ` and `Aᵀ` hold halves, quarters, eighths and small
//! integers, exact in floating point, and `G`'s thirds and fifteenths are
//! applied in f64 when the weights are transformed; its sums still carry a
//! few times F(2x2)'s rounding (tests below). Both agree with the direct convolution to float
//! rounding (tests below, and every fused-path parity test against Burn and
//! onnxruntime runs through here).
//!
//! A *unit* of work is a run of whole tile rows over the batch (the image
//! index and the tile row flattened), so that its output pixels are one
//! contiguous run of NHWC rows and the epilogue runs on them as on a
//! direct convolution's tile.

use std::cell::RefCell;

use super::buffers::Map;
use super::conv::Conv;
use super::panels::Panels;
use rayon::prelude::*;

use crate::winograd_lanes::{F2, F4, Forward, LANES, Lanes, Matrices};

/// Above this many (input, output) channel pairs a layer runs F(2x2, 3x3)
/// rather than F(4x4, 3x3) ([`Variant::for_layer`]).
const F4_MAX_CHANNEL_PAIRS: usize = 256 * 256;

thread_local! {
    /// Per-thread `V` and `M` buffers, kept across units and layers.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Which Winograd algorithm a stride-1 3x3 convolution runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Variant {
    /// F(2x2, 3x3): 4x4 patches, 16 products.
    F2,
    /// F(4x4, 3x3): 6x6 patches, 36 products.
    F4,
}

impl Variant {
    /// F(4x4, 3x3) does fewer multiplications (2.25 per output pixel and
    /// channel pair against F(2x2)'s 4) but its transformed weights are 4x
    /// the 3x3 weights (F(2x2)'s 16/9), and a 7x7 map (ResNet's last stage
    /// at 224x224) fills only 49 of the 64 pixels of its 4x4 tiles, in
    /// tiles so few that the products run short. So the widest layers
    /// (more than 256x256 channel pairs: the last stage of ResNet18 and
    /// ResNet50, 9.4 MB of weights each as F(4x4)) keep F(2x2), and peak
    /// RSS stays within 30% of ONNX Runtime's (README, "Performance").
    pub(super) fn for_layer(cin: usize, cout: usize) -> Self {
        if cin.saturating_mul(cout) <= F4_MAX_CHANNEL_PAIRS {
            Self::F4
        } else {
            Self::F2
        }
    }

    /// [`Variant::for_layer`], or F(2x2) for every layer when the
    /// environment has `AVP_WINOGRAD=f2` (its rounding is a few times
    /// tighter; read once per process).
    pub(super) fn chosen(cin: usize, cout: usize) -> Self {
        static F2_ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let f2_only = *F2_ONLY.get_or_init(|| {
            std::env::var("AVP_WINOGRAD").is_ok_and(|v| v.eq_ignore_ascii_case("f2"))
        });
        if f2_only {
            Self::F2
        } else {
            Self::for_layer(cin, cout)
        }
    }

    /// Output pixels per tile side.
    pub(super) fn m(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Tiles per unit the scheduler aims at: enough rows that each `U[ξ]`
    /// read serves many of them, few enough that a unit's `V`
    /// and `M` (α² · tiles · channels floats each) stay near the caches.
    fn target_tiles(self) -> usize {
        match self {
            Self::F2 => 128,
            Self::F4 => 64,
        }
    }
}

/// A convolution's weights transformed for Winograd: α² `[cin, cout]`
/// matrices, one per point ξ, in panels for `gemm`'s kernels
/// (`panels.rs`).
pub(super) struct Winograd {
    pub(super) variant: Variant,
    pub(super) u: Vec<Panels>,
}

/// `G`: α rows of 3, for `U = G g Gᵀ`.
fn g_matrix(variant: Variant) -> &'static [[f64; 3]] {
    match variant {
        Variant::F2 => &<F2 as Matrices<4, 2>>::G,
        Variant::F4 => &<F4 as Matrices<6, 4>>::G,
    }
}

/// `U = G g Gᵀ` (in f64, rounded once) for every (input, output) channel
/// pair of Burn's `[cout, cin, 3, 3]` weights, as α² row-major
/// `[cin, cout]` matrices.
pub(super) fn transform_weights(w: &[f32], cin: usize, cout: usize, variant: Variant) -> Winograd {
    let g_mat = g_matrix(variant);
    let alpha = g_mat.len();
    let a2 = alpha * alpha;
    // Groups of input channels on the rayon pool, each channel's values
    // as `[α²][cout]` (its rows contiguous), then copied into
    // `[α²][cin][cout]`. (One thread over the pairs in output-channel
    // order, each value `cout` floats from the last, took 0.3–0.8 s of a
    // fine-tuning run's start with the other core idle; a scratch copy of
    // the whole `U` raised inference's peak RSS by 21 MB at batch 1.)
    const GROUP: usize = 16;
    let mut u = vec![0f32; a2 * cin * cout];
    let mut group = vec![0f32; GROUP.min(cin) * a2 * cout];
    for c0 in (0..cin).step_by(GROUP) {
        let n = GROUP.min(cin - c0);
        group[..n * a2 * cout]
            .par_chunks_mut(a2 * cout)
            .enumerate()
            .for_each(|(i, rows)| {
                let ci = c0 + i;
                for co in 0..cout {
                    let g = &w[(co * cin + ci) * 9..][..9];
                    // G g: α rows of 3 (a fixed array: no allocation per pair).
                    let mut gg = [[0f64; 3]; 6];
                    for (row, gr) in gg.iter_mut().zip(g_mat) {
                        *row = std::array::from_fn(|x| {
                            (0..3).map(|k| gr[k] * g[3 * k + x] as f64).sum()
                        });
                    }
                    // (G g) Gᵀ: α columns of each row.
                    for (i, row) in gg[..alpha].iter().enumerate() {
                        for (j, gr) in g_mat.iter().enumerate() {
                            let v: f64 = (0..3).map(|k| row[k] * gr[k]).sum();
                            rows[(alpha * i + j) * cout + co] = v as f32;
                        }
                    }
                }
            });
        let group = &group;
        u.par_chunks_mut(cin * cout)
            .enumerate()
            .for_each(|(xi, block)| {
                for i in 0..n {
                    block[(c0 + i) * cout..][..cout]
                        .copy_from_slice(&group[(i * a2 + xi) * cout..][..cout]);
                }
            });
    }
    let u = u
        .chunks_exact((cin * cout).max(1))
        .map(|m| Panels::new(m, cin, cout))
        .collect();
    Winograd { variant, u }
}

/// The tile geometry of one convolution over one input map.
#[derive(Clone, Copy)]
pub(super) struct Tiles {
    pub(super) variant: Variant,
    /// Output height and width.
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Tile rows per image and tiles per tile row.
    pub(super) th: usize,
    pub(super) tw: usize,
}

impl Tiles {
    pub(super) fn new(oh: usize, ow: usize, variant: Variant) -> Self {
        let m = variant.m();
        Self {
            variant,
            oh,
            ow,
            th: oh.div_ceil(m),
            tw: ow.div_ceil(m),
        }
    }

    /// The first output row (NHWC pixel index) of flattened tile row `g`
    /// (`image · th + tile row`); `g = n · th` gives the end of the batch.
    pub(super) fn row_start(&self, g: usize) -> usize {
        let (b, ty) = (g / self.th, g % self.th);
        (b * self.oh + (self.variant.m() * ty).min(self.oh)) * self.ow
    }

    /// Units of whole tile rows for `threads` threads over `n` images:
    /// `(first, end)` flattened tile rows. Their number is a multiple of the
    /// thread count where there are tile rows enough, and their sizes differ
    /// by one tile row at most, so that the threads finish together (units
    /// of a fixed size and a short last one left a thread idle: 56 tile rows
    /// at ResNet50's `layer2`, batch 8, made seven units, four for one
    /// thread and three for the other).
    pub(super) fn units(&self, n: usize, threads: usize) -> Vec<(usize, usize)> {
        let tile_rows = n * self.th;
        let threads = threads.max(1);
        let per_unit =
            (self.variant.target_tiles() / self.tw).clamp(1, tile_rows.div_ceil(threads).max(1));
        let units = tile_rows
            .div_ceil(per_unit)
            .next_multiple_of(threads)
            .min(tile_rows);
        (0..units)
            .map(|i| (tile_rows * i / units, tile_rows * (i + 1) / units))
            .filter(|(g0, g1)| g1 > g0)
            .collect()
    }
}

impl Conv {
    /// Whether this convolution runs as Winograd.
    pub(super) fn winograd_shape(kh: usize, kw: usize, stride: [usize; 2]) -> bool {
        kh == 3 && kw == 3 && stride == [1, 1]
    }

    /// The product (no bias) of tile rows `g0 .. g1` for output channels
    /// `lo .. hi`, written over `dst`: the unit's output rows from
    /// [`Tiles::row_start`]`(g0)` on, `dst_rs` floats apart, channel `lo` at
    /// column 0. `u` is this convolution's [`Winograd`] of `tiles`' variant.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn winograd_product(
        &self,
        u: &[Panels],
        x: &Map,
        tiles: Tiles,
        unit: (usize, usize),
        cols: (usize, usize),
        dst: &mut [f32],
        dst_rs: usize,
    ) {
        match tiles.variant {
            Variant::F2 => self.product::<4, 2, F2>(u, x, tiles, unit, cols, (dst, dst_rs)),
            Variant::F4 => self.product::<6, 4, F4>(u, x, tiles, unit, cols, (dst, dst_rs)),
        }
    }

    /// [`Conv::winograd_product`] for patches of `A` x `A` and tiles of
    /// `M` x `M`, with the variant `T`'s `Bᵀ` and `Aᵀ`. The input and
    /// output transforms run at the processor's vector width
    /// ([`crate::simd::widest`]; the transforms are trait methods so that
    /// they inline there, where a function pointer stays a call).
    #[inline(always)]
    fn product<const A: usize, const M: usize, T: Forward<A, M>>(
        &self,
        u: &[Panels],
        x: &Map,
        tiles: Tiles,
        (g0, g1): (usize, usize),
        (lo, hi): (usize, usize),
        (dst, dst_rs): (&mut [f32], usize),
    ) {
        let cin = self.cin;
        let ncol = hi - lo;
        let count = (g1 - g0) * tiles.tw;
        let points = A * A;
        if count == 0 || ncol == 0 {
            return;
        }
        SCRATCH.with_borrow_mut(|(v, m)| {
            if v.len() < points * count * cin {
                v.resize(points * count * cin, 0.0);
            }
            if m.len() < points * count * ncol {
                m.resize(points * count * ncol, 0.0);
            }
            let v_all = &mut v[..points * count * cin];
            crate::simd::widest(
                #[inline(always)]
                || {
                    for t in 0..count {
                        let (g, tx) = (g0 + t / tiles.tw, t % tiles.tw);
                        self.input_tile::<A, M, T>(x, tiles, (g, tx), v_all, (count, t));
                    }
                },
            );
            for (xi, u) in u.iter().enumerate().take(points) {
                u.product(
                    count,
                    (&v[xi * count * cin..(xi + 1) * count * cin], cin),
                    (lo, hi),
                    (&mut m[xi * count * ncol..(xi + 1) * count * ncol], ncol),
                );
            }
            let base = tiles.row_start(g0);
            let m_all = &m[..points * count * ncol];
            crate::simd::widest(
                #[inline(always)]
                || {
                    for t in 0..count {
                        let (g, tx) = (g0 + t / tiles.tw, t % tiles.tw);
                        let place = |dy, dx| {
                            let (b, ty) = (g / tiles.th, g % tiles.th);
                            let (oy, ox) = (M * ty + dy, M * tx + dx);
                            (oy < tiles.oh && ox < tiles.ow).then(|| {
                                let row = (b * tiles.oh + oy) * tiles.ow + ox - base;
                                row * dst_rs
                            })
                        };
                        output_tile::<A, M, T>(m_all, (count, t, ncol), place, dst);
                    }
                },
            );
        });
    }

    /// `V = Bᵀ d B` of the `A` x `A` input patch of tile `(g, tx)` into
    /// `v[ξ][t][..]` (`count` tiles per ξ), zeros outside the image.
    #[inline(always)]
    fn input_tile<const A: usize, const M: usize, T: Forward<A, M>>(
        &self,
        x: &Map,
        tiles: Tiles,
        (g, tx): (usize, usize),
        v: &mut [f32],
        (count, t): (usize, usize),
    ) {
        let cin = self.cin;
        let m = tiles.variant.m();
        let (b, ty) = (g / tiles.th, g % tiles.th);
        let y0 = (m * ty) as isize - self.pad[0] as isize;
        let x0 = (m * tx) as isize - self.pad[1] as isize;
        // The patch's pixels as offsets into `x.data`, None outside.
        let mut at = [[None; A]; A];
        for (i, row) in at.iter_mut().enumerate() {
            let iy = y0 + i as isize;
            if iy < 0 || iy >= x.h as isize {
                continue;
            }
            for (j, p) in row.iter_mut().enumerate() {
                let ix = x0 + j as isize;
                if ix >= 0 && ix < x.w as isize {
                    *p = Some(((b * x.h + iy as usize) * x.w + ix as usize) * cin);
                }
            }
        }
        // The patch column by column (`d[j][i]`: row i of column j), and
        // `Bᵀ d` by rows: made once per patch, not cleared per lane group (a
        // `memset` call each). The pixels outside the image are never
        // loaded, so they stay zero; in a short last group the lanes past
        // `w` keep the last group's values, computed on but not stored.
        let mut d = [[[0f32; LANES]; A]; A];
        let mut rows = [[[0f32; LANES]; A]; A];
        for c0 in (0..cin).step_by(LANES) {
            let w = LANES.min(cin - c0);
            for (i, row) in at.iter().enumerate() {
                for (j, p) in row.iter().enumerate() {
                    if let Some(o) = p {
                        load(&mut d[j][i], &x.data[o + c0..], w);
                    }
                }
            }
            // Bᵀ d, one column at a time; then (Bᵀ d) B, one row at a time.
            // (Loops, not `std::array::from_fn`, as in
            // `winograd_lanes::two_sided`.)
            for (j, col) in d.iter().enumerate() {
                for (row, lanes) in rows.iter_mut().zip(T::bt(col)) {
                    row[j] = lanes;
                }
            }
            for (i, row) in rows.iter().enumerate() {
                for (j, o) in T::bt(row).iter().enumerate() {
                    let at = ((A * i + j) * count + t) * cin + c0;
                    store(&mut v[at..], o, w);
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` of tile `t` from `m[ξ][t][..ncol]`, each of the M x M
/// output pixels written at the offset `place(dy, dx)` gives (None: outside
/// the image).
#[inline(always)]
fn output_tile<const A: usize, const M: usize, T: Forward<A, M>>(
    m: &[f32],
    (count, t, ncol): (usize, usize, usize),
    place: impl Fn(usize, usize) -> Option<usize>,
    dst: &mut [f32],
) {
    let spots: [[Option<usize>; M]; M] =
        std::array::from_fn(|dy| std::array::from_fn(|dx| place(dy, dx)));
    // Both arrays are overwritten for every lane group (in a short last
    // group the lanes past `w` keep the last group's values, which are
    // computed on but not stored): made once, not cleared per group (a
    // `memset` call each, 1.2% of the samples at batch 32).
    let mut mm = [[[0f32; LANES]; A]; A];
    let mut p = [[[0f32; LANES]; A]; M];
    for c0 in (0..ncol).step_by(LANES) {
        let w = LANES.min(ncol - c0);
        for (i, row) in mm.iter_mut().enumerate() {
            for (j, lanes) in row.iter_mut().enumerate() {
                let at = ((A * i + j) * count + t) * ncol + c0;
                load(lanes, &m[at..], w);
            }
        }
        // M A: M columns of each row.
        // Stored by column: `p[dx][i]` (loops rather than
        // `std::array::from_fn`, as in `input_tile`).
        for (i, row) in mm.iter().enumerate() {
            for (col, lanes) in p.iter_mut().zip(T::at(row)) {
                col[i] = lanes;
            }
        }
        // Aᵀ (M A), one output column at a time.
        for (dx, col) in p.iter().enumerate() {
            for (dy, lanes) in T::at(col).iter().enumerate() {
                if let Some(o) = spots[dy][dx] {
                    store(&mut dst[o + c0..], lanes, w);
                }
            }
        }
    }
}

/// The first `w` of `lanes` from `src` (`w` ≤ [`LANES`]). A whole group
/// is one fixed-size copy, a single vector load where the code is compiled
/// wide; a copy of run-time length is a call to `memcpy` (10% of ResNet50's
/// inference time in a `perf` profile, from these copies and the stores).
#[inline(always)]
fn load(lanes: &mut Lanes, src: &[f32], w: usize) {
    match src.first_chunk::<LANES>() {
        Some(whole) if w == LANES => *lanes = *whole,
        _ => lanes[..w].copy_from_slice(&src[..w]),
    }
}

/// The first `w` of `lanes` into `dst` ([`load`]'s counterpart).
#[inline(always)]
fn store(dst: &mut [f32], lanes: &Lanes, w: usize) {
    match dst.first_chunk_mut::<LANES>() {
        Some(whole) if w == LANES => *whole = *lanes,
        _ => dst[..w].copy_from_slice(&lanes[..w]),
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::tests::fill;
    use super::*;

    /// The direct 3x3 stride-1 convolution (no bias) in f64, NHWC.
    fn exact(x: &Map, w: &[f32], cout: usize, pad: [usize; 4]) -> (usize, usize, Vec<f32>) {
        let (oh, ow) = (x.h + pad[0] + pad[2] - 2, x.w + pad[1] + pad[3] - 2);
        let mut out = vec![0f32; x.n * oh * ow * cout];
        for b in 0..x.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..cout {
                        let mut s = 0f64;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy + ky) as isize - pad[0] as isize;
                                let ix = (ox + kx) as isize - pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                                    continue;
                                }
                                let p = ((b * x.h + iy as usize) * x.w + ix as usize) * x.c;
                                for ci in 0..x.c {
                                    s += x.data[p + ci] as f64
                                        * w[((co * x.c + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        out[((b * oh + oy) * ow + ox) * cout + co] = s as f32;
                    }
                }
            }
        }
        (oh, ow, out)
    }

    /// Every unit split, and a block of output channels, give the direct
    /// convolution, in both variants: odd and even sizes (tiles hanging
    /// over the edge), more than one image (units crossing images), channel
    /// counts that are not a multiple of the 16 lanes, asymmetric padding.
    #[test]
    fn winograd_equals_direct_convolution() {
        for variant in [Variant::F2, Variant::F4] {
            for (n, h, w, cin, cout, pad, threads) in [
                (1, 7, 7, 8, 24, [1; 4], 2),
                (3, 6, 5, 19, 17, [1; 4], 2),
                (2, 9, 4, 16, 33, [0, 1, 2, 1], 3),
                (1, 14, 14, 32, 16, [1; 4], 1),
                (2, 13, 11, 64, 40, [1; 4], 2),
            ] {
                check(variant, (n, h, w, cin, cout, pad, threads));
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn check(
        variant: Variant,
        (n, h, w, cin, cout, pad, threads): (usize, usize, usize, usize, usize, [usize; 4], usize),
    ) {
        let x = Map {
            n,
            h,
            w,
            c: cin,
            data: fill(n * h * w * cin, 5),
        };
        let raw = fill(cout * cin * 9, 9);
        let conv = super::super::conv::tests::winograd_conv(cin, cout, pad, None, None);
        let wino = transform_weights(&raw, cin, cout, variant);
        assert_eq!(wino.variant, variant);
        let u = &wino.u;
        let (oh, ow, want) = exact(&x, &raw, cout, pad);
        let tiles = Tiles::new(oh, ow, variant);
        let worst = |got: &[f32]| {
            want.iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                .fold(
                    0f32,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                )
        };
        let what = format!("{variant:?} on {n}x{h}x{w}x{cin} -> {cout}");
        // Row units, as `Conv::run` schedules them.
        let mut got = vec![f32::NAN; want.len()];
        let units = tiles.units(n, threads);
        assert_eq!(units.first().map(|u| u.0), Some(0));
        assert_eq!(units.last().map(|u| u.1), Some(n * tiles.th));
        for &(g0, g1) in &units {
            let (r0, r1) = (tiles.row_start(g0), tiles.row_start(g1));
            conv.winograd_product(
                u,
                &x,
                tiles,
                (g0, g1),
                (0, cout),
                &mut got[r0 * cout..r1 * cout],
                cout,
            );
        }
        // F(4x4)'s transforms round more (measured here: up to 4.3e-5 on
        // 64 input channels, against F(2x2)'s 7.0e-6).
        let tol = match variant {
            Variant::F2 => 1e-5,
            Variant::F4 => 1e-4,
        };
        assert!(worst(&got) < tol, "{what}: units differ by {}", worst(&got));
        // One block of channels over everything (the batch-1 split).
        let (lo, hi) = (cout / 3, cout);
        let rows = n * oh * ow;
        let mut block = vec![f32::NAN; rows * (hi - lo)];
        conv.winograd_product(
            u,
            &x,
            tiles,
            (0, n * tiles.th),
            (lo, hi),
            &mut block,
            hi - lo,
        );
        let mut full = want.clone();
        for (row, src) in full.chunks_exact_mut(cout).zip(block.chunks_exact(hi - lo)) {
            row[lo..hi].copy_from_slice(src);
        }
        assert!(
            worst(&full) < tol,
            "{what}: channel block differs by {}",
            worst(&full)
        );
    }

    /// Units cover every tile row once, in order; where there are tile rows
    /// enough their number is a multiple of the thread count and their
    /// sizes differ by one tile row at most (ResNet50's shapes at batch 1,
    /// 8 and 32, and small odd ones).
    #[test]
    fn units_are_even_across_threads() {
        for variant in [Variant::F2, Variant::F4] {
            for (side, n, threads) in [
                (56, 1, 2),
                (28, 1, 2),
                (28, 8, 2),
                (28, 32, 2),
                (14, 8, 2),
                (7, 32, 2),
                (7, 1, 2),
                (5, 3, 3),
                (28, 8, 1),
                (3, 1, 4),
            ] {
                let tiles = Tiles::new(side, side, variant);
                let units = tiles.units(n, threads);
                let what = format!("{variant:?}, {n} images of {side}x{side}, {threads} threads");
                let mut next = 0;
                for &(g0, g1) in &units {
                    assert_eq!(g0, next, "{what}: units {units:?} leave a gap");
                    assert!(g1 > g0, "{what}: an empty unit in {units:?}");
                    next = g1;
                }
                assert_eq!(next, n * tiles.th, "{what}: units {units:?} stop short");
                let sizes: Vec<usize> = units.iter().map(|(a, b)| b - a).collect();
                let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                assert!(
                    hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
                    "{what}: {sizes:?}"
                );
                if n * tiles.th >= threads {
                    assert_eq!(units.len() % threads, 0, "{what}: {sizes:?}");
                }
            }
        }
    }

    /// The widest layers keep F(2x2, 3x3) (memory), the rest take F(4x4).
    #[test]
    fn variant_by_width() {
        assert_eq!(Variant::for_layer(64, 64), Variant::F4);
        assert_eq!(Variant::for_layer(256, 256), Variant::F4);
        assert_eq!(Variant::for_layer(512, 512), Variant::F2);
        assert_eq!(Variant::for_layer(usize::MAX, 2), Variant::F2);
    }
}
