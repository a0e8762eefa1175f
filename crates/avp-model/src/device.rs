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

/// Whether `device` is the flex CPU device (the one device the fused
/// path serves).
pub fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// The adapter a wgpu or vulkan device runs on, for a line the programs
/// print: its name, and a warning when it is no graphics card (a CPU
/// fallback such as Mesa's llvmpipe, tens of times slower than flex).
/// `None` for the other backends.
pub fn device_report(name: &str) -> Option<String> {
    let lower = name.trim().to_ascii_lowercase();
    match lower.as_str() {
        "wgpu" | "vulkan" => adapter_report(lower == "vulkan"),
        _ => None,
    }
}

#[cfg(feature = "wgpu")]
fn adapter_report(vulkan: bool) -> Option<String> {
    use cubecl::wgpu::{WgpuBackend, WgpuDevice, WgpuDeviceKind, WgpuRuntime};
    use cubecl_runtime::runtime::Runtime;
    let backend = if vulkan {
        WgpuBackend::Vulkan
    } else {
        WgpuBackend::Auto
    };
    // The device Burn's `Device::wgpu(DeviceKind::DefaultDevice)` opens;
    // opening it here starts the server Burn then uses. No adapter at all
    // makes cubecl panic: that becomes a line too.
    let device = WgpuDevice::new(WgpuDeviceKind::DefaultDevice).on(backend);
    let identity = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        <WgpuRuntime as Runtime>::client(&device)
            .properties()
            .identity
            .clone()
    }));
    let api = if vulkan { "vulkan" } else { "wgpu" };
    Some(match identity {
        Ok(id) if id.physical.is_none() => format!(
            "{api}: running on {}, which is not a graphics card but a software or CPU fallback: \
             expect it to be much slower than --device flex",
            id.name
        ),
        Ok(id) => format!("{api}: running on {}", id.name),
        Err(_) => format!(
            "{api}: no adapter could be opened (is a Vulkan, Metal or DX12 driver installed?)"
        ),
    })
}

#[cfg(not(feature = "wgpu"))]
fn adapter_report(_vulkan: bool) -> Option<String> {
    None
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

/// Needs a Vulkan device: CI installs Mesa's lavapipe, a CPU fallback,
/// which must be named and warned about.
#[cfg(all(test, feature = "wgpu"))]
mod adapter_tests {
    #[test]
    #[ignore = "needs a Vulkan device (CI: Mesa's lavapipe)"]
    fn the_wgpu_adapter_is_named_and_a_cpu_fallback_is_warned_about() {
        let line = super::device_report("wgpu").unwrap_or_default();
        assert!(line.starts_with("wgpu: running on "), "{line}");
        if line.contains("llvmpipe") {
            assert!(line.contains("not a graphics card"), "{line}");
        }
        assert_eq!(super::device_report("flex"), None);
    }
}
