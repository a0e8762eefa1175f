//! What the network sees: writes the evaluation transform's tensor for the
//! given images as `DIR/batch.npy` (NCHW float32, in argument order), and
//! with `--augment N` a PNG grid of N augmented versions of each image.
//!
//! ```text
//! cargo run --example preprocess -- data/alien_vs_predator_thumbnails/data/validation/alien/11.jpg \
//!     --out /tmp/pre --augment 6 --seed 1
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use avp::data::{Normalize, Pipeline, Rng, decode_rgb8};
use avp::model::npy;
use avp::train::data_normalize;
use clap::Parser;

mod common;
use common::BackboneArgs;
use image::RgbImage;

/// Write what the network sees for some images.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Image files (any format, decoded by content).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Output folder (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// The backbone whose normalization is applied (default: the committed
    /// ResNet18, the default backbone of the other programs, whose input is
    /// BGR 0..255).
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Use torchvision's ImageNet normalization (RGB 0..1, ImageNet mean and
    /// std) instead of a backbone's.
    #[arg(long, conflicts_with_all = ["weights", "prep"])]
    imagenet: bool,
    /// Also write augment.png: N augmented versions of each image (the
    /// lesson's RandomAffine and RandomHorizontalFlip), one row per image.
    #[arg(long, value_name = "N")]
    augment: Option<usize>,
    /// Seed of the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Checked before anything is written.
    if args.augment.is_some_and(|n| n == 0 || n > 64) {
        bail!("--augment takes 1 to 64 versions per image");
    }
    let normalize = if args.imagenet {
        println!("normalization: torchvision's ImageNet statistics");
        Normalize::imagenet()
    } else {
        // The same default backbone, and the same load path, as the
        // training and speed programs.
        let device = args.backbone.run.device()?;
        let loaded = args.backbone.load(&device)?;
        let loaded = loaded.normalization();
        println!("normalization: {}", loaded.describe());
        data_normalize(loaded)
    };
    let images: Vec<RgbImage> = args
        .images
        .iter()
        .map(|p| decode_rgb8(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let eval = Pipeline::eval(normalize);
    let [c, h, w] = eval.output_shape();
    let mut values = Vec::with_capacity(images.len() * c * h * w);
    for img in &images {
        values.extend(eval.apply(img, &mut Rng::for_item(0, 0, 0)));
    }
    let npy_path = args.out.join("batch.npy");
    npy::write_f32(&npy_path, &[images.len(), c, h, w], &values)?;
    println!(
        "wrote {} ({} x {c} x {h} x {w})",
        npy_path.display(),
        images.len()
    );
    if let Some(n) = args.augment {
        let train = Pipeline::lesson(normalize);
        let (tw, th) = (w as u32, h as u32);
        let gap = 4u32;
        // First column: the evaluation view; then N augmented draws.
        let cols = n as u32 + 1;
        let mut grid = RgbImage::from_pixel(
            cols * (tw + gap) + gap,
            images.len() as u32 * (th + gap) + gap,
            image::Rgb([128, 128, 128]),
        );
        for (row, img) in images.iter().enumerate() {
            let y = gap + row as u32 * (th + gap);
            let base = eval.augment(img, &mut Rng::for_item(0, 0, 0));
            image::imageops::replace(&mut grid, &base, gap as i64, y as i64);
            for k in 0..n {
                let mut rng = Rng::for_item(args.seed, k as u64, row as u64);
                let view = train.augment(img, &mut rng);
                image::imageops::replace(
                    &mut grid,
                    &view,
                    (gap + (k as u32 + 1) * (tw + gap)) as i64,
                    y as i64,
                );
            }
        }
        let png = args.out.join("augment.png");
        grid.save(&png)
            .with_context(|| format!("writing {}", png.display()))?;
        println!(
            "wrote {} (first column: the evaluation view; then {n} augmented views per image)",
            png.display()
        );
    }
    Ok(())
}
