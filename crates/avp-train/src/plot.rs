//! The figures of a run: `curves.png` (loss and accuracy per epoch) and
//! `predictions.png` (images with their class probabilities).
//!
//! Drawn with plotters on a bitmap, with a font embedded in the binary
//! (`epaint_default_fonts`), so no system font or fontconfig is needed.

use std::path::Path;
use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::error::{TrainError, write_err};
use crate::metrics::EpochMetrics;

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
