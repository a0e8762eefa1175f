//! Feature files on disk: [safetensors](https://huggingface.co/docs/safetensors),
//! so that other tools (Python's `safetensors`, numpy, Rust's
//! `safetensors` crate) read them too, and memory-mapped when training
//! reads them, so that a table larger than memory trains a head.
//!
//! A file holds two tensors, `features` (`F32`, `[views, images, width]`)
//! and `targets` (`I64`, `[images]`), and string metadata: the format, the
//! SHA-256 of the cache key it was computed for, the SHA-256 of its data
//! section, and for one shard of a sharded extraction, which shard it is
//! and where its images start in the split. The header is written by avp
//! in a fixed order, so the same features always give the same bytes: a
//! table merged from shards equals, byte for byte, the table one process
//! computed.
//!
//! A file is trusted only when every check passes: the safetensors
//! structure (read by the `safetensors` crate), the format, the key, the
//! shapes, the data checksum, every class index below the class count and
//! every value finite. Anything else is "damaged or stale".

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

/// The `format` metadata of avp's feature files.
pub const FORMAT: &str = "avp features 3";

/// Which part of a split a shard file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPart {
    /// Shard index, `0..count`.
    pub index: usize,
    /// Number of shards of the split.
    pub count: usize,
    /// The split's index of this shard's first image.
    pub first: usize,
    /// Images in the whole split.
    pub total: usize,
}

/// What a feature file's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Images in the file.
    pub len: usize,
    /// Views per image.
    pub views: usize,
    /// Floats per image and view.
    pub width: usize,
    /// SHA-256 (hex) of the cache key text.
    pub key_sha256: String,
    /// SHA-256 (hex) of the data section (features, then targets).
    pub data_sha256: String,
    /// Set for a shard file.
    pub shard: Option<ShardPart>,
}

/// The bytes a file starts with: the header length (u64, little endian)
/// and the header JSON, padded with spaces so that the data section
/// starts 8-byte aligned (as the safetensors format recommends).
pub fn header_bytes(h: &Header) -> Vec<u8> {
    let features_bytes = h.views * h.len * h.width * 4;
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("key_sha256".into(), h.key_sha256.clone().into());
    meta.insert("data_sha256".into(), h.data_sha256.clone().into());
    if let Some(s) = h.shard {
        meta.insert("shard".into(), format!("{}/{}", s.index, s.count).into());
        meta.insert("first".into(), s.first.to_string().into());
        meta.insert("total".into(), s.total.to_string().into());
    }
    // serde_json's `json!` keeps a fixed key order for a given input, so
    // equal headers are equal bytes.
    let json = serde_json::json!({
        "__metadata__": meta,
        "features": {
            "dtype": "F32",
            "shape": [h.views, h.len, h.width],
            "data_offsets": [0, features_bytes],
        },
        "targets": {
            "dtype": "I64",
            "shape": [h.len],
            "data_offsets": [features_bytes, features_bytes + h.len * 8],
        },
    });
    let mut text = json.to_string().into_bytes();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// Little-endian bytes of `values`, in pieces of `chunk` floats, to `f`.
pub fn for_le_bytes_f32(
    values: &[f32],
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        // The values' own bytes are little-endian already: no copy (the
        // copy, once for the checksum and once for the file, took about
        // half of the 0.5–0.6 s that storing a 140 MB cache took).
        for piece in values.chunks(1 << 18) {
            f(bytemuck::cast_slice(piece))?;
        }
        return Ok(());
    }
    let mut buf = Vec::with_capacity(1 << 16);
    for piece in values.chunks(1 << 14) {
        buf.clear();
        for v in piece {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        f(&buf)?;
    }
    Ok(())
}

/// Little-endian `i64` bytes of the class indices.
pub fn targets_bytes(targets: &[usize]) -> Vec<u8> {
    targets
        .iter()
        .flat_map(|&t| (t as i64).to_le_bytes())
        .collect()
}

/// SHA-256 (hex) of the data section of `values` and `targets`.
pub fn data_sha256(values: &[f32], targets: &[usize]) -> String {
    let mut hash = Sha256::new();
    // Writing into a hash cannot fail.
    let _ = for_le_bytes_f32(values, |b| {
        hash.update(b);
        Ok(())
    });
    hash.update(targets_bytes(targets));
    hex(&hash.finalize())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a whole file at `tmp` (the caller renames it into place):
/// `header`, then `data` writes the data section.
pub fn write_file(
    tmp: &Path,
    header: &Header,
    data: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let file = std::fs::File::create(tmp)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header_bytes(header))?;
    data(&mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// A feature file, memory-mapped and checked.
#[derive(Clone)]
pub struct Mapped {
    map: Arc<Mmap>,
    /// What its header says.
    pub header: Header,
    /// Byte offset of the features in the map.
    features_at: usize,
    /// Byte offset of the targets in the map.
    targets_at: usize,
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped")
            .field("header", &self.header)
            .finish()
    }
}

impl Mapped {
    /// Maps `path` and checks its structure and format; the data is not
    /// read yet ([`Mapped::verify`] reads it). `Err` says why the file is
    /// not a feature file.
    pub fn open(path: &Path) -> Result<Self, String> {
        if cfg!(target_endian = "big") {
            return Err("feature files are read in place on little-endian machines only".into());
        }
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        // SAFETY: the map is read-only. avp writes feature files whole
        // under a temporary name and renames them into place, never
        // changing a file in place (a rewrite is a new file; this map keeps
        // the old one). A file changed in place by another program while it
        // is mapped could change the values read after they were verified,
        // and one truncated in place would make reads past its new end
        // fault (SIGBUS): do not edit feature files in place.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| e.to_string())?;
        let (header, features_at, targets_at) = parse(&map)?;
        Ok(Self {
            map: Arc::new(map),
            header,
            features_at,
            targets_at,
        })
    }

    /// Reads the whole data section: the checksum must match, every class
    /// index must be below `classes` and every value finite. Returns the
    /// class indices.
    pub fn verify(&self, classes: usize) -> Result<Vec<usize>, String> {
        let h = &self.header;
        let data = &self.map[self.features_at..self.targets_at + h.len * 8];
        if hex(&Sha256::digest(data)) != h.data_sha256 {
            return Err("its data does not match its checksum".into());
        }
        if let Some(bad) = self.values().iter().position(|v| !v.is_finite()) {
            return Err(format!("value {bad} is not finite"));
        }
        self.map[self.targets_at..self.targets_at + h.len * 8]
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                usize::try_from(i64::from_le_bytes(b))
                    .ok()
                    .filter(|&t| t < classes)
                    .ok_or_else(|| format!("a class index is not in 0..{classes}"))
            })
            .collect()
    }

    /// All values, `[views][len][width]`, read in place.
    pub fn values(&self) -> &[f32] {
        let h = &self.header;
        let bytes = &self.map[self.features_at..self.features_at + h.views * h.len * h.width * 4];
        // `parse` checked the alignment and the size.
        bytemuck::try_cast_slice(bytes).unwrap_or(&[])
    }

    /// The values of view `view`, `[len][width]`, in little-endian bytes.
    pub fn view_bytes(&self, view: usize) -> &[u8] {
        let h = &self.header;
        let n = h.len * h.width * 4;
        let at = self.features_at + view * n;
        &self.map[at..at + n]
    }

    /// The targets, as stored (little-endian `i64`).
    pub fn targets_bytes(&self) -> &[u8] {
        &self.map[self.targets_at..self.targets_at + self.header.len * 8]
    }
}

