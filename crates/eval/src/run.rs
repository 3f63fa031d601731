//! Predictions for a dataset: prompts built as for training (`[image] [BOS] prefix \n`),
//! decoded in batches, detokenised with `<loc…>`/`<seg…>` kept. Used by `pali eval`,
//! `pali predict` and the trainer's evaluations.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use pali_data::dataset::Example;
use pali_data::image::ResizeMethod;
use pali_data::{PaliTokenizer, SequenceBuilder};
use pali_model::{PaliGemma, PaliGemmaConfig};

use crate::decode::{decode, DecodeOptions, Decoded, Prompts};
use crate::error::{Error, Result};
use crate::score::{Reference, Task};

/// How to build prompts and decode.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub decode: DecodeOptions,
    /// Prompt length limit in tokens (BOS + prefix + separator).
    pub text_len: usize,
    pub resolution: usize,
    pub resize: ResizeMethod,
    pub batch_size: usize,
    /// Downscale / windowing as in training (augmentations are never applied here).
    pub transforms: pali_data::transform::Transforms,
}

/// One example's prediction.
#[derive(Debug, Clone)]
pub struct Predicted {
    pub id: String,
    pub prefix: String,
    /// The example's target text (empty when the data has none).
    pub suffix: String,
    pub prediction: String,
    /// Confidence of each detected object: the probability of the first token after its four
    /// location tokens (the class token, as PaliGemma 2's detection transfer).
    pub object_scores: Vec<f64>,
    pub decoded: Decoded,
}

/// Decoding throughput of a `predict` call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Throughput {
    pub new_tokens: usize,
    pub seconds: f64,
}

impl Throughput {
    pub fn tokens_per_second(&self) -> f64 {
        self.new_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Decodes every example. `progress` is called with the number of examples done.
pub fn predict<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    tok: &PaliTokenizer,
    examples: &[Example],
    opts: &PredictOptions,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<Predicted>, Throughput)> {
    let seq = SequenceBuilder::new(opts.text_len);
    let n_img = cfg.num_image_tokens();
    let r = opts.resolution;
    let mut out = Vec::with_capacity(examples.len());
    let mut thr = Throughput::default();
    let mut start = 0;
    while start < examples.len() {
        // A batch holds examples with the same number of images.
        let images = examples[start].images.len();
        let frames = images * opts.transforms.frames_per_image();
        let mut end = start;
        while end < examples.len()
            && end - start < opts.batch_size.max(1)
            && examples[end].images.len() == images
        {
            end += 1;
        }
        let batch = &examples[start..end];
        let (mut ids, mut ar, mut px) = (Vec::new(), Vec::new(), Vec::new());
        for ex in batch {
            let p = seq
                .prompt(tok, &ex.prefix)
                .map_err(|e| Error::Other(format!("{}: {e}", ex.id)))?;
            let mut row = vec![cfg.image_token_id as i64; frames * n_img];
            row.extend(
                p.ids
                    .iter()
                    .zip(&p.mask_input)
                    .filter(|(_, m)| **m == 1)
                    .map(|(t, _)| *t as i64),
            );
            ar.push(vec![0i64; row.len()]);
            ids.push(row);
            for im in &ex.images {
                px.extend(
                    opts.transforms
                        .pixels(im, r, opts.resize, None)
                        .map_err(|e| Error::Other(format!("{}: {e}", ex.id)))?,
                );
            }
        }
        let b = batch.len();
        let prompts = Prompts {
            pixel_values: Tensor::<B, 5>::from_data(
                TensorData::new(px, [b, frames, 3, r, r]),
                device,
            ),
            ids,
            mask_ar: ar,
        };
        let t0 = Instant::now();
        let decoded = decode(model, prompts, cfg.text.sliding_window, &opts.decode)?;
        thr.seconds += t0.elapsed().as_secs_f64();
        for (ex, d) in batch.iter().zip(decoded) {
            thr.new_tokens += d.logprobs.len();
            let prediction = tok.decode(&d.tokens)?;
            out.push(Predicted {
                id: ex.id.clone(),
                prefix: ex.prefix.clone(),
                suffix: ex.suffix.clone(),
                object_scores: object_scores(&d, tok),
                prediction,
                decoded: d,
            });
        }
        start = end;
        progress(out.len());
    }
    Ok((out, thr))
}

/// Per detected object (four consecutive location tokens), the probability of the token that
/// follows them (segmentation tokens skipped); 1 when nothing follows.
pub fn object_scores(d: &Decoded, tok: &PaliTokenizer) -> Vec<f64> {
    let is_loc = |t: u32| tok.loc.first().is_some_and(|l0| t >= *l0 && t <= l0 + 1023);
    let is_seg = |t: u32| tok.seg.first().is_some_and(|s0| t >= *s0 && t <= s0 + 127);
    let mut out = Vec::new();
    let mut i = 0;
    let n = d.tokens.len();
    while i < n {
        if i + 4 <= n && d.tokens[i..i + 4].iter().all(|t| is_loc(*t)) {
            let mut j = i + 4;
            while j < n && is_seg(d.tokens[j]) {
                j += 1;
            }
            out.push(if j < n {
                (d.logprobs[j] as f64).exp()
            } else {
                1.0
            });
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// References taken from the examples themselves (their suffix), when no references file is
/// given: the suffix is the one caption / answer; detection boxes and the RefCOCO box come from
/// its location tokens (in [0, 1] coordinates: IoU does not change with the scale; the RefCOCO
/// mask is the box, on a 1024×1024 grid).
pub fn references_from_suffix(task: Task, examples: &[Example]) -> Vec<Reference> {
    examples
        .iter()
        .map(|ex| match task {
            Task::Detect => {
                let (dets, _) = crate::detection::parse_detections(&ex.suffix);
                Reference::Boxes {
                    width: 1.0,
                    height: 1.0,
                    boxes: dets.iter().map(|d| d.to_pixels(1.0, 1.0)).collect(),
                    labels: dets.into_iter().map(|d| d.label).collect(),
                }
            }
            Task::Refcoco => {
                let s = 1024usize;
                let bbox = crate::segmentation::parse_segmentation(&ex.suffix)
                    .map(|p| {
                        let l = p.loc.map(|v| v as f64 / 1023.0 * s as f64);
                        [l[1], l[0], l[3], l[2]]
                    })
                    .unwrap_or([0.0; 4]);
                Reference::Region {
                    width: s,
                    height: s,
                    bbox,
                    mask: None,
                }
            }
            _ => Reference::Texts(vec![ex.suffix.clone()]),
        })
        .collect()
}
