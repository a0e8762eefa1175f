//! Winograd F(2x2, 3x3) for the stride-1 3x3 convolutions: each 2x2 block
//! of output pixels (a *tile*) comes from a 4x4 input patch through 16
//! element-wise products instead of 36 multiply-adds, so the 3x3 layers do
//! 16/36 of the direct convolution's multiplications (the transforms add
//! passes over memory, not arithmetic that counts).
//!
//! With `V = Bᵀ d B` (the input patch transformed), `U = G g Gᵀ` (the
//! weights, transformed once when the network is packed) and
//! `Y = Aᵀ (U ⊙ V) A`, the 16 element-wise products over all channels become
//! 16 matrix products `M[ξ] = V[ξ] · U[ξ]` of shape `[tiles, cin] ·
//! [cin, cout]`, one per position ξ in the 4x4 patch, run by the same
//! `gemm` as the direct convolution. The transforms' coefficients are 0, ±1
//! and ½, exact in floating point; the results agree with the direct
//! convolution to float rounding (tests below, and every fused-path
//! parity test against Burn and onnxruntime runs through here).
//!
//! A *unit* of work is a run of whole tile rows over the batch (the image
//! index and the tile row flattened), so that its output pixels are one
//! contiguous run of NHWC rows and the epilogue runs on them as on a
//! direct convolution's tile.

use std::cell::RefCell;

use super::buffers::Map;
use super::conv::{Conv, gemm_strided};

/// Lanes of the transforms' inner loops: one AVX-512 register of f32.
const LANES: usize = 16;

/// Tiles per unit the scheduler aims at: enough rows to amortise the
/// packing of each `U[ξ]` inside `gemm`, few enough that a unit's `V` and
/// `M` (16 · tiles · channels floats each) stay near the core's L2.
const TARGET_TILES: usize = 128;

thread_local! {
    /// Per-thread `V` and `M` buffers, kept across units and layers.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `U = G g Gᵀ` for every (input, output) channel pair of Burn's
/// `[cout, cin, 3, 3]` weights, as 16 row-major `[cin, cout]` matrices.
pub(super) fn transform_weights(w: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cin * cout];
    for co in 0..cout {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..][..9];
            // G g: 4 rows of 3.
            let mut r = [[0f32; 3]; 4];
            for x in 0..3 {
                let (g0, g1, g2) = (g[x], g[3 + x], g[6 + x]);
                r[0][x] = g0;
                r[1][x] = 0.5 * (g0 + g1 + g2);
                r[2][x] = 0.5 * (g0 - g1 + g2);
                r[3][x] = g2;
            }
            // (G g) Gᵀ: 4 columns of each row.
            for (i, row) in r.iter().enumerate() {
                let [g0, g1, g2] = *row;
                let cols = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
                for (j, v) in cols.into_iter().enumerate() {
                    u[((4 * i + j) * cin + ci) * cout + co] = v;
                }
            }
        }
    }
    u
}

/// The tile geometry of one convolution over one input map.
#[derive(Clone, Copy)]
pub(super) struct Tiles {
    /// Output height and width.
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Tile rows per image and tiles per tile row.
    pub(super) th: usize,
    pub(super) tw: usize,
}

impl Tiles {
    pub(super) fn new(oh: usize, ow: usize) -> Self {
        Self {
            oh,
            ow,
            th: oh.div_ceil(2),
            tw: ow.div_ceil(2),
        }
    }

    /// The first output row (NHWC pixel index) of flattened tile row `g`
    /// (`image · th + tile row`); `g = n · th` gives the end of the batch.
    pub(super) fn row_start(&self, g: usize) -> usize {
        let (b, ty) = (g / self.th, g % self.th);
        (b * self.oh + (2 * ty).min(self.oh)) * self.ow
    }

    /// Units of whole tile rows for `threads` threads over `n` images:
    /// `(first, end)` flattened tile rows.
    pub(super) fn units(&self, n: usize, threads: usize) -> Vec<(usize, usize)> {
        let tile_rows = n * self.th;
        let per_unit = (TARGET_TILES / self.tw).clamp(1, tile_rows.div_ceil(threads).max(1));
        (0..tile_rows)
            .step_by(per_unit)
            .map(|g0| (g0, (g0 + per_unit).min(tile_rows)))
            .collect()
    }
}

impl Conv {
    /// Whether this convolution runs as Winograd F(2x2, 3x3).
    pub(super) fn winograd_shape(kh: usize, kw: usize, stride: [usize; 2]) -> bool {
        kh == 3 && kw == 3 && stride == [1, 1]
    }

