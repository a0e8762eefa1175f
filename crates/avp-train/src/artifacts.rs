//! What a training run leaves behind and how it comes back: `model.bpk`
//! (backbone and head, with everything needed to run it: architecture,
//! head widths, classes, input normalization) as a [`TrainedModel`], and
//! its predictions on image files. The figures are in `plot.rs`.

use std::path::Path;

use std::sync::Arc;

use avp_model::{Backbone, Normalization, Provenance, ResNet, ResNetConfig, WeightFormat};
use burn::module::Module;
use burn::tensor::Device;

use crate::classifier::{BnMode, Classifier, Head, HeadConfig};
use crate::error::{TrainError, write_err};

/// Backbone and head as one module, for saving and loading.
#[derive(Module, Debug)]
pub struct ClassifierWeights {
    /// The frozen backbone.
    pub backbone: ResNet,
    /// The trained head.
    pub head: Head,
}

/// A trained classifier: what a training run returns and what `model.bpk`
/// holds.
#[derive(Debug)]
pub struct TrainedModel {
    /// The classifier.
    pub classifier: Classifier,
    /// Class names, in index order.
    pub classes: Vec<String>,
    /// The input normalization (and evaluation transform) predictions use:
    /// what validation used.
    pub normalization: Normalization,
}

impl TrainedModel {
    /// The backbone's architecture.
    pub fn backbone_config(&self) -> &ResNetConfig {
        self.classifier.backbone.0.config()
    }

    /// The same model with its backbone on other kernels (see
    /// [`avp_model::Kernels`]).
    pub fn with_kernels(self, kernels: avp_model::Kernels) -> Result<Self, TrainError> {
        let Classifier {
            head,
            backbone,
            bn_mode,
            ..
        } = self.classifier;
        let backbone = match Arc::try_unwrap(backbone.0) {
            Ok(b) => b,
            Err(shared) => Backbone::new(
                shared.network().clone(),
                shared.config().clone(),
                shared.provenance().clone(),
                shared.normalization().clone(),
            ),
        };
        let backbone = Arc::new(backbone.with_kernels(kernels)?);
        Ok(Self {
            classifier: Classifier::new(backbone, head, bn_mode)?,
            classes: self.classes,
            normalization: self.normalization,
        })
    }
}

const META_BACKBONE: &str = "avp.backbone_config";
const META_HEAD: &str = "avp.head_widths";
const META_CLASSES: &str = "avp.classes";
const META_NORMALIZATION: &str = "avp.normalization";

/// Writes backbone and head to `path` (burnpack) with their metadata.
pub fn save_model(trained: &TrainedModel, path: &Path) -> Result<(), TrainError> {
    let model = &trained.classifier;
    let (classes, normalization) = (&trained.classes, &trained.normalization);
    let backbone_config = trained.backbone_config();
    let widths: Vec<usize> = model
        .head
        .layers
        .iter()
        .map(|l| l.weight.lazy_shape().dims::<2>()[1])
        .collect();
    let json = |v: serde_json::Result<String>| v.map_err(|e| write_err(path, e));
    let weights = ClassifierWeights {
        backbone: model.backbone.0.network().clone(),
        head: model.head.clone(),
    };
    let metadata = [
        (META_BACKBONE, json(serde_json::to_string(backbone_config))?),
        (META_HEAD, json(serde_json::to_string(&widths))?),
        (META_CLASSES, json(serde_json::to_string(classes))?),
        (
            META_NORMALIZATION,
            json(serde_json::to_string(normalization))?,
        ),
    ];
    // Whole or not at all (avp_model::pack writes through a `.partial`).
    avp_model::pack::save(&weights, &metadata, path).map_err(|e| write_err(path, e))
}

