//! NumPy `.npz` archives (zip of `.npy` arrays, stored or deflated): enough to read big_vision's
//! `vae-oid.npz` and to write files of the same layout (tests, exports). Little-endian f32/f64
//! (converted to f32) in C order.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{io_err, Error, Result};

/// Named tensors of a checkpoint: name → (shape, values).
pub type NamedTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: not a usable .npz file: {msg}", path.display()))
}

/// Reads every array of an `.npz` file (names without the `.npy` suffix).
pub fn read(path: &Path) -> Result<NamedTensors> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(path, e))?;
    let mut out = NamedTensors::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(path, e))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(io_err(path))?;
        let (shape, values) =
            parse_npy(&bytes).map_err(|m| bad(path, format!("array `{name}`: {m}")))?;
        out.insert(name, (shape, values));
    }
    Ok(out)
}

/// Parses one `.npy` array (format 1.0–3.0).
fn parse_npy(b: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err("truncated header".into());
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|_| "header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("header has no `{key}`"))?;
        Ok(header[at + key.len() + 2..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr")?;
    let dtype = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or_default();
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let inner = shape_text
        .trim_start_matches('(')
        .split(')')
        .next()
        .ok_or("bad shape")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape `({inner})`"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &b[start + hlen..];
    let values: Vec<f32> = match dtype {
        "<f4" => {
            if data.len() != 4 * n {
                return Err(format!(
                    "{} data bytes for shape {shape:?} of f32",
                    data.len()
                ));
            }
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        "<f8" => {
            if data.len() != 8 * n {
                return Err(format!(
                    "{} data bytes for shape {shape:?} of f64",
                    data.len()
                ));
            }
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect()
        }
        d => return Err(format!("unsupported dtype `{d}` (f32 or f64 expected)")),
    };
    Ok((shape, values))
}

/// Writes f32 arrays as an `.npz` (as `np.savez`: stored entries, `.npy` format 1.0).
pub fn write(path: &Path, tensors: &NamedTensors) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, (shape, values)) in tensors {
        zip.start_file(format!("{name}.npy"), opts)
            .map_err(|e| bad(path, e))?;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape_text = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let mut header =
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
        // Pad so that the data starts at a multiple of 64 bytes, ending with a newline.
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut buf = b"\x93NUMPY\x01\x00".to_vec();
        buf.extend((header.len() as u16).to_le_bytes());
        buf.extend(header.as_bytes());
        for v in values {
            buf.extend(v.to_le_bytes());
        }
        zip.write_all(&buf).map_err(io_err(path))?;
    }
    zip.finish().map_err(|e| bad(path, e))?;
    Ok(())
}