fn parse(map: &[u8]) -> Result<(Header, usize, usize), String> {
    let st = SafeTensors::deserialize(map).map_err(|e| format!("not a safetensors file ({e})"))?;
    let (_, meta) = SafeTensors::read_metadata(map).map_err(|e| e.to_string())?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| format!("no {k} in its metadata"))
    };
    if get("format")? != FORMAT {
        return Err(format!("it is not in the format {FORMAT:?}"));
    }
    let features = st.tensor("features").map_err(|e| e.to_string())?;
    let targets = st.tensor("targets").map_err(|e| e.to_string())?;
    let (&[views, len, width], &[tlen]) = (features.shape(), targets.shape()) else {
        return Err("its tensors do not have the shapes of a feature table".into());
    };
    if features.dtype() != Dtype::F32 || targets.dtype() != Dtype::I64 || tlen != len {
        return Err("its tensors do not have the types of a feature table".into());
    }
    let base = map.as_ptr() as usize;
    let features_at = features.data().as_ptr() as usize - base;
    let targets_at = targets.data().as_ptr() as usize - base;
    // The data section is one block: features, then targets.
    if !features_at.is_multiple_of(4) || targets_at != features_at + features.data().len() {
        return Err("its data section is not laid out as avp writes it".into());
    }
    let number = |k: &str| -> Result<usize, String> {
        get(k)?
            .parse()
            .map_err(|_| format!("its {k} is not a number"))
    };
    let shard = match meta.get("shard") {
        None => None,
        Some(s) => {
            let (i, n) = s
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)))
                .ok_or_else(|| format!("its shard {s:?} is not I/N"))?;
            Some(ShardPart {
                index: i,
                count: n,
                first: number("first")?,
                total: number("total")?,
            })
        }
    };
    let header = Header {
        len,
        views,
        width,
        key_sha256: get("key_sha256")?,
        data_sha256: get("data_sha256")?,
        shard,
    };
    Ok((header, features_at, targets_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(values: &[f32], targets: &[usize]) -> Header {
        Header {
            len: targets.len(),
            views: 1,
            width: values.len() / targets.len(),
            key_sha256: "k".repeat(64),
            data_sha256: data_sha256(values, targets),
            shard: Some(ShardPart {
                index: 1,
                count: 3,
                first: 8,
                total: 20,
            }),
        }
    }

    /// A file avp writes is a safetensors file that the `safetensors`
    /// crate reads with the shapes, types and metadata avp meant, and
    /// that avp maps back to the same values.
    #[test]
    fn files_are_safetensors_and_read_back() {
        let dir = std::env::temp_dir().join(format!("avp-featfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let path = dir.join("t.safetensors");
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let targets = vec![0, 1, 1];
        let h = header(&values, &targets);
        write_file(&path, &h, |w| {
            for_le_bytes_f32(&values, |b| w.write_all(b))?;
            w.write_all(&targets_bytes(&targets))
        })
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("features").unwrap().shape(), &[1, 3, 4]);
        assert_eq!(st.tensor("targets").unwrap().dtype(), Dtype::I64);
        let m = Mapped::open(&path).unwrap();
        assert_eq!(m.header, h);
        assert_eq!(m.values(), &values[..]);
        assert_eq!(m.verify(2).unwrap(), targets);
        assert!(m.verify(1).is_err(), "class 1 of 1 class");
        // The same table gives the same bytes.
        assert_eq!(header_bytes(&h), header_bytes(&header(&values, &targets)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
