//! Element-wise loops compiled for the processor they run on.
//!
//! The crate is built for the baseline x86-64 target (SSE2), so a loop
//! over 16-float lanes (the Winograd transforms, the convolution
//! epilogues) compiles to four 4-wide instructions per operation.
//! [`widest`] runs its closure inside a function compiled for AVX-512 or
//! AVX2 + FMA when the processor has them (`pulp`'s run-time dispatch, the
//! one `gemm` uses), where the closure's inlined loops vectorize at that
//! width. Rust never contracts a multiply and an add into an FMA on its
//! own, so every lane computes the same IEEE operations in the same order
//! at any width: the results are bit for bit those of the baseline build
//! (the parity tests run through here).

/// `f()`, compiled for the widest vector extension this processor has.
/// Everything `f` does must inline into it (`#[inline(always)]` helpers)
/// to be compiled at that width; calls that stay calls run as they were
/// built.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}
