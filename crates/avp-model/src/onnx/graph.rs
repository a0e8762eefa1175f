//! A read-only view of a decoded ONNX graph: constants by name, consumers
//! of every value, node attributes, and tensor data converted to `f32`
//! with every size checked before anything is allocated.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::proto::{AttributeProto, GraphProto, NodeProto, TensorProto, data_type_name};
use crate::error::ModelError;

/// Largest tensor we accept (elements); far above any ResNet layer, far
/// below what would exhaust memory.
const MAX_ELEMENTS: u64 = 1 << 31;

/// A graph with lookup tables.
pub(crate) struct Graph<'a> {
    pub path: &'a Path,
    pub nodes: &'a [NodeProto],
    consts: HashMap<&'a str, &'a TensorProto>,
    consumers: HashMap<&'a str, Vec<usize>>,
    pub outputs: Vec<&'a str>,
}

impl<'a> Graph<'a> {
    pub fn new(path: &'a Path, g: &'a GraphProto) -> Self {
        let mut consts: HashMap<&str, &TensorProto> = HashMap::new();
        for t in &g.initializer {
            consts.insert(t.name.as_str(), t);
        }
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            if n.op_type == "Constant"
                && let (Some(out), Some(t)) = (
                    n.output.first(),
                    attr(n, "value").and_then(|a| a.t.as_ref()),
                )
            {
                consts.insert(out.as_str(), t);
            }
            for input in &n.input {
                if !input.is_empty() {
                    consumers.entry(input.as_str()).or_default().push(i);
                }
            }
        }
        // Exporters deduplicate equal initializers and hand the copies out
        // through `Identity` nodes (torch.onnx does for equal folded
        // biases): such an output is the same constant.
        for _ in 0..g.node.len() {
            let mut changed = false;
            for n in &g.node {
                if n.op_type == "Identity"
                    && let (Some(i), Some(o)) = (n.input.first(), n.output.first())
                    && !consts.contains_key(o.as_str())
                    && let Some(t) = consts.get(i.as_str()).copied()
                {
                    consts.insert(o.as_str(), t);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        Graph {
            path,
            nodes: &g.node,
            consts,
            consumers,
            outputs: g.output.iter().map(|o| o.name.as_str()).collect(),
        }
    }

    pub fn is_const(&self, name: &str) -> bool {
        self.consts.contains_key(name)
    }

    pub fn constant(&self, name: &str) -> Option<&'a TensorProto> {
        self.consts.get(name).copied()
    }

    /// Node indices that read `value`.
    pub fn consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A human-readable reference to node `i`, for error messages.
    pub fn describe(&self, i: usize) -> String {
        let n = &self.nodes[i];
        if n.name.is_empty() {
            format!("node #{i} ({})", n.op_type)
        } else {
            format!("node `{}` ({})", n.name, n.op_type)
        }
    }

    pub fn not_resnet(&self, why: impl Into<String>) -> ModelError {
        ModelError::NotResNet {
            path: self.path.to_path_buf(),
            why: why.into(),
        }
    }

    /// The data of constant `name` as `f32`, with its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let t = self.constant(name).ok_or_else(|| {
            self.not_resnet(format!(
                "`{name}` should be a constant (weights) but is computed"
            ))
        })?;
        tensor_to_f32(self.path, t)
    }

    /// Shape of constant `name` without converting its data.
    pub fn const_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.constant(name)
            .map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect())
    }
}

/// Attribute `name` of a node.
pub(crate) fn attr<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Integer-list attribute.
pub(crate) fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// Integer attribute.
pub(crate) fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    attr(node, name).map(|a| a.i)
}

/// Float attribute.
pub(crate) fn attr_float(node: &NodeProto, name: &str) -> Option<f32> {
    attr(node, name).map(|a| a.f)
}

fn corrupt(path: &Path, tensor: &str, why: String) -> ModelError {
    ModelError::CorruptTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        why,
    }
}

/// Converts a tensor to `f32` (FLOAT, DOUBLE and FLOAT16 are accepted),
/// checking that its stored size matches its declared shape before
/// allocating the output.
pub(crate) fn tensor_to_f32(
    path: &Path,
    t: &TensorProto,
) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    let mut numel: u64 = 1;
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(corrupt(path, &t.name, format!("negative dimension {d}")));
        }
        numel = numel
            .checked_mul(d as u64)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                corrupt(
                    path,
                    &t.name,
                    format!("declared shape {:?} is too large", t.dims),
                )
            })?;
        dims.push(d as usize);
    }
    let n = numel as usize;
    let elem = match t.data_type {
        1 => 4,
        11 => 8,
        10 => 2,
        other => {
            return Err(ModelError::DataType {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                dtype: data_type_name(other).to_string(),
            });
        }
    };
    let raw: Option<Vec<u8>> = if t.data_location == 1 {
        Some(read_external(path, t, n * elem)?)
    } else if !t.raw_data.is_empty() {
        if t.raw_data.len() != n * elem {
            return Err(corrupt(
                path,
                &t.name,
                format!(
                    "shape {:?} needs {} bytes but {} are stored",
                    t.dims,
                    n * elem,
                    t.raw_data.len()
                ),
            ));
        }
        None
    } else {
        None
    };
    let bytes: Option<&[u8]> = raw
        .as_deref()
        .or((!t.raw_data.is_empty()).then_some(&t.raw_data[..]));
    let values: Vec<f32> = match (t.data_type, bytes) {
        (1, Some(b)) => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        (11, Some(b)) => b
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        (10, Some(b)) => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        (1, None) => t.float_data.clone(),
        (11, None) => t.double_data.iter().map(|&v| v as f32).collect(),
        (10, None) => t
            .int32_data
            .iter()
            .map(|&v| half::f16::from_bits(v as u16).to_f32())
            .collect(),
        _ => Vec::new(),
    };
    if values.len() != n {
        return Err(corrupt(
            path,
            &t.name,
            format!(
                "shape {:?} needs {n} values but {} are stored",
                t.dims,
                values.len()
            ),
        ));
    }
    Ok((dims, values))
}

/// Reads a tensor's external data, checking the file's size before
/// allocating.
fn read_external(path: &Path, t: &TensorProto, expected: usize) -> Result<Vec<u8>, ModelError> {
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let location = get("location").unwrap_or("");
    let ext_err = |external: PathBuf, why: String| ModelError::ExternalData {
        path: path.to_path_buf(),
        tensor: t.name.clone(),
        external,
        why,
    };
    let rel = Path::new(location);
    if location.is_empty()
        || rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ext_err(
            rel.to_path_buf(),
            "is not a plain relative file name".into(),
        ));
    }
    let file = path.parent().unwrap_or(Path::new(".")).join(rel);
    let parse = |k: &str| -> Result<Option<u64>, ModelError> {
        get(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ext_err(file.clone(), format!("has a bad {k} `{v}`")))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?.unwrap_or(expected as u64);
    if length != expected as u64 {
        return Err(ext_err(
            file,
            format!("is declared to hold {length} bytes where the shape needs {expected}"),
        ));
    }
    let mut f = std::fs::File::open(&file).map_err(|e| {
        ext_err(
            file.clone(),
            format!("cannot be opened ({e}); keep it next to the .onnx file"),
        )
    })?;
    let size = f
        .metadata()
        .map_err(|e| ext_err(file.clone(), format!("cannot be read ({e})")))?
        .len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(ext_err(
            file,
            format!("is too short: {size} bytes, needs {length} at offset {offset}"),
        ));
    }
    let mut buf = vec![0u8; expected];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| ext_err(file.clone(), format!("cannot be read ({e})")))?;
    Ok(buf)
}
