//! torchvision's transforms on RGB8 images, each a small type:
//! [`Resize`] (PIL bilinear with antialias), [`RandomAffine`] (the same
//! parameter distribution and inverse-matrix math as torchvision, PIL's
//! nearest sampling), [`RandomHorizontalFlip`], and [`Normalize`] (which
//! also does `ToTensor`: CHW, scaled, per-channel mean and std, in the
//! channel order the network reads).
//!
//! Besides the lesson's squash to 224x224, torchvision's ImageNet
//! conventions: the evaluation crop its (and timm's) weights were measured
//! with, `Resize(256)` + `CenterCrop(224)` ([`ResizeShorter`],
//! [`CenterCrop`]), and its transfer-learning tutorial's training
//! transform, [`RandomResizedCrop`]`(224)` + flip; [`Pipeline`] picks one
//! [`Geometry`].
//!
//! Randomness comes from a [`Rng`] seeded by `(seed, epoch, index)`, so an
//! image gets the same augmentation whatever the number of loader workers.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// SplitMix64, seeded from `(seed, epoch, index)`: small, fast, and the
/// same on every platform and in every version of this crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for one image in one epoch.
    pub fn for_item(seed: u64, epoch: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ 0x5851_f42d_4c95_7f2d);
        let a = r.next_u64() ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut r = Rng(a);
        let b = r.next_u64() ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        Rng(b)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

/// `Resize((height, width))` as torchvision does it on PIL images: PIL's
/// bilinear filter with its support widened when shrinking (antialias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    /// Output height.
    pub height: u32,
    /// Output width.
    pub width: u32,
}

impl Resize {
    /// Resizes to `height x width`.
    pub fn new(height: u32, width: u32) -> Self {
        Self { height, width }
    }

    /// Applies the resize (a copy when the size already matches).
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        if img.dimensions() == (self.width, self.height) {
            return img.clone();
        }
        let (w, h) = img.dimensions();
        let mut dst = Image::new(self.width, self.height, PixelType::U8x3);
        let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        // Both buffers are sized here and U8x3 has no alignment requirement:
        // neither the view nor the resizer can fail on them.
        if let Ok(src) = ImageRef::new(w, h, img.as_raw(), PixelType::U8x3) {
            let _ = Resizer::new().resize(&src, &mut dst, &opts);
        }
        RgbImage::from_raw(self.width, self.height, dst.into_vec())
            .unwrap_or_else(|| RgbImage::new(self.width, self.height))
    }
}

/// torchvision's `Resize(size)` with one number: the shorter side becomes
/// `size` and the longer one `int(size * long / short)` (truncated, as
/// torchvision does), with the same filter as [`Resize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeShorter {
    /// The shorter side after resizing.
    pub size: u32,
}

impl ResizeShorter {
    /// The output (width, height) for an input of `(w, h)`.
    pub fn output_size(&self, (w, h): (u32, u32)) -> (u32, u32) {
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = ((self.size as u64 * long as u64) / short.max(1) as u64) as u32;
        if w <= h {
            (self.size, new_long.max(1))
        } else {
            (new_long.max(1), self.size)
        }
    }

    /// Applies the resize.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = self.output_size(img.dimensions());
        Resize::new(h, w).apply(img)
    }
}

/// A crop box: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// Crops `img` to `b`; parts outside the image are filled with black (as
/// torchvision pads an image smaller than its centre crop).
pub fn crop(img: &RgbImage, b: CropBox) -> RgbImage {
    crop_at(img, (b.top as i64, b.left as i64), (b.width, b.height))
}

