//! What a training run leaves behind: `model.bpk` (backbone and head, with
//! everything needed to run it: architecture, head widths, classes, input
//! normalization), `curves.png` and `predictions.png`.
//!
//! Figures are drawn with plotters on a bitmap, with a font embedded in the
//! binary (`epaint_default_fonts`), so no system font or fontconfig is
//! needed.

use std::path::Path;
use std::sync::Once;

use std::sync::Arc;

use avp_model::{Backbone, Normalization, Provenance, ResNet, ResNetConfig, WeightFormat};
use burn::module::Module;
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::Device;
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::classifier::{BnMode, Classifier, Head, HeadConfig};
use crate::error::TrainError;
use crate::train::EpochMetrics;

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

fn write_err(path: &Path, why: impl std::fmt::Display) -> TrainError {
    TrainError::Write {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

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
    let mut store = BurnpackStore::from_file(path)
        .overwrite(true)
        .auto_extension(false)
        .metadata(META_BACKBONE, json(serde_json::to_string(backbone_config))?)
        .metadata(META_HEAD, json(serde_json::to_string(&widths))?)
        .metadata(META_CLASSES, json(serde_json::to_string(classes))?)
        .metadata(
            META_NORMALIZATION,
            json(serde_json::to_string(normalization))?,
        );
    weights
        .save_into(&mut store)
        .map_err(|e| write_err(path, e))
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
    let reader = burn_pack::Reader::from_file(path)
        .map_err(|e| bad(format!("not a readable burnpack file: {e}")))?;
    let meta = reader.metadata().clone();
    drop(reader);
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            bad(format!(
                "no `{k}` metadata: not a model.bpk written by avp-train"
            ))
        })
    };
    let parse_err = |e: serde_json::Error| bad(format!("bad metadata: {e}"));
    let backbone_config: ResNetConfig =
        serde_json::from_str(&get(META_BACKBONE)?).map_err(parse_err)?;
    let widths: Vec<usize> = serde_json::from_str(&get(META_HEAD)?).map_err(parse_err)?;
    let classes: Vec<String> = serde_json::from_str(&get(META_CLASSES)?).map_err(parse_err)?;
    let normalization: Normalization =
        serde_json::from_str(&get(META_NORMALIZATION)?).map_err(parse_err)?;
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
    let mut weights = ClassifierWeights {
        backbone: backbone_config.init(device),
        head,
    };
    let mut store = BurnpackStore::from_file(path).auto_extension(false);
    let result = weights
        .load_from(&mut store)
        .map_err(|e| bad(e.to_string()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        return Err(bad(format!(
            "weights do not fit: missing {:?}, errors {:?}",
            result.missing, result.errors
        )));
    }
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

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let regular = epaint_default_fonts::UBUNTU_LIGHT;
        // Registration only fails on unparsable font bytes, and these ship
        // with the crate.
        let _ = register_font("sans-serif", FontStyle::Normal, regular);
        let _ = register_font("sans-serif", FontStyle::Bold, regular);
    });
}

/// Loss and accuracy per epoch, training against validation, side by side.
pub fn plot_curves(epochs: &[EpochMetrics], path: &Path) -> Result<(), TrainError> {
    fonts();
    let e = |x: Box<dyn std::error::Error>| write_err(path, x);
    let (w, h) = (1000u32, 420u32);
    // Drawn into a buffer and encoded with `image` (plotters' own encoder
    // would pull in a second copy of `image` and `png`).
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    draw_curves(epochs, canvas.as_mut(), (w, h)).map_err(e)?;
    canvas.save(path).map_err(|x| write_err(path, x))
}

fn draw_curves(
    epochs: &[EpochMetrics],
    buf: &mut [u8],
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    let e = |x: Box<dyn std::error::Error>| x;
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(Box::new(x)))?;
    let panels = root.split_evenly((1, 2));
    let n = epochs.len().max(1) as f64;
    type Pick = fn(&EpochMetrics) -> (f64, f64);
    let series: [(&str, Pick); 2] = [
        ("Loss", |m| (m.train_loss, m.valid_loss)),
        ("Accuracy", |m| (m.train_acc, m.valid_acc)),
    ];
    for (panel, (name, get)) in panels.iter().zip(series.iter()) {
        let values: Vec<(f64, f64)> = epochs.iter().map(get).collect();
        let (lo, hi) = values
            .iter()
            .flat_map(|&(a, b)| [a, b])
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo, hi) };
        let pad = ((hi - lo) * 0.1).max(0.01);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} per epoch"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.8f64..n + 0.2, (lo - pad)..(hi + pad))
            .map_err(|x| e(Box::new(x)))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(*name)
            .x_labels(epochs.len().clamp(2, 10))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|x| e(Box::new(x)))?;
        for (label, color, pick) in [("training", BLUE, 0usize), ("validation", RED, 1usize)] {
            let pts: Vec<(f64, f64)> = epochs
                .iter()
                .zip(&values)
                .map(|(m, v)| (m.epoch as f64, if pick == 0 { v.0 } else { v.1 }))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(Box::new(x)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|x| e(Box::new(x)))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(Box::new(x)))?;
    }
    root.present().map_err(|x| e(Box::new(x)))?;
    Ok(())
}

