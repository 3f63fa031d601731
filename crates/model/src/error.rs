//! Typed errors of the model crate. Every message names the file, tensor or field it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("missing tensor `{name}` (expected shape {expected:?}) in {source_desc}")]
    MissingTensor {
        name: String,
        expected: Vec<usize>,
        source_desc: String,
    },
    #[error("unexpected tensor `{name}` (shape {shape:?}) in {source_desc}: the model has no such parameter")]
    UnexpectedTensor {
        name: String,
        shape: Vec<usize>,
        source_desc: String,
    },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?} in {source_desc}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        source_desc: String,
    },
    #[error("tensor `{name}`: unsupported dtype {dtype} in {source_desc}")]
    Dtype {
        name: String,
        dtype: String,
        source_desc: String,
    },
    #[error("unknown preset `{0}`; known presets: {1}")]
    UnknownPreset(String, String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