/// The `size` (width, height) window of `img` whose top-left corner is at
/// `(top, left)`, which may lie outside the image; outside is black.
fn crop_at(img: &RgbImage, (top, left): (i64, i64), (cw, ch): (u32, u32)) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(cw, ch, |x, y| {
        let (sx, sy) = (left + x as i64, top + y as i64);
        if sx >= 0 && sy >= 0 && (sx as u32) < w && (sy as u32) < h {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// torchvision's `CenterCrop(size)`: the box's top-left corner is
/// `round((H - h) / 2)`, `round((W - w) / 2)` with Python's rounding (half
/// to even).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CenterCrop {
    /// Output height.
    pub height: u32,
    /// Output width.
    pub width: u32,
}

impl CenterCrop {
    /// The box for an image of `(w, h)` (negative offsets, for an image
    /// smaller than the crop, are clamped: the rest is padding).
    pub fn crop_box(&self, (w, h): (u32, u32)) -> (i64, i64) {
        let half =
            |big: u32, small: u32| ((big as f64 - small as f64) / 2.0).round_ties_even() as i64;
        (half(h, self.height), half(w, self.width))
    }

    /// Applies the crop.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        crop_at(
            img,
            self.crop_box(img.dimensions()),
            (self.width, self.height),
        )
    }
}

/// torchvision's `RandomResizedCrop(size, scale=(0.08, 1.0),
/// ratio=(3/4, 4/3))`: a box of random area and aspect ratio (ten tries,
/// then a centred fallback, as torchvision's `get_params`), cropped and
/// resized to `size x size` with [`Resize`]'s filter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomResizedCrop {
    /// Output side.
    pub size: u32,
    /// Range of the box's area, as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the box's aspect ratio (width / height).
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// torchvision's defaults for `size`.
    pub fn new(size: u32) -> Self {
        Self {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// Draws a box for an image of `(w, h)`, in torchvision's steps.
    pub fn sample(&self, (width, height): (u32, u32), rng: &mut Rng) -> CropBox {
        let area = width as f64 * height as f64;
        let (lo, hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.uniform(self.scale.0, self.scale.1);
            let aspect = rng.uniform(lo, hi).exp();
            let w = (target * aspect).sqrt().round_ties_even() as i64;
            let h = (target / aspect).sqrt().round_ties_even() as i64;
            if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
                let top = (rng.unit() * (height as i64 - h + 1) as f64) as u32;
                let left = (rng.unit() * (width as i64 - w + 1) as f64) as u32;
                return CropBox {
                    top: top.min(height - h as u32),
                    left: left.min(width - w as u32),
                    height: h as u32,
                    width: w as u32,
                };
            }
        }
        // torchvision's fallback: the whole image, its ratio clamped.
        let in_ratio = width as f64 / height.max(1) as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (
                width,
                ((width as f64 / self.ratio.0).round_ties_even() as u32).min(height),
            )
        } else if in_ratio > self.ratio.1 {
            (
                ((height as f64 * self.ratio.1).round_ties_even() as u32).min(width),
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h.max(1),
            width: w.max(1),
        }
    }

    /// Crops `b` out of `img` and resizes it to `size x size`
    /// (torchvision's `F.resized_crop`).
    pub fn apply_box(&self, img: &RgbImage, b: CropBox) -> RgbImage {
        Resize::new(self.size, self.size).apply(&crop(img, b))
    }
}

/// How an image becomes the network's square input.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Geometry {
    /// The lesson's `Resize((224, 224))`: the whole image, squashed.
    #[default]
    Squash,
    /// torchvision's evaluation transform for its ImageNet weights:
    /// `Resize(resize)` (shorter side) then `CenterCrop(crop)`.
    CenterCrop {
        /// The shorter side after resizing (256 for 224 crops).
        resize: u32,
        /// The crop's side.
        crop: u32,
    },
    /// torchvision's tutorial training transform: `RandomResizedCrop`.
    RandomResizedCrop(RandomResizedCrop),
}

impl Geometry {
    /// Whether this is the lesson's squash (the pipeline's `resize`).
    pub fn is_squash(&self) -> bool {
        matches!(self, Geometry::Squash)
    }
}

/// Parameters of one affine draw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AffineParams {
    /// Rotation, degrees.
    pub angle: f64,
    /// Translation, pixels.
    pub translate: (f64, f64),
    /// Scale factor.
    pub scale: f64,
    /// Shear (x, y), degrees.
    pub shear: (f64, f64),
}

