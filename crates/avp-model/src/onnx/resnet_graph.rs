//! Recognising a ResNet in an ONNX graph.
//!
//! The walk starts at the graph input and expects: a stem convolution
//! (BatchNorm either folded or a separate node), `Relu`, `MaxPool`; then
//! residual blocks, each a value read by one or two convolution chains and
//! possibly by the `Add` itself (identity shortcut), the chains being
//! convolution units separated by `Relu`, meeting at an `Add` followed by
//! `Relu`; then a global average (`GlobalAveragePool`, `ReduceMean` over
//! H and W, or a fixed-window `AveragePool`), shape-only nodes (`Flatten`,
//! `Reshape`, `Squeeze`, `Identity`) and an optional classifier (`Gemm`, or
//! `MatMul` + `Add`). A new stage begins at every block with stride 2.
//! Anything else stops the walk with an error naming the node.

use std::collections::BTreeMap;
use std::path::Path;

use super::OnnxInfo;
use super::graph::{Graph, attr_float, attr_int, attr_ints};
use super::proto::ModelProto;
use crate::error::ModelError;
use crate::resnet::{BlockKind, PaddingStyle, ResNetConfig, StridePlacement};

/// Tensors keyed by their Burn module path (`layer1.0.bn1.gamma`), with
/// the source tensor's name for messages.
pub type NamedWeights = BTreeMap<String, WeightEntry>;

/// One tensor destined for a Burn parameter.
#[derive(Debug, Clone)]
pub struct WeightEntry {
    /// Shape.
    pub dims: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
    /// Where it came from (an ONNX initializer name, or a description).
    pub source: String,
}

/// The result of recognising a ResNet in an ONNX file: its architecture,
/// its weights by module path, and what the file says about itself.
#[derive(Debug, Clone)]
pub struct ImportedResNet {
    /// The inferred architecture.
    pub config: ResNetConfig,
    /// Weights by Burn module path.
    pub weights: NamedWeights,
    /// File facts.
    pub info: OnnxInfo,
    /// Whether the file had BatchNorm folded into its convolutions.
    pub folded_batchnorm: bool,
    /// Number of values stored in the file's weight tensors.
    pub stored_values: usize,
}

/// One convolution with the BatchNorm that follows it (if any).
struct ConvUnit {
    node: usize,
    weight: String,
    bias: Option<String>,
    bn: Option<BnRef>,
    kernel: usize,
    stride: usize,
    pads: [usize; 4],
    out_channels: usize,
    in_channels: usize,
    /// Value produced by the unit (after BatchNorm).
    out: String,
}

struct BnRef {
    scale: String,
    bias: String,
    mean: String,
    var: String,
    epsilon: f32,
}

struct BlockMatch {
    main: Vec<ConvUnit>,
    downsample: Option<ConvUnit>,
    out: String,
    stride: usize,
    add_node: usize,
}

struct Walker<'a> {
    g: Graph<'a>,
}

impl<'a> Walker<'a> {
    fn err(&self, why: impl Into<String>) -> ModelError {
        self.g.not_resnet(why)
    }

    /// Skips nodes that do not change values (`Identity`, and `Dropout` in
    /// inference exports).
    fn skip_transparent(&self, mut value: String) -> String {
        // Bounded: a hostile graph may contain a cycle of Identity nodes.
        for _ in 0..=self.g.nodes.len() {
            let cons = self.g.consumers(&value);
            if cons.len() == 1 {
                let n = &self.g.nodes[cons[0]];
                if matches!(n.op_type.as_str(), "Identity" | "Dropout") && !n.output.is_empty() {
                    value = n.output[0].clone();
                    continue;
                }
            }
            break;
        }
        value
    }

    /// The single node reading `value`, which must be one of `ops`.
    fn only_consumer(&self, value: &str, ops: &[&str], context: &str) -> Result<usize, ModelError> {
        let cons = self.g.consumers(value);
        match cons {
            [i] if ops.contains(&self.g.nodes[*i].op_type.as_str()) => Ok(*i),
            [i] => Err(self.err(format!(
                "{context}: expected {} after `{value}`, found {}",
                ops.join(" or "),
                self.g.describe(*i)
            ))),
            [] => Err(self.err(format!(
                "{context}: `{value}` is not used by any node (expected {})",
                ops.join(" or ")
            ))),
            many => Err(self.err(format!(
                "{context}: `{value}` feeds {} nodes ({}) where one {} was expected",
                many.len(),
                many.iter()
                    .map(|&i| self.g.describe(i))
                    .collect::<Vec<_>>()
                    .join(", "),
                ops.join("/")
            ))),
        }
    }