    /// The product (no bias) of tile rows `g0 .. g1` for output channels
    /// `lo .. hi`, written over `dst`: the unit's output rows from
    /// [`Tiles::row_start`]`(g0)` on, `dst_rs` floats apart, channel `lo` at
    /// column 0.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn winograd_product(
        &self,
        u: &[f32],
        x: &Map,
        tiles: Tiles,
        (g0, g1): (usize, usize),
        (lo, hi): (usize, usize),
        dst: &mut [f32],
        dst_rs: usize,
    ) {
        let cin = self.cin;
        let ncol = hi - lo;
        let count = (g1 - g0) * tiles.tw;
        if count == 0 || ncol == 0 {
            return;
        }
        SCRATCH.with_borrow_mut(|(v, m)| {
            if v.len() < 16 * count * cin {
                v.resize(16 * count * cin, 0.0);
            }
            if m.len() < 16 * count * ncol {
                m.resize(16 * count * ncol, 0.0);
            }
            for t in 0..count {
                let g = g0 + t / tiles.tw;
                let tx = t % tiles.tw;
                self.input_tile(x, tiles, g, tx, &mut v[..16 * count * cin], count, t);
            }
            for xi in 0..16 {
                gemm_strided(
                    (count, ncol, cin),
                    (&v[xi * count * cin..(xi + 1) * count * cin], cin),
                    (
                        &u[xi * cin * self.cout + lo..(xi + 1) * cin * self.cout],
                        self.cout,
                    ),
                    (&mut m[xi * count * ncol..(xi + 1) * count * ncol], ncol),
                );
            }
            let base = tiles.row_start(g0);
            for t in 0..count {
                let g = g0 + t / tiles.tw;
                let tx = t % tiles.tw;
                output_tile(
                    &m[..16 * count * ncol],
                    count,
                    t,
                    ncol,
                    |dy, dx| {
                        let (b, ty) = (g / tiles.th, g % tiles.th);
                        let (oy, ox) = (2 * ty + dy, 2 * tx + dx);
                        (oy < tiles.oh && ox < tiles.ow).then(|| {
                            let row = (b * tiles.oh + oy) * tiles.ow + ox - base;
                            row * dst_rs
                        })
                    },
                    dst,
                );
            }
        });
    }

    /// `V = Bᵀ d B` of the 4x4 input patch of tile `(g, tx)` into
    /// `v[ξ][t][..]` (`count` tiles per ξ), zeros outside the image.
    #[allow(clippy::too_many_arguments)]
    fn input_tile(
        &self,
        x: &Map,
        tiles: Tiles,
        g: usize,
        tx: usize,
        v: &mut [f32],
        count: usize,
        t: usize,
    ) {
        let cin = self.cin;
        let (b, ty) = (g / tiles.th, g % tiles.th);
        let y0 = (2 * ty) as isize - self.pad[0] as isize;
        let x0 = (2 * tx) as isize - self.pad[1] as isize;
        // The patch's pixels as offsets into `x.data`, None outside.
        let mut at = [[None; 4]; 4];
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
        for c0 in (0..cin).step_by(LANES) {
            let w = LANES.min(cin - c0);
            let mut d = [[[0f32; LANES]; 4]; 4];
            for i in 0..4 {
                for j in 0..4 {
                    if let Some(o) = at[i][j] {
                        d[i][j][..w].copy_from_slice(&x.data[o + c0..o + c0 + w]);
                    }
                }
            }
            // Bᵀ d, then (Bᵀ d) B, lane by lane.
            let mut s = [[[0f32; LANES]; 4]; 4];
            for j in 0..4 {
                for l in 0..LANES {
                    let (d0, d1, d2, d3) = (d[0][j][l], d[1][j][l], d[2][j][l], d[3][j][l]);
                    s[0][j][l] = d0 - d2;
                    s[1][j][l] = d1 + d2;
                    s[2][j][l] = d2 - d1;
                    s[3][j][l] = d1 - d3;
                }
            }
            for (i, row) in s.iter().enumerate() {
                let mut out = [[0f32; LANES]; 4];
                for l in 0..LANES {
                    let (a0, a1, a2, a3) = (row[0][l], row[1][l], row[2][l], row[3][l]);
                    out[0][l] = a0 - a2;
                    out[1][l] = a1 + a2;
                    out[2][l] = a2 - a1;
                    out[3][l] = a1 - a3;
                }
                for (j, o) in out.iter().enumerate() {
                    let at = ((4 * i + j) * count + t) * cin + c0;
                    v[at..at + w].copy_from_slice(&o[..w]);
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` of tile `t` from `m[ξ][t][..ncol]`, each of the four output
/// pixels written at the offset `place(dy, dx)` gives (None: outside the
/// image).
fn output_tile(
    m: &[f32],
    count: usize,
    t: usize,
    ncol: usize,
    place: impl Fn(usize, usize) -> Option<usize>,
    dst: &mut [f32],
) {
    let spots = [[place(0, 0), place(0, 1)], [place(1, 0), place(1, 1)]];
    for c0 in (0..ncol).step_by(LANES) {
        let w = LANES.min(ncol - c0);
        let mut mm = [[[0f32; LANES]; 4]; 4];
        for (i, row) in mm.iter_mut().enumerate() {
            for (j, lanes) in row.iter_mut().enumerate() {
                let at = ((4 * i + j) * count + t) * ncol + c0;
                lanes[..w].copy_from_slice(&m[at..at + w]);
            }
        }
        // M A: two columns per row.
        let mut p = [[[0f32; LANES]; 2]; 4];
        for i in 0..4 {
            for l in 0..LANES {
                let (m0, m1, m2, m3) = (mm[i][0][l], mm[i][1][l], mm[i][2][l], mm[i][3][l]);
                p[i][0][l] = m0 + m1 + m2;
                p[i][1][l] = m1 - m2 - m3;
            }
        }
        // Aᵀ (M A).
        for dx in 0..2 {
            let mut y = [[0f32; LANES]; 2];
            for l in 0..LANES {
                let (p0, p1, p2, p3) = (p[0][dx][l], p[1][dx][l], p[2][dx][l], p[3][dx][l]);
                y[0][l] = p0 + p1 + p2;
                y[1][l] = p1 - p2 - p3;
            }
            for (dy, lanes) in y.iter().enumerate() {
                if let Some(o) = spots[dy][dx] {
                    dst[o + c0..o + c0 + w].copy_from_slice(&lanes[..w]);
                }
            }
        }
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
    /// convolution: odd and even sizes (tiles hanging over the edge), more
    /// than one image (units crossing images), channel counts that are not
    /// a multiple of the 16 lanes, asymmetric padding.
    #[test]
    fn winograd_equals_direct_convolution() {
        for (n, h, w, cin, cout, pad, threads) in [
            (1, 7, 7, 8, 24, [1; 4], 2),
            (3, 6, 5, 19, 17, [1; 4], 2),
            (2, 9, 4, 16, 33, [0, 1, 2, 1], 3),
            (1, 14, 14, 32, 16, [1; 4], 1),
        ] {
            let x = Map {
                n,
                h,
                w,
                c: cin,
                data: fill(n * h * w * cin, 5),
            };
            let raw = fill(cout * cin * 9, 9);
            let conv = Conv {
                cin,
                cout,
                kh: 3,
                kw: 3,
                stride: [1, 1],
                pad,
                weight: Vec::new(),
                winograd: None,
                bias: vec![0.0; cout],
                bn: None,
            };
            let u = transform_weights(&raw, cin, cout);
            let (oh, ow, want) = exact(&x, &raw, cout, pad);
            let tiles = Tiles::new(oh, ow);
            let worst = |got: &[f32]| {
                want.iter()
                    .zip(got)
                    .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                    .fold(
                        0f32,
                        |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                    )
            };
            // Row units, as `Conv::run` schedules them.
            let mut got = vec![f32::NAN; want.len()];
            let units = tiles.units(n, threads);
            assert_eq!(units.first().map(|u| u.0), Some(0));
            assert_eq!(units.last().map(|u| u.1), Some(n * tiles.th));
            for &(g0, g1) in &units {
                let (r0, r1) = (tiles.row_start(g0), tiles.row_start(g1));
                conv.winograd_product(
                    &u,
                    &x,
                    tiles,
                    (g0, g1),
                    (0, cout),
                    &mut got[r0 * cout..r1 * cout],
                    cout,
                );
            }
            assert!(worst(&got) < 1e-5, "units differ by {}", worst(&got));
            // One block of channels over everything (the batch-1 split).
            let (lo, hi) = (cout / 3, cout);
            let rows = n * oh * ow;
            let mut block = vec![f32::NAN; rows * (hi - lo)];
            conv.winograd_product(
                &u,
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
                worst(&full) < 1e-5,
                "channel block differs by {}",
                worst(&full)
            );
        }
    }
}
