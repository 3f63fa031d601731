//! Text layout per big_vision (`transfers/common.py` `combine_and_keep_train/eval`, pp ops
//! `masked_concat`, `tolen`):
//!
//! ```text
//! [BOS] tok(prefix) | tok("\n") | tok(suffix) [EOS] | [PAD] …
//! mask_ar    0 …         0             1 …   1          1 …     (0 = bidirectional block)
//! mask_loss  0 …         0             1 …   1          0 …     (suffix incl. EOS)
//! mask_input 1 …         1             1 …   1          0 …
//! ```
//!
//! The separator is tokenized on its own so it never merges with prefix or suffix (paper §3.1).
//! Training sequences have `text_len + 1` tokens: the model reads `[:-1]` and predicts `[1:]`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::PaliTokenizer;

/// What happens when prefix + separator + suffix is longer than the text length.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Cut the suffix but keep its EOS as the last token, so the model still learns to stop.
    #[default]
    KeepEos,
    /// big_vision's plain cut (`tolen`): the EOS is lost.
    Cut,
    /// Refuse the example.
    Error,
}

/// One example's tokens and masks, all of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextExample {
    pub ids: Vec<u32>,
    pub mask_ar: Vec<u8>,
    pub mask_loss: Vec<u8>,
    pub mask_input: Vec<u8>,
    /// Tokens after prefix+sep (the suffix part, EOS included) before any cut.
    pub suffix_len: usize,
    /// Length of BOS + prefix + separator.
    pub prefix_len: usize,
    /// Tokens were dropped to fit.
    pub truncated: bool,
    /// The EOS did not fit (only with `Truncation::Cut`).
    pub eos_cut: bool,
}

#[derive(Debug, Clone)]
pub struct SequenceBuilder {
    /// Text tokens the model reads (big_vision `text_len`); training sequences hold one more.
    pub text_len: usize,
    pub truncation: Truncation,
    /// Loss on prefix tokens too (the paper's "prefix and suffix" loss ablation, §5.2).
    pub loss_on_prefix: bool,
    /// Text alone, for stage 0: `[BOS] suffix [EOS] [PAD] …` (the prefix and the separator are
    /// left out), loss on every token after BOS.
    pub text_only: bool,
}

impl SequenceBuilder {
    pub fn new(text_len: usize) -> Self {
        Self {
            text_len,
            truncation: Truncation::default(),
            loss_on_prefix: false,
            text_only: false,
        }
    }

    fn prefix_ids(&self, tok: &PaliTokenizer, prefix: &str) -> Result<Vec<u32>> {
        let mut ids = vec![tok.bos];
        if self.text_only {
            return Ok(ids);
        }
        ids.extend(tok.encode(prefix)?);
        ids.extend(tok.encode("\n")?);
        Ok(ids)
    }

    /// Unpadded training tokens: `[BOS] prefix \n suffix [EOS]` with masks.
    pub fn train_unpadded(
        &self,
        tok: &PaliTokenizer,
        prefix: &str,
        suffix: &str,
    ) -> Result<TextExample> {
        let p = self.prefix_ids(tok, prefix)?;
        let mut s = tok.encode(suffix)?;
        s.push(tok.eos);
        let (np, ns) = (p.len(), s.len());
        let ids: Vec<u32> = p.into_iter().chain(s).collect();
        let mask_ar = (0..np + ns).map(|i| u8::from(i >= np)).collect();
        let mut mask_loss: Vec<u8> = (0..np + ns)
            .map(|i| u8::from(i >= np || self.loss_on_prefix))
            .collect();
        if let Some(noise) = tok.noise {
            no_loss_on_noise_boxes(&ids[np..], &mut mask_loss[np..], noise, &tok.loc);
        }
        Ok(TextExample {
            ids,
            mask_ar,
            mask_loss,
            mask_input: vec![1; np + ns],
            suffix_len: ns,
            prefix_len: np,
            truncated: false,
            eos_cut: false,
        })
    }

    /// Training tokens padded/truncated to `text_len + 1` (big_vision `tolen(text_len+1)` with
    /// pad values text=PAD, mask_ar=1, mask_loss=0, mask_input=0).
    pub fn train(&self, tok: &PaliTokenizer, prefix: &str, suffix: &str) -> Result<TextExample> {
        let mut ex = self.train_unpadded(tok, prefix, suffix)?;
        let len = self.text_len + 1;
        if ex.ids.len() > len {
            match self.truncation {
                Truncation::Error => {
                    return Err(Error::Invalid(format!(
                    "text too long: {} tokens (prefix+sep {}, suffix+eos {}) > text_len+1 = {len}",
                    ex.ids.len(),
                    ex.prefix_len,
                    ex.suffix_len
                )))
                }
                Truncation::Cut => {
                    ex.eos_cut = true;
                    cut(&mut ex, len);
                }
                Truncation::KeepEos => {
                    if ex.prefix_len + 1 > len {
                        ex.eos_cut = true;
                        cut(&mut ex, len);
                    } else {
                        cut(&mut ex, len);
                        *ex.ids.last_mut().unwrap() = tok.eos;
                    }
                }
            }
            ex.truncated = true;
        }
        pad(&mut ex, len, tok.pad);
        Ok(ex)
    }

