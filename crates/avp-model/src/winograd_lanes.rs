//! The Winograd F(2x2, 3x3) and F(4x4, 3x3) matrices, once, for the fused
//! inference path (`fused::winograd`) and the trained stages
//! (`train_conv::winograd`), and their one-dimensional transforms over
//! lanes of 16 channels.
//!
//! With `V = Bᵀ d B` (an α x α input patch), `U = G g Gᵀ` (the 3x3
//! weights) and `Y = Aᵀ (U ⊙ V) A` (an m x m output tile, α = m + 2):
//! each two-sided transform `L X Rᵀ` is a one-dimensional transform of
//! each column, then of each row. The forward needs `Bᵀ`, `G` and `Aᵀ`;
//! the backward their transposes (`A` for the output gradient, `Gᵀ` for
//! the weight gradient, `B` for the input gradient).
//!
//! The transforms are written out term by term. The training path's
//! transforms used to loop over a matrix's coefficients, which compiled to
//! run-time loads, tests for zero and loops that were not unrolled: with
//! these, a 512-channel `layer4` convolution's forward and backward at
//! batch 32 went from 152 to 138 ms (the input and output transforms
//! about twice as fast), on the 2-core AVX2 EPYC of the project's
//! measurements. The training path's input and output transforms are
//! handed over as function pointers: on that machine the same bodies as
//! trait methods, inlined or not, measured 160 ms. The fused path
//! ([`Forward`]) and the training path's weight transforms ([`Weights`])
//! take them as trait methods, inlined into loops compiled at the
//! processor's vector width. The tests below check every transform
//! against its matrix.

/// Channels a transform handles together: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// The same position of [`LANES`] channels.
pub(crate) type Lanes = [f32; LANES];

/// A one-dimensional transform of `I` lane groups into `O`.
pub(crate) type Lin<const I: usize, const O: usize> = fn(&[Lanes; I]) -> [Lanes; O];

