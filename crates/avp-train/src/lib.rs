//! # avp-train
//!
//! Frozen-backbone transfer learning: the glue between [`avp_model`]'s
//! networks and [`avp_data`]'s pipeline.
#![warn(missing_docs)]

pub mod bridge;

pub use bridge::data_normalize;
