//! Decoding on a tiny random model: the cache changes nothing, beam 1 is greedy, beam search
//! finds the best sequence (checked by scoring every possible sequence), reported log-probs are
//! those of a plain forward pass.

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use pali_eval::{
    decode, greedy_with_logits, DecodeOptions, Decoded, PaddedPrompts, Prompts, Sampler,
};
use pali_model::mask::make_attn_mask;
use pali_model::paligemma::bool_tensor;
use pali_model::presets::tiny;
use pali_model::{ForwardOptions, ModelInput, PaliGemma, PaliGemmaConfig};

type B = Flex;

const EOS: u32 = 1;
/// Only these tokens (and EOS) may be produced, so every sequence can be enumerated.
const ALLOWED: [u32; 3] = [5, 6, 7];
const VOCAB: usize = 40;
const IMAGE: usize = 39;

fn model(seed: u64) -> (PaliGemma<B>, PaliGemmaConfig) {
    let cfg = tiny(VOCAB, IMAGE, 16);
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
    (cfg.init::<B>(&Default::default()), cfg)
}

fn forbid() -> Vec<u32> {
    (0..VOCAB as u32 - 1)
        .filter(|t| *t != EOS && !ALLOWED.contains(t))
        .collect()
}

/// Two prompts of different lengths, image slots first.
fn prompts(cfg: &PaliGemmaConfig) -> (Vec<Vec<i64>>, Vec<f32>) {
    let n = cfg.num_image_tokens();
    let mut a = vec![IMAGE as i64; n];
    a.extend([2, 10, 11, 3]);
    let mut b = vec![IMAGE as i64; n];
    b.extend([2, 12, 3]);
    let px: Vec<f32> = (0..2 * 3 * 16 * 16)
        .map(|i| ((i * 37) % 17) as f32 / 8.5 - 1.0)
        .collect();
    (vec![a, b], px)
}

fn make_prompts(ids: &[Vec<i64>], px: &[f32]) -> Prompts<B> {
    let b = ids.len();
    Prompts {
        pixel_values: Tensor::from_data(
            TensorData::new(px[..b * 768].to_vec(), [b, 1, 3, 16, 16]),
            &Default::default(),
        ),
        ids: ids.to_vec(),
        mask_ar: ids.iter().map(|r| vec![0; r.len()]).collect(),
    }
}

fn opts(sampler: Sampler, max_new: usize) -> DecodeOptions {
    DecodeOptions {
        sampler,
        max_new,
        eos: EOS,
        forbid: forbid(),
        seed: 7,
        use_cache: true,
    }
}

