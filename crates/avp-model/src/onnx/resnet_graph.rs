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
use crate::resnet::{BlockKind, ConvSite, PaddingStyle, ResNetConfig, StridePlacement};

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

/// Recognises the ResNet in `model` and extracts its weights, in three
/// phases: [`match_graph`] (structure only), [`infer_config`] (the
/// architecture and every structural check), [`extract_weights`] (values
/// by Burn module path).
pub(super) fn import(path: &Path, model: &ModelProto) -> Result<ImportedResNet, ModelError> {
    let info = info(model);
    let graph = model.graph.as_ref().ok_or_else(|| ModelError::NotOnnx {
        path: path.to_path_buf(),
        why: "no graph".into(),
    })?;
    let w = Walker {
        g: Graph::new(path, graph),
    };
    let found = match_graph(&w, &info)?;
    let config = infer_config(&w, &found)?;
    let (weights, folded_batchnorm, stored_values) = extract_weights(path, &w, &found, &config)?;
    Ok(ImportedResNet {
        config,
        weights,
        info,
        folded_batchnorm,
        stored_values,
    })
}

/// The classifier at the end of a graph: `Gemm` (or `MatMul` + `Add`).
struct FcRef {
    weight: String,
    /// `transB`: the weight is stored `[out, in]`.
    transposed: bool,
    bias: Option<String>,
    alpha: f32,
    beta: f32,
}

/// A ResNet recognised in a graph: where each part is, no value read yet.
struct ResNetGraph {
    stem: ConvUnit,
    pool_pads: [usize; 4],
    blocks: Vec<BlockMatch>,
    final_pool_window: Option<usize>,
    fc: Option<FcRef>,
}

/// Phase 1: walks the graph from its input and names every part of the
/// ResNet it finds (stem, pool, blocks, final pool, classifier).
fn match_graph(w: &Walker<'_>, info: &OnnxInfo) -> Result<ResNetGraph, ModelError> {
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
    let (stem, pool_pads, x) = match_stem(w, &info.input_name)?;
    let (blocks, x) = match_blocks(w, x)?;
    let (final_pool_window, x) = match_final_pool(w, &x)?;
    let fc = match_head(w, x)?;
    Ok(ResNetGraph {
        stem,
        pool_pads,
        blocks,
        final_pool_window,
        fc,
    })
}

/// Stem convolution, `Relu`, 3x3 stride-2 `MaxPool`; returns the stem, the
/// pool's pads and the pool's output.
fn match_stem(w: &Walker<'_>, input: &str) -> Result<(ConvUnit, [usize; 4], String), ModelError> {
    let x = w.skip_transparent(input.to_string());
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
    let x = w.skip_transparent(w.output_of(pool)?);
    Ok((stem, pool_pads, x))
}

/// Residual blocks for as long as a convolution reads the current value.
fn match_blocks(w: &Walker<'_>, mut x: String) -> Result<(Vec<BlockMatch>, String), ModelError> {
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
    Ok((blocks, x))
}

/// The global average: `GlobalAveragePool`, `ReduceMean` over H and W, or
/// a fixed-window `AveragePool` (its window returned).
fn match_final_pool(w: &Walker<'_>, x: &str) -> Result<(Option<usize>, String), ModelError> {
    let pool = w.only_consumer(
        x,
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
            let mut axes = reduce_axes(w, pool);
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
    Ok((final_pool_window, w.output_of(pool)?))
}

/// The axes of a `ReduceMean`: an attribute (opset < 18) or a constant
/// second input (int64 values or raw little-endian bytes).
fn reduce_axes(w: &Walker<'_>, node: usize) -> Vec<i64> {
    let pn = &w.g.nodes[node];
    let from_input = || {
        let t = pn.input.get(1).and_then(|a| w.g.constant(a))?;
        if !t.int64_data.is_empty() {
            return Some(t.int64_data.clone());
        }
        Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        )
    };
    attr_ints(pn, "axes")
        .or_else(from_input)
        .unwrap_or_default()
}