/// `RandomAffine(degrees, shear=(-s, s), scale=(lo, hi))` with
/// torchvision's parameter distribution: angle uniform in `±degrees`,
/// no translation, scale uniform in `[lo, hi]`, shear-x uniform in `±s`,
/// shear-y 0; nearest sampling, fill 0, about the image centre.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomAffine {
    /// Maximum rotation (degrees); the lesson uses 0.
    pub degrees: f64,
    /// Maximum x-shear (degrees); the lesson uses 10.
    pub shear: f64,
    /// Scale range; the lesson uses (0.8, 1.2).
    pub scale: (f64, f64),
}

impl RandomAffine {
    /// The lesson's `RandomAffine(0, shear=10, scale=(0.8, 1.2))`.
    pub fn lesson() -> Self {
        Self {
            degrees: 0.0,
            shear: 10.0,
            scale: (0.8, 1.2),
        }
    }

    /// Draws parameters in torchvision's order (angle, scale, shear).
    pub fn sample(&self, rng: &mut Rng) -> AffineParams {
        let angle = if self.degrees == 0.0 {
            0.0
        } else {
            rng.uniform(-self.degrees, self.degrees)
        };
        let scale = rng.uniform(self.scale.0, self.scale.1);
        let shear_x = if self.shear == 0.0 {
            0.0
        } else {
            rng.uniform(-self.shear, self.shear)
        };
        AffineParams {
            angle,
            translate: (0.0, 0.0),
            scale,
            shear: (shear_x, 0.0),
        }
    }
}

/// torchvision's inverse affine matrix (output pixel → input pixel) about
/// `center`: `C · RSS⁻¹ · C⁻¹ · T⁻¹`, with RSS the rotation-scale-shear.
pub fn inverse_affine_matrix(center: (f64, f64), p: &AffineParams) -> [f64; 6] {
    let rot = p.angle.to_radians();
    let sx = p.shear.0.to_radians();
    let sy = p.shear.1.to_radians();
    let (cx, cy) = center;
    let (tx, ty) = p.translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0].map(|v| v / p.scale);
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// Applies an affine transform as PIL's `Image.transform(AFFINE, NEAREST)`
/// does: each output pixel centre is mapped through the inverse matrix and
/// the input pixel under it is copied; outside the input, `fill`.
///
/// PIL walks rows incrementally, in 16.16 fixed point whenever the mapped
/// corners fit (always, at these image sizes), else in floating point; we
/// follow it step by step so that the same pixels are picked.
pub fn affine(img: &RgbImage, p: &AffineParams, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let m = inverse_affine_matrix((w as f64 * 0.5, h as f64 * 0.5), p);
    let mut out = RgbImage::from_pixel(w, h, image::Rgb(fill));
    let src = img.as_raw();
    let (wu, hu) = (w as usize, h as usize);
    let dst: &mut [u8] = &mut out;
    let mut copy = |x: usize, y: usize, xi: i64, yi: i64| {
        if xi >= 0 && yi >= 0 && (xi as usize) < wu && (yi as usize) < hu {
            let s = (yi as usize * wu + xi as usize) * 3;
            let d = (y * wu + x) * 3;
            dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
        }
    };
    let fits = |x: f64, y: f64| {
        (x * m[0] + y * m[1] + m[2]).abs() < 32768.0 && (x * m[3] + y * m[4] + m[5]).abs() < 32768.0
    };
    let (fw, fh) = (w as f64, h as f64);
    let scale_only = m[1] == 0.0 && m[3] == 0.0;
    if !scale_only && fits(0.0, 0.0) && fits(fw, fh) && fits(0.0, fh) && fits(fw, 0.0) {
        let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
        let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
        let mut a2 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
        let mut a5 = fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
        for y in 0..hu {
            let (mut xx, mut yy) = (a2, a5);
            for x in 0..wu {
                copy(x, y, xx >> 16, yy >> 16);
                xx += a0;
                yy += a3;
            }
            a2 += a1;
            a5 += a4;
        }
    } else {
        // PIL's COORD: negative → -1, else truncation.
        let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
        let mut xo = m[2] + m[0] * 0.5 + m[1] * 0.5;
        let mut yo = m[5] + m[3] * 0.5 + m[4] * 0.5;
        for y in 0..hu {
            let (mut xx, mut yy) = (xo, yo);
            for x in 0..wu {
                copy(x, y, coord(xx), coord(yy));
                xx += m[0];
                yy += m[3];
            }
            xo += m[1];
            yo += m[4];
        }
    }
    out
}

