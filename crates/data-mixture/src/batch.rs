//! Batches as flat host arrays, exactly what the model gets:
//!
//! - `pixel_values` [B, F, 3, R, R] f32 in [−1, 1]
//! - `text`, `mask_ar`, `mask_loss`, `mask_input` [B, T+1] (the model reads `[:, :-1]`, the
//!   loss targets `text[:, 1:]` weighted by `mask_loss[:, 1:]`)
//!
//! The loader decodes and resizes a batch's images in parallel (rayon) and builds batches on a
//! background thread a few batches ahead. Every batch carries the mixture state *after* it was
//! drawn, so a checkpoint taken after consuming it resumes the exact stream.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::dataset::{Example, OnError};
use crate::error::{Error, Result};
use crate::image::ResizeMethod;
use crate::mixture::{Mixture, MixtureState};
use crate::sequence::SequenceBuilder;
use crate::tokenizer::PaliTokenizer;

#[derive(Debug, Clone)]
pub struct Batch {
    pub batch_size: usize,
    pub frames: usize,
    pub resolution: usize,
    /// [B, F, 3, R, R]
    pub pixel_values: Vec<f32>,
    /// T + 1
    pub seq_len: usize,
    /// [B, T+1] each
    pub text: Vec<i64>,
    pub mask_ar: Vec<i64>,
    pub mask_loss: Vec<i64>,
    pub mask_input: Vec<i64>,
    /// Source of each row.
    pub sources: Vec<usize>,
    pub ids: Vec<String>,
    /// Rows whose text was cut to fit, and among them rows that lost their EOS.
    pub truncated: usize,
    pub eos_cut: Vec<String>,
    /// Examples skipped because they could not be loaded (`OnError::Skip`).
    pub skipped: Vec<String>,
    /// The mixture state after this batch.
    pub state_after: Option<MixtureState>,
}

/// One example's tokens and masks, and its pixels (CHW per frame, frames concatenated).
pub type Encoded = (crate::sequence::TextExample, Vec<f32>);

/// Turns examples into a batch.
#[derive(Clone)]
pub struct BatchBuilder {
    pub tokenizer: Arc<PaliTokenizer>,
    pub seq: SequenceBuilder,
    pub resolution: usize,
    pub resize: ResizeMethod,
    /// Images per example; every example must have exactly this many. 0: text only (images,
    /// if any, are not read).
    pub frames: usize,
    /// Downscale, windowing (each image becomes `window²` frames) and augmentations.
    pub transforms: crate::transform::Transforms,
}

impl BatchBuilder {
    /// Frames per example the model sees (images × windows).
    pub fn model_frames(&self) -> usize {
        self.frames * self.transforms.frames_per_image()
    }

    /// Tokens and pixels of one example; `draw` (unique per draw of the stream) seeds the
    /// augmentations, `None` for none.
    pub fn encode(&self, ex: &Example, draw: Option<u64>) -> Result<Encoded> {
        if self.frames > 0 && ex.images.len() != self.frames {
            return Err(Error::Invalid(format!(
                "{}: {} images, but the stage expects {} per example",
                ex.id,
                ex.images.len(),
                self.frames
            )));
        }
        let text = self
            .seq
            .train(&self.tokenizer, &ex.prefix, &ex.suffix)
            .map_err(|e| Error::Invalid(format!("{}: {e}", ex.id)))?;
        let mut px = Vec::with_capacity(self.model_frames() * 3 * self.resolution.pow(2));
        for (k, im) in ex.images.iter().take(self.frames).enumerate() {
            let draw = draw.map(|d| d.wrapping_mul(31).wrapping_add(k as u64));
            px.extend(
                self.transforms
                    .pixels(im, self.resolution, self.resize, draw)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", ex.id)))?,
            );
        }
        Ok((text, px))
    }

    /// Assembles encoded rows `(source, example, (text, pixels))` into one batch.
    pub fn build(
        &self,
        rows: Vec<(usize, Example, Encoded)>,
        skipped: Vec<String>,
    ) -> Result<Batch> {
        let b = rows.len();
        let t1 = self.seq.text_len + 1;
        let mut batch = Batch {
            batch_size: b,
            frames: self.model_frames(),
            resolution: self.resolution,
            pixel_values: Vec::with_capacity(
                b * self.model_frames() * 3 * self.resolution * self.resolution,
            ),
            seq_len: t1,
            text: Vec::with_capacity(b * t1),
            mask_ar: Vec::with_capacity(b * t1),
            mask_loss: Vec::with_capacity(b * t1),
            mask_input: Vec::with_capacity(b * t1),
            sources: rows.iter().map(|(s, _, _)| *s).collect(),
            ids: rows.iter().map(|(_, e, _)| e.id.clone()).collect(),
            truncated: 0,
            eos_cut: Vec::new(),
            skipped,
            state_after: None,
        };
        for (_, ex, (t, px)) in rows {
            batch.pixel_values.extend(px);
            batch.text.extend(t.ids.iter().map(|x| *x as i64));
            batch.mask_ar.extend(t.mask_ar.iter().map(|x| *x as i64));
            batch
                .mask_loss
                .extend(t.mask_loss.iter().map(|x| *x as i64));
            batch
                .mask_input
                .extend(t.mask_input.iter().map(|x| *x as i64));
            batch.truncated += usize::from(t.truncated);
            if t.eos_cut {
                batch.eos_cut.push(ex.id.clone());
            }
        }
        Ok(batch)
    }
}

