//! Where avp keeps files it can make again (downloaded weights, converted
//! weights, cached features).

use std::path::PathBuf;

/// The cache folder: `$AVP_CACHE_DIR` when set, else `$XDG_CACHE_HOME/avp`,
/// else `.cache/avp` in the user's home folder (`std::env::home_dir`, which
/// also finds it on Windows, where `$HOME` is usually unset), else
/// `.avp-cache` in the working directory.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("AVP_CACHE_DIR") {
        return d;
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return d.join("avp");
    }
    if let Some(h) = std::env::home_dir().filter(|h| !h.as_os_str().is_empty()) {
        return h.join(".cache").join("avp");
    }
    PathBuf::from(".avp-cache")
}
