//! NumPy `.npz` archives (zip of `.npy` arrays, stored or deflated): big_vision's `vae-oid.npz`
//! and PaliGemma checkpoints (read one array at a time), and f32 files of the same layout
//! (tests, exports). Little-endian f32, f64, f16 and bf16 (JAX's `|V2`), C order.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{io_err, Error, Result};

/// Named tensors of a checkpoint: name → (shape, values).
pub type NamedTensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: not a usable .npz file: {msg}", path.display()))
}

/// Reads every array of an `.npz` file (names without the `.npy` suffix), as f32.
pub fn read(path: &Path) -> Result<NamedTensors> {
    let mut archive = Archive::open(path)?;
    let mut out = NamedTensors::new();
    for name in archive.names() {
        let (header, data) = archive.array(&name)?;
        out.insert(name, (header.shape, data.to_f32()));
    }
    Ok(out)
}

/// Element types of `.npy` arrays pali reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    /// bfloat16, which NumPy lacks: JAX writes it as 2-byte void (`|V2`).
    Bf16,
}

impl Dtype {
    fn parse(descr: &str) -> std::result::Result<Dtype, String> {
        Ok(match descr {
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "<f2" => Dtype::F16,
            "|V2" | "<V2" => Dtype::Bf16,
            d => {
                return Err(format!(
                    "unsupported dtype `{d}` (f32, f64, f16 or bf16 `|V2`)"
                ))
            }
        })
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// An array's dtype and shape (C order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// An array's values: f32 (f64 converted), or the raw bits of a 16-bit float.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

impl Data {
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v
                .iter()
                .map(|b| burn::tensor::f16::from_bits(*b).to_f32())
                .collect(),
            Data::Bf16(v) => v
                .iter()
                .map(|b| burn::tensor::bf16::from_bits(*b).to_f32())
                .collect(),
        }
    }
}

/// An open `.npz`: arrays are read one at a time, by name.
pub struct Archive {
    path: std::path::PathBuf,
    zip: zip::ZipArchive<std::fs::File>,
}

impl Archive {
    pub fn open(path: &Path) -> Result<Archive> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let zip = zip::ZipArchive::new(file).map_err(|e| bad(path, e))?;
        Ok(Archive {
            path: path.to_path_buf(),
            zip,
        })
    }

    /// Array names, in the archive's order.
    pub fn names(&self) -> Vec<String> {
        self.zip
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
            .collect()
    }

    /// The header of array `name`, reading only its first bytes.
    pub fn header(&mut self, name: &str) -> Result<Header> {
        let path = self.path.clone();
        let mut entry = self
            .zip
            .by_name(&format!("{name}.npy"))
            .map_err(|e| bad(&path, format!("array `{name}`: {e}")))?;
        let mut head = vec![0u8; 12];
        entry.read_exact(&mut head).map_err(io_err(&path))?;
        let len = header_len(&head).map_err(|m| bad(&path, format!("array `{name}`: {m}")))?;
        // A corrupt length must not underflow or ask for gigabytes.
        let rest = (len.0 + len.1)
            .checked_sub(head.len())
            .filter(|n| *n < 1 << 20)
            .ok_or_else(|| {
                bad(
                    &path,
                    format!("array `{name}`: bad header length {}", len.0),
                )
            })?;
        let mut rest = vec![0u8; rest];
        entry.read_exact(&mut rest).map_err(io_err(&path))?;
        head.extend(rest);
        parse_header(&head)
            .map(|(h, _)| h)
            .map_err(|m| bad(&path, format!("array `{name}`: {m}")))
    }

    /// Array `name` as its file bytes, with its header and where its data starts (checked to
    /// be whole): the caller decodes only the pieces it needs.
    pub fn raw(&mut self, name: &str) -> Result<(Header, Vec<u8>, usize)> {
        let path = self.path.clone();
        let mut entry = self
            .zip
            .by_name(&format!("{name}.npy"))
            .map_err(|e| bad(&path, format!("array `{name}`: {e}")))?;
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let (header, start) =
            parse_header(&bytes).map_err(|m| bad(&path, format!("array `{name}`: {m}")))?;
        let n: usize = header.shape.iter().product();
        if bytes.len() - start != header.dtype.size() * n {
            return Err(bad(
                &path,
                format!(
                    "array `{name}`: {} data bytes for shape {:?} of {:?} (truncated?)",
                    bytes.len() - start,
                    header.shape,
                    header.dtype
                ),
            ));
        }
        Ok((header, bytes, start))
    }

    /// Array `name`, whole.
    pub fn array(&mut self, name: &str) -> Result<(Header, Data)> {
        let (header, bytes, start) = self.raw(name)?;
        let data = decode(header.dtype, &bytes[start..]);
        Ok((header, data))
    }
}

/// (header text length, header start) of a `.npy` file from its first 12 bytes.
fn header_len(b: &[u8]) -> std::result::Result<(usize, usize), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    match b[6] {
        1 => Ok((u16::from_le_bytes([b[8], b[9]]) as usize, 10)),
        2 | 3 if b.len() >= 12 => Ok((u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)),
        2 | 3 => Err("truncated header".into()),
        v => Err(format!("unsupported .npy version {v}")),
    }
}

/// The header of a `.npy` file and where its data starts.
fn parse_header(b: &[u8]) -> std::result::Result<(Header, usize), String> {
    let (hlen, start) = header_len(b)?;
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|_| "header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("header has no `{key}`"))?;
        Ok(header[at + key.len() + 2..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr")?;
    let descr = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or_default();
    let dtype = Dtype::parse(descr)?;
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
    Ok((Header { dtype, shape }, start + hlen))
}

/// Little-endian values of `dtype` (f64 converted to f32).
pub fn decode(dtype: Dtype, data: &[u8]) -> Data {
    let u16s = || -> Vec<u16> {
        data.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    match dtype {
        Dtype::F32 => Data::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F64 => Data::F32(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        ),
        Dtype::F16 => Data::F16(u16s()),
        Dtype::Bf16 => Data::Bf16(u16s()),
    }
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