    fn output_of(&self, node: usize) -> Result<String, ModelError> {
        self.g.nodes[node]
            .output
            .first()
            .cloned()
            .ok_or_else(|| self.err(format!("{} has no output", self.g.describe(node))))
    }

    fn square(
        &self,
        node: usize,
        name: &str,
        v: Option<Vec<i64>>,
        default: usize,
    ) -> Result<usize, ModelError> {
        match v.as_deref() {
            None | Some([]) => Ok(default),
            Some([a, b]) if a == b && *a > 0 => Ok(*a as usize),
            Some(other) => Err(self.err(format!(
                "{} has {name} {other:?}; only square, positive values are supported",
                self.g.describe(node)
            ))),
        }
    }

    fn pads(&self, node: usize) -> Result<[usize; 4], ModelError> {
        let n = &self.g.nodes[node];
        if let Some(a) = super::graph::attr(n, "auto_pad")
            && !a.s.is_empty()
            && a.s != b"NOTSET"
        {
            return Err(self.err(format!(
                "{} uses auto_pad {}; only explicit pads are supported",
                self.g.describe(node),
                String::from_utf8_lossy(&a.s)
            )));
        }
        match attr_ints(n, "pads").as_deref() {
            None | Some([]) => Ok([0; 4]),
            Some([t, l, b, r]) if [t, l, b, r].iter().all(|v| (0..1 << 16).contains(*v)) => {
                Ok([*t as usize, *l as usize, *b as usize, *r as usize])
            }
            Some(other) => Err(self.err(format!("{} has pads {other:?}", self.g.describe(node)))),
        }
    }

    /// Reads a `Conv` node and the `BatchNormalization` after it, if any.
    fn conv_unit(&self, node: usize) -> Result<ConvUnit, ModelError> {
        let n = &self.g.nodes[node];
        let desc = self.g.describe(node);
        let weight = n
            .input
            .get(1)
            .filter(|w| self.g.is_const(w))
            .cloned()
            .ok_or_else(|| self.err(format!("{desc} has no constant weight")))?;
        let dims = self.g.const_dims(&weight).unwrap_or_default();
        let [out_channels, in_channels, kh, kw] = dims[..] else {
            return Err(self.err(format!(
                "{desc}: weight `{weight}` has shape {dims:?}, expected 4-D"
            )));
        };
        if kh != kw {
            return Err(self.err(format!("{desc}: non-square kernel {kh}x{kw}")));
        }
        let kernel = self.square(node, "kernel_shape", attr_ints(n, "kernel_shape"), kh)?;
        if kernel != kh {
            return Err(self.err(format!(
                "{desc}: kernel_shape {kernel} disagrees with weight {kh}x{kw}"
            )));
        }
        let stride = self.square(node, "strides", attr_ints(n, "strides"), 1)?;
        if self.square(node, "dilations", attr_ints(n, "dilations"), 1)? != 1 {
            return Err(self.err(format!(
                "{desc}: dilated convolutions are not part of a ResNet"
            )));
        }
        if attr_int(n, "group").unwrap_or(1) != 1 {
            return Err(self.err(format!(
                "{desc}: grouped convolution (ResNeXt?) is not supported"
            )));
        }
        let pads = self.pads(node)?;
        let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
        if let Some(b) = &bias
            && !self.g.is_const(b)
        {
            return Err(self.err(format!("{desc}: bias `{b}` is not a constant")));
        }
        let mut out = self.skip_transparent(self.output_of(node)?);
        let mut bn = None;
        let cons = self.g.consumers(&out);
        if let [c] = cons
            && self.g.nodes[*c].op_type == "BatchNormalization"
        {
            let b = &self.g.nodes[*c];
            let bdesc = self.g.describe(*c);
            if b.input.len() < 5 || !b.input[1..5].iter().all(|i| self.g.is_const(i)) {
                return Err(self.err(format!(
                    "{bdesc}: expected 4 constant inputs (scale, B, mean, var)"
                )));
            }
            if attr_int(b, "training_mode").unwrap_or(0) != 0 {
                return Err(self.err(format!("{bdesc}: exported in training mode")));
            }
            bn = Some(BnRef {
                scale: b.input[1].clone(),
                bias: b.input[2].clone(),
                mean: b.input[3].clone(),
                var: b.input[4].clone(),
                epsilon: attr_float(b, "epsilon").unwrap_or(1e-5),
            });
            out = self.skip_transparent(self.output_of(*c)?);
        }
        Ok(ConvUnit {
            node,
            weight,
            bias,
            bn,
            kernel,
            stride,
            pads,
            out_channels,
            in_channels,
            out,
        })
    }