/// Draws `batch_size` examples from the mixture; with `OnError::Skip` unreadable examples are
/// replaced by the next ones and reported in the batch.
pub fn next_batch(
    mix: &mut Mixture,
    builder: &BatchBuilder,
    batch_size: usize,
    on_error: OnError,
) -> Result<Batch> {
    next_share(mix, builder, batch_size, on_error, Share::ALL)
}

/// One data-parallel rank's part of every batch: rows `rank × B / ranks ..` of the batch the
/// whole run draws, so the data order does not depend on the number of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: usize,
    pub ranks: usize,
}

impl Share {
    pub const ALL: Share = Share { rank: 0, ranks: 1 };

    /// This share's rows of a batch of `b`.
    pub fn rows(&self, b: usize) -> std::ops::Range<usize> {
        self.rank * b / self.ranks..(self.rank + 1) * b / self.ranks
    }
}

/// [`next_batch`]'s rows `share.rows(batch_size)`. Every rank draws the whole batch from the
/// stream (its indices only: cheap) and reads and decodes its own rows, except with
/// `OnError::Skip`: which examples replace a skipped one depends on every row, so each rank
/// decodes the whole batch, as one process would, and keeps its rows.
pub fn next_share(
    mix: &mut Mixture,
    builder: &BatchBuilder,
    batch_size: usize,
    on_error: OnError,
    share: Share,
) -> Result<Batch> {
    let mine = share.rows(batch_size);
    // With several ranks and `Fail`, a rank reads only its own rows (no error replaces one).
    let partial = on_error == OnError::Fail && share.ranks > 1;
    let mut rows = Vec::with_capacity(batch_size);
    let mut skipped = Vec::new();
    // Rows of the whole batch drawn so far.
    let mut filled = 0;
    while filled < batch_size {
        // Draw what is missing in stream order, decode it in parallel, each example once.
        let picks: Vec<_> = (filled..batch_size)
            .map(|r| {
                let (s, i) = mix.next_index();
                // The draw's identity (source, examples drawn from it) seeds augmentations.
                (r, s, i, ((s as u64) << 40) ^ mix.state.sources[s].seen)
            })
            .collect();
        // Read (a shard row, a scene) and encode in parallel; a row that cannot be read is
        // skipped like one that cannot be decoded.
        let sources = &mix.sources;
        let encoded: Vec<(usize, Result<(Example, Encoded)>)> = picks
            .into_par_iter()
            .filter(|(r, ..)| !partial || mine.contains(r))
            .map(|(_, s, i, draw)| {
                let read = sources[s]
                    .get(i)
                    .and_then(|ex| builder.encode(&ex, Some(draw)).map(|enc| (ex, enc)));
                (s, read)
            })
            .collect();
        for (s, read) in encoded {
            match read {
                Ok((ex, enc)) => rows.push((s, ex, enc)),
                Err(e) if on_error == OnError::Skip => {
                    skipped.push(e.to_string());
                    if skipped.len() > 100 * batch_size {
                        return Err(Error::Invalid(format!(
                            "too many unreadable examples; last: {e}"
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        filled = if partial { batch_size } else { rows.len() };
    }
    if share.ranks > 1 && !partial {
        rows = rows.drain(mine).collect();
    }
    let mut b = builder.build(rows, skipped)?;
    b.state_after = Some(mix.state.clone());
    Ok(b)
}

/// Background batch production, `prefetch` batches ahead.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    pub fn spawn(
        mix: Mixture,
        builder: BatchBuilder,
        batch_size: usize,
        on_error: OnError,
        prefetch: usize,
    ) -> Self {
        Self::spawn_share(mix, builder, batch_size, on_error, prefetch, Share::ALL)
    }

    /// Batches of one data-parallel rank ([`next_share`]).
    pub fn spawn_share(
        mut mix: Mixture,
        builder: BatchBuilder,
        batch_size: usize,
        on_error: OnError,
        prefetch: usize,
        share: Share,
    ) -> Self {
        let (tx, rx) = sync_channel(prefetch.max(1));
        let handle = std::thread::spawn(move || loop {
            let b = next_share(&mut mix, &builder, batch_size, on_error, share);
            let stop = b.is_err();
            if tx.send(b).is_err() || stop {
                return;
            }
        });
        Self {
            rx,
            handle: Some(handle),
        }
    }

    pub fn recv(&mut self) -> Result<Batch> {
        self.rx
            .recv()
            .map_err(|_| Error::Invalid("data loader thread stopped".into()))?
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Dropping the receiver makes the producer's next send fail; it then exits.
        let (_, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