/// Shape-only nodes after the final pool, then an optional classifier.
fn match_head(w: &Walker<'_>, mut x: String) -> Result<Option<FcRef>, ModelError> {
    let mut fc: Option<FcRef> = None;
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
        let constant = |i: usize, what: &str| {
            n.input
                .get(i)
                .filter(|b| w.g.is_const(b))
                .cloned()
                .ok_or_else(|| w.err(format!("{what} without a constant weight")))
        };
        match n.op_type.as_str() {
            "Gemm" | "MatMul" if fc.is_some() => {
                return Err(w.err(format!(
                    "a second classifier layer at {}",
                    w.g.describe(next)
                )));
            }
            "Gemm" => {
                if attr_int(n, "transA").unwrap_or(0) != 0 {
                    return Err(w.err(format!("{} uses transA", w.g.describe(next))));
                }
                fc = Some(FcRef {
                    weight: constant(1, "Gemm")?,
                    transposed: attr_int(n, "transB").unwrap_or(0) != 0,
                    bias: n.input.get(2).filter(|c| !c.is_empty()).cloned(),
                    alpha: attr_float(n, "alpha").unwrap_or(1.0),
                    beta: attr_float(n, "beta").unwrap_or(1.0),
                });
            }
            "MatMul" => {
                fc = Some(FcRef {
                    weight: constant(1, "MatMul")?,
                    transposed: false,
                    bias: None,
                    alpha: 1.0,
                    beta: 1.0,
                });
            }
            "Add" => {
                let bias = n.input.iter().find(|i| w.g.is_const(i)).cloned();
                match (fc.as_mut(), bias) {
                    (Some(f), Some(b)) if f.bias.is_none() => f.bias = Some(b),
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
    Ok(fc)
}

/// The blocks by stage: a new stage starts at every stride-2 block.
fn stages(w: &Walker<'_>, blocks: &[BlockMatch]) -> Result<Vec<Vec<usize>>, ModelError> {
    let mut stages: Vec<Vec<usize>> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match (b.stride, stages.last_mut()) {
            (1, Some(stage)) => stage.push(i),
            (1, None) => stages.push(vec![i]),
            (2, Some(_)) => stages.push(vec![i]),
            (s, _) => {
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
    Ok(stages)
}

/// Phase 2: the architecture of a matched graph, with every structural
/// check (stage strides, one block kind, one BatchNorm epsilon, padding
/// consistent with the stem's style, a 3-channel stem).
fn infer_config(w: &Walker<'_>, m: &ResNetGraph) -> Result<ResNetConfig, ModelError> {
    let (stem, blocks) = (&m.stem, &m.blocks);
    let stages = stages(w, blocks)?;
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
    let stride_on = if kind == BlockKind::Bottleneck && blocks[stages[1][0]].main[0].stride == 2 {
        StridePlacement::Conv1x1
    } else {
        StridePlacement::Conv3x3
    };
    let padding = if stem.pads == [stem.kernel / 2; 4] {
        PaddingStyle::Symmetric
    } else {
        PaddingStyle::BeginHeavy
    };
    let layers = [0, 1, 2, 3].map(|s| stages[s].len());
    let widths = [0, 1, 2, 3].map(|s| blocks[stages[s][0]].main[0].out_channels);
    let num_classes = match &m.fc {
        Some(fc) => {
            let d = w.g.const_dims(&fc.weight).unwrap_or_default();
            match (d.as_slice(), fc.transposed) {
                ([out, _], true) | ([_, out], false) => Some(*out),
                _ => {
                    return Err(w.err(format!(
                        "classifier weight `{}` has shape {d:?}, expected 2-D",
                        fc.weight
                    )));
                }
            }
        }
        None => None,
    };
    let config = ResNetConfig::new(kind, layers)
        .with_widths(widths)
        .with_stem_width(stem.out_channels)
        .with_stem_kernel(stem.kernel)
        .with_stride_on(stride_on)
        .with_padding(padding)
        .with_num_classes(num_classes)
        .with_final_pool_window(m.final_pool_window)
        .with_bn_epsilon(bn_epsilon(w, m)?);
    config.validate()?;
    if stem.in_channels != 3 {
        return Err(w.err(format!(
            "the stem convolution reads {} channels, expected 3",
            stem.in_channels
        )));
    }
    check_padding(w, m, padding)?;
    Ok(config)
}

/// Every convolution unit of a matched graph, stem first, each block's
/// main chain then its shortcut.
fn units(m: &ResNetGraph) -> impl Iterator<Item = &ConvUnit> {
    std::iter::once(&m.stem).chain(
        m.blocks
            .iter()
            .flat_map(|b| b.main.iter().chain(b.downsample.iter())),
    )
}

/// The network's one BatchNorm epsilon (1e-5 when every layer is folded).
fn bn_epsilon(w: &Walker<'_>, m: &ResNetGraph) -> Result<f64, ModelError> {
    let eps: Vec<f32> = units(m)
        .filter_map(|u| u.bn.as_ref().map(|b| b.epsilon))
        .collect();
    let first = eps.first().map(|&e| e as f64).unwrap_or(1e-5);
    if eps.iter().any(|&e| (e as f64 - first).abs() > 1e-12) {
        return Err(w.err("BatchNorm epsilons differ between layers"));
    }
    Ok(first)
}

/// Every convolution and the stem pool padded as the stem's style says.
fn check_padding(w: &Walker<'_>, m: &ResNetGraph, padding: PaddingStyle) -> Result<(), ModelError> {
    for u in units(m) {
        let (b, e) = padding.pads(u.kernel, u.stride);
        if u.pads != [b, b, e, e] {
            return Err(w.err(format!(
                "{} has pads {:?} where the network's padding style ({padding:?}, set by the stem) gives {:?}",
                w.g.describe(u.node),
                u.pads,
                [b, b, e, e]
            )));
        }
    }
    let (b, e) = padding.pads(3, 2);
    if m.pool_pads != [b, b, e, e] {
        return Err(w.err(format!(
            "the stem max pool has pads {:?}, which does not match the padding style {padding:?} of the stem convolution",
            m.pool_pads
        )));
    }
    Ok(())
}

/// What phase 3 gathers: weights by module path, whether any BatchNorm
/// was folded in the file, and the values read.
struct Extracted {
    weights: NamedWeights,
    folded: bool,
    stored: usize,
}

/// Phase 3: every tensor of a matched graph under its Burn module path
/// (the names come from [`ConvSite`]). A folded convolution gets an
/// identity BatchNorm that adds its bias; a convolution bias before a
/// BatchNorm moves into the running mean.
fn extract_weights(
    path: &Path,
    w: &Walker<'_>,
    m: &ResNetGraph,
    config: &ResNetConfig,
) -> Result<(NamedWeights, bool, usize), ModelError> {
    let mut out = Extracted {
        weights: NamedWeights::new(),
        folded: false,
        stored: 0,
    };
    let eps = config.bn_epsilon as f32;
    unit_weights(path, w, &mut out, ConvSite::Stem, &m.stem, eps)?;
    let mut first = 0;
    for (stage, &count) in config.layers.iter().enumerate() {
        for (block, b) in m.blocks[first..first + count].iter().enumerate() {
            for (k, u) in b.main.iter().enumerate() {
                let site = ConvSite::Main {
                    stage,
                    block,
                    conv: k,
                };
                unit_weights(path, w, &mut out, site, u, eps)?;
            }
            if let Some(ds) = &b.downsample {
                let site = ConvSite::Downsample { stage, block };
                unit_weights(path, w, &mut out, site, ds, eps)?;
            }
        }
        first += count;
    }
    if let Some(fc) = &m.fc {
        fc_weights(w, &mut out, fc, config.num_classes.unwrap_or(0))?;
    }
    Ok((out.weights, out.folded, out.stored))
}

/// One convolution's weight and its BatchNorm's four tensors.
fn unit_weights(
    path: &Path,
    w: &Walker<'_>,
    out: &mut Extracted,
    site: ConvSite,
    u: &ConvUnit,
    eps: f32,
) -> Result<(), ModelError> {
    let (conv, bn_path) = (site.conv(), site.bn());
    let (dims, values) = w.g.tensor_f32(&u.weight)?;
    out.stored += values.len();
    out.weights.insert(
        format!("{conv}.weight"),
        WeightEntry {
            dims,
            values,
            source: u.weight.clone(),
        },
    );
    let n = u.out_channels;
    let shape_err = |layer: String, found: Vec<usize>| ModelError::Shape {
        path: path.to_path_buf(),
        layer,
        expected: vec![n],
        found,
    };
    let conv_bias = match &u.bias {
        Some(b) => {
            let (d, v) = w.g.tensor_f32(b)?;
            out.stored += v.len();
            if d != [n] {
                return Err(shape_err(format!("{conv}.bias (ONNX `{b}`)"), d));
            }
            Some(v)
        }
        None => None,
    };
    let tensors: [(Vec<f32>, String); 4] = match &u.bn {
        Some(bn) => {
            let mut get = |name: &str| -> Result<(Vec<f32>, String), ModelError> {
                let (_, v) = w.g.tensor_f32(name)?;
                out.stored += v.len();
                Ok((v, name.to_string()))
            };
            let (gamma, beta, mut mean, var) = (
                get(&bn.scale)?,
                get(&bn.bias)?,
                get(&bn.mean)?,
                get(&bn.var)?,
            );
            if let Some(cb) = &conv_bias {
                // BN(Wx + b) = BN'(Wx) with the mean shifted by b.
                for (m, b) in mean.0.iter_mut().zip(cb) {
                    *m -= b;
                }
            }
            [gamma, beta, mean, var]
        }
        None => {
            out.folded = true;
            let src = format!("folded into {}", w.g.describe(u.node));
            let beta = conv_bias.unwrap_or_else(|| vec![0.0; n]);
            [
                (vec![1.0; n], src.clone()),
                (beta, src.clone()),
                (vec![0.0; n], src.clone()),
                (vec![1.0 - eps; n], src),
            ]
        }
    };
    for (field, (values, source)) in ["gamma", "beta", "running_mean", "running_var"]
        .into_iter()
        .zip(tensors)
    {
        if values.len() != n {
            return Err(shape_err(
                format!("{bn_path}.{field} (ONNX `{source}`)"),
                vec![values.len()],
            ));
        }
        let entry = WeightEntry {
            dims: vec![n],
            values,
            source,
        };
        out.weights.insert(format!("{bn_path}.{field}"), entry);
    }
    Ok(())
}

/// The classifier as Burn's `Linear` stores it (`[in, out]`), with
/// `Gemm`'s alpha and beta applied; a missing bias is zero.
fn fc_weights(
    w: &Walker<'_>,
    out: &mut Extracted,
    fc: &FcRef,
    classes: usize,
) -> Result<(), ModelError> {
    let (d, v) = w.g.tensor_f32(&fc.weight)?;
    out.stored += v.len();
    let [rows, cols] = d[..] else {
        return Err(w.err(format!(
            "classifier weight `{}` has shape {d:?}, expected 2-D",
            fc.weight
        )));
    };
    let (dims, values) = if fc.transposed {
        let mut t = vec![0.0; v.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = v[r * cols + c] * fc.alpha;
            }
        }
        (vec![cols, rows], t)
    } else {
        (vec![rows, cols], v.iter().map(|x| x * fc.alpha).collect())
    };
    let weight = WeightEntry {
        dims,
        values,
        source: fc.weight.clone(),
    };
    out.weights.insert("fc.weight".into(), weight);
    let bias = match &fc.bias {
        Some(c) => {
            let (d, v) = w.g.tensor_f32(c)?;
            out.stored += v.len();
            WeightEntry {
                dims: d,
                values: v.iter().map(|x| x * fc.beta).collect(),
                source: c.clone(),
            }
        }
        None => WeightEntry {
            dims: vec![classes],
            values: vec![0.0; classes],
            source: "absent (zero)".into(),
        },
    };
    out.weights.insert("fc.bias".into(), bias);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    //! Each phase on a small graph built here: a basic-block ResNet with
    //! one block per stage, widths 4, 8, 8, 8, BatchNorm kept, and a
    //! `Gemm` classifier with `transB`.
    use super::*;
    use crate::onnx::proto::{AttributeProto, GraphProto, NodeProto, TensorProto, ValueInfoProto};

    fn ints(name: &str, v: &[usize]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            ints: v.iter().map(|&x| x as i64).collect(),
            ..Default::default()
        }
    }

    #[derive(Default)]
    struct Builder {
        g: GraphProto,
        n: usize,
    }

    impl Builder {
        fn init(&mut self, name: &str, dims: &[usize]) {
            let len: usize = dims.iter().product();
            self.g.initializer.push(TensorProto {
                name: name.into(),
                dims: dims.iter().map(|&d| d as i64).collect(),
                data_type: 1,
                float_data: (0..len).map(|i| 0.5 + i as f32 * 1e-3).collect(),
                ..Default::default()
            });
        }

        fn node(&mut self, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
            self.n += 1;
            let out = format!("v{}", self.n);
            self.g.node.push(NodeProto {
                input: inputs.iter().map(|s| s.to_string()).collect(),
                output: vec![out.clone()],
                name: format!("n{}", self.n),
                op_type: op.into(),
                attribute,
                ..Default::default()
            });
            out
        }

        /// Conv (symmetric pads) + BatchNormalization.
        fn conv(&mut self, x: &str, cin: usize, cout: usize, k: usize, stride: usize) -> String {
            let w = format!("w{}", self.n + 1);
            self.init(&w, &[cout, cin, k, k]);
            let p = k / 2;
            let attrs = vec![
                ints("kernel_shape", &[k, k]),
                ints("strides", &[stride, stride]),
                ints("pads", &[p, p, p, p]),
            ];
            let y = self.node("Conv", &[x, &w], attrs);
            let bn: Vec<String> = ["scale", "bias", "mean", "var"]
                .iter()
                .map(|t| format!("{t}{}", self.n))
                .collect();
            for name in &bn {
                self.init(name, &[cout]);
            }
            let eps = AttributeProto {
                name: "epsilon".into(),
                f: 1e-5,
                ..Default::default()
            };
            let inputs = [y.as_str(), &bn[0], &bn[1], &bn[2], &bn[3]];
            self.node("BatchNormalization", &inputs, vec![eps])
        }

        fn block(&mut self, x: &str, cin: usize, cout: usize, stride: usize) -> String {
            let a = self.conv(x, cin, cout, 3, stride);
            let a = self.node("Relu", &[&a], vec![]);
            let b = self.conv(&a, cout, cout, 3, 1);
            let shortcut = if stride != 1 || cin != cout {
                self.conv(x, cin, cout, 1, stride)
            } else {
                x.to_string()
            };
            let sum = self.node("Add", &[&b, &shortcut], vec![]);
            self.node("Relu", &[&sum], vec![])
        }
    }

    fn tiny(strides: [usize; 4]) -> GraphProto {
        let mut b = Builder::default();
        b.g.input.push(ValueInfoProto {
            name: "x".into(),
            ..Default::default()
        });
        let stem = b.conv("x", 3, 4, 7, 2);
        let stem = b.node("Relu", &[&stem], vec![]);
        let pool_attrs = vec![
            ints("kernel_shape", &[3, 3]),
            ints("strides", &[2, 2]),
            ints("pads", &[1, 1, 1, 1]),
        ];
        let mut x = b.node("MaxPool", &[&stem], pool_attrs);
        let widths = [4, 8, 8, 8];
        let mut cin = 4;
        for (w, s) in widths.into_iter().zip(strides) {
            x = b.block(&x, cin, w, s);
            cin = w;
        }
        let x = b.node("GlobalAveragePool", &[&x], vec![]);
        let x = b.node("Flatten", &[&x], vec![]);
        b.init("fc_w", &[3, 8]);
        b.init("fc_b", &[3]);
        let trans_b = AttributeProto {
            name: "transB".into(),
            i: 1,
            ..Default::default()
        };
        let y = b.node("Gemm", &[&x, "fc_w", "fc_b"], vec![trans_b]);
        b.g.output.push(ValueInfoProto {
            name: y,
            ..Default::default()
        });
        b.g
    }

    fn phases(
        g: &GraphProto,
    ) -> Result<(ResNetGraph, ResNetConfig, NamedWeights, usize), ModelError> {
        let w = Walker {
            g: Graph::new(Path::new("tiny.onnx"), g),
        };
        let info = OnnxInfo {
            producer: String::new(),
            opset: 17,
            ir_version: 8,
            input_name: "x".into(),
            input_shape: Vec::new(),
        };
        let m = match_graph(&w, &info)?;
        let config = infer_config(&w, &m)?;
        let (weights, folded, stored) = extract_weights(Path::new("tiny.onnx"), &w, &m, &config)?;
        assert!(!folded);
        Ok((m, config, weights, stored))
    }

    #[test]
    fn match_graph_names_every_part() {
        let (m, ..) = phases(&tiny([1, 2, 2, 2])).unwrap();
        assert_eq!(
            (m.stem.kernel, m.stem.stride, m.stem.out_channels),
            (7, 2, 4)
        );
        assert_eq!(m.pool_pads, [1; 4]);
        assert_eq!(m.blocks.len(), 4);
        let shortcuts: Vec<bool> = m.blocks.iter().map(|b| b.downsample.is_some()).collect();
        // Every stride-2 block projects its shortcut.
        assert_eq!(shortcuts, [false, true, true, true]);
        assert_eq!(m.final_pool_window, None);
        let fc = m.fc.unwrap();
        assert_eq!((fc.weight.as_str(), fc.transposed), ("fc_w", true));
        assert_eq!(fc.bias.as_deref(), Some("fc_b"));
    }

    #[test]
    fn infer_config_reads_the_architecture() {
        let (_, c, ..) = phases(&tiny([1, 2, 2, 2])).unwrap();
        assert_eq!(c.block, BlockKind::Basic);
        assert_eq!(c.layers, [1, 1, 1, 1]);
        assert_eq!(c.widths, [4, 8, 8, 8]);
        assert_eq!(c.stem_width, 4);
        assert_eq!(c.num_classes, Some(3));
        assert_eq!(c.padding, PaddingStyle::Symmetric);
        // A block of stride 3 is no ResNet stage.
        let e = phases(&tiny([1, 3, 2, 2])).err().unwrap().to_string();
        assert!(e.contains("stride 3"), "{e}");
        // Three stride-2 blocks are needed for four stages.
        let e = phases(&tiny([1, 1, 2, 2])).err().unwrap().to_string();
        assert!(e.contains("found 3 stages"), "{e}");
    }

    #[test]
    fn extract_weights_uses_the_module_paths_of_resnet_rs() {
        let (_, _, weights, stored) = phases(&tiny([1, 2, 2, 2])).unwrap();
        let ds = ConvSite::Downsample { stage: 1, block: 0 };
        assert_eq!(weights[&format!("{}.weight", ds.conv())].dims, [8, 4, 1, 1]);
        assert_eq!(weights[&format!("{}.running_var", ds.bn())].dims, [8]);
        let c2 = ConvSite::Main {
            stage: 3,
            block: 0,
            conv: 1,
        };
        assert_eq!(weights[&format!("{}.weight", c2.conv())].dims, [8, 8, 3, 3]);
        // Gemm with transB: Burn's Linear stores [in, out], transposed.
        let fc = &weights["fc.weight"];
        assert_eq!(fc.dims, [8, 3]);
        assert_eq!(
            fc.values[1],
            0.5 + 8.0 * 1e-3,
            "row 1 of [in, out] is column 1 of [out, in]"
        );
        // 12 convolutions (stem, 2 per block, 3 shortcuts) with their
        // BatchNorm (4 tensors each), and fc.
        let convs = 1 + 2 * 4 + 3;
        assert_eq!(weights.len(), convs * 5 + 2);
        assert_eq!(
            stored,
            weights.values().map(|e| e.values.len()).sum::<usize>()
        );
    }
}
