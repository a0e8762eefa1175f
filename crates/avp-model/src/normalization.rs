//! The input normalization a network was trained with, as part of its
//! weights: channel order, value range, per-channel mean and std.
//!
//! Sources, in order of precedence: given explicitly; a companion
//! preprocessing ONNX file (channel reorder + mean subtraction, such as
//! ML.NET's `ResNetPreprocess.onnx`); the `weights/` manifest by SHA-256;
//! torchvision's ImageNet mean/std for PyTorch files and exports.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Order of the colour channels the network reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue (torchvision).
    Rgb,
    /// Blue, green, red (Caffe, CNTK).
    Bgr,
}

/// Scale of the pixel values before mean and std are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueRange {
    /// Pixels divided by 255 (`ToTensor`).
    Unit,
    /// Raw 0..255 pixel values.
    Byte,
}

/// Where a normalization came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum NormalizationSource {
    /// Given by the caller.
    #[default]
    Explicit,
    /// Read from a preprocessing ONNX file.
    PrepFile(PathBuf),
    /// Found in the weights manifest under this name.
    Manifest(String),
    /// torchvision's ImageNet statistics, for PyTorch files and exports.
    Torchvision,
    /// Nothing said otherwise; torchvision's statistics were assumed.
    Assumed,
}

/// `x[c] = (pixel[order[c]] * scale - mean[c]) / std[c]`, with `mean` and
/// `std` in the network's own channel order and value range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Channel order the network reads.
    pub channel_order: ChannelOrder,
    /// Value range before mean/std.
    pub range: ValueRange,
    /// Per-channel mean, in `channel_order`.
    pub mean: [f32; 3],
    /// Per-channel std, in `channel_order` (1 for "no std").
    pub std: [f32; 3],
    /// Where this came from.
    #[serde(default)]
    pub source: NormalizationSource,
    /// The evaluation crop the weights were measured with, when known
    /// (torchvision's and timm's: the shorter side resized, then a centre
    /// crop); `None`: the lesson's squash to 224x224.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_crop: Option<EvalCrop>,
}

/// An evaluation transform of the ImageNet kind: `Resize(resize)` (the
/// shorter side) then `CenterCrop(crop)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalCrop {
    /// The shorter side after resizing (torchvision: 256).
    pub resize: u32,
    /// The centre crop's side (torchvision: 224).
    pub crop: u32,
}

impl EvalCrop {
    /// torchvision's `Resize(256)` + `CenterCrop(224)`.
    pub fn torchvision() -> Self {
        Self {
            resize: 256,
            crop: 224,
        }
    }
}

impl Normalization {
    /// torchvision's ImageNet normalization: RGB, 0..1,
    /// mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
    pub fn imagenet() -> Self {
        Self {
            channel_order: ChannelOrder::Rgb,
            range: ValueRange::Unit,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            source: NormalizationSource::Torchvision,
            eval_crop: None,
        }
    }

    /// The per-channel average of the Caffe/CNTK ImageNet mean image in BGR,
    /// 0..255, no std: what ML.NET's ResNet featurizers expect.
    pub fn caffe_bgr() -> Self {
        Self {
            channel_order: ChannelOrder::Bgr,
            range: ValueRange::Byte,
            mean: [103.06, 115.90, 123.15],
            std: [1.0; 3],
            source: NormalizationSource::Explicit,
            eval_crop: None,
        }
    }

    /// Same normalization with a known evaluation crop.
    pub fn with_eval_crop(mut self, eval_crop: Option<EvalCrop>) -> Self {
        self.eval_crop = eval_crop;
        self
    }

    /// Same normalization with another source tag.
    pub fn with_source(mut self, source: NormalizationSource) -> Self {
        self.source = source;
        self
    }

    /// One-line description, e.g. `BGR 0..255, mean [103.06, 115.90,
    /// 123.15], no std (from ResNetPreprocess.onnx)`.
    pub fn describe(&self) -> String {
        let order = match self.channel_order {
            ChannelOrder::Rgb => "RGB",
            ChannelOrder::Bgr => "BGR",
        };
        let range = match self.range {
            ValueRange::Unit => "0..1",
            ValueRange::Byte => "0..255",
        };
        let f = |v: &[f32; 3]| format!("[{:.4}, {:.4}, {:.4}]", v[0], v[1], v[2]);
        let std = if self.std == [1.0; 3] {
            "no std".to_string()
        } else {
            format!("std {}", f(&self.std))
        };
        let source = match &self.source {
            NormalizationSource::Explicit => "given".to_string(),
            NormalizationSource::PrepFile(p) => format!("from {}", p.display()),
            NormalizationSource::Manifest(n) => format!("from the weights manifest entry `{n}`"),
            NormalizationSource::Torchvision => "torchvision's ImageNet statistics".to_string(),
            NormalizationSource::Assumed => {
                "assumed: torchvision's ImageNet statistics; pass a preprocessing file if the network expects otherwise".to_string()
            }
        };
        format!("{order} {range}, mean {}, {std} ({source})", f(&self.mean))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_order_range_and_source() {
        let d = Normalization::caffe_bgr().describe();
        assert!(d.starts_with("BGR 0..255, mean [103.0600"), "{d}");
        assert!(d.contains("no std"), "{d}");
        assert!(Normalization::imagenet().describe().contains("RGB 0..1"));
    }
}