/// Loads a `model.bpk` written by [`save_model`] onto `device`.
pub fn load_model(path: &Path, device: &Device) -> Result<TrainedModel, TrainError> {
    let bad = |why: String| {
        TrainError::Model(avp_model::ModelError::Store {
            path: path.to_path_buf(),
            why,
        })
    };
    if !path.is_file() {
        return Err(bad(
            "no such file (train a model first, e.g. cargo run --example alien_vs_predator)".into(),
        ));
    }
    let meta = avp_model::pack::metadata(path)?;
    use avp_model::pack::meta as get;
    let backbone_config: ResNetConfig = get(path, &meta, META_BACKBONE, "backbone architecture")?;
    let widths: Vec<usize> = get(path, &meta, META_HEAD, "head widths")?;
    let classes: Vec<String> = get(path, &meta, META_CLASSES, "class names")?;
    let normalization: Normalization = get(path, &meta, META_NORMALIZATION, "normalization")?;
    backbone_config.validate()?;
    if widths.last() != Some(&classes.len()) {
        return Err(bad(format!(
            "head ends with {:?} outputs but {} classes are named",
            widths.last(),
            classes.len()
        )));
    }
    let hidden = widths[..widths.len().saturating_sub(1)].to_vec();
    let head = HeadConfig::new().with_hidden(hidden).init(
        backbone_config.num_features(),
        classes.len(),
        device,
    )?;
    let weights = ClassifierWeights {
        backbone: backbone_config.init(device),
        head,
    };
    // One rule with converted weights: nothing missing, nothing unused.
    let weights = avp_model::pack::load(weights, path)?;
    let provenance = Provenance {
        path: path.to_path_buf(),
        format: WeightFormat::Burnpack,
        sha256: std::fs::read(path)
            .map(|b| avp_model::sha256_hex(&b))
            .map_err(|e| bad(format!("cannot read it: {e}")))?,
        architecture: backbone_config.describe(),
        ..Provenance::in_memory("")
    };
    let backbone = Backbone::new(
        weights.backbone,
        backbone_config,
        provenance,
        normalization.clone(),
    );
    Ok(TrainedModel {
        classifier: Classifier::new(Arc::new(backbone), weights.head, BnMode::Frozen)?,
        classes,
        normalization,
    })
}

/// The class probabilities of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The image.
    pub path: std::path::PathBuf,
    /// Softmax probabilities, in class order.
    pub probabilities: Vec<f32>,
    /// The most probable class.
    pub class: usize,
}

impl TrainedModel {
    /// Class probabilities for image files: each is decoded by content,
    /// brought to 224x224 by the evaluation transform validation used (the
    /// lesson's squash, or the weights' centre crop) and normalized as the
    /// backbone expects, then run
    /// in batches of `batch_size`. A file that cannot be read or decoded
    /// is an error naming it.
    pub fn predict_paths<P: AsRef<Path>>(
        &self,
        paths: &[P],
        batch_size: usize,
    ) -> Result<Vec<Prediction>, TrainError> {
        predict_paths(&self.classifier, &self.normalization, paths, batch_size)
    }
}

/// Class probabilities of `classifier` for image files, with the
/// backbone's `normalization` (see [`TrainedModel::predict_paths`]).
pub fn predict_paths<P: AsRef<Path>>(
    classifier: &Classifier,
    normalization: &Normalization,
    paths: &[P],
    batch_size: usize,
) -> Result<Vec<Prediction>, TrainError> {
    let eval = crate::bridge::eval_pipeline(normalization);
    let device = classifier
        .head
        .devices()
        .first()
        .cloned()
        .unwrap_or_default()
        .without_autodiff();
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(batch_size.max(1)) {
        let mut pixels = Vec::new();
        for p in chunk {
            let img = avp_data::decode_rgb8(p.as_ref())?;
            pixels.extend(eval.apply(&img, &mut avp_data::Rng::for_item(0, 0, 0)));
        }
        let [c, h, w] = eval.output_shape();
        let images = burn::tensor::Tensor::<4>::from_data(
            burn::tensor::TensorData::new(pixels, [chunk.len(), c, h, w]),
            &device,
        );
        let probs = classifier
            .probabilities(images)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::Config(format!("classifier output: {e:?}")))?;
        let k = probs.len() / chunk.len().max(1);
        for (p, row) in chunk.iter().zip(probs.chunks_exact(k.max(1))) {
            let class = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            out.push(Prediction {
                path: p.as_ref().to_path_buf(),
                probabilities: row.to_vec(),
                class,
            });
        }
    }
    Ok(out)
}
