//! `pali generate`: greedy decoding with a KV cache from an HF-named prompt (the eval crate's
//! decoder, on the inputs as given: their padding, positions and masks).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use pali_eval::{greedy_with_logits, PaddedPrompts};

use super::inputs::{self, Positions};
use crate::backend::{dispatch, Job};
use crate::st::Writer;
use crate::DeviceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF checkpoint directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompt: pixel_values, input_ids, attention_mask, token_type_ids (right-padded rows).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Tokens to generate per row.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Stop a row at this token (default: never stop early).
    #[arg(long)]
    pub eos: Option<u32>,
    /// Writes `new_tokens` i64 [B, N] and `step_logits` f32 [N, B, V].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "hf")]
    pub positions: Positions,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: Args) -> Result<()> {
    dispatch(args.device.spec()?, GenerateJob(args))
}

struct GenerateJob(Args);

impl Job for GenerateJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let (config, model) = pali_model::load_hf::<B>(&a.checkpoint, &device)
            .with_context(|| format!("loading checkpoint {}", a.checkpoint.display()))?;
        let inp = inputs::load::<B>(&a.inputs, &config, a.positions, &device)?;
        let start = Instant::now();
        let prompts = PaddedPrompts {
            input: inp.input,
            input_mask: inp.input_mask,
        };
        let (rows, logits) = greedy_with_logits(
            &model,
            prompts,
            config.text.sliding_window,
            a.max_new_tokens,
            a.eos,
        )?;
        let secs = start.elapsed().as_secs_f64();
        // One token per step and row, as HF's `generate`: a row that ended repeats EOS.
        let eos = a.eos.map_or(0, i64::from);
        let tokens: Vec<Vec<i64>> = rows
            .iter()
            .map(|d| {
                let mut t: Vec<i64> = d.tokens.iter().map(|x| i64::from(*x)).collect();
                t.resize(logits.len(), eos);
                t
            })
            .collect();
        let n: usize = tokens.iter().map(|t| t.len()).sum();
        for row in &tokens {
            println!(
                "{}",
                row.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        eprintln!(
            "generate: {n} tokens in {secs:.3} s ({:.1} tokens/s incl. prefill)",
            n as f64 / secs
        );
        if let Some(out) = a.out {
            let mut w = Writer::default();
            let b = tokens.len();
            let len = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
            let flat: Vec<i64> = tokens
                .iter()
                .flat_map(|t| t.iter().copied().chain(std::iter::repeat(eos)).take(len))
                .collect();
            w.i64("new_tokens", vec![b, len], &flat);
            let v = logits
                .first()
                .and_then(|l| l.first())
                .map_or(0, |r| r.len());
            let all: Vec<f32> = logits.into_iter().flatten().flatten().collect();
            w.f32("step_logits", vec![all.len() / (b * v.max(1)), b, v], &all);
            w.write(&out)?;
            println!("wrote {}", out.display());
        }
        Ok(())
    }
}
