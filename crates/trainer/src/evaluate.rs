//! A stage's evaluation of the current model: decode validation examples and score them with
//! the stage's task (the evaluators of `pali eval`), and the validation perplexity of every
//! source with the masks and loss weights of a training step.

use std::collections::HashMap;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use pali_data::batch::{BatchBuilder, Encoded};
use pali_data::dataset::{Dataset, Example, ImageSource};
use pali_eval::perplexity::{row_nll, Perplexity};
use pali_eval::run::{predict, references_from_suffix, PredictOptions};
use pali_eval::{score, DecodeOptions, Prediction, Task};
use pali_model::{PaliGemma, PaliGemmaConfig};

use crate::config::{Attention, LossOn};
use crate::error::Result;
pub use crate::events::Eval;
use crate::inputs::step_inputs;
use crate::stage::StagePlan;

/// Decodes `stage.eval.examples` validation examples and scores them, and measures validation
/// perplexity of every source that has validation data. `plan.evaluates()` must hold.
pub fn evaluate<B: Backend>(
    model: &PaliGemma<B>,
    plan: &StagePlan,
    device: &B::Device,
) -> Result<Eval> {
    let stage = plan.stage;
    let builder = plan.batch_builder();
    let tok = &builder.tokenizer;
    // The decoded set: `eval.jsonl` when given, else the first source's validation split.
    let val = plan
        .eval_set
        .clone()
        .or_else(|| plan.val[0].clone())
        .expect("a stage that evaluates has validation data");
    let n = stage.eval.examples.min(val.len());
    let examples: Vec<Example> = (0..n)
        .map(|i| val.get(i))
        .collect::<std::result::Result<_, _>>()?;
    let task = plan.eval_task();
    let opts = PredictOptions {
        decode: DecodeOptions {
            sampler: *stage.eval.decode,
            max_new: stage.text_len,
            eos: tok.eos,
            // PaliGemma 2 decodes detections without its noise class.
            forbid: tok
                .noise
                .filter(|_| stage.sources.iter().any(|x| x.noise_boxes.is_some()))
                .into_iter()
                .collect(),
            seed: plan.seed(),
            use_cache: true,
        },
        text_len: stage.text_len,
        resolution: stage.resolution,
        resize: stage.resize,
        batch_size: 16,
        transforms: builder.transforms,
    };
    let (preds, _) = predict(model, &plan.model, tok, &examples, &opts, device, |_| {})?;
    // The blind control: the same questions about a constant grey image. What a model still
    // answers right then, it answers from the text alone.
    let blind = if stage.eval.blind {
        let grey: Vec<Example> = examples
            .iter()
            .map(|e| Example {
                images: vec![ImageSource::Grey; e.images.len()],
                ..e.clone()
            })
            .collect();
        let (p, _) = predict(model, &plan.model, tok, &grey, &opts, device, |_| {})?;
        Some(p)
    } else {
        None
    };
    let refs = references_from_suffix(task, &examples);
    let scored: Vec<Prediction> = preds
        .iter()
        .map(|p| Prediction {
            id: p.id.clone(),
            prediction: p.prediction.clone(),
            scores: (task == Task::Detect).then(|| p.object_scores.clone()),
        })
        .collect();
    let pairs: Vec<_> = scored.iter().zip(refs.iter()).collect();
    let mut metrics = score(task, &pairs, None)?;
    if matches!(task, Task::Vqa) {
        if let Some(m) = metrics.as_object_mut() {
            m.insert("by_question_type".into(), by_question_type(&preds));
        }
    }
    if let (Some(b), Some(m)) = (&blind, metrics.as_object_mut()) {
        let right = b.iter().filter(|p| exact(p)).count();
        let mut bm = serde_json::json!({ "exact_match": right as f64 / b.len().max(1) as f64 });
        if matches!(task, Task::Vqa) {
            bm["by_question_type"] = by_question_type(b);
        }
        m.insert("blind".into(), bm);
    }
    let mut correct = 0;
    let mut answers_seen: HashMap<&str, usize> = HashMap::new();
    for p in &preds {
        correct += usize::from(exact(p));
        *answers_seen.entry(p.suffix.trim()).or_default() += 1;
    }
    let shown = preds
        .iter()
        .take(5)
        .map(|p| (p.prefix.clone(), p.suffix.clone(), p.prediction.clone()))
        .collect();
    let majority = answers_seen.values().copied().max().unwrap_or(0);

    // Perplexity per source on its validation examples, masks and loss weights as in training.
    let mut ppl = Perplexity::default();
    for (k, src) in stage.sources.iter().enumerate() {
        let set: Arc<dyn Dataset> = match (&plan.val[k], &plan.eval_set) {
            (Some(v), _) => v.clone(),
            (None, Some(e)) => e.clone(),
            // A JSONL source without `eval.jsonl`: its training data is no validation set.
            (None, None) => continue,
        };
        let name = match src.synth_task() {
            Some(task) => task.name().to_string(),
            None => set.name().to_string(),
        };
        let m = n.min(set.len());
        for chunk in (0..m).collect::<Vec<_>>().chunks(16) {
            let rows = chunk
                .iter()
                .map(|i| {
                    let ex = set.get(*i)?;
                    let enc = builder.encode(&ex, None)?;
                    Ok((k, ex, enc))
                })
                .collect::<std::result::Result<Vec<_>, pali_data::Error>>()?;
            let (nll, _) = batch_nll(
                model,
                &plan.model,
                &builder,
                rows,
                stage.attention,
                stage.loss.on,
                device,
            )?;
            for (n, t) in nll {
                ppl.add(&name, n, t);
            }
        }
    }
    Ok(Eval {
        task,
        accuracy: correct as f64 / n.max(1) as f64,
        majority_baseline: majority as f64 / n.max(1) as f64,
        metrics,
        perplexity: ppl.per_task().into_iter().map(|(k, p, _)| (k, p)).collect(),
        shown,
    })
}