/// `RandomHorizontalFlip(p)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomHorizontalFlip {
    /// Probability of flipping.
    pub p: f64,
}

impl RandomHorizontalFlip {
    /// Decides whether to flip.
    pub fn sample(&self, rng: &mut Rng) -> bool {
        rng.unit() < self.p
    }
}

/// Channel order the network reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red.
    Bgr,
}

/// `ToTensor` + `Normalize`, generalised to the network's input
/// convention: `out[c] = (pixel[order[c]] * scale - mean[c]) / std[c]`,
/// laid out CHW.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Channel order of the output.
    pub channels: Channels,
    /// `1/255` (torchvision's `ToTensor`) or `1` (raw 0..255).
    pub scale: f32,
    /// Mean per output channel.
    pub mean: [f32; 3],
    /// Std per output channel.
    pub std: [f32; 3],
}

impl Normalize {
    /// torchvision's ImageNet normalization.
    pub fn imagenet() -> Self {
        Self {
            channels: Channels::Rgb,
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Writes the CHW tensor of `img` into `out` (length `3 * w * h`).
    pub fn apply_into(&self, img: &RgbImage, out: &mut [f32]) {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let order = match self.channels {
            Channels::Rgb => [0, 1, 2],
            Channels::Bgr => [2, 1, 0],
        };
        let (a, b): (Vec<f32>, Vec<f32>) = (0..3)
            .map(|c| (self.scale / self.std[c], -self.mean[c] / self.std[c]))
            .unzip();
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = px[order[c]] as f32 * a[c] + b[c];
            }
        }
    }

    /// The CHW tensor of `img` as a vector.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let mut out = vec![0.0; 3 * img.as_raw().len() / 3];
        self.apply_into(img, &mut out);
        out
    }
}

/// The whole pipeline: resize (or another [`Geometry`]), then (when
/// augmenting) random affine and horizontal flip, then normalize.
/// `Pipeline::lesson` is the lesson's training transform; `Pipeline::eval`
/// its validation transform; `Pipeline::center_crop` and
/// `Pipeline::tutorial` torchvision's evaluation and tutorial training
/// transforms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Resize applied first (with [`Geometry::Squash`]); otherwise the
    /// output size.
    pub resize: Resize,
    /// How the image is cut to the network's input; the squash is left out
    /// of the serialized form, so that the lesson's pipelines (and the
    /// feature cache keys made from them) read as they always did.
    #[serde(default, skip_serializing_if = "Geometry::is_squash")]
    pub geometry: Geometry,
    /// Random affine, when augmenting.
    pub affine: Option<RandomAffine>,
    /// Random flip, when augmenting.
    pub flip: Option<RandomHorizontalFlip>,
    /// Final normalization.
    pub normalize: Normalize,
}

impl Pipeline {
    /// Resize to 224x224 and normalize.
    pub fn eval(normalize: Normalize) -> Self {
        Self {
            resize: Resize::new(224, 224),
            geometry: Geometry::Squash,
            affine: None,
            flip: None,
            normalize,
        }
    }

    /// torchvision's evaluation transform for ImageNet weights:
    /// `Resize(resize)` + `CenterCrop(crop)` (256 and 224 for its weights).
    pub fn center_crop(normalize: Normalize, resize: u32, crop: u32) -> Self {
        Self {
            resize: Resize::new(crop, crop),
            geometry: Geometry::CenterCrop { resize, crop },
            affine: None,
            flip: None,
            normalize,
        }
    }