    /// Follows a chain of convolution units separated by `Relu` from the
    /// `Conv` node `first` to the `Add` that ends the block.
    fn chain(&self, first: usize) -> Result<(Vec<ConvUnit>, usize), ModelError> {
        let mut units = Vec::new();
        let mut node = first;
        loop {
            let unit = self.conv_unit(node)?;
            let next =
                self.only_consumer(&unit.out, &["Relu", "Add"], "inside a residual block")?;
            units.push(unit);
            if self.g.nodes[next].op_type == "Add" {
                return Ok((units, next));
            }
            let relu_out = self.skip_transparent(self.output_of(next)?);
            node = self.only_consumer(&relu_out, &["Conv"], "inside a residual block")?;
            if units.len() > 8 {
                return Err(self.err(format!(
                    "{} starts a chain of more than 8 convolutions",
                    self.g.describe(first)
                )));
            }
        }
    }

    fn block(&self, x: &str) -> Result<BlockMatch, ModelError> {
        let cons = self.g.consumers(x).to_vec();
        let convs: Vec<usize> = cons
            .iter()
            .copied()
            .filter(|&i| self.g.nodes[i].op_type == "Conv")
            .collect();
        let adds: Vec<usize> = cons
            .iter()
            .copied()
            .filter(|&i| self.g.nodes[i].op_type == "Add")
            .collect();
        if let Some(&other) = cons
            .iter()
            .find(|&&i| !matches!(self.g.nodes[i].op_type.as_str(), "Conv" | "Add"))
        {
            return Err(self.err(format!(
                "`{x}` (a block input) is read by {}, expected only Conv and Add",
                self.g.describe(other)
            )));
        }
        let mut chains = Vec::new();
        for &c in &convs {
            chains.push(self.chain(c)?);
        }
        let (main, downsample, add) = match (chains.len(), adds.len()) {
            (1, 1) => {
                let (main, add) = chains.remove(0);
                if add != adds[0] {
                    return Err(self.err(format!(
                        "the shortcut of `{x}` reaches {} but the main path reaches {}",
                        self.g.describe(adds[0]),
                        self.g.describe(add)
                    )));
                }
                (main, None, add)
            }
            (2, 0) => {
                let (b, add_b) = chains.remove(1);
                let (a, add_a) = chains.remove(0);
                if add_a != add_b {
                    return Err(self.err(format!(
                        "the two paths from `{x}` end at different Add nodes"
                    )));
                }
                let (main, mut ds) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                if ds.len() != 1 || main.len() < 2 {
                    return Err(self.err(format!(
                        "block at `{x}`: paths of {} and {} convolutions; expected a main path of 2 or 3 and a 1-convolution projection",
                        main.len(),
                        ds.len()
                    )));
                }
                (main, Some(ds.remove(0)), add_a)
            }
            (nc, na) => {
                return Err(self.err(format!(
                    "`{x}` is read by {nc} Conv and {na} Add nodes; a residual block has a main \
                     path plus either an identity (Add) or a projection (Conv)"
                )));
            }
        };
        if !(2..=3).contains(&main.len()) {
            return Err(self.err(format!(
                "the block at {} has {} convolutions on its main path (2 = basic, 3 = bottleneck)",
                self.g.describe(main[0].node),
                main.len()
            )));
        }
        let add_out = self.skip_transparent(self.output_of(add)?);
        let relu = self.only_consumer(&add_out, &["Relu"], "after a residual Add")?;
        let out = self.skip_transparent(self.output_of(relu)?);
        let stride = main
            .iter()
            .map(|u| u.stride)
            .chain(downsample.iter().map(|u| u.stride))
            .max()
            .unwrap_or(1);
        Ok(BlockMatch {
            main,
            downsample,
            out,
            stride,
            add_node: add,
        })
    }
}

