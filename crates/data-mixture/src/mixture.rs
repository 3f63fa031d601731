//! Weighted mixtures of datasets, deterministic from a seed, with a serialisable state so a
//! resumed run continues the exact same stream (big_vision `input_pipeline.training`: weights
//! are normalised, zero weights skipped, each source's share reported).
//!
//! Each draw picks a source with probability ∝ weight, then takes the next example of that
//! source's current epoch permutation (seeded by seed, source, epoch), evaluated position by
//! position ([`Permutation`]): a source of a billion rows costs no memory to shuffle.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::rng::{Permutation, Rng};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourceState {
    pub epoch: u64,
    pub position: usize,
    /// Examples drawn from this source so far.
    pub seen: u64,
    /// Examples in the source when the stream started (0 in states saved before this was
    /// recorded): a resume checks the data did not change.
    #[serde(default)]
    pub len: usize,
}

/// Everything needed to continue the stream exactly.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MixtureState {
    pub rng: Rng,
    pub sources: Vec<SourceState>,
    /// States saved before this field existed continue with the shuffle they started with.
    #[serde(default = "Shuffle::saved_before")]
    pub shuffle: Shuffle,
}

/// How an epoch is shuffled.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Shuffle {
    /// A shuffled index list per source (8 bytes per example); streams begun before the
    /// Feistel permutation.
    FisherYates,
    /// [`Permutation`]: O(1) memory.
    Feistel,
}

impl Shuffle {
    fn saved_before() -> Self {
        Shuffle::FisherYates
    }
}

pub struct Mixture {
    pub sources: Vec<Arc<dyn Dataset>>,
    /// Normalised weights.
    pub weights: Vec<f64>,
    pub seed: u64,
    pub state: MixtureState,
    perms: Vec<(u64, Vec<usize>)>,
}