/// Log-probs of `gen` after `prompt` (one row), by one plain forward pass, same logit mask.
fn score(model: &PaliGemma<B>, prompt: &[i64], px: &[f32], gen: &[u32]) -> Vec<f32> {
    let d = Default::default();
    let mut ids = prompt.to_vec();
    ids.extend(gen.iter().map(|t| *t as i64));
    let s = ids.len();
    let mut ar = vec![0i64; prompt.len()];
    ar.extend(vec![1; gen.len()]);
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, s]), &d);
    let masks = make_attn_mask(
        int(ar),
        bool_tensor::<B, 2>(vec![true; s], [1, s], &d),
        None,
    );
    let input = ModelInput {
        pixel_values: Tensor::from_data(TensorData::new(px[..768].to_vec(), [1, 1, 3, 16, 16]), &d),
        input_ids: int(ids),
        positions: Tensor::<B, 1, Int>::arange(0..s as i64, &d).reshape([1, s]),
        masks,
    };
    let out = model
        .forward(input, ForwardOptions::logits_from(prompt.len() - 1))
        .unwrap();
    let v = out.logits.dims()[2];
    let logits: Vec<f32> = out.logits.into_data().iter::<f32>().collect();
    let f = forbid();
    gen.iter()
        .enumerate()
        .map(|(i, t)| {
            let mut row = logits[i * v..(i + 1) * v].to_vec();
            for x in &f {
                row[*x as usize] = f32::NEG_INFINITY;
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            row[*t as usize] - lse
        })
        .collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn cache_changes_nothing_and_logprobs_are_the_models() {
    let (m, cfg) = model(1);
    let (ids, px) = prompts(&cfg);
    for sampler in [Sampler::Greedy, Sampler::Beam(3), Sampler::Temperature(1.0)] {
        let mut o = opts(sampler, 6);
        let with = decode(&m, make_prompts(&ids, &px), None, &o).unwrap();
        o.use_cache = false;
        let without = decode(&m, make_prompts(&ids, &px), None, &o).unwrap();
        for (a, b) in with.iter().zip(&without) {
            assert_eq!(a.tokens, b.tokens, "{sampler:?}");
            assert!(
                close(&a.logprobs, &b.logprobs, 1e-4),
                "{sampler:?}: {a:?} vs {b:?}"
            );
        }
    }
    // Row 0's reported log-probs are what a plain forward pass gives.
    let d = &decode(&m, make_prompts(&ids, &px), None, &opts(Sampler::Greedy, 6)).unwrap()[0];
    let mut gen = d.tokens.clone();
    if d.finished {
        gen.push(EOS);
    }
    let want = score(&m, &ids[0], &px, &gen);
    assert!(
        close(&d.logprobs, &want, 1e-4),
        "{:?} vs {want:?}",
        d.logprobs
    );
}

#[test]
fn batched_rows_decode_as_if_alone() {
    let (m, cfg) = model(2);
    let (ids, px) = prompts(&cfg);
    let o = opts(Sampler::Beam(2), 5);
    let both = decode(&m, make_prompts(&ids, &px), None, &o).unwrap();
    let alone = decode(&m, make_prompts(&ids[..1], &px), None, &o).unwrap();
    assert_eq!(both[0].tokens, alone[0].tokens);
    assert!(close(&both[0].logprobs, &alone[0].logprobs, 1e-4));
}

#[test]
fn beam_one_is_greedy_and_wide_beams_find_the_best_sequence() {
    let max_new = 4;
    for seed in [3, 4, 5] {
        let (m, cfg) = model(seed);
        let (ids, px) = prompts(&cfg);
        let greedy = decode(
            &m,
            make_prompts(&ids, &px),
            None,
            &opts(Sampler::Greedy, max_new),
        )
        .unwrap();
        let beam1 = decode(
            &m,
            make_prompts(&ids, &px),
            None,
            &opts(Sampler::Beam(1), max_new),
        )
        .unwrap();
        assert_eq!(greedy, beam1, "seed {seed}");

        // Every finished sequence of at most `max_new` tokens: 1 + 3 + 9 + 27 of them.
        let mut best = (f64::NEG_INFINITY, Vec::new());
        let mut stack: Vec<Vec<u32>> = vec![vec![]];
        while let Some(prefix) = stack.pop() {
            let mut seq = prefix.clone();
            seq.push(EOS);
            let total: f64 = score(&m, &ids[0], &px, &seq)
                .iter()
                .map(|x| *x as f64)
                .sum();
            if total > best.0 {
                best = (total, prefix.clone());
            }
            if prefix.len() + 1 < max_new {
                for t in ALLOWED {
                    let mut p = prefix.clone();
                    p.push(t);
                    stack.push(p);
                }
            }
        }
        // 27 live hypotheses keep every prefix alive: the search is exhaustive.
        let wide: Decoded = decode(
            &m,
            make_prompts(&ids[..1], &px),
            None,
            &opts(Sampler::Beam(27), max_new),
        )
        .unwrap()
        .remove(0);
        assert!(wide.finished);
        assert_eq!(wide.tokens, best.1, "seed {seed}");
        assert!((wide.total_logprob() - best.0).abs() < 1e-4);
        let g = &greedy[0];
        if g.finished {
            assert!(wide.total_logprob() >= g.total_logprob() - 1e-6);
        }
        // A narrower beam never returns something better than the optimum, and what it
        // returns is scored correctly.
        let b3 = decode(
            &m,
            make_prompts(&ids[..1], &px),
            None,
            &opts(Sampler::Beam(3), max_new),
        )
        .unwrap()
        .remove(0);
        let mut gen = b3.tokens.clone();
        if b3.finished {
            gen.push(EOS);
            assert!(b3.total_logprob() <= best.0 + 1e-4);
        }
        assert!(close(&b3.logprobs, &score(&m, &ids[0], &px, &gen), 1e-4));
    }
}

#[test]
fn sampling_is_seeded_and_best_of_n_picks_the_most_likely() {
    let (m, cfg) = model(6);
    let (ids, px) = prompts(&cfg);
    let a = decode(
        &m,
        make_prompts(&ids, &px),
        None,
        &opts(Sampler::Temperature(1.0), 6),
    )
    .unwrap();
    let b = decode(
        &m,
        make_prompts(&ids, &px),
        None,
        &opts(Sampler::Temperature(1.0), 6),
    )
    .unwrap();
    assert_eq!(a, b, "same seed, same samples");
    let mut o = opts(Sampler::Temperature(1.0), 6);
    let samples: Vec<Decoded> = (0..4)
        .map(|s| {
            o.seed = s;
            decode(&m, make_prompts(&ids[..1], &px), None, &o)
                .unwrap()
                .remove(0)
        })
        .collect();
    assert!(
        samples.windows(2).any(|w| w[0].tokens != w[1].tokens),
        "samples all equal"
    );
    let best = decode(
        &m,
        make_prompts(&ids[..1], &px),
        None,
        &opts(Sampler::BestOfN { n: 8, t: 1.0 }, 6),
    )
    .unwrap()
    .remove(0);
    let one = decode(
        &m,
        make_prompts(&ids[..1], &px),
        None,
        &opts(Sampler::Temperature(1.0), 6),
    )
    .unwrap()
    .remove(0);
    // Sample 0 of best-of-8 uses the same stream as the single sample.
    assert!(best.total_logprob() >= one.total_logprob());
    // Forbidden tokens never appear.
    for d in a.iter().chain(&samples) {
        assert!(d.tokens.iter().all(|t| ALLOWED.contains(t)), "{d:?}");
    }
}

/// The prompts of [`make_prompts`] as one right-padded model input, in the same layout.
fn padded(ids: &[Vec<i64>], px: &[f32], valid: Option<Vec<bool>>) -> PaddedPrompts<B> {
    let d = Default::default();
    let (b, s) = (ids.len(), ids.iter().map(|r| r.len()).max().unwrap());
    let (mut flat, mut ar, mut real) = (vec![0i64; b * s], vec![1i64; b * s], vec![false; b * s]);
    for (r, row) in ids.iter().enumerate() {
        flat[r * s..r * s + row.len()].copy_from_slice(row);
        ar[r * s..r * s + row.len()].iter_mut().for_each(|a| *a = 0);
        real[r * s..r * s + row.len()]
            .iter_mut()
            .for_each(|v| *v = true);
    }
    let real = valid.unwrap_or(real);
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, s]), &d);
    let mask = || bool_tensor::<B, 2>(real.clone(), [b, s], &d);
    PaddedPrompts {
        input: ModelInput {
            pixel_values: make_prompts(ids, px).pixel_values,
            input_ids: int(flat),
            positions: Tensor::<B, 1, Int>::arange(0..s as i64, &d)
                .reshape([1, s])
                .expand([b, s]),
            masks: make_attn_mask(int(ar), mask(), None),
        },
        input_mask: mask(),
    }
}