fn info(model: &ModelProto) -> OnnxInfo {
    let g = model.graph.as_ref();
    let input = g.and_then(|g| {
        let inits: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name.as_str()).collect();
        g.input.iter().find(|i| !inits.contains(i.name.as_str()))
    });
    let input_shape = input
        .and_then(|i| i.r#type.as_ref())
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| {
                    (d.dim_value > 0 && d.dim_param.is_empty()).then_some(d.dim_value as usize)
                })
                .collect()
        })
        .unwrap_or_default();
    OnnxInfo {
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opset: model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(0),
        ir_version: model.ir_version,
        input_name: input.map(|i| i.name.clone()).unwrap_or_default(),
        input_shape,
    }
}

/// Recognises the ResNet in `model` and extracts its weights.
pub(super) fn import(path: &Path, model: &ModelProto) -> Result<ImportedResNet, ModelError> {
    let info = info(model);
    let graph = model.graph.as_ref().ok_or_else(|| ModelError::NotOnnx {
        path: path.to_path_buf(),
        why: "no graph".into(),
    })?;
    let w = Walker {
        g: Graph::new(path, graph),
    };
    if info.input_name.is_empty() {
        return Err(w.err("the graph has no input"));
    }
    if let Some(c) = info.input_shape.get(1).copied().flatten()
        && c != 3
    {
        return Err(w.err(format!(
            "the input `{}` has {c} channels, expected 3 (RGB or BGR)",
            info.input_name
        )));
    }

    // Stem.
    let x = w.skip_transparent(info.input_name.clone());
    let conv = w.only_consumer(&x, &["Conv"], "at the graph input")?;
    let stem = w.conv_unit(conv)?;
    let relu = w.only_consumer(&stem.out, &["Relu"], "after the stem convolution")?;
    let relu_out = w.skip_transparent(w.output_of(relu)?);
    let pool = w.only_consumer(&relu_out, &["MaxPool"], "after the stem")?;
    let pool_node = &w.g.nodes[pool];
    let pool_k = w.square(
        pool,
        "kernel_shape",
        attr_ints(pool_node, "kernel_shape"),
        0,
    )?;
    let pool_s = w.square(pool, "strides", attr_ints(pool_node, "strides"), 1)?;
    if (pool_k, pool_s) != (3, 2) {
        return Err(w.err(format!(
            "the stem {} is {pool_k}x{pool_k} stride {pool_s}; a ResNet uses 3x3 stride 2",
            w.g.describe(pool)
        )));
    }
    if attr_int(pool_node, "ceil_mode").unwrap_or(0) != 0 {
        return Err(w.err(format!("the stem {} uses ceil_mode", w.g.describe(pool))));
    }
    let pool_pads = w.pads(pool)?;
    let mut x = w.skip_transparent(w.output_of(pool)?);

    // Residual blocks.
    let mut blocks = Vec::new();
    while w
        .g
        .consumers(&x)
        .iter()
        .any(|&i| w.g.nodes[i].op_type == "Conv")
    {
        let b = w.block(&x)?;
        x = b.out.clone();
        blocks.push(b);
        if blocks.len() > w.g.nodes.len() {
            return Err(w.err("the residual blocks form a cycle"));
        }
    }
    if blocks.is_empty() {
        return Err(w.err(format!("no residual block after the stem (at `{x}`)")));
    }

    // Final pool.
    let pool = w.only_consumer(
        &x,
        &["GlobalAveragePool", "AveragePool", "ReduceMean"],
        "after the last block",
    )?;
    let pn = &w.g.nodes[pool];
    let final_pool_window = match pn.op_type.as_str() {
        "AveragePool" => {
            let k = w.square(pool, "kernel_shape", attr_ints(pn, "kernel_shape"), 0)?;
            if w.pads(pool)? != [0; 4] {
                return Err(w.err(format!("the final {} is padded", w.g.describe(pool))));
            }
            Some(k)
        }
        "ReduceMean" => {
            let axes = attr_ints(pn, "axes").or_else(|| {
                pn.input
                    .get(1)
                    .and_then(|a| w.g.constant(a))
                    .map(|t| t.int64_data.clone())
                    .filter(|v| !v.is_empty())
                    .or_else(|| {
                        pn.input.get(1).and_then(|a| w.g.constant(a)).map(|t| {
                            t.raw_data
                                .chunks_exact(8)
                                .map(|c| {
                                    i64::from_le_bytes([
                                        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                                    ])
                                })
                                .collect()
                        })
                    })
            });
            let mut axes = axes.unwrap_or_default();
            axes.sort_unstable();
            if axes != [2, 3] && axes != [-2, -1] {
                return Err(w.err(format!(
                    "the final {} averages over axes {axes:?}, expected [2, 3]",
                    w.g.describe(pool)
                )));
            }
            None
        }
        _ => None,
    };
    let mut x = w.output_of(pool)?;

    // Shape-only nodes, then an optional classifier.
    let mut fc: Option<(String, bool, Option<String>, f32, f32)> = None; // (weight, transposed, bias, alpha, beta)
    for step in 0.. {
        if step > w.g.nodes.len() {
            return Err(w.err("the graph loops after the final pool"));
        }
        if w.g.outputs.contains(&x.as_str()) && w.g.consumers(&x).is_empty() {
            break;
        }
        let next = w.only_consumer(
            &x,
            &[
                "Flatten", "Reshape", "Squeeze", "Identity", "Dropout", "Gemm", "MatMul", "Add",
            ],
            "after the final pool",
        )?;
        let n = &w.g.nodes[next];
        match n.op_type.as_str() {
            "Gemm" | "MatMul" if fc.is_some() => {
                return Err(w.err(format!(
                    "a second classifier layer at {}",
                    w.g.describe(next)
                )));
            }
            "Gemm" => {
                let b = n
                    .input
                    .get(1)
                    .filter(|b| w.g.is_const(b))
                    .cloned()
                    .ok_or_else(|| w.err("Gemm without a constant weight"))?;
                if attr_int(n, "transA").unwrap_or(0) != 0 {
                    return Err(w.err(format!("{} uses transA", w.g.describe(next))));
                }
                let c = n.input.get(2).filter(|c| !c.is_empty()).cloned();
                fc = Some((
                    b,
                    attr_int(n, "transB").unwrap_or(0) != 0,
                    c,
                    attr_float(n, "alpha").unwrap_or(1.0),
                    attr_float(n, "beta").unwrap_or(1.0),
                ));
            }
            "MatMul" => {
                let b = n
                    .input
                    .get(1)
                    .filter(|b| w.g.is_const(b))
                    .cloned()
                    .ok_or_else(|| w.err("MatMul without a constant weight"))?;
                fc = Some((b, false, None, 1.0, 1.0));
            }
            "Add" => {
                let bias = n.input.iter().find(|i| w.g.is_const(i)).cloned();
                match (&mut fc, bias) {
                    (Some((_, _, slot @ None, _, _)), Some(b)) => *slot = Some(b),
                    _ => {
                        return Err(w.err(format!(
                            "unexpected {} after the final pool",
                            w.g.describe(next)
                        )));
                    }
                }
            }
            _ => {}
        }
        x = w.output_of(next)?;
    }

    build(
        path,
        &w,
        info,
        &stem,
        pool_pads,
        &blocks,
        final_pool_window,
        fc,
    )
}