    /// torchvision's transfer-learning tutorial's training transform:
    /// `RandomResizedCrop(224)` + `RandomHorizontalFlip()`.
    pub fn tutorial(normalize: Normalize) -> Self {
        Self {
            resize: Resize::new(224, 224),
            geometry: Geometry::RandomResizedCrop(RandomResizedCrop::new(224)),
            affine: None,
            flip: Some(RandomHorizontalFlip { p: 0.5 }),
            normalize,
        }
    }

    /// The lesson's training transform: `Resize((224,224))`,
    /// `RandomAffine(0, shear=10, scale=(0.8,1.2))`, `RandomHorizontalFlip()`.
    pub fn lesson(normalize: Normalize) -> Self {
        Self {
            resize: Resize::new(224, 224),
            geometry: Geometry::Squash,
            affine: Some(RandomAffine::lesson()),
            flip: Some(RandomHorizontalFlip { p: 0.5 }),
            normalize,
        }
    }

    /// Whether the pipeline draws random numbers.
    pub fn is_random(&self) -> bool {
        self.affine.is_some()
            || self.flip.is_some()
            || matches!(self.geometry, Geometry::RandomResizedCrop(_))
    }

    /// The augmented RGB image (before normalization).
    pub fn augment(&self, img: &RgbImage, rng: &mut Rng) -> RgbImage {
        let mut img = match &self.geometry {
            Geometry::Squash => self.resize.apply(img),
            Geometry::CenterCrop { resize, crop } => CenterCrop {
                height: *crop,
                width: *crop,
            }
            .apply(&ResizeShorter { size: *resize }.apply(img)),
            Geometry::RandomResizedCrop(r) => {
                let b = r.sample(img.dimensions(), rng);
                r.apply_box(img, b)
            }
        };
        if let Some(a) = &self.affine {
            let p = a.sample(rng);
            img = affine(&img, &p, [0, 0, 0]);
        }
        if let Some(f) = &self.flip
            && f.sample(rng)
        {
            image::imageops::flip_horizontal_in_place(&mut img);
        }
        img
    }

    /// The network input (CHW f32) for one image.
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> Vec<f32> {
        self.normalize.apply(&self.augment(img, rng))
    }

    /// Output shape `[3, H, W]`.
    pub fn output_shape(&self) -> [usize; 3] {
        [3, self.resize.height as usize, self.resize.width as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_affine_is_identity() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let p = AffineParams {
            angle: 0.0,
            translate: (0.0, 0.0),
            scale: 1.0,
            shear: (0.0, 0.0),
        };
        assert_eq!(affine(&img, &p, [0; 3]), img);
    }

    #[test]
    fn zoom_out_fills_with_zero() {
        let img = RgbImage::from_pixel(20, 20, image::Rgb([200, 200, 200]));
        let p = AffineParams {
            angle: 0.0,
            translate: (0.0, 0.0),
            scale: 0.5,
            shear: (0.0, 0.0),
        };
        let out = affine(&img, &p, [0; 3]);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(10, 10).0, [200, 200, 200]);
    }

    #[test]
    fn parameter_distribution_matches_the_lesson() {
        let a = RandomAffine::lesson();
        let mut rng = Rng::for_item(0, 0, 0);
        let draws: Vec<AffineParams> = (0..2000).map(|_| a.sample(&mut rng)).collect();
        assert!(
            draws
                .iter()
                .all(|p| p.angle == 0.0 && p.shear.1 == 0.0 && p.translate == (0.0, 0.0))
        );
        assert!(draws.iter().all(|p| (0.8..1.2).contains(&p.scale)));
        assert!(draws.iter().all(|p| (-10.0..10.0).contains(&p.shear.0)));
        let mean_scale: f64 = draws.iter().map(|p| p.scale).sum::<f64>() / 2000.0;
        assert!((mean_scale - 1.0).abs() < 0.01, "{mean_scale}");
        let flips = (0..2000)
            .filter(|_| RandomHorizontalFlip { p: 0.5 }.sample(&mut rng))
            .count();
        assert!((900..1100).contains(&flips), "{flips}");
    }

