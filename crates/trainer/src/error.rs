//! Errors of the trainer: each names the config key, stage, step or file it is about.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] pali_model::Error),
    #[error(transparent)]
    Data(#[from] pali_data::Error),
    #[error("evaluation: {0}")]
    Eval(#[from] pali_eval::Error),
    #[error("{0}")]
    Train(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
