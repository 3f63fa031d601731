//! Near-duplicate removal: a perceptual hash per image and a Hamming-distance search of the
//! training images against the evaluation images (the paper removes near-duplicates of the
//! evaluation sets from its pretraining data).
//!
//! The hash is the DCT pHash (as the `imagehash` package): grey levels (ITU-R 601 luma), resized
//! to 32×32, 2-D DCT-II, the 8×8 lowest frequencies compared with their median → 64 bits.
//! Re-encoding, rescaling and small colour shifts move a few bits; different images differ in
//! about half.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use crate::dataset::{parse_line, ImageSource};
use crate::error::{Error, Result};
use crate::image::{resize, ResizeMethod, Rgb};

/// The non-empty lines of a JSONL file with their image paths (checked like training does).
pub fn jsonl_images(path: &Path) -> Result<Vec<(usize, String, Vec<PathBuf>)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex = parse_line(path, dir, i + 1, line, false)?;
        let files = ex
            .images
            .into_iter()
            .filter_map(|s| match s {
                ImageSource::File(p) => Some(p),
                ImageSource::Synth(_) | ImageSource::Grey | ImageSource::Encoded(_) => None,
            })
            .collect();
        out.push((i + 1, line.to_string(), files));
    }
    Ok(out)
}

/// pHashes of files, in parallel; a missing or undecodable image is an error naming it.
pub fn hash_files(files: &[PathBuf]) -> Result<Vec<u64>> {
    files
        .par_iter()
        .map(|p| crate::image::load(p).map(|im| phash(&im)))
        .collect()
}

/// A training line removed as a near-duplicate of an evaluation image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Removed {
    pub line: usize,
    pub image: PathBuf,
    /// The evaluation image it matches and the Hamming distance.
    pub matches: PathBuf,
    pub distance: u32,
}

/// Lines kept: (line number, text as written).
pub type Kept = Vec<(usize, String)>;

/// Splits the lines of `train` into those kept and those with an image within `threshold` bits
/// of an image of `against`.
pub fn filter_jsonl(
    train: &Path,
    against: &[PathBuf],
    threshold: u32,
) -> Result<(Kept, Vec<Removed>)> {
    let mut eval_files = Vec::new();
    for a in against {
        eval_files.extend(jsonl_images(a)?.into_iter().flat_map(|(_, _, f)| f));
    }
    eval_files.sort();
    eval_files.dedup();
    let eval_hashes = hash_files(&eval_files)?;
    let lines = jsonl_images(train)?;
    let files: Vec<PathBuf> = lines.iter().flat_map(|l| l.2.clone()).collect();
    let hashes = hash_files(&files)?;
    let hits = near_duplicates(&hashes, &eval_hashes, threshold);
    let (mut kept, mut removed) = (Vec::new(), Vec::new());
    let mut k = 0;
    for (line, text, imgs) in lines {
        let hit = (k..k + imgs.len())
            .filter_map(|j| hits[j].map(|(e, d)| (j, e, d)))
            .min_by_key(|x| x.2);
        k += imgs.len();
        match hit {
            Some((j, e, d)) => removed.push(Removed {
                line,
                image: files[j].clone(),
                matches: eval_files[e].clone(),
                distance: d,
            }),
            None => kept.push((line, text)),
        }
    }
    Ok((kept, removed))
}

/// Rewrites a JSONL line's relative image paths to absolute ones (for output elsewhere).
pub fn absolute_images(line: &str, dir: &Path) -> Result<String> {
    let mut v: Value =
        serde_json::from_str(line).map_err(|e| Error::Invalid(format!("malformed JSON: {e}")))?;
    let fix = |s: &Value| -> Value {
        match s.as_str() {
            Some(p) if Path::new(p).is_relative() => {
                Value::String(dir.join(p).display().to_string())
            }
            _ => s.clone(),
        }
    };
    let new = match &v["image"] {
        Value::Array(a) => Value::Array(a.iter().map(fix).collect()),
        other => fix(other),
    };
    v["image"] = new;
    Ok(v.to_string())
}

