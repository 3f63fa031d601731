//! The PaliGemma tokenizer: any HF `tokenizer.json` (the real Gemma/PaliGemma one or a small
//! one), with every id the model needs looked up by its token string, never hard-coded.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Number of `<locNNNN>` and `<segNNN>` tokens (big_vision `tokensets=("loc","seg")`).
pub const NUM_LOC: usize = 1024;
pub const NUM_SEG: usize = 128;

pub struct PaliTokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub pad: u32,
    pub eos: u32,
    pub bos: u32,
    pub image: u32,
    /// `loc[i]` = id of `<loc{i:04}>`.
    pub loc: Vec<u32>,
    /// `seg[i]` = id of `<seg{i:03}>`.
    pub seg: Vec<u32>,
    /// `<noise>`, the class of PaliGemma 2's noise boxes, when the tokenizer has it.
    pub noise: Option<u32>,
}

impl std::fmt::Debug for PaliTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PaliTokenizer({}, vocab {})",
            self.path.display(),
            self.vocab_size()
        )
    }
}

impl PaliTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .ok_or_else(|| err(format!("has no `{tok}` token")))
        };
        let loc = (0..NUM_LOC)
            .map(|i| id(&format!("<loc{i:04}>")))
            .collect::<Result<Vec<_>>>()?;
        let seg = (0..NUM_SEG)
            .map(|i| id(&format!("<seg{i:03}>")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pad: id("<pad>")?,
            eos: id("<eos>")?,
            bos: id("<bos>")?,
            image: id("<image>")?,
            loc,
            seg,
            noise: inner.token_to_id("<noise>"),
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of `text`, without BOS/EOS (they are placed explicitly by the sequence builder).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("encoding {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` with `<loc…>`/`<seg…>` kept as text; BOS, EOS and PAD are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let keep: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|i| *i != self.bos && *i != self.eos && *i != self.pad)
            .collect();
        self.inner
            .decode(&keep, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("decoding: {e}"),
            })
    }

    /// The id of a token string (`<noise>`, `<loc0001>`…), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of one id (for inspection output).
    pub fn token(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }
}