/// Tiles per row of the predictions figure, and the most it shows: with
/// many classes the figure wraps instead of growing without bound.
pub const PREDICTION_COLUMNS: usize = 4;
/// The most images [`plot_predictions`] draws (three rows).
pub const PREDICTION_TILES: usize = 12;

/// The lesson's figure: images side by side, each titled with its class
/// probabilities ("99% Alien, 1% Predator"); rows of at most
/// [`PREDICTION_COLUMNS`], and at most [`PREDICTION_TILES`] images (the
/// rest are left out).
pub fn plot_predictions(items: &[(RgbImage, String)], path: &Path) -> Result<(), TrainError> {
    fonts();
    let items = &items[..items.len().min(PREDICTION_TILES)];
    let tile = 224u32;
    let (pad, title_h) = (16u32, 40u32);
    let cols = items.len().clamp(1, PREDICTION_COLUMNS) as u32;
    let rows = items.len().div_ceil(PREDICTION_COLUMNS).max(1) as u32;
    let row_h = title_h + tile + pad;
    let w = pad + cols * (tile + pad);
    let h = pad + rows * row_h;
    let at = |i: usize| {
        let (c, r) = (
            (i % PREDICTION_COLUMNS) as u32,
            (i / PREDICTION_COLUMNS) as u32,
        );
        (pad + c * (tile + pad), pad + r * row_h)
    };
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (i, (img, _)) in items.iter().enumerate() {
        let resized =
            image::imageops::resize(img, tile, tile, image::imageops::FilterType::Triangle);
        let (x, y) = at(i);
        image::imageops::replace(&mut canvas, &resized, x as i64, (y + title_h) as i64);
    }
    {
        let buf: &mut [u8] = &mut canvas;
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        for (i, (_, title)) in items.iter().enumerate() {
            let (x0, y0) = at(i);
            let x = (x0 + tile / 2) as i32;
            let style = TextStyle::from(("sans-serif", 18).into_font())
                .color(&BLACK)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ));
            root.draw_text(title, &style, (x, (y0 + title_h / 2) as i32))
                .map_err(|x| write_err(path, x))?;
        }
        root.present().map_err(|x| write_err(path, x))?;
    }
    canvas.save(path).map_err(|x| write_err(path, x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many classes wrap into rows and stop at a cap instead of one tile
    /// per class in a single row.
    #[test]
    fn the_predictions_figure_wraps_and_is_capped() {
        let dir = std::env::temp_dir().join(format!("avp-figure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let img = RgbImage::from_pixel(30, 20, image::Rgb([200, 10, 10]));
        let items: Vec<(RgbImage, String)> = (0..40)
            .map(|i| (img.clone(), format!("{i}% class {i}")))
            .collect();
        let path = dir.join("many.png");
        plot_predictions(&items, &path).ok();
        let (w, h) = image::image_dimensions(&path).unwrap_or((0, 0));
        let tile = 224 + 16;
        assert_eq!(w, 16 + 4 * tile, "four tiles per row");
        assert_eq!(h, 16 + 3 * (40 + 224 + 16), "three rows at most");
        plot_predictions(&items[..2], &path).ok();
        assert_eq!(
            image::image_dimensions(&path).unwrap_or((0, 0)).0,
            16 + 2 * tile
        );
        let curves = dir.join("curves.png");
        let m = EpochMetrics {
            epoch: 1,
            train_loss: 0.5,
            train_acc: 0.7,
            valid_loss: 0.4,
            valid_acc: 0.8,
            seconds: 1.0,
        };
        plot_curves(&[m], &curves).ok();
        assert_eq!(
            image::image_dimensions(&curves).unwrap_or((0, 0)),
            (1000, 420)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