    /// Decoding prompt: `[BOS] prefix \n`, padded to `text_len` with mask_ar=1, mask_input=0
    /// (big_vision `combine_and_keep_eval`).
    pub fn prompt(&self, tok: &PaliTokenizer, prefix: &str) -> Result<TextExample> {
        let p = self.prefix_ids(tok, prefix)?;
        let np = p.len();
        if np > self.text_len {
            return Err(Error::Invalid(format!(
                "prompt too long: {np} tokens > text_len {}",
                self.text_len
            )));
        }
        let mut ex = TextExample {
            ids: p,
            mask_ar: vec![0; np],
            mask_loss: vec![0; np],
            mask_input: vec![1; np],
            suffix_len: 0,
            prefix_len: np,
            truncated: false,
            eos_cut: false,
        };
        pad(&mut ex, self.text_len, tok.pad);
        Ok(ex)
    }
}

fn cut(ex: &mut TextExample, len: usize) {
    ex.ids.truncate(len);
    ex.mask_ar.truncate(len);
    ex.mask_loss.truncate(len);
    ex.mask_input.truncate(len);
}

fn pad(ex: &mut TextExample, len: usize, pad: u32) {
    while ex.ids.len() < len {
        ex.ids.push(pad);
        ex.mask_ar.push(1);
        ex.mask_loss.push(0);
        ex.mask_input.push(0);
    }
}

/// One `Vec<i64>` per example.
pub type Rows = Vec<Vec<i64>>;

/// HF `PaliGemmaProcessor` form of a batch: `N` image tokens per image, then the text; right
/// padding to the longest row. Returns (input_ids, token_type_ids, labels) — labels are −100
/// outside the suffix, token types are 0 on image + prefix + padding.
pub fn hf_processor_form(
    tok: &PaliTokenizer,
    examples: &[(&str, &str)],
    num_image_tokens: usize,
) -> Result<(Rows, Rows, Rows)> {
    let b = SequenceBuilder::new(usize::MAX - 1);
    let rows: Vec<TextExample> = examples
        .iter()
        .map(|(p, s)| b.train_unpadded(tok, p, s))
        .collect::<Result<_>>()?;
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0) + num_image_tokens;
    let (mut ids, mut tt, mut labels) = (vec![], vec![], vec![]);
    for r in rows {
        let mut i: Vec<i64> = vec![tok.image as i64; num_image_tokens];
        i.extend(r.ids.iter().map(|x| *x as i64));
        let mut y: Vec<i64> = vec![0; num_image_tokens];
        y.extend(r.mask_ar.iter().map(|x| *x as i64));
        let l: Vec<i64> = i
            .iter()
            .zip(&y)
            .map(|(id, ty)| if *ty == 1 { *id } else { -100 })
            .collect();
        let n = i.len();
        let padded = |mut v: Vec<i64>, val: i64| {
            v.resize(t, val);
            v
        };
        ids.push(padded(i, tok.pad as i64));
        tt.push(padded(y, 0));
        labels.push(padded(l, -100));
        debug_assert!(n <= t);
    }
    Ok((ids, tt, labels))
}

/// PaliGemma 2's detection targets end with noise boxes, `<loc×4> <noise>`: the loss covers the
/// `<noise>` class but not the random coordinates before it (PG2 App. C). Zeroes `mask_loss` on
/// the four location tokens before each `<noise>` (one token, e.g. a space, may sit between).
pub fn no_loss_on_noise_boxes(ids: &[u32], mask_loss: &mut [u8], noise: u32, loc: &[u32]) {
    let is_loc = |t: u32| {
        let Some(&a) = loc.first() else { return false };
        t >= a && loc.get((t - a) as usize) == Some(&t)
    };
    for j in 0..ids.len() {
        if ids[j] != noise {
            continue;
        }
        let end = if j >= 1 && is_loc(ids[j - 1]) {
            j
        } else {
            j.saturating_sub(1)
        };
        if end >= 4 && ids[end - 4..end].iter().all(|&t| is_loc(t)) {
            mask_loss[end - 4..end].iter_mut().for_each(|m| *m = 0);
        }
    }
}
