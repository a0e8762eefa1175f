//! Filling a freshly built module from tensors keyed by module path,
//! checking every shape and that nothing is missing or left over.

use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};

use crate::error::ModelError;
use crate::onnx::NamedWeights;

struct Filler<'a> {
    path: Vec<String>,
    weights: &'a mut NamedWeights,
    file: &'a Path,
    error: Option<ModelError>,
    missing: Vec<String>,
}

impl ModuleMapper for Filler<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let key = self.path.join(".");
        let Some(entry) = self.weights.remove(&key) else {
            self.missing.push(key);
            return param;
        };
        let expected: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        if entry.dims != expected {
            self.error = Some(ModelError::Shape {
                path: self.file.to_path_buf(),
                layer: format!("{key} (source `{}`)", entry.source),
                expected,
                found: entry.dims,
            });
            return param;
        }
        let device = param.lazy_device();
        let tensor = Tensor::<D>::from_data(TensorData::new(entry.values, entry.dims), &device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Moves every tensor of `weights` into `module`; errors name the first
/// mismatching layer, or list the missing and unused ones.
pub fn fill<M: Module>(module: M, mut weights: NamedWeights, file: &Path) -> Result<M, ModelError> {
    let mut filler = Filler {
        path: Vec::new(),
        weights: &mut weights,
        file,
        error: None,
        missing: Vec::new(),
    };
    let module = module.map(&mut filler);
    if let Some(e) = filler.error {
        return Err(e);
    }
    if !filler.missing.is_empty() {
        return Err(ModelError::Store {
            path: file.to_path_buf(),
            why: format!("no weights for {}", filler.missing.join(", ")),
        });
    }
    if !weights.is_empty() {
        return Err(ModelError::Store {
            path: file.to_path_buf(),
            why: format!(
                "weights that fit no layer: {}",
                weights.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(module)
}
