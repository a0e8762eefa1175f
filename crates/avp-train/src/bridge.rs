//! Conversions between the model crate's and the data crate's types, which
//! know nothing of each other.

use avp_data::{Channels, Normalize, Pipeline};
use avp_model::{ChannelOrder, Normalization, ValueRange};

/// The evaluation transform for a model: its own centre crop when the
/// weights name one (torchvision's, timm's), the lesson's squash to
/// 224x224 otherwise.
pub fn eval_pipeline(n: &Normalization) -> Pipeline {
    match n.eval_crop {
        Some(c) => Pipeline::center_crop(data_normalize(n), c.resize, c.crop),
        None => Pipeline::eval(data_normalize(n)),
    }
}

/// The data pipeline's `Normalize` for a model's normalization.
pub fn data_normalize(n: &Normalization) -> Normalize {
    Normalize {
        channels: match n.channel_order {
            ChannelOrder::Rgb => Channels::Rgb,
            ChannelOrder::Bgr => Channels::Bgr,
        },
        scale: match n.range {
            ValueRange::Unit => 1.0 / 255.0,
            ValueRange::Byte => 1.0,
        },
        mean: n.mean,
        std: n.std,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caffe_bgr_becomes_raw_bgr_minus_mean() {
        let n = data_normalize(&Normalization::caffe_bgr());
        assert_eq!(n.channels, Channels::Bgr);
        assert_eq!(n.scale, 1.0);
        assert_eq!(n.std, [1.0; 3]);
        let t = data_normalize(&Normalization::imagenet());
        assert_eq!(t, Normalize::imagenet());
    }

    #[test]
    fn weights_with_a_known_crop_are_evaluated_with_it() {
        let squash = eval_pipeline(&Normalization::imagenet());
        assert_eq!(squash, Pipeline::eval(Normalize::imagenet()));
        let tv = Normalization::imagenet().with_eval_crop(Some(avp_model::EvalCrop::torchvision()));
        assert_eq!(
            eval_pipeline(&tv),
            Pipeline::center_crop(Normalize::imagenet(), 256, 224)
        );
    }
}
