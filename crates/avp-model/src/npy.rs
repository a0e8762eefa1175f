//! Minimal `.npy` reading and writing for little-endian `float32` C-order
//! arrays: how the examples exchange tensors with NumPy and onnxruntime.

use std::path::Path;

use crate::error::ModelError;

fn npy_err(path: &Path, why: impl Into<String>) -> ModelError {
    ModelError::Npy {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// Encodes a float32 array as `.npy` bytes.
pub fn encode_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a float32 array to `path`.
pub fn write_f32(path: &Path, shape: &[usize], values: &[f32]) -> Result<(), ModelError> {
    std::fs::write(path, encode_f32(shape, values))
        .map_err(|e| npy_err(path, format!("cannot write: {e}")))
}

/// Decodes `.npy` bytes holding a little-endian float32 C-order array.
pub fn decode_f32(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(npy_err(path, "not a .npy file (bad magic)"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(npy_err(path, format!("unsupported .npy version {v}"))),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| npy_err(path, "truncated header"))?;
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| npy_err(path, "header is not text"))?;
    let field = |name: &str| -> Option<&str> {
        let i = header.find(&format!("'{name}'"))?;
        let rest = header[i + name.len() + 2..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| npy_err(path, "no descr"))?;
    if !(descr.starts_with("'<f4'") || descr.starts_with("'float32'")) {
        return Err(npy_err(
            path,
            format!(
                "dtype {} is not little-endian float32; save with arr.astype(np.float32)",
                descr.split(',').next().unwrap_or("")
            ),
        ));
    }
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(npy_err(
            path,
            "Fortran-order arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape_txt = field("shape").ok_or_else(|| npy_err(path, "no shape"))?;
    let close = shape_txt
        .find(')')
        .ok_or_else(|| npy_err(path, "bad shape"))?;
    let shape: Vec<usize> = shape_txt[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| npy_err(path, format!("bad dimension `{s}`")))
        })
        .collect::<Result<_, _>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| npy_err(path, "shape overflows"))?;
    let data = &bytes[end..];
    if Some(data.len()) != numel.checked_mul(4) {
        return Err(npy_err(
            path,
            format!(
                "shape {shape:?} needs {} bytes of data, found {}",
                numel.saturating_mul(4),
                data.len()
            ),
        ));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

/// Reads a float32 `.npy` file.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_f32(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        assert_eq!((bytes.len() - 6 * 4) % 64, 0);
        let (shape, v) = decode_f32(Path::new("x.npy"), &bytes).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(v[5], -6.5);
    }

    #[test]
    fn bad_files_are_explained() {
        let p = Path::new("x.npy");
        assert!(
            decode_f32(p, b"hello")
                .unwrap_err()
                .to_string()
                .contains("bad magic")
        );
        let mut b = encode_f32(&[4], &[1.0; 4]);
        b.truncate(b.len() - 1);
        assert!(
            decode_f32(p, &b)
                .unwrap_err()
                .to_string()
                .contains("needs 16 bytes")
        );
    }
}
