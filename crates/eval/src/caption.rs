//! Captioning metrics as pycocoevalcap computes them: corpus BLEU-1..4 (`closest` reference
//! length, its `tiny`/`small` smoothing constants) and CIDEr-D (σ = 6, clipped tf-idf n-grams,
//! ×10), both on PTB-tokenised text (see [`crate::ptb`]).

use std::collections::HashMap;

type Ngram = Vec<String>;

/// Counts of the 1..=n-grams of a tokenised sentence.
fn ngram_counts(sentence: &str, n: usize) -> HashMap<Ngram, usize> {
    let words: Vec<String> = sentence.split_whitespace().map(String::from).collect();
    let mut counts = HashMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU-1..4 of tokenised `predictions` against tokenised `references` (pycocoevalcap
/// `Bleu(4)` with `option='closest'`).
pub fn bleu(predictions: &[String], references: &[Vec<String>]) -> [f64; 4] {
    const N: usize = 4;
    let (tiny, small) = (1e-15, 1e-9);
    let (mut testlen, mut reflen) = (0.0f64, 0.0f64);
    let mut guess = [0.0f64; N];
    let mut correct = [0.0f64; N];
    for (pred, refs) in predictions.iter().zip(references) {
        let mut max_ref: HashMap<Ngram, usize> = HashMap::new();
        let mut lens = Vec::new();
        for r in refs {
            lens.push(r.split_whitespace().count());
            for (g, c) in ngram_counts(r, N) {
                let m = max_ref.entry(g).or_insert(0);
                *m = (*m).max(c);
            }
        }
        let tl = pred.split_whitespace().count();
        // Closest reference length; ties go to the shorter one (Python's min over (diff, len)).
        let rl = lens
            .iter()
            .map(|l| ((*l as i64 - tl as i64).abs(), *l))
            .min()
            .map(|(_, l)| l)
            .unwrap_or(0);
        testlen += tl as f64;
        reflen += rl as f64;
        for (k, g) in guess.iter_mut().enumerate() {
            *g += tl.saturating_sub(k) as f64;
        }
        for (g, c) in ngram_counts(pred, N) {
            correct[g.len() - 1] += c.min(max_ref.get(&g).copied().unwrap_or(0)) as f64;
        }
    }
    let mut out = [0.0; N];
    let mut b = 1.0f64;
    for k in 0..N {
        b *= (correct[k] + tiny) / (guess[k] + small);
        out[k] = b.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (testlen + tiny) / (reflen + small);
    if ratio < 1.0 {
        for o in &mut out {
            *o *= (1.0 - 1.0 / ratio).exp();
        }
    }
    out
}

/// tf-idf vectors of one sentence per n-gram order, their norms, and the "length" pycocoevalcap
/// uses (which, by a long-standing quirk kept here for parity, counts bigrams).
struct Vector {
    weights: [HashMap<Ngram, f64>; 4],
    norm: [f64; 4],
    length: f64,
}

/// CIDEr-D of tokenised predictions: the corpus mean and the per-example scores (pycocoevalcap
/// `Cider()`; document frequencies come from the references of this corpus).
pub fn cider_d(predictions: &[String], references: &[Vec<String>]) -> (f64, Vec<f64>) {
    const N: usize = 4;
    let sigma = 6.0f64;
    let refs: Vec<Vec<HashMap<Ngram, usize>>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| ngram_counts(r, N)).collect())
        .collect();
    let mut df: HashMap<&Ngram, f64> = HashMap::new();
    for rs in &refs {
        let mut seen: Vec<&Ngram> = rs.iter().flat_map(|r| r.keys()).collect();
        seen.sort();
        seen.dedup();
        for g in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (refs.len() as f64).ln();
    let vec = |counts: &HashMap<Ngram, usize>| {
        let mut v = Vector {
            weights: Default::default(),
            norm: [0.0; 4],
            length: 0.0,
        };
        for (g, tf) in counts {
            let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
            let n = g.len() - 1;
            let w = *tf as f64 * (ref_len - d);
            v.weights[n].insert(g.clone(), w);
            v.norm[n] += w * w;
            if n == 1 {
                v.length += *tf as f64;
            }
        }
        v.norm.iter_mut().for_each(|x| *x = x.sqrt());
        v
    };
    let mut scores = Vec::with_capacity(predictions.len());
    for (pred, rs) in predictions.iter().zip(&refs) {
        let h = vec(&ngram_counts(pred, N));
        let mut score = [0.0f64; N];
        for r in rs {
            let r = vec(r);
            let delta = h.length - r.length;
            for (n, total) in score.iter_mut().enumerate() {
                let mut val = 0.0;
                for (g, w) in &h.weights[n] {
                    let wr = r.weights[n].get(g).copied().unwrap_or(0.0);
                    val += w.min(wr) * wr;
                }
                if h.norm[n] != 0.0 && r.norm[n] != 0.0 {
                    val /= h.norm[n] * r.norm[n];
                }
                val *= (-(delta * delta) / (2.0 * sigma * sigma)).exp();
                *total += val;
            }
        }
        let avg = score.iter().sum::<f64>() / N as f64 / rs.len().max(1) as f64 * 10.0;
        scores.push(avg);
    }
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    (mean, scores)
}
