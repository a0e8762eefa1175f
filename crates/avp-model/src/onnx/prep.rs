//! Reading a preprocessing ONNX graph (the companion file some exporters
//! ship, such as ML.NET's `ResNetPreprocess.onnx`) into a
//! [`Normalization`]: a channel split and reordering concat, a mean
//! subtraction, and optionally a division by a std and a scaling by 1/255.
//! A per-pixel mean image is reduced to its per-channel averages.

use std::path::Path;

use super::graph::Graph;
use crate::error::ModelError;
use crate::normalization::{ChannelOrder, Normalization, NormalizationSource, ValueRange};

/// What the walk over the graph has found so far.
struct Prep {
    /// Source channel of each output channel.
    order: [usize; 3],
    mean: [f32; 3],
    std: [f32; 3],
    /// Scaling applied to the input before the mean (1/255 or 1).
    scale: f32,
}

/// Reads the preprocessing graph in `path`.
pub fn read_prep_onnx(path: &Path) -> Result<Normalization, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let model = super::decode(path, &bytes)?;
    let Some(graph) = model.graph.as_ref() else {
        return Err(prep_err(path, "no graph".into()));
    };
    let g = Graph::new(path, graph);
    let mut p = Prep {
        order: [0, 1, 2],
        mean: [0.0; 3],
        std: [1.0; 3],
        scale: 1.0,
    };
    for i in 0..g.nodes.len() {
        match g.nodes[i].op_type.as_str() {
            "Split" => p.order = split_order(path, &g, i)?,
            "Concat" | "Identity" => {}
            "Sub" | "Div" | "Mul" => arithmetic(path, &g, i, &mut p)?,
            other => {
                return Err(prep_err(
                    path,
                    format!("unexpected operator {other} at {}", g.describe(i)),
                ));
            }
        }
    }
    finish(path, p)
}

fn prep_err(path: &Path, why: String) -> ModelError {
    ModelError::Preprocess {
        path: path.to_path_buf(),
        why,
    }
}

/// The channel order a `Split` into three and the `Concat` after it make.
fn split_order(path: &Path, g: &Graph<'_>, i: usize) -> Result<[usize; 3], ModelError> {
    let n = &g.nodes[i];
    // Outputs are the input channels 0, 1, 2 in order.
    if n.output.len() != 3 {
        return Err(prep_err(
            path,
            format!("{} does not split into 3 channels", g.describe(i)),
        ));
    }
    let mut order = [0, 1, 2];
    if let Some(c) = g.nodes.iter().find(|c| c.op_type == "Concat") {
        for (dst, name) in c.input.iter().enumerate().take(3) {
            order[dst] = n.output.iter().position(|o| o == name).ok_or_else(|| {
                prep_err(path, format!("Concat input `{name}` is not a Split output"))
            })?;
        }
    }
    Ok(order)
}

/// A `Sub` (the mean, in the current scale), `Div` (a std, or a scalar
/// that scales the input) or `Mul` (a scalar scale).
fn arithmetic(path: &Path, g: &Graph<'_>, i: usize, p: &mut Prep) -> Result<(), ModelError> {
    let n = &g.nodes[i];
    let c = n
        .input
        .get(1)
        .filter(|c| g.is_const(c))
        .ok_or_else(|| prep_err(path, format!("{} has no constant operand", g.describe(i))))?;
    let (dims, v) = g.tensor_f32(c)?;
    let per_channel = channel_means(&dims, &v).ok_or_else(|| {
        prep_err(
            path,
            format!("constant `{c}` with shape {dims:?} is not per-channel"),
        )
    })?;
    let scalar = dims.iter().product::<usize>() == 1;
    match n.op_type.as_str() {
        "Sub" => {
            for (m, x) in p.mean.iter_mut().zip(per_channel) {
                *m += x * p.scale;
            }
        }
        "Div" if scalar => p.scale /= per_channel[0],
        "Div" => p.std = per_channel,
        _ if scalar => p.scale *= per_channel[0],
        _ => {
            return Err(prep_err(
                path,
                format!("{} scales channels unevenly", g.describe(i)),
            ));
        }
    }
    Ok(())
}

/// The normalization the walk found, or why it is none avp can apply.
fn finish(path: &Path, p: Prep) -> Result<Normalization, ModelError> {
    let channel_order = match p.order {
        [0, 1, 2] => ChannelOrder::Rgb,
        [2, 1, 0] => ChannelOrder::Bgr,
        o => {
            return Err(prep_err(
                path,
                format!("channel permutation {o:?} is neither RGB nor BGR"),
            ));
        }
    };
    let range = if (p.scale - 1.0 / 255.0).abs() < 1e-6 {
        ValueRange::Unit
    } else if (p.scale - 1.0).abs() < 1e-6 {
        ValueRange::Byte
    } else {
        return Err(prep_err(
            path,
            format!("input scale {} is neither 1 nor 1/255", p.scale),
        ));
    };
    Ok(Normalization {
        channel_order,
        range,
        mean: p.mean,
        std: p.std,
        source: NormalizationSource::PrepFile(path.to_path_buf()),
        eval_crop: None,
    })
}

/// Per-channel means of a constant shaped `[1,3,H,W]`, `[3,H,W]`,
/// `[3,1,1]`, `[3]` or a scalar.
fn channel_means(dims: &[usize], v: &[f32]) -> Option<[f32; 3]> {
    if v.len() == 1 {
        return Some([v[0]; 3]);
    }
    let lead: Vec<usize> = dims.iter().copied().skip_while(|&d| d == 1).collect();
    if lead.first() != Some(&3) || !v.len().is_multiple_of(3) {
        return None;
    }
    let per = v.len() / 3;
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let sum: f64 = v[c * per..(c + 1) * per].iter().map(|&x| x as f64).sum();
        *o = (sum / per as f64) as f32;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_means_of_images_and_vectors() {
        let img: Vec<f32> = [1.0f32; 4]
            .iter()
            .chain(&[2.0; 4])
            .chain(&[3.0; 4])
            .copied()
            .collect();
        assert_eq!(channel_means(&[1, 3, 2, 2], &img), Some([1.0, 2.0, 3.0]));
        assert_eq!(channel_means(&[3], &[4.0, 5.0, 6.0]), Some([4.0, 5.0, 6.0]));
        assert_eq!(channel_means(&[4], &[1.0; 4]), None);
    }
}
