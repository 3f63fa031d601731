//! Errors of the evaluators: every problem with an input file names the file, the line and the
//! field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad line of a predictions or references file.
    #[error("{path}:{line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// Predictions and references do not pair up.
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Model(#[from] pali_model::Error),
    #[error(transparent)]
    Data(#[from] pali_data::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;
