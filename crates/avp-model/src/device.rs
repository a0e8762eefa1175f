//! Turning a backend name (`flex`, `ndarray`, `wgpu`, `vulkan`, `cuda`,
//! `cuda:N`) into a Burn [`Device`], with an error that says which Cargo
//! feature to enable when the backend was not compiled in.

use burn::tensor::Device;

use crate::error::ModelError;

/// The backend names [`parse_device`] accepts.
pub const DEVICE_NAMES: &[&str] = &["flex", "ndarray", "wgpu", "vulkan", "cuda", "cuda:N"];

/// The backends compiled into this build, for help texts.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "flex") {
        v.push("flex");
    }
    if cfg!(feature = "ndarray") {
        v.push("ndarray");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "vulkan") {
        v.push("vulkan");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

fn not_compiled(name: &str, feature: &str) -> ModelError {
    ModelError::Device(format!(
        "backend `{name}` is not compiled into this build; rebuild with `--features {feature}` \
         (compiled here: {})",
        compiled_backends().join(", ")
    ))
}

/// Parses a backend name into a device. Names are case-insensitive;
/// `cuda:N` selects GPU `N`.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    let lower = name.trim().to_ascii_lowercase();
    let (base, index) = match lower.split_once(':') {
        Some((b, i)) => {
            let idx: usize = i.parse().map_err(|_| {
                ModelError::Device(format!(
                    "device `{name}`: `{i}` is not a device index (expected e.g. cuda:0)"
                ))
            })?;
            (b, Some(idx))
        }
        None => (lower.as_str(), None),
    };
    if index.is_some() && base != "cuda" {
        return Err(ModelError::Device(format!(
            "device `{name}`: only cuda takes an index (cuda:N)"
        )));
    }
    match base {
        "flex" => flex(),
        "ndarray" => ndarray(),
        "wgpu" => wgpu(),
        "vulkan" => vulkan(),
        "cuda" => cuda(index.unwrap_or(0)),
        _ => Err(ModelError::Device(format!(
            "unknown device `{name}`; expected one of {}",
            DEVICE_NAMES.join(", ")
        ))),
    }
}

fn flex() -> Result<Device, ModelError> {
    #[cfg(feature = "flex")]
    return Ok(Device::flex());
    #[allow(unreachable_code)]
    Err(not_compiled("flex", "flex"))
}

fn ndarray() -> Result<Device, ModelError> {
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    return Ok(Device::ndarray());
    #[allow(unreachable_code)]
    Err(not_compiled("ndarray", "ndarray"))
}

fn wgpu() -> Result<Device, ModelError> {
    #[cfg(feature = "wgpu")]
    return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
    #[allow(unreachable_code)]
    Err(not_compiled("wgpu", "wgpu"))
}

fn vulkan() -> Result<Device, ModelError> {
    #[cfg(feature = "vulkan")]
    return Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice));
    #[allow(unreachable_code)]
    Err(not_compiled("vulkan", "vulkan"))
}

#[allow(unused_variables)]
fn cuda(index: usize) -> Result<Device, ModelError> {
    #[cfg(feature = "cuda")]
    return Ok(Device::cuda(index));
    #[allow(unreachable_code)]
    Err(not_compiled("cuda", "cuda"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flex_parses() {
        assert!(parse_device("flex").is_ok());
        assert!(parse_device(" FLEX ").is_ok());
    }

    #[test]
    fn unknown_and_malformed_names_are_explained() {
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(
            e.contains("unknown device `tpu`") && e.contains("flex"),
            "{e}"
        );
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("not a device index"), "{e}");
        let e = parse_device("flex:1").unwrap_err().to_string();
        assert!(e.contains("only cuda takes an index"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backend_names_the_feature() {
        let e = parse_device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(e.contains("not compiled"), "{e}");
    }
}