impl Mixture {
    pub fn new(sources: Vec<Arc<dyn Dataset>>, weights: &[f64], seed: u64) -> Result<Self> {
        if sources.len() != weights.len() || sources.is_empty() {
            return Err(Error::Invalid(format!(
                "{} sources but {} weights",
                sources.len(),
                weights.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(Error::Invalid(format!(
                "mixture weight {w} is not a non-negative number"
            )));
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err(Error::Invalid("mixture weights sum to 0".into()));
        }
        for (s, w) in sources.iter().zip(weights) {
            if *w > 0.0 && s.is_empty() {
                return Err(Error::Invalid(format!(
                    "source {} has weight {w} but no examples",
                    s.name()
                )));
            }
        }
        let n = sources.len();
        let states = sources
            .iter()
            .map(|s| SourceState {
                len: s.len(),
                ..Default::default()
            })
            .collect();
        Ok(Self {
            weights: weights.iter().map(|w| w / total).collect(),
            sources,
            seed,
            state: MixtureState {
                rng: Rng::derive(seed, &[0x006d_6978]),
                sources: states,
                shuffle: Shuffle::Feistel,
            },
            perms: vec![(u64::MAX, Vec::new()); n],
        })
    }

    /// Continues a saved stream. Refused when the sources are not the ones it was saved with
    /// (another number of sources or of examples): the stream would differ, or index past the
    /// end of a file that shrank.
    pub fn restore(&mut self, state: MixtureState) -> Result<()> {
        if state.sources.len() != self.sources.len() {
            return Err(Error::Invalid(format!(
                "the saved data stream has {} sources, the stage {}",
                state.sources.len(),
                self.sources.len()
            )));
        }
        for (saved, src) in state.sources.iter().zip(&self.sources) {
            let now = src.len();
            if (saved.len != 0 && saved.len != now) || saved.position >= now.max(1) {
                let then = if saved.len != 0 {
                    saved.len.to_string()
                } else {
                    format!("more than {}", saved.position)
                };
                return Err(Error::Invalid(format!(
                    "{} has {now} examples but had {then} when the checkpoint was written; a \
                     resumed run needs the data it started with",
                    src.name()
                )));
            }
        }
        self.state = state;
        Ok(())
    }

    /// One line per source: name, examples, share.
    pub fn describe(&self) -> Vec<String> {
        self.sources
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| format!("{}: {} examples ({:.3}%)", s.name(), s.len(), w * 100.0))
            .collect()
    }

    /// The shuffled index list of `source` in `epoch` ([`Shuffle::FisherYates`]).
    fn permutation(&mut self, source: usize, epoch: u64) -> &[usize] {
        if self.perms[source].0 != epoch {
            let mut p: Vec<usize> = (0..self.sources[source].len()).collect();
            Rng::derive(self.seed, &[source as u64, epoch]).shuffle(&mut p);
            self.perms[source] = (epoch, p);
        }
        &self.perms[source].1
    }

    /// Next (source, index) of the stream.
    pub fn next_index(&mut self) -> (usize, usize) {
        let u = self.state.rng.f32() as f64;
        let mut acc = 0.0;
        let mut source = self.weights.iter().rposition(|w| *w > 0.0).unwrap();
        for (i, w) in self.weights.iter().enumerate() {
            acc += w;
            if *w > 0.0 && u < acc {
                source = i;
                break;
            }
        }
        let st = self.state.sources[source];
        let len = self.sources[source].len();
        let index = match self.state.shuffle {
            Shuffle::Feistel => {
                Permutation::new(len, self.seed, &[source as u64, st.epoch]).at(st.position)
            }
            Shuffle::FisherYates => self.permutation(source, st.epoch)[st.position],
        };
        let s = &mut self.state.sources[source];
        s.position += 1;
        s.seen += 1;
        if s.position == len {
            s.position = 0;
            s.epoch += 1;
        }
        (source, index)
    }
}

/// K examples of a dataset drawn without replacement by a seed (few-shot transfer).
pub struct FewShot {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
    name: String,
}

impl FewShot {
    pub fn new(inner: Arc<dyn Dataset>, k: usize, seed: u64) -> Result<Self> {
        if k > inner.len() {
            return Err(Error::Invalid(format!(
                "few-shot k = {k} but {} has {} examples",
                inner.name(),
                inner.len()
            )));
        }
        let mut p: Vec<usize> = (0..inner.len()).collect();
        Rng::derive(seed, &[0x6673]).shuffle(&mut p);
        p.truncate(k);
        let name = format!("{}[{k}-shot, seed {seed}]", inner.name());
        Ok(Self {
            inner,
            indices: p,
            name,
        })
    }
}

impl Dataset for FewShot {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<crate::dataset::Example> {
        self.inner.get(self.indices[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{SynthDataset, SynthTask};

    fn mix(seed: u64) -> Mixture {
        let a: Arc<dyn Dataset> = Arc::new(SynthDataset::new(SynthTask::Caption, 1, 0, 10, true));
        let b: Arc<dyn Dataset> = Arc::new(SynthDataset::new(SynthTask::Ocr, 1, 0, 7, true));
        let c: Arc<dyn Dataset> = Arc::new(SynthDataset::new(SynthTask::Vqa, 1, 0, 5, true));
        Mixture::new(vec![a, b, c], &[3.0, 1.0, 0.0], seed).unwrap()
    }

    #[test]
    fn same_seed_same_stream_and_weights_respected() {
        let (mut m1, mut m2) = (mix(5), mix(5));
        let s1: Vec<_> = (0..1000).map(|_| m1.next_index()).collect();
        let s2: Vec<_> = (0..1000).map(|_| m2.next_index()).collect();
        assert_eq!(s1, s2);
        assert_ne!(
            s1,
            (0..1000).map(|_| mix(6).next_index()).collect::<Vec<_>>()[..]
        );
        let from_a = s1.iter().filter(|(s, _)| *s == 0).count();
        assert!((700..800).contains(&from_a), "source 0 share {from_a}/1000");
        assert!(
            s1.iter().all(|(s, _)| *s != 2),
            "zero weight is never drawn"
        );
        // Every epoch is a permutation: the first 10 draws of source 0 cover 0..10.
        let mut first: Vec<usize> = s1
            .iter()
            .filter(|(s, _)| *s == 0)
            .take(10)
            .map(|(_, i)| *i)
            .collect();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        assert_eq!(m1.state.sources[0].seen as usize, from_a);
    }

    #[test]
    fn resume_from_state_continues_identically() {
        let mut m = mix(9);
        for _ in 0..123 {
            m.next_index();
        }
        let saved = serde_json::to_string(&m.state).unwrap();
        let rest: Vec<_> = (0..200).map(|_| m.next_index()).collect();
        let mut r = mix(9);
        r.state = serde_json::from_str(&saved).unwrap();
        let again: Vec<_> = (0..200).map(|_| r.next_index()).collect();
        assert_eq!(rest, again);
    }

    #[test]
    fn a_state_saved_before_the_feistel_shuffle_keeps_its_order() {
        let mut m = mix(9);
        let mut old = serde_json::to_value(&m.state).unwrap();
        old.as_object_mut().unwrap().remove("shuffle");
        m.state = serde_json::from_value(old).unwrap();
        assert_eq!(m.state.shuffle, Shuffle::FisherYates);
        let mut p: Vec<usize> = (0..10).collect();
        Rng::derive(9, &[0, 0]).shuffle(&mut p);
        let from_a: Vec<usize> = (0..100)
            .map(|_| m.next_index())
            .filter(|(s, _)| *s == 0)
            .take(10)
            .map(|(_, i)| i)
            .collect();
        assert_eq!(from_a, p);
    }

    #[test]
    fn bad_weights_are_refused() {
        let a: Arc<dyn Dataset> = Arc::new(SynthDataset::new(SynthTask::Caption, 1, 0, 10, true));
        assert!(Mixture::new(vec![a.clone()], &[0.0], 1).is_err());
        assert!(Mixture::new(vec![a.clone()], &[-1.0], 1).is_err());
        assert!(Mixture::new(vec![a], &[1.0, 2.0], 1).is_err());
    }

    #[test]
    fn few_shot_is_a_seeded_subset() {
        let a: Arc<dyn Dataset> = Arc::new(SynthDataset::new(SynthTask::Caption, 1, 0, 100, true));
        let f1 = FewShot::new(a.clone(), 16, 3).unwrap();
        let f2 = FewShot::new(a.clone(), 16, 3).unwrap();
        let f3 = FewShot::new(a.clone(), 16, 4).unwrap();
        assert_eq!(f1.indices, f2.indices);
        assert_ne!(f1.indices, f3.indices);
        assert!(FewShot::new(a, 101, 0).is_err());
    }
}