    #[test]
    fn rng_streams_differ_by_epoch_and_index() {
        let a = Rng::for_item(1, 0, 0).next_u64();
        assert_eq!(a, Rng::for_item(1, 0, 0).next_u64());
        assert_ne!(a, Rng::for_item(1, 1, 0).next_u64());
        assert_ne!(a, Rng::for_item(1, 0, 1).next_u64());
        assert_ne!(a, Rng::for_item(2, 0, 0).next_u64());
    }

    #[test]
    fn normalize_orders_channels() {
        let img = RgbImage::from_pixel(1, 1, image::Rgb([10, 20, 30]));
        let bgr = Normalize {
            channels: Channels::Bgr,
            scale: 1.0,
            mean: [1.0, 2.0, 3.0],
            std: [1.0; 3],
        };
        assert_eq!(bgr.apply(&img), vec![29.0, 18.0, 7.0]);
        let v = Normalize::imagenet().apply(&img);
        assert!((v[0] - (10.0 / 255.0 - 0.485) / 0.229).abs() < 1e-6);
    }
}

#[cfg(test)]
mod crop_tests {
    use super::*;

    #[test]
    fn resize_shorter_keeps_the_aspect_ratio_as_torchvision() {
        let r = ResizeShorter { size: 256 };
        assert_eq!(r.output_size((500, 375)), (341, 256));
        assert_eq!(r.output_size((375, 500)), (256, 341));
        assert_eq!(r.output_size((100, 100)), (256, 256));
    }

    #[test]
    fn center_crop_rounds_half_to_even_as_python() {
        let c = CenterCrop {
            height: 224,
            width: 224,
        };
        // (341 - 224) / 2 = 58.5 -> 58 (Python's round), (256 - 224) / 2 = 16.
        assert_eq!(c.crop_box((341, 256)), (16, 58));
        assert_eq!(c.crop_box((343, 256)), (16, 60));
        let img = RgbImage::from_fn(341, 256, |x, y| image::Rgb([(x % 256) as u8, y as u8, 0]));
        let out = c.apply(&img);
        assert_eq!(out.dimensions(), (224, 224));
        assert_eq!(out.get_pixel(0, 0).0, [58, 16, 0]);
    }

    #[test]
    fn random_resized_crop_boxes_stay_inside_and_follow_the_ranges() {
        let r = RandomResizedCrop::new(224);
        let mut rng = Rng::for_item(3, 0, 0);
        for (w, h) in [(500, 375), (64, 300), (224, 224), (1000, 20)] {
            for _ in 0..500 {
                let b = r.sample((w, h), &mut rng);
                assert!(b.width >= 1 && b.height >= 1, "{b:?}");
                assert!(
                    b.left + b.width <= w && b.top + b.height <= h,
                    "{b:?} in {w}x{h}"
                );
            }
        }
        for _ in 0..2000 {
            let b = r.sample((400, 400), &mut rng);
            let a = (b.width * b.height) as f64 / 160000.0;
            assert!((0.07..=1.0).contains(&a), "{a}");
            let ratio = b.width as f64 / b.height as f64;
            assert!((0.7..=1.4).contains(&ratio), "{ratio}");
        }
        // The distribution against torchvision's: tests/torchvision_parity.rs.
        let p = Pipeline::tutorial(Normalize::imagenet());
        let img = RgbImage::from_pixel(300, 200, image::Rgb([9, 9, 9]));
        assert_eq!(p.augment(&img, &mut rng).dimensions(), (224, 224));
        assert!(p.is_random());
    }

    /// The lesson's pipelines serialize as before the crops existed (the
    /// feature cache keys stay the same).
    #[test]
    fn the_lesson_pipelines_serialize_as_before() {
        let p = serde_json::to_string(&Pipeline::eval(Normalize::imagenet())).unwrap_or_default();
        assert!(!p.contains("geometry"), "{p}");
        let c = serde_json::to_string(&Pipeline::center_crop(Normalize::imagenet(), 256, 224))
            .unwrap_or_default();
        assert!(c.contains("center_crop"), "{c}");
    }
}
