#![doc = include_str!("../README.md")]
//!
//! The facade re-exports the three crates: [`data`] (`avp-data`), [`model`]
//! (`avp-model`) and [`train`] (`avp-train`), and [`burn`] itself, so that
//! `avp::burn::tensor::Tensor` is the very type the crates take.
#![warn(missing_docs)]

pub use avp_data as data;
pub use avp_model as model;
pub use avp_train as train;
pub use burn;