#[test]
fn greedy_with_logits_is_greedy_decoding() {
    let (m, cfg) = model(8);
    let (ids, px) = prompts(&cfg);
    let mut o = opts(Sampler::Greedy, 5);
    o.forbid.clear();
    let want = decode(&m, make_prompts(&ids, &px), None, &o).unwrap();
    let (got, logits) =
        greedy_with_logits(&m, padded(&ids, &px, None), None, 5, Some(EOS)).unwrap();
    // The same inputs give the same numbers, bit for bit.
    assert_eq!(got, want);
    let steps = got
        .iter()
        .map(|d| d.tokens.len() + usize::from(d.finished))
        .max()
        .unwrap();
    assert_eq!(logits.len(), steps);
    for (r, d) in got.iter().enumerate() {
        for (i, lp) in d.logprobs.iter().enumerate() {
            let row = &logits[i][r];
            assert_eq!(row.len(), cfg.predictable_vocab());
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            let tok = d.tokens.get(i).copied().unwrap_or(EOS) as usize;
            assert_eq!(row[tok] - lse, *lp);
        }
    }
    // Padding must follow the real tokens of a row.
    let n = ids[0].len();
    let mut left = vec![false; n];
    left[1..].iter_mut().for_each(|v| *v = true);
    assert!(greedy_with_logits(&m, padded(&ids[..1], &px, Some(left)), None, 2, None).is_err());
}