/// The transposed matrix, at compile time.
#[cfg_attr(not(test), allow(dead_code))] // for the matrices the tests check against
const fn transpose<const R: usize, const C: usize>(m: [[f64; C]; R]) -> [[f64; R]; C] {
    let mut t = [[0.0; R]; C];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < C {
            t[j][i] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

/// One variant: `Bᵀ` (α x α), `Aᵀ` (m x α), `G` (α x 3), and the
/// transforms that apply them and their transposes. (Outside the tests,
/// only `G` is read as a matrix: by the fused path's f64 weight
/// transform.)
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) trait Matrices<const A: usize, const M: usize> {
    /// `Bᵀ`.
    const BT: [[f64; A]; A];
    /// `Aᵀ`.
    const AT: [[f64; A]; M];
    /// `G`.
    const G: [[f64; 3]; A];
    /// `B`.
    const B: [[f64; A]; A] = transpose(Self::BT);
    /// `A`.
    const A_: [[f64; M]; A] = transpose(Self::AT);
    /// `Gᵀ`.
    const GT: [[f64; A]; 3] = transpose(Self::G);
    /// `x ↦ Bᵀ x`.
    const BT_X: Lin<A, A>;
    /// `x ↦ B x`.
    const B_X: Lin<A, A>;
    /// `x ↦ Aᵀ x`.
    const AT_X: Lin<A, M>;
    /// `x ↦ A x`.
    const A_X: Lin<M, A>;
    /// `x ↦ G x`.
    const G_X: Lin<3, A>;
    /// `x ↦ Gᵀ x`.
    const GT_X: Lin<A, 3>;
}

/// F(2x2, 3x3): 4x4 patches, points 0, 1, -1.
pub(crate) struct F2;

/// F(4x4, 3x3): 6x6 patches, points 0, 1, -1, ½, -2.
pub(crate) struct F4;

/// `out[r][l] = f(x[0][l], x[1][l], …)` for every lane: the body of each
/// transform below.
macro_rules! lanes {
    ($x:ident: $n_in:literal -> $n_out:literal, |$($v:ident),+| [$($e:expr),+ $(,)?]) => {{
        let mut o = [[0f32; LANES]; $n_out];
        for l in 0..LANES {
            let [$($v),+]: [f32; $n_in] = std::array::from_fn(|i| $x[i][l]);
            let r: [f32; $n_out] = [$($e),+];
            for (row, v) in o.iter_mut().zip(r) {
                row[l] = v;
            }
        }
        o
    }};
}

impl Matrices<4, 2> for F2 {
    const BT: [[f64; 4]; 4] = [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ];
    const AT: [[f64; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    const BT_X: Lin<4, 4> = bt4;
    const B_X: Lin<4, 4> =
        |x| lanes!(x: 4 -> 4, |x0, x1, x2, x3| [x0, x1 - x2 + x3, x1 + x2 - x0, -x3]);
    const AT_X: Lin<4, 2> = at4;
    const A_X: Lin<2, 4> = |y| lanes!(y: 2 -> 4, |y0, y1| [y0, y0 + y1, y0 - y1, -y1]);
    const G_X: Lin<3, 4> = g4;
    const GT_X: Lin<4, 3> = gt4;
}

impl Matrices<6, 4> for F4 {
    const BT: [[f64; 6]; 6] = [
        [1.0, -1.5, -2.0, 1.5, 1.0, 0.0],
        [0.0, -1.0, 0.5, 2.5, 1.0, 0.0],
        [0.0, 1.0, -2.5, 0.5, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 0.5, -1.0, -0.5, 1.0, 0.0],
        [0.0, 1.0, -1.5, -2.0, 1.5, 1.0],
    ];
    const AT: [[f64; 6]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 0.5, -2.0, 0.0],
        [0.0, 1.0, 1.0, 0.25, 4.0, 0.0],
        [0.0, 1.0, -1.0, 0.125, -8.0, 1.0],
    ];
    const G: [[f64; 3]; 6] = [
        [1.0, 0.0, 0.0],
        [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
        [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
        [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
        [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
        [0.0, 0.0, 1.0],
    ];
    const BT_X: Lin<6, 6> = bt6;
    const B_X: Lin<6, 6> = |x| {
        lanes!(x: 6 -> 6, |x0, x1, x2, x3, x4, x5| [
            x0,
            (x2 + x5) - 1.5 * x0 - x1 - 2.0 * x3 + 0.5 * x4,
            -2.0 * x0 + 0.5 * x1 - 2.5 * x2 - (x3 + x4) - 1.5 * x5,
            1.5 * x0 + 2.5 * x1 + 0.5 * x2 + 2.0 * (x3 - x5) - 0.5 * x4,
            (x0 + x1) + (x2 + x3) + x4 + 1.5 * x5,
            x5,
        ])
    };
    const AT_X: Lin<6, 4> = at6;
    const A_X: Lin<4, 6> = |y| {
        lanes!(y: 4 -> 6, |y0, y1, y2, y3| [
            y0,
            (y0 + y2) + (y1 + y3),
            (y0 + y2) - (y1 + y3),
            y0 + 0.5 * y1 + 0.25 * y2 + 0.125 * y3,
            y0 - 2.0 * y1 + 4.0 * y2 - 8.0 * y3,
            y3,
        ])
    };
    const G_X: Lin<3, 6> = g6;
    const GT_X: Lin<6, 3> = gt6;
}

/// A variant's forward transforms, `Bᵀ` (over an α-long column) and `Aᵀ`
/// (α values to m), as methods: a caller that must have them inlined (the
/// fused path's transforms, compiled at the processor's vector width) gets
/// direct calls, where a function pointer stays a call.
pub(crate) trait Forward<const A: usize, const M: usize> {
    fn bt(d: &[Lanes; A]) -> [Lanes; A];
    fn at(m: &[Lanes; A]) -> [Lanes; M];
}

impl Forward<4, 2> for F2 {
    #[inline(always)]
    fn bt(d: &[Lanes; 4]) -> [Lanes; 4] {
        bt4(d)
    }
    #[inline(always)]
    fn at(m: &[Lanes; 4]) -> [Lanes; 2] {
        at4(m)
    }
}

impl Forward<6, 4> for F4 {
    #[inline(always)]
    fn bt(d: &[Lanes; 6]) -> [Lanes; 6] {
        bt6(d)
    }
    #[inline(always)]
    fn at(m: &[Lanes; 6]) -> [Lanes; 4] {
        at6(m)
    }
}

/// A variant's weight transform `G` (3 taps to α) and its transpose,
/// as methods, for the same reason as [`Forward`]: the trained stages'
/// weight transform and weight gradient run them inside
/// [`crate::simd::widest`]. (Those exist with the flex backend only.)
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) trait Weights<const A: usize> {
    fn g(k: &[Lanes; 3]) -> [Lanes; A];
    fn gt(u: &[Lanes; A]) -> [Lanes; 3];
}

impl Weights<4> for F2 {
    #[inline(always)]
    fn g(k: &[Lanes; 3]) -> [Lanes; 4] {
        g4(k)
    }
    #[inline(always)]
    fn gt(u: &[Lanes; 4]) -> [Lanes; 3] {
        gt4(u)
    }
}

impl Weights<6> for F4 {
    #[inline(always)]
    fn g(k: &[Lanes; 3]) -> [Lanes; 6] {
        g6(k)
    }
    #[inline(always)]
    fn gt(u: &[Lanes; 6]) -> [Lanes; 3] {
        gt6(u)
    }
}

/// `G g` for F(2x2, 3x3).
#[inline(always)]
fn g4(g: &[Lanes; 3]) -> [Lanes; 4] {
    lanes!(g: 3 -> 4, |g0, g1, g2| [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2])
}

/// `Gᵀ u` for F(2x2, 3x3).
#[inline(always)]
fn gt4(u: &[Lanes; 4]) -> [Lanes; 3] {
    lanes!(u: 4 -> 3, |u0, u1, u2, u3| [
        u0 + 0.5 * (u1 + u2),
        0.5 * (u1 - u2),
        0.5 * (u1 + u2) + u3,
    ])
}

const THIRD: f32 = 1.0 / 3.0;
const FIFTEENTH: f32 = 1.0 / 15.0;

/// `G g` for F(4x4, 3x3).
#[inline(always)]
fn g6(g: &[Lanes; 3]) -> [Lanes; 6] {
    lanes!(g: 3 -> 6, |g0, g1, g2| [
        g0,
        THIRD * (g0 + g1 + g2),
        THIRD * (g1 - g0 - g2),
        -FIFTEENTH * (16.0 * g0 + 8.0 * g1 + 4.0 * g2),
        FIFTEENTH * (g0 - 2.0 * g1 + 4.0 * g2),
        g2,
    ])
}

/// `Gᵀ u` for F(4x4, 3x3).
#[inline(always)]
fn gt6(u: &[Lanes; 6]) -> [Lanes; 3] {
    lanes!(u: 6 -> 3, |u0, u1, u2, u3, u4, u5| [
        u0 + THIRD * (u1 - u2) + FIFTEENTH * (u4 - 16.0 * u3),
        THIRD * (u1 + u2) - FIFTEENTH * (8.0 * u3 + 2.0 * u4),
        THIRD * (u1 - u2) + FIFTEENTH * (4.0 * u4 - 4.0 * u3) + u5,
    ])
}

/// `Bᵀ d` for F(2x2, 3x3).
#[inline(always)]
pub(crate) fn bt4(d: &[Lanes; 4]) -> [Lanes; 4] {
    lanes!(d: 4 -> 4, |d0, d1, d2, d3| [d0 - d2, d1 + d2, d2 - d1, d1 - d3])
}

/// `Bᵀ d` for F(4x4, 3x3).
#[inline(always)]
pub(crate) fn bt6(d: &[Lanes; 6]) -> [Lanes; 6] {
    lanes!(d: 6 -> 6, |d0, d1, d2, d3, d4, d5| [
        (d0 + d4) + 1.5 * (d3 - d1) - 2.0 * d2,
        (d4 - d1) + 0.5 * d2 + 2.5 * d3,
        (d4 + d1) - 2.5 * d2 + 0.5 * d3,
        (d4 - d2) + 2.0 * (d3 - d1),
        (d4 - d2) + 0.5 * (d1 - d3),
        (d5 + d1) + 1.5 * (d4 - d2) - 2.0 * d3,
    ])
}

/// `Aᵀ m` for F(2x2, 3x3).
#[inline(always)]
pub(crate) fn at4(m: &[Lanes; 4]) -> [Lanes; 2] {
    lanes!(m: 4 -> 2, |m0, m1, m2, m3| [m0 + m1 + m2, m1 - m2 - m3])
}

/// `Aᵀ m` for F(4x4, 3x3).
#[inline(always)]
pub(crate) fn at6(m: &[Lanes; 6]) -> [Lanes; 4] {
    lanes!(m: 6 -> 4, |m0, m1, m2, m3, m4, m5| [
        m0 + (m1 + m2) + m3 + m4,
        (m1 - m2) + 0.5 * m3 - 2.0 * m4,
        (m1 + m2) + 0.25 * m3 + 4.0 * m4,
        (m1 - m2) + 0.125 * m3 - 8.0 * m4 + m5,
    ])
}

/// `L X Rᵀ` of a `J x Q` block of lanes, from the one-dimensional
/// transforms `x ↦ L x` (each column) and `x ↦ R x` (each row). Plain
/// loops: built with `std::array::from_fn`, the closures stayed calls and
/// every block went through the stack (the training path's weight
/// transform took 7.8 ms instead of 5.1 at batch 32, see
/// `train_conv::winograd`; the trained stages exist with the flex backend
/// only).
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
#[inline(always)]
pub(crate) fn two_sided<const I: usize, const J: usize, const P: usize, const Q: usize>(
    l: impl Fn(&[Lanes; J]) -> [Lanes; I],
    x: &[[Lanes; Q]; J],
    r: impl Fn(&[Lanes; Q]) -> [Lanes; P],
) -> [[Lanes; P]; I] {
    let mut cols = [[[0f32; LANES]; I]; Q];
    for (q, col) in cols.iter_mut().enumerate() {
        let mut xq = [[0f32; LANES]; J];
        for (d, row) in xq.iter_mut().zip(x) {
            *d = row[q];
        }
        *col = l(&xq);
    }
    let mut out = [[[0f32; LANES]; P]; I];
    for (i, o) in out.iter_mut().enumerate() {
        let mut ri = [[0f32; LANES]; Q];
        for (d, col) in ri.iter_mut().zip(&cols) {
            *d = col[i];
        }
        *o = r(&ri);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    /// Deterministic inputs: lane `l` of row `j` is a different value
    /// for every (row, lane).
    fn input<const N: usize>() -> [Lanes; N] {
        std::array::from_fn(|j| {
            std::array::from_fn(|l| ((j * 37 + l * 11) % 23) as f32 / 7.0 - 1.5)
        })
    }

    /// `f` equals the product by `m` (in f64), lane by lane.
    fn check<const I: usize, const O: usize>(
        f: fn(&[Lanes; I]) -> [Lanes; O],
        m: &[[f64; I]; O],
        what: &str,
    ) {
        let x = input::<I>();
        let y = f(&x);
        for (o, row) in m.iter().enumerate() {
            for l in 0..LANES {
                let want: f64 = row.iter().zip(&x).map(|(c, xi)| c * xi[l] as f64).sum();
                let got = y[o][l] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{what}: row {o}, lane {l}: {got} against {want}"
                );
            }
        }
    }

    fn all<const A: usize, const M: usize, W: Matrices<A, M>>(name: &str) {
        check(W::BT_X, &W::BT, &format!("{name} Bᵀ"));
        check(W::B_X, &W::B, &format!("{name} B"));
        check(W::AT_X, &W::AT, &format!("{name} Aᵀ"));
        check(W::A_X, &W::A_, &format!("{name} A"));
        check(W::G_X, &W::G, &format!("{name} G"));
        check(W::GT_X, &W::GT, &format!("{name} Gᵀ"));
    }

    /// Every written-out transform applies its matrix.
    #[test]
    fn transforms_apply_their_matrices() {
        all::<4, 2, F2>("F(2x2)");
        all::<6, 4, F4>("F(4x4)");
    }

    /// The matrices are Winograd's: `Aᵀ[(G g) ⊙ (Bᵀ d)]` is the 1-D
    /// correlation of `d` with the 3 taps `g`, for both variants.
    #[test]
    fn the_matrices_compute_a_correlation() {
        fn correlation<const A: usize, const M: usize, W: Matrices<A, M>>() {
            let d: [f64; A] = std::array::from_fn(|i| (i as f64 * 0.7).sin());
            let g = [0.3, -1.2, 0.8];
            let bd: [f64; A] = std::array::from_fn(|i| (0..A).map(|j| W::BT[i][j] * d[j]).sum());
            let gg: [f64; A] = std::array::from_fn(|i| (0..3).map(|k| W::G[i][k] * g[k]).sum());
            for o in 0..M {
                let y: f64 = (0..A).map(|i| W::AT[o][i] * gg[i] * bd[i]).sum();
                let want: f64 = (0..3).map(|k| g[k] * d[o + k]).sum();
                assert!((y - want).abs() < 1e-12, "output {o}: {y} against {want}");
            }
        }
        correlation::<4, 2, F2>();
        correlation::<6, 4, F4>();
    }
}
