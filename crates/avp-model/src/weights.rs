//! Loading a ResNet from any weights file we know (ONNX, PyTorch state
//! dict, safetensors, Burn's native burnpack), with typed provenance: where
//! the weights came from, in which format, their SHA-256, the architecture
//! they fill, and the input normalization they expect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::store::{ModuleSnapshot, PytorchStore, SafetensorsStore};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ModelError;
use crate::fill::fill;
use crate::normalization::{Normalization, NormalizationSource};
use crate::onnx;
use crate::resnet::{BlockKind, ConvSite, ResNet, ResNetConfig};

/// The file formats [`load_weights`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// ONNX (`.onnx`), imported by graph structure.
    Onnx,
    /// A PyTorch state dict (`.pth`, `.pt`) with torchvision's key names.
    Pytorch,
    /// safetensors with torchvision's key names.
    Safetensors,
    /// Burn's native burnpack (`.bpk`), as written by [`save_native`].
    Burnpack,
}

impl WeightFormat {
    /// The format a file name's extension stands for.
    pub fn from_path(path: &Path) -> Result<Self, ModelError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match ext.as_str() {
            "onnx" => Ok(Self::Onnx),
            "pth" | "pt" | "bin" | "ckpt" => Ok(Self::Pytorch),
            "safetensors" => Ok(Self::Safetensors),
            "bpk" => Ok(Self::Burnpack),
            _ => Err(ModelError::UnknownFormat {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// A known weights file, from `crates/avp-model/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownWeights {
    /// Short name (`mlnet-resnet18`, `torchvision-resnet50`).
    pub name: String,
    /// What the file is and who made it.
    pub source: String,
    /// Licence.
    pub licence: String,
    /// Where to get it (a path in this repository or a URL).
    pub location: String,
    /// Full SHA-256, when known.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The leading hex digits of the SHA-256 that torchvision puts in its
    /// file names, when the full hash is not recorded.
    #[serde(default)]
    pub sha256_prefix: Option<String>,
    /// Architecture in words.
    pub architecture: String,
    /// ImageNet top-1 accuracy (%) as published by the source, if any.
    #[serde(default)]
    pub imagenet_top1: Option<f32>,
    /// Input normalization.
    pub normalization: Normalization,
}

#[derive(Deserialize)]
struct Manifest {
    weights: Vec<KnownWeights>,
}

/// The weights manifest shipped with the crate (`manifest.json`, inside the crate so that it packages).
pub fn manifest() -> Vec<KnownWeights> {
    // The manifest is ours and checked by a test: parsing cannot fail at run
    // time unless the crate itself was built from a broken tree.
    serde_json::from_str::<Manifest>(include_str!("../manifest.json"))
        .map(|m| m.weights)
        .unwrap_or_default()
}

/// The manifest entry whose hash matches `sha256` (full or prefix).
pub fn lookup_manifest(sha256: &str) -> Option<KnownWeights> {
    manifest().into_iter().find(|k| {
        k.sha256.as_deref() == Some(sha256)
            || k.sha256_prefix
                .as_deref()
                .is_some_and(|p| !p.is_empty() && sha256.starts_with(p))
    })
}

/// Where a loaded model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The file that was read.
    pub path: PathBuf,
    /// Its format.
    pub format: WeightFormat,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// The architecture, in words.
    pub architecture: String,
    /// Producer (ONNX `producer_name producer_version`), when the file says.
    pub producer: Option<String>,
    /// ONNX opset, when relevant.
    pub opset: Option<i64>,
    /// Whether BatchNorm had been folded into the convolutions in the file.
    pub folded_batchnorm: bool,
    /// Number of values stored in the file's weight tensors.
    pub stored_values: usize,
    /// The manifest entry the hash matched, if any.
    pub known: Option<KnownWeights>,
    /// For a file converted by [`save_native`]: the provenance of the
    /// original.
    pub converted_from: Option<Box<Provenance>>,
}

impl Provenance {
    /// The provenance of a network made in memory (a random
    /// initialisation, a test), read from no file.
    pub fn in_memory(architecture: impl Into<String>) -> Self {
        Self {
            path: PathBuf::new(),
            format: WeightFormat::Burnpack,
            sha256: String::new(),
            architecture: architecture.into(),
            producer: None,
            opset: None,
            folded_batchnorm: false,
            stored_values: 0,
            known: None,
            converted_from: None,
        }
    }
}

/// A loaded network with everything needed to feed it correctly.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: ResNet,
    /// Its architecture.
    pub config: ResNetConfig,
    /// Where it came from.
    pub provenance: Provenance,
    /// The input normalization it expects.
    pub normalization: Normalization,
}

/// Options for [`load_weights`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A companion preprocessing ONNX file that defines the normalization.
    pub prep: Option<PathBuf>,
    /// An explicit normalization (wins over everything else).
    pub normalization: Option<Normalization>,
    /// For state dicts, which do not record strides or padding: the
    /// architecture to fill (inferred from the keys with torchvision's
    /// conventions otherwise).
    pub config: Option<ResNetConfig>,
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn store_err(path: &Path, why: impl std::fmt::Display) -> ModelError {
    ModelError::Store {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Loads any supported weights file onto `device`.
pub fn load_weights(
    path: &Path,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedModel, ModelError> {
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    if path.is_dir() {
        let hint = if path.join("model.bpk").is_file() {
            format!(
                "; it holds a trained model, {}, which `classify --model` and `load_model` read",
                path.join("model.bpk").display()
            )
        } else {
            String::new()
        };
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                format!(
                    "this is a folder, not a weights file: pass the file itself (.onnx, .pth/.pt, .safetensors or .bpk){hint}"
                ),
            ),
        });
    }
    let format = WeightFormat::from_path(path)?;
    let (model, config, mut provenance, file_norm) = match format {
        WeightFormat::Onnx => load_onnx(path, device)?,
        WeightFormat::Pytorch | WeightFormat::Safetensors => {
            load_state_dict(path, format, device, options.config.clone())?
        }
        WeightFormat::Burnpack => load_native(path, device)?,
    };
    provenance.known = lookup_manifest(&provenance.sha256);
    let normalization = match (&options.normalization, &options.prep) {
        (Some(n), _) => n.clone().with_source(NormalizationSource::Explicit),
        (None, Some(prep)) => crate::onnx::read_prep_onnx(prep)?,
        (None, None) => match (&provenance.known, file_norm) {
            (Some(k), _) => k
                .normalization
                .clone()
                .with_source(NormalizationSource::Manifest(k.name.clone())),
            (None, Some(n)) => n,
            (None, None) => Normalization::imagenet().with_source(NormalizationSource::Assumed),
        },
    };
    Ok(LoadedModel {
        model,
        config,
        provenance,
        normalization,
    })
}

type Loaded = (ResNet, ResNetConfig, Provenance, Option<Normalization>);

fn load_onnx(path: &Path, device: &Device) -> Result<Loaded, ModelError> {
    let bytes = read(path)?;
    let sha256 = sha256_hex(&bytes);
    let imported = onnx::import_resnet_bytes(path, &bytes)?;
    drop(bytes);
    let config = imported.config.clone();
    let model = fill(config.init(device), imported.weights, path)?;
    let from_pytorch = imported.info.producer.starts_with("pytorch");
    let provenance = Provenance {
        path: path.to_path_buf(),
        format: WeightFormat::Onnx,
        sha256,
        architecture: config.describe(),
        producer: Some(imported.info.producer.clone()).filter(|p| !p.is_empty()),
        opset: Some(imported.info.opset),
        folded_batchnorm: imported.folded_batchnorm,
        stored_values: imported.stored_values,
        known: None,
        converted_from: None,
    };
    let norm = from_pytorch.then(Normalization::imagenet);
    Ok((model, config, provenance, norm))
}

/// Infers a torchvision ResNet configuration from state-dict keys and shapes.
pub fn config_from_state_dict(
    shapes: &BTreeMap<String, Vec<usize>>,
    path: &Path,
) -> Result<ResNetConfig, ModelError> {
    let shape = |k: &str| shapes.get(k).cloned();
    let stem = shape("conv1.weight").ok_or_else(|| {
        store_err(
            path,
            format!(
                "no `conv1.weight`: not a torchvision ResNet state dict (keys start with {})",
                shapes
                    .keys()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let [stem_width, 3, k, _] = stem[..] else {
        return Err(store_err(
            path,
            format!("conv1.weight has shape {stem:?}, expected [C, 3, k, k]"),
        ));
    };
    let bottleneck = shapes.keys().any(|k| k.ends_with(".conv3.weight"));
    let mut layers = [0usize; 4];
    let mut widths = [0usize; 4];
    for s in 0..4 {
        let prefix = format!("{}.", ConvSite::stage(s));
        let max_block = shapes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max();
        let Some(max_block) = max_block else {
            return Err(store_err(
                path,
                format!("no blocks in {}", ConvSite::stage(s)),
            ));
        };
        layers[s] = max_block + 1;
        let first = ConvSite::Main {
            stage: s,
            block: 0,
            conv: 0,
        }
        .conv();
        let w = shape(&format!("{first}.weight"))
            .ok_or_else(|| store_err(path, format!("missing {first}.weight")))?;
        widths[s] = w[0];
    }
    let num_classes = shape("fc.weight").map(|s| s[0]);
    let block = if bottleneck {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let config = ResNetConfig::new(block, layers)
        .with_widths(widths)
        .with_stem_width(stem_width)
        .with_stem_kernel(k)
        .with_num_classes(num_classes);
    config.validate()?;
    Ok(config)
}

fn load_state_dict(
    path: &Path,
    format: WeightFormat,
    device: &Device,
    config: Option<ResNetConfig>,
) -> Result<Loaded, ModelError> {
    let bytes = read(path)?;
    let sha256 = sha256_hex(&bytes);
    let shapes: BTreeMap<String, Vec<usize>> = match format {
        WeightFormat::Pytorch => {
            use burn::store::pytorch::PytorchReader;
            let reader = PytorchReader::new(path)
                .or_else(|_| PytorchReader::with_top_level_key(path, "state_dict"))
                .map_err(|e| store_err(path, format!("not a readable PyTorch checkpoint: {e}")))?;
            reader
                .tensors()
                .iter()
                .map(|(k, t)| (k.clone(), t.shape().to_vec()))
                .collect()
        }
        _ => {
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| store_err(path, format!("not a readable safetensors file: {e}")))?;
            st.tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec()))
                .collect()
        }
    };
    drop(bytes);
    let config = match config {
        Some(c) => c,
        None => config_from_state_dict(&shapes, path)?,
    };
    config.validate()?;
    let mut model = config.init(device);
    let stored_values = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    let remaps = [
        (r"(.*)\.downsample\.0\.(.*)", "$1.downsample.conv.$2"),
        (r"(.*)\.downsample\.1\.(.*)", "$1.downsample.bn.$2"),
    ];
    let result = match format {
        WeightFormat::Pytorch => {
            let mut store = PytorchStore::from_file(path).allow_partial(true);
            for (from, to) in remaps {
                store = store.with_key_remapping(from, to);
            }
            model
                .load_from(&mut store)
                .map_err(|e| store_err(path, e))?
        }
        _ => {
            let mut store = SafetensorsStore::from_file(path)
                .with_from_adapter(burn::store::PyTorchToBurnAdapter)
                .allow_partial(true);
            for (from, to) in remaps {
                store = store.with_key_remapping(from, to);
            }
            model
                .load_from(&mut store)
                .map_err(|e| store_err(path, e))?
        }
    };
    crate::pack::check_apply(path, &result, |k| k.ends_with("num_batches_tracked"))?;
    let provenance = Provenance {
        path: path.to_path_buf(),
        format,
        sha256,
        architecture: config.describe(),
        producer: None,
        opset: None,
        folded_batchnorm: false,
        stored_values,
        known: None,
        converted_from: None,
    };
    Ok((model, config, provenance, Some(Normalization::imagenet())))
}

const META_CONFIG: &str = "avp.resnet_config";
const META_NORMALIZATION: &str = "avp.normalization";
const META_PROVENANCE: &str = "avp.provenance";

/// Saves a model in Burn's native burnpack format, with its architecture,
/// normalization and provenance as metadata, so that [`load_weights`]
/// reloads it without the original file.
pub fn save_native(
    model: &ResNet,
    config: &ResNetConfig,
    normalization: &Normalization,
    provenance: &Provenance,
    path: &Path,
) -> Result<(), ModelError> {
    let json = |v: serde_json::Result<String>| v.map_err(|e| store_err(path, e));
    let metadata = [
        (META_CONFIG, json(serde_json::to_string(config))?),
        (
            META_NORMALIZATION,
            json(serde_json::to_string(normalization))?,
        ),
        (META_PROVENANCE, json(serde_json::to_string(provenance))?),
    ];
    crate::pack::save(model, &metadata, path)
}

/// Writes `model` as a PyTorch state dict in safetensors, with
/// torchvision's names (`layer2.0.downsample.0.weight`, `bn1.running_var`)
/// and PyTorch's layouts, atomically: what `load_state_dict` of a
/// torchvision ResNet with the same blocks takes (with `strict=False` for a
/// headless network, which has no `fc`, and for `num_batches_tracked`,
/// which avp does not keep). [`load_weights`] reads it back.
pub fn save_torchvision(model: &ResNet, path: &Path) -> Result<(), ModelError> {
    crate::atomic::write_with(path, |partial| {
        let mut store = SafetensorsStore::from_file(partial)
            .with_to_adapter(burn::store::BurnToPyTorchAdapter)
            .with_key_remapping(r"(.*)\.downsample\.conv\.(.*)", "$1.downsample.0.$2")
            .with_key_remapping(r"(.*)\.downsample\.bn\.(.*)", "$1.downsample.1.$2");
        model
            .save_into(&mut store)
            .map_err(|e| store_err(path, format!("cannot write: {e}")))
    })
}

fn load_native(path: &Path, device: &Device) -> Result<Loaded, ModelError> {
    let bytes = read(path)?;
    let sha256 = sha256_hex(&bytes);
    drop(bytes);
    let meta = crate::pack::metadata(path)?;
    let config: ResNetConfig = crate::pack::meta(path, &meta, META_CONFIG, "architecture")?;
    let normalization: Normalization =
        crate::pack::meta(path, &meta, META_NORMALIZATION, "normalization")?;
    let original: Option<Provenance> = meta
        .get(META_PROVENANCE)
        .and_then(|p| serde_json::from_str(p).ok());
    config.validate()?;
    let model = crate::pack::load(config.init(device), path)?;
    let provenance = Provenance {
        path: path.to_path_buf(),
        format: WeightFormat::Burnpack,
        sha256,
        architecture: config.describe(),
        producer: original.as_ref().and_then(|p| p.producer.clone()),
        opset: None,
        folded_batchnorm: original.as_ref().is_some_and(|p| p.folded_batchnorm),
        stored_values: original.as_ref().map_or(0, |p| p.stored_values),
        known: None,
        converted_from: original.map(Box::new),
    };
    Ok((model, config, provenance, Some(normalization)))
}
