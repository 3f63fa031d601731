//! `pali forward`: one forward pass of an HF checkpoint on HF-named inputs; writes what HF's
//! `PaliGemmaForConditionalGeneration` would return, so a port can be checked tensor by tensor.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use pali_model::loss::hf_causal_lm_loss;
use pali_model::{ForwardOptions, Trace};

use super::inputs::{self, Positions};
use crate::backend::{dispatch, Job};
use crate::st::Writer;
use crate::DeviceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF checkpoint directory (config.json + model.safetensors or a sharded index).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Inputs: pixel_values, input_ids, attention_mask, token_type_ids, optional labels.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors: logits, image_features, loss (when labels are given).
    #[arg(long)]
    pub out: PathBuf,
    /// RoPE numbering.
    #[arg(long, value_enum, default_value = "hf")]
    pub positions: Positions,
    /// Also write vision_hidden_states.{i} and lm_hidden_states.{i} (HF layout).
    #[arg(long)]
    pub hidden_states: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: Args) -> Result<()> {
    dispatch(args.device.spec()?, ForwardJob(args))
}

struct ForwardJob(Args);

fn vals<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (shape, t.into_data().convert::<f32>().to_vec().expect("f32"))
}

impl Job for ForwardJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = self.0;
        let (config, model) = pali_model::load_hf::<B>(&a.checkpoint, &device)
            .with_context(|| format!("loading checkpoint {}", a.checkpoint.display()))?;
        let inp = inputs::load::<B>(&a.inputs, &config, a.positions, &device)?;
        let start = Instant::now();
        let mut trace = Trace::default();
        let out = model.forward(
            inp.input,
            ForwardOptions::all_vocab_rows().with_trace(a.hidden_states.then_some(&mut trace)),
        )?;
        let mut w = Writer::default();
        if let Some(labels) = inp.labels {
            let (_, loss) = vals(hf_causal_lm_loss(out.logits.clone(), labels));
            println!("loss {:.6}", loss[0]);
            w.f32("loss", vec![1], &loss);
        }
        let (s, v) = vals(out.logits);
        w.f32("logits", s, &v);
        let (s, v) = vals(out.image_features);
        w.f32("image_features", s, &v);
        if a.hidden_states {
            for (i, h) in trace.vision_hidden.into_iter().enumerate() {
                let (s, v) = vals(h);
                w.f32(&format!("vision_hidden_states.{i}"), s, &v);
            }
            // HF overwrites the last entry with the final-norm output.
            let n = trace.lm_hidden.len();
            for (i, h) in trace.lm_hidden.into_iter().enumerate() {
                let h = if i + 1 == n {
                    trace.lm_last_hidden.clone().unwrap_or(h)
                } else {
                    h
                };
                let (s, v) = vals(h);
                w.f32(&format!("lm_hidden_states.{i}"), s, &v);
            }
        }
        eprintln!("forward: {:.3} s", start.elapsed().as_secs_f64());
        w.write(&a.out)?;
        println!("wrote {}", a.out.display());
        Ok(())
    }
}