/// The prediction is the reference, whitespace around either aside.
fn exact(p: &pali_eval::run::Predicted) -> bool {
    p.prediction.trim() == p.suffix.trim()
}

/// Exact match per question type, beside what always giving the type's most frequent answer
/// scores. The type is the question's first two words after the task prefix (`answer en`),
/// as VQAv2 groups questions by their leading words: the synthetic world's `what color`,
/// `where is`, `is there`, `how many`.
fn by_question_type(preds: &[pali_eval::run::Predicted]) -> serde_json::Value {
    let mut groups: std::collections::BTreeMap<String, Vec<&pali_eval::run::Predicted>> =
        Default::default();
    for p in preds {
        let mut words = p.prefix.split_whitespace().peekable();
        if words.peek() == Some(&"answer") {
            words.next();
            words.next(); // the language
        }
        let kind: Vec<&str> = words.take(2).collect();
        groups.entry(kind.join(" ")).or_default().push(p);
    }
    let out: serde_json::Map<String, serde_json::Value> = groups
        .into_iter()
        .map(|(k, ps)| {
            let n = ps.len() as f64;
            let right = ps.iter().filter(|p| exact(p)).count() as f64;
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for p in &ps {
                *counts.entry(p.suffix.trim()).or_default() += 1;
            }
            let top = counts.values().copied().max().unwrap_or(0) as f64;
            let v = serde_json::json!({
                "examples": ps.len(), "exact_match": right / n, "majority_baseline": top / n,
            });
            (k, v)
        })
        .collect();
    serde_json::Value::Object(out)
}

/// Summed suffix NLL and token count of each row of encoded examples, with the masks and loss
/// weights of a training step; also the number of rows whose text was cut.
pub fn batch_nll<B: Backend>(
    model: &PaliGemma<B>,
    cfg: &PaliGemmaConfig,
    builder: &BatchBuilder,
    rows: Vec<(usize, Example, Encoded)>,
    attention: Attention,
    loss_on: LossOn,
    device: &B::Device,
) -> Result<(Vec<(f64, f64)>, usize)> {
    let mut batch = builder.build(rows, Vec::new())?;
    let inputs = step_inputs::<B>(&mut batch, cfg, attention, loss_on, device)?;
    let nll = row_nll(
        model,
        inputs.input,
        inputs.targets,
        inputs.weights,
        inputs.n_img,
    )?;
    Ok((nll, batch.truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predicted(prefix: &str, suffix: &str, prediction: &str) -> pali_eval::run::Predicted {
        pali_eval::run::Predicted {
            id: String::new(),
            prefix: prefix.into(),
            suffix: suffix.into(),
            prediction: prediction.into(),
            object_scores: Vec::new(),
            decoded: pali_eval::decode::Decoded {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finished: true,
            },
        }
    }

    #[test]
    fn questions_group_by_their_leading_words() {
        let preds = [
            predicted("answer en what color is the circle?", "red", "red"),
            predicted("answer en what color is the square?", "blue", "red"),
            predicted("answer en what color is the star?", "red", "red"),
            predicted("answer en how many circles are there?", "2", "1"),
            predicted("is there a red star?", "yes", "yes"),
        ];
        let t = by_question_type(&preds);
        let c = &t["what color"];
        assert_eq!(c["examples"], 3);
        assert!((c["exact_match"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c["majority_baseline"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(t["how many"]["exact_match"], 0.0);
        // Without a task prefix the question starts at once.
        assert_eq!(t["is there"]["exact_match"], 1.0);
        assert_eq!(t.as_object().unwrap().len(), 3);
    }
}
