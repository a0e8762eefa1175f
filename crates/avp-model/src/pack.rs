//! Burnpack files with avp's metadata, in one place, for converted weights
//! (`save_native`) and trained models (`model.bpk`): written whole or not
//! at all ([`crate::atomic`]), metadata read back before any tensor, and
//! one rule when a module is loaded: every parameter of the module must be
//! in the file and every tensor of the file must be used (a file that
//! holds more than the module is another model).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::store::{BurnpackStore, ModuleSnapshot};

use crate::error::ModelError;

fn store_err(path: &Path, why: impl std::fmt::Display) -> ModelError {
    ModelError::Store {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Writes `module` with `metadata` (key, JSON text) to `path`, atomically.
pub fn save<M: Module>(
    module: &M,
    metadata: &[(&str, String)],
    path: &Path,
) -> Result<(), ModelError> {
    crate::atomic::write_with(path, |partial| {
        let mut store = BurnpackStore::from_file(partial)
            .overwrite(true)
            .auto_extension(false);
        for (k, v) in metadata {
            store = store.metadata(*k, v.clone());
        }
        module
            .save_into(&mut store)
            .map_err(|e| store_err(path, format!("cannot write: {e}")))
    })
}

/// The metadata of a burnpack file, without reading its tensors.
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let reader = burn_pack::Reader::from_file(path)
        .map_err(|e| store_err(path, format!("not a readable burnpack file: {e}")))?;
    Ok(reader
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// One metadata entry parsed from JSON; `what` names it in errors.
pub fn meta<T: serde::de::DeserializeOwned>(
    path: &Path,
    meta: &BTreeMap<String, String>,
    key: &str,
    what: &str,
) -> Result<T, ModelError> {
    let text = meta.get(key).ok_or_else(|| {
        store_err(
            path,
            format!("no `{key}` metadata: not a file written by avp ({what} missing)"),
        )
    })?;
    serde_json::from_str(text).map_err(|e| store_err(path, format!("bad {what} metadata: {e}")))
}

/// Loads the tensors of `path` into `module`, under the one rule of the
/// module header.
pub fn load<M: Module>(mut module: M, path: &Path) -> Result<M, ModelError> {
    let mut store = BurnpackStore::from_file(path).auto_extension(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| store_err(path, e))?;
    check_apply(path, &result, |_| false)?;
    Ok(module)
}

/// Turns burn-store's report into an error when anything did not fit.
/// `ignorable` names file tensors that may go unused (PyTorch's
/// `num_batches_tracked` counters, in state dicts).
pub(crate) fn check_apply(
    path: &Path,
    r: &burn::store::ApplyResult,
    ignorable: impl Fn(&str) -> bool,
) -> Result<(), ModelError> {
    if let Some(e) = r.errors.first() {
        return Err(store_err(path, format!("{e:?}")));
    }
    let unused: Vec<&String> = r.unused.iter().filter(|k| !ignorable(k)).collect();
    if !r.missing.is_empty() || !unused.is_empty() {
        let missing: Vec<&str> = r.missing.iter().map(|(p, _)| p.as_str()).collect();
        return Err(store_err(
            path,
            format!("weights do not fit the architecture: missing {missing:?}, unused {unused:?}"),
        ));
    }
    Ok(())
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::resnet::{BlockKind, ResNetConfig};
    use burn::tensor::Device;

    #[test]
    fn metadata_round_trips_and_extra_or_missing_tensors_are_refused() {
        let dir = std::env::temp_dir().join(format!("avp-pack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let device = Device::flex();
        let cfg = ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1])
            .with_widths([4, 4, 4, 4])
            .with_stem_width(4)
            .with_num_classes(None);
        let with_fc = cfg.clone().with_num_classes(Some(3));
        let path = dir.join("a.bpk");
        save(
            &with_fc.init(&device),
            &[("avp.test", "\"x\"".into())],
            &path,
        )
        .unwrap();
        let m = metadata(&path).unwrap();
        assert_eq!(meta::<String>(&path, &m, "avp.test", "test").unwrap(), "x");
        let e = meta::<String>(&path, &m, "avp.none", "thing").unwrap_err();
        assert!(e.to_string().contains("thing missing"), "{e}");
        // The same architecture loads.
        assert!(load(with_fc.init(&device), &path).is_ok());
        // A headless module leaves the file's fc unused: refused.
        let e = load(cfg.init(&device), &path).unwrap_err().to_string();
        assert!(e.contains("unused") && e.contains("fc"), "{e}");
        // A module with more parameters than the file: refused.
        let wider = cfg.clone().with_num_classes(Some(3)).with_stem_width(8);
        assert!(load(wider.init(&device), &path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