/// The 64-bit DCT perceptual hash of an image.
pub fn phash(img: &Rgb) -> u64 {
    let grey: Vec<f32> = img
        .data
        .chunks_exact(3)
        .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
        .flat_map(|l| [l, l, l])
        .collect();
    let grey = Rgb {
        width: img.width,
        height: img.height,
        data: grey,
    };
    let small = resize(&grey, 32, 32, ResizeMethod::Bicubic);
    let px: Vec<f64> = small.data.chunks_exact(3).map(|p| p[0] as f64).collect();
    // DCT-II (unnormalised, as scipy's default): rows, then columns; only 8 outputs each.
    let cos: Vec<f64> = (0..8)
        .flat_map(|k| {
            (0..32)
                .map(move |n| (std::f64::consts::PI * k as f64 * (2 * n + 1) as f64 / 64.0).cos())
        })
        .collect();
    let mut rows = [[0f64; 8]; 32]; // [y][u]
    for (y, row) in rows.iter_mut().enumerate() {
        for (u, out) in row.iter_mut().enumerate() {
            *out = (0..32).map(|x| px[y * 32 + x] * cos[u * 32 + x]).sum();
        }
    }
    let mut low = [0f64; 64]; // [v][u]
    for v in 0..8 {
        for u in 0..8 {
            low[v * 8 + u] = (0..32).map(|y| rows[y][u] * cos[v * 32 + y]).sum();
        }
    }
    let mut sorted = low;
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = (sorted[31] + sorted[32]) / 2.0;
    low.iter()
        .enumerate()
        .fold(0u64, |h, (i, &c)| if c > median { h | (1 << i) } else { h })
}

pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// For each query hash, the closest reference within `threshold` bits: (reference index,
/// distance). Multi-index search: with the 64 bits cut into `threshold + 1` chunks, two hashes
/// within `threshold` bits agree on at least one whole chunk (pigeonhole), so only references
/// sharing a chunk are compared.
pub fn near_duplicates(
    queries: &[u64],
    references: &[u64],
    threshold: u32,
) -> Vec<Option<(usize, u32)>> {
    let chunks = (threshold as usize + 1).min(64);
    let bounds: Vec<(u32, u32)> = (0..chunks)
        .map(|c| ((c * 64 / chunks) as u32, ((c + 1) * 64 / chunks) as u32))
        .collect();
    let key = |h: u64, (lo, hi): (u32, u32)| {
        let width = hi - lo;
        let mask = if width == 64 {
            u64::MAX
        } else {
            (1u64 << width) - 1
        };
        (h >> lo) & mask
    };
    let mut index: Vec<HashMap<u64, Vec<usize>>> = vec![HashMap::new(); chunks];
    for (i, &h) in references.iter().enumerate() {
        for (c, b) in bounds.iter().enumerate() {
            index[c].entry(key(h, *b)).or_default().push(i);
        }
    }
    queries
        .par_iter()
        .map(|&q| {
            let mut best: Option<(usize, u32)> = None;
            for (c, b) in bounds.iter().enumerate() {
                for &i in index[c].get(&key(q, *b)).map(Vec::as_slice).unwrap_or(&[]) {
                    let d = hamming(q, references[i]);
                    if d <= threshold && best.is_none_or(|(_, bd)| d < bd) {
                        best = Some((i, d));
                    }
                }
            }
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Scene;

    #[test]
    fn near_copies_are_close_and_other_images_far() {
        let a = Scene::generate(0, 0, 1).render(96);
        let b = Scene::generate(0, 0, 2).render(96);
        let ha = phash(&a);
        // Re-encoded as JPEG, and rendered at another size.
        let jpeg = crate::transform::jpeg_roundtrip(&a, 60).unwrap();
        let other_size = Scene::generate(0, 0, 1).render(80);
        assert!(
            hamming(ha, phash(&jpeg)) <= 4,
            "{}",
            hamming(ha, phash(&jpeg))
        );
        assert!(hamming(ha, phash(&other_size)) <= 6);
        assert!(hamming(ha, phash(&b)) > 12, "{}", hamming(ha, phash(&b)));
        // Half the bits are set (the median split).
        assert!((24..=40).contains(&ha.count_ones()), "{}", ha.count_ones());
    }

    #[test]
    fn multi_index_search_equals_brute_force() {
        let mut rng = crate::rng::Rng::new(1);
        let refs: Vec<u64> = (0..300).map(|_| rng.next_u64()).collect();
        // Queries: perturbed references (0..8 flipped bits) and random hashes.
        let mut queries = Vec::new();
        for i in 0..200 {
            let mut q = refs[i % refs.len()];
            for _ in 0..rng.below(9) {
                q ^= 1 << rng.below(64);
            }
            queries.push(if i % 3 == 0 { rng.next_u64() } else { q });
        }
        for t in [0u32, 3, 6, 10] {
            let got = near_duplicates(&queries, &refs, t);
            for (q, g) in queries.iter().zip(&got) {
                let want = refs
                    .iter()
                    .map(|r| hamming(*q, *r))
                    .filter(|d| *d <= t)
                    .min();
                assert_eq!(g.map(|x| x.1), want, "threshold {t}");
            }
        }
    }
}