#[allow(clippy::too_many_arguments)]
fn build(
    path: &Path,
    w: &Walker<'_>,
    info: OnnxInfo,
    stem: &ConvUnit,
    pool_pads: [usize; 4],
    blocks: &[BlockMatch],
    final_pool_window: Option<usize>,
    fc: Option<(String, bool, Option<String>, f32, f32)>,
) -> Result<ImportedResNet, ModelError> {
    // Stages: a new stage starts at every stride-2 block.
    let mut stages: Vec<Vec<&BlockMatch>> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match b.stride {
            1 if i > 0 => stages.last_mut().map(|s| s.push(b)).unwrap_or(()),
            1 => stages.push(vec![b]),
            2 if i > 0 => stages.push(vec![b]),
            s => {
                return Err(w.err(format!(
                    "the block ending at {} has stride {s}; ResNet stages use 1 then 2",
                    w.g.describe(b.add_node)
                )));
            }
        }
    }
    if stages.len() != 4 {
        return Err(w.err(format!(
            "found {} stages (blocks per stage {:?}); a ResNet has 4",
            stages.len(),
            stages.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    let kind = match blocks[0].main.len() {
        2 => BlockKind::Basic,
        _ => BlockKind::Bottleneck,
    };
    if let Some(b) = blocks.iter().find(|b| b.main.len() != blocks[0].main.len()) {
        return Err(w.err(format!(
            "{} mixes basic and bottleneck blocks",
            w.g.describe(b.add_node)
        )));
    }
    let stride_on = if kind == BlockKind::Bottleneck && stages[1][0].main[0].stride == 2 {
        StridePlacement::Conv1x1
    } else {
        StridePlacement::Conv3x3
    };
    let padding = if stem.pads == [stem.kernel / 2; 4] {
        PaddingStyle::Symmetric
    } else {
        PaddingStyle::BeginHeavy
    };
    let mut layers = [0usize; 4];
    let mut widths = [0usize; 4];
    for (s, stage) in stages.iter().enumerate() {
        layers[s] = stage.len();
        widths[s] = stage[0].main[0].out_channels;
    }
    let (fc_weight, num_classes) = match &fc {
        Some((b, transposed, ..)) => {
            let d = w.g.const_dims(b).unwrap_or_default();
            let classes = match (d.as_slice(), transposed) {
                ([out, _], true) | ([_, out], false) => *out,
                _ => {
                    return Err(w.err(format!(
                        "classifier weight `{b}` has shape {d:?}, expected 2-D"
                    )));
                }
            };
            (Some(b.clone()), Some(classes))
        }
        None => (None, None),
    };
    // BatchNorm epsilon: one value for the whole network.
    let eps: Vec<f32> = std::iter::once(stem)
        .chain(
            blocks
                .iter()
                .flat_map(|b| b.main.iter().chain(b.downsample.iter())),
        )
        .filter_map(|u| u.bn.as_ref().map(|b| b.epsilon))
        .collect();
    let bn_epsilon = eps.first().map(|&e| e as f64).unwrap_or(1e-5);
    if eps.iter().any(|&e| (e as f64 - bn_epsilon).abs() > 1e-12) {
        return Err(w.err("BatchNorm epsilons differ between layers"));
    }
    let config = ResNetConfig::new(kind, layers)
        .with_widths(widths)
        .with_stem_width(stem.out_channels)
        .with_stem_kernel(stem.kernel)
        .with_stride_on(stride_on)
        .with_padding(padding)
        .with_num_classes(num_classes)
        .with_final_pool_window(final_pool_window)
        .with_bn_epsilon(bn_epsilon);
    config.validate()?;
    if stem.in_channels != 3 {
        return Err(w.err(format!(
            "the stem convolution reads {} channels, expected 3",
            stem.in_channels
        )));
    }

    // Every convolution and the stem pool must be padded as the style says.
    let check_pads = |pads: [usize; 4],
                      kernel: usize,
                      stride: usize,
                      node: usize|
     -> Result<(), ModelError> {
        let (b, e) = padding.pads(kernel, stride);
        if pads != [b, b, e, e] {
            return Err(w.err(format!(
                "{} has pads {pads:?} where the network's padding style ({padding:?}, set by the stem) gives {:?}",
                w.g.describe(node),
                [b, b, e, e]
            )));
        }
        Ok(())
    };
    let mut weights = NamedWeights::new();
    let mut stored = 0usize;
    let mut folded = false;
    let mut add_unit = |prefix: &str, bn_prefix: &str, u: &ConvUnit| -> Result<(), ModelError> {
        check_pads(u.pads, u.kernel, u.stride, u.node)?;
        let (dims, values) = w.g.tensor_f32(&u.weight)?;
        stored += values.len();
        weights.insert(
            format!("{prefix}.weight"),
            WeightEntry {
                dims,
                values,
                source: u.weight.clone(),
            },
        );
        let n = u.out_channels;
        let conv_bias = match &u.bias {
            Some(b) => {
                let (d, v) = w.g.tensor_f32(b)?;
                stored += v.len();
                if d != [n] {
                    return Err(ModelError::Shape {
                        path: path.to_path_buf(),
                        layer: format!("{prefix}.bias (ONNX `{b}`)"),
                        expected: vec![n],
                        found: d,
                    });
                }
                Some(v)
            }
            None => None,
        };
        let mut put = |field: &str, values: Vec<f32>, source: String| -> Result<(), ModelError> {
            if values.len() != n {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    layer: format!("{bn_prefix}.{field} (ONNX `{source}`)"),
                    expected: vec![n],
                    found: vec![values.len()],
                });
            }
            weights.insert(
                format!("{bn_prefix}.{field}"),
                WeightEntry {
                    dims: vec![n],
                    values,
                    source,
                },
            );
            Ok(())
        };
        match &u.bn {
            Some(bn) => {
                let mut get = |name: &str| -> Result<Vec<f32>, ModelError> {
                    let (_, v) = w.g.tensor_f32(name)?;
                    stored += v.len();
                    Ok(v)
                };
                let gamma = get(&bn.scale)?;
                let beta = get(&bn.bias)?;
                let mut mean = get(&bn.mean)?;
                let var = get(&bn.var)?;
                if let Some(cb) = &conv_bias {
                    // BN(Wx + b) = BN'(Wx) with the mean shifted by b.
                    for (m, b) in mean.iter_mut().zip(cb) {
                        *m -= b;
                    }
                }
                put("gamma", gamma, bn.scale.clone())?;
                put("beta", beta, bn.bias.clone())?;
                put("running_mean", mean, bn.mean.clone())?;
                put("running_var", var, bn.var.clone())?;
            }
            None => {
                folded = true;
                let src = format!("folded into {}", w.g.describe(u.node));
                let eps = bn_epsilon as f32;
                put("gamma", vec![1.0; n], src.clone())?;
                put(
                    "beta",
                    conv_bias.unwrap_or_else(|| vec![0.0; n]),
                    src.clone(),
                )?;
                put("running_mean", vec![0.0; n], src.clone())?;
                put("running_var", vec![1.0 - eps; n], src)?;
            }
        }
        Ok(())
    };
    add_unit("conv1", "bn1", stem)?;
    for (s, stage) in stages.iter().enumerate() {
        for (j, b) in stage.iter().enumerate() {
            let p = format!("layer{}.{j}", s + 1);
            for (k, u) in b.main.iter().enumerate() {
                add_unit(
                    &format!("{p}.conv{}", k + 1),
                    &format!("{p}.bn{}", k + 1),
                    u,
                )?;
            }
            if let Some(ds) = &b.downsample {
                add_unit(
                    &format!("{p}.downsample.conv"),
                    &format!("{p}.downsample.bn"),
                    ds,
                )?;
            }
        }
    }
    let pool_expected = padding.pads(3, 2);
    if pool_pads
        != [
            pool_expected.0,
            pool_expected.0,
            pool_expected.1,
            pool_expected.1,
        ]
    {
        return Err(w.err(format!(
            "the stem max pool has pads {pool_pads:?}, which does not match the padding style {padding:?} of the stem convolution"
        )));
    }
    if let (Some((b, transposed, c, alpha, beta)), Some(_)) = (&fc, &fc_weight) {
        let (d, v) = w.g.tensor_f32(b)?;
        stored += v.len();
        let (rows, cols) = (d[0], d[1]);
        // Burn's Linear stores [in, out].
        let values: Vec<f32> = if *transposed {
            let mut t = vec![0.0; v.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = v[r * cols + c] * alpha;
                }
            }
            t
        } else {
            v.iter().map(|x| x * alpha).collect()
        };
        let dims = if *transposed {
            vec![cols, rows]
        } else {
            vec![rows, cols]
        };
        weights.insert(
            "fc.weight".into(),
            WeightEntry {
                dims,
                values,
                source: b.clone(),
            },
        );
        if let Some(c) = c {
            let (d, v) = w.g.tensor_f32(c)?;
            stored += v.len();
            weights.insert(
                "fc.bias".into(),
                WeightEntry {
                    dims: d,
                    values: v.iter().map(|x| x * beta).collect(),
                    source: c.clone(),
                },
            );
        } else {
            let n = num_classes.unwrap_or(0);
            weights.insert(
                "fc.bias".into(),
                WeightEntry {
                    dims: vec![n],
                    values: vec![0.0; n],
                    source: "absent (zero)".into(),
                },
            );
        }
    }
    Ok(ImportedResNet {
        config,
        weights,
        info,
        folded_batchnorm: folded,
        stored_values: stored,
    })
}
