//! The run config (TOML). Every struct refuses unknown keys; docs/config.md documents each key
//! and its default. `--set stage.1.lr=3e-5` style overrides are applied to the TOML tree before
//! it is typed, so they are checked exactly like the file.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use pali_data::dataset::{OnError, SynthTask};
use pali_data::image::ResizeMethod;
use pali_data::Truncation;
use pali_eval::{Sampler, Task};
use pali_model::loss::Reduction;
use pali_model::Compute;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schedule::Decay;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: Run,
    pub model: ModelSection,
    pub tokenizer: TokenizerSection,
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub name: String,
    /// Checkpoints, metrics.jsonl and plots go here (relative to the config file).
    pub out_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    /// Checkpoints to keep (oldest removed first).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Train only these stages (by name, in config order); default: all. E.g.
    /// `--set 'run.stages=["transfer"]'` skips stage 1 (the stage-1 length ablation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<String>>,
    /// Optimizer steps already taken by the checkpoint this run starts from (a stage-2 run
    /// from the stage-1 checkpoint): the run's step count, and so `continues` schedules and
    /// checkpoint names, start there.
    #[serde(default)]
    pub start_step: u64,
    /// Recompute cheap activations during the backward pass instead of keeping them (Burn's
    /// balanced checkpointing): less memory, some more compute. Results are unchanged.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Where to train: `cpu`, `wgpu[:N]` or `cuda[:N]`; the command line's `--device` wins.
    /// Default: cpu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The dtype matmuls compute in: `f32`, or `bf16` for mixed precision (weights, optimizer
    /// state, norms, softmax and the loss stay f32). bf16 needs a device that supports it (CUDA
    /// on Ampere or newer, or the CPU, where it is emulated and only useful for checking).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub dtype: Compute,
    /// Stop when a stage's smoothed loss (an exponential average over logged steps, 0.2 on the
    /// newest) rises above this many times its lowest value in the stage; 0 turns it off. Training also
    /// stops at a logged step whose gradient norm is exactly 0 while some group trains.
    #[serde(
        default = "default_divergence",
        skip_serializing_if = "is_default_divergence"
    )]
    pub divergence_factor: f64,
}

fn is_f32(c: &Compute) -> bool {
    *c == Compute::F32
}

fn default_divergence() -> f64 {
    3.0
}

fn is_default_divergence(x: &f64) -> bool {
    *x == default_divergence()
}

fn default_keep() -> usize {
    2
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProjectorChoice {
    #[default]
    Linear,
    Mlp,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncoderChoice {
    #[default]
    Siglip,
    /// Raw patches through the projector (Fuyu-style ablation).
    None,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A preset name (`pali model list`); `tiny` takes its vocabulary from the tokenizer.
    /// Not needed with `init_hf`, whose `config.json` defines the model.
    #[serde(default)]
    pub preset: Option<String>,
    /// Initialise from an HF PaliGemma checkpoint directory instead of randomly.
    #[serde(default)]
    pub init_hf: Option<PathBuf>,
    /// Initialise from a big_vision PaliGemma checkpoint (`.npz`, the official release format);
    /// the model is `preset` if given (its shapes must match), else the preset that matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_big_vision: Option<PathBuf>,
    /// Unimodal start: the image encoder from a SigLIP checkpoint (HF `vision_model.*` names;
    /// a safetensors file or a directory).
    #[serde(default)]
    pub init_siglip: Option<PathBuf>,
    /// Unimodal start: the decoder from a Gemma checkpoint (HF `model.*` names). A smaller
    /// vocabulary than the tokenizer's is extended by `token_init`.
    #[serde(default)]
    pub init_gemma: Option<PathBuf>,
    /// Rows added to a Gemma embedding for new tokens: `normal` (N(0, 0.02)) or `avg_emb`
    /// (the mean embedding plus N(0, 0.002) noise).
    #[serde(default)]
    pub token_init: TokenInit,
    #[serde(default)]
    pub projector: ProjectorChoice,
    #[serde(default)]
    pub encoder: EncoderChoice,
    /// Changes to the preset's image encoder, e.g. `vision = { num_layers = 4 }` (field names
    /// of `pali_model::SiglipConfig`; the resolution is each stage's).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub vision: toml::Table,
    /// Changes to the preset's decoder, e.g. `text = { num_kv_heads = 4 }` (field names of
    /// `pali_model::GemmaConfig`).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub text: toml::Table,
}

impl ModelSection {
    /// The key of a whole-model start (`init_hf`, `init_big_vision`), if any.
    pub fn whole_start(&self) -> Option<&'static str> {
        if self.init_hf.is_some() {
            Some("init_hf")
        } else if self.init_big_vision.is_some() {
            Some("init_big_vision")
        } else {
            None
        }
    }
}

/// `config` with the fields of `changes` replaced (`model.vision` / `model.text`, named `key`):
/// unknown fields and values of the wrong type are refused by name.
pub fn with_changes<T>(
    key: &str,
    config: &T,
    changes: &toml::Table,
) -> std::result::Result<T, String>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let serde_json::Value::Object(mut fields) =
        serde_json::to_value(config).map_err(|e| format!("model.{key}: {e}"))?
    else {
        unreachable!("a config struct serialises to an object")
    };
    let mut out = None;
    for (name, value) in changes {
        if key == "vision" && name == "image_size" {
            return Err(
                "model.vision.image_size: the resolution is each stage's `resolution`".into(),
            );
        }
        let Some(slot) = fields.get_mut(name) else {
            let mut known: Vec<&str> = fields.keys().map(|k| k.as_str()).collect();
            known.sort();
            return Err(format!(
                "model.{key}.{name}: no such field (fields: {})",
                known.join(", ")
            ));
        };
        *slot = serde_json::to_value(value).map_err(|e| format!("model.{key}.{name}: {e}"))?;
        // One field at a time, so that a wrong value is named.
        out = Some(
            serde_json::from_value::<T>(serde_json::Value::Object(fields.clone()))
                .map_err(|e| format!("model.{key}.{name} = {value}: {e}"))?,
        );
    }
    match out {
        Some(c) => Ok(c),
        None => serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| format!("model.{key}: {e}")),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenInit {
    #[default]
    Normal,
    AvgEmb,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    pub path: PathBuf,
}

/// A data source as written in TOML: `{ kind = "synth", task = "caption", size = 1000 }`,
/// `{ kind = "jsonl", path = "train.jsonl" }` or `{ kind = "shards", path = "DIR" }` (written
/// by `pali data pack`), each with an optional `weight` (default 1).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(try_from = "SourceToml", into = "SourceToml")]
pub struct Source {
    pub kind: SourceKind,
    pub weight: f64,
    /// VQ-VAE weights for the `segment` task (`pali vqvae train` output or big_vision's
    /// `vae-oid.npz`).
    pub vqvae: Option<PathBuf>,
    /// Train on only K examples of this source, drawn by `run.seed` (few-shot transfer).
    pub few_shot: Option<usize>,
    /// Synthetic `detect`: pad each target with noise boxes (`<loc×4> <noise>`, no loss on
    /// their coordinates) up to this many entries, PaliGemma 2's detection recipe. Needs a
    /// tokenizer with `<noise>` (`pali tokenizer add`).
    pub noise_boxes: Option<usize>,
}

/// What a source is.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// The built-in shapes world, one task.
    Synth { task: SynthTask, size: usize },
    /// A big_vision JSONL file.
    Jsonl { path: PathBuf },
    /// A shard directory (`pali data pack`), read on demand.
    Shards { path: PathBuf },
}

impl Source {
    /// The synthetic task of the source, if it is one.
    pub fn synth_task(&self) -> Option<SynthTask> {
        match self.kind {
            SourceKind::Synth { task, .. } => Some(task),
            SourceKind::Jsonl { .. } | SourceKind::Shards { .. } => None,
        }
    }
}

/// A source's TOML form, checked into a [`Source`] when the config is read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceToml {
    kind: SourceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<SynthTask>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vqvae: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    few_shot: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    noise_boxes: Option<usize>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum SourceType {
    Synth,
    Jsonl,
    Shards,
}

impl TryFrom<SourceToml> for Source {
    type Error = String;
    fn try_from(s: SourceToml) -> std::result::Result<Self, String> {
        let kind = match (s.kind, s.task, s.size, s.path) {
            (SourceType::Synth, Some(task), Some(size), None) => SourceKind::Synth { task, size },
            (SourceType::Synth, ..) => {
                return Err("kind = \"synth\" needs `task` and `size` (and no `path`)".into())
            }
            (SourceType::Jsonl, None, None, Some(path)) => SourceKind::Jsonl { path },
            (SourceType::Shards, None, None, Some(path)) => SourceKind::Shards { path },
            (t @ (SourceType::Jsonl | SourceType::Shards), ..) => {
                let t = if t == SourceType::Jsonl {
                    "jsonl"
                } else {
                    "shards"
                };
                return Err(format!(
                    "kind = \"{t}\" needs `path` (and no `task`/`size`)"
                ));
            }
        };
        if !s.weight.is_finite() || s.weight < 0.0 {
            return Err(format!("weight {} is not a non-negative number", s.weight));
        }
        Ok(Source {
            kind,
            weight: s.weight,
            vqvae: s.vqvae,
            few_shot: s.few_shot,
            noise_boxes: s.noise_boxes,
        })
    }
}

impl From<Source> for SourceToml {
    fn from(s: Source) -> Self {
        let (kind, task, size, path) = match s.kind {
            SourceKind::Synth { task, size } => (SourceType::Synth, Some(task), Some(size), None),
            SourceKind::Jsonl { path } => (SourceType::Jsonl, None, None, Some(path)),
            SourceKind::Shards { path } => (SourceType::Shards, None, None, Some(path)),
        };
        SourceToml {
            kind,
            task,
            size,
            path,
            weight: s.weight,
            vqvae: s.vqvae,
            few_shot: s.few_shot,
            noise_boxes: s.noise_boxes,
        }
    }
}

fn one() -> f64 {
    1.0
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Full attention over image + prefix, causal over the suffix.
    #[default]
    PrefixLm,
    /// Causal over all text (prefix too), image tokens bidirectional.
    CausalText,
    /// Causal over image and text.
    CausalAll,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    #[default]
    Suffix,
    PrefixAndSuffix,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    #[serde(default)]
    pub reduction: Reduction,
    #[serde(default)]
    pub on: LossOn,
    #[serde(default)]
    pub label_smoothing: f64,
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            reduction: Reduction::PerExample,
            on: LossOn::Suffix,
            label_smoothing: 0.0,
        }
    }
}

/// One parameter group: a regex over parameter paths and its schedule.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Regex matched against the whole parameter path (e.g. `vision_tower\..*`).
    pub params: Parsed<Pattern>,
    #[serde(default)]
    pub decay: Decay,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the stage (used when `warmup_steps` is 0).
    #[serde(default)]
    pub warmup_fraction: f64,
    #[serde(default)]
    pub cooldown_steps: u64,
    /// Learning-rate multiplier of the group.
    #[serde(default = "one")]
    pub mult: f64,
    #[serde(default)]
    pub frozen: bool,
    #[serde(default = "default_timescale")]
    pub timescale: f64,
    /// Continue the run's schedule instead of restarting it: steps (warm-up, rsqrt decay,
    /// cooldown) count from the start of the run, so an rsqrt group with `continues = true`
    /// in stages 1 and 2 is one "infinite" schedule, and a transfer stage with
    /// `cooldown_steps` equal to its length is its cooldown (big_vision's pretraining recipe).
    #[serde(default)]
    pub continues: bool,
}

impl Group {
    /// What makes this group's settings meaningless, if anything.
    pub fn problem(&self) -> Option<String> {
        if !(0.0..=1.0).contains(&self.warmup_fraction) {
            return Some(format!(
                "warmup_fraction {} must be in [0, 1]",
                self.warmup_fraction
            ));
        }
        if !(self.mult >= 0.0 && self.mult.is_finite()) {
            return Some(format!("mult {} must be a finite number ≥ 0", self.mult));
        }
        if !(self.timescale > 0.0 && self.timescale.is_finite()) {
            return Some(format!("timescale {} must be > 0", self.timescale));
        }
        None
    }
}

fn default_timescale() -> f64 {
    10_000.0
}

/// What a stage trains: the paper's stage 0 (unimodal towers) or PaliGemma itself.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// PaliGemma (stages 1, 2 and transfers).
    #[default]
    Vlm,
    /// Stage 0, image side: a SigLIP two-tower model with the sigmoid loss on image–text
    /// pairs (each example's image and suffix); later stages start from its image encoder.
    Siglip,
    /// Stage 0, text side: Gemma next-token pretraining on text alone (each example's
    /// suffix); later stages start from its decoder.
    Lm,
}

impl StageKind {
    pub fn is_vlm(&self) -> bool {
        *self == StageKind::Vlm
    }
}

/// `[stage.text_tower]`: the text tower of a `kind = "siglip"` stage. Defaults: the image
/// encoder's width, depth, heads and MLP width; `text_len` positions; the tokenizer's vocabulary.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct TextTower {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// `vlm` (default), or stage 0: `siglip` / `lm` (see [`StageKind`]). Stage-0 stages come
    /// first; each writes its tower under `out_dir/NAME/` and the first PaliGemma stage starts
    /// from it.
    #[serde(default, skip_serializing_if = "StageKind::is_vlm")]
    pub kind: StageKind,
    /// The text tower of a `siglip` stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_tower: Option<TextTower>,
    pub resolution: usize,
    pub text_len: usize,
    /// Optimizer steps; or leave out and give `epochs` or `examples`, from which the steps are
    /// computed when the config is loaded: `ceil(epochs × mixture examples / batch_size)`.
    #[serde(default)]
    pub steps: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<u64>,
    pub batch_size: usize,
    /// Split each batch into this many micro-batches, summing their gradients before the one
    /// optimizer step (same update, less memory); must divide `batch_size`.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Residual dropout in the decoder (attention and MLP outputs) during training: the
    /// paper's "LLM dropout" transfer hyper-parameter.
    #[serde(default)]
    pub llm_dropout: f64,
    pub optim: Optim,
    #[serde(default)]
    pub loss: LossSection,
    #[serde(default)]
    pub attention: Attention,
    #[serde(default = "yes")]
    pub task_prefix: bool,
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default)]
    pub resize: ResizeMethod,
    /// Resize images to this resolution first, then to `resolution` (the information of the
    /// low resolution at the sequence length of the high one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downscale: Option<usize>,
    /// Cut each image into `window × window` tiles of `resolution`, each its own frame.
    #[serde(default = "one_usize")]
    pub window: usize,
    /// Images of every example (NLVR2 pairs, video frames), each its own frame, in order.
    #[serde(default = "one_usize")]
    pub images: usize,
    /// Training augmentations: `crop_min_area`, `jpeg_quality = [lo, hi]`, `random_resize`.
    #[serde(default)]
    pub augment: pali_data::transform::Augment,
    #[serde(default)]
    pub on_error: OnError,
    /// Keep the optimizer state from the previous stage.
    #[serde(default = "yes")]
    pub carry_optimizer: bool,
    /// Re-initialise these parts at the start of the stage: the paper's "reset" ablation.
    #[serde(default)]
    pub reset: Vec<Part>,
    #[serde(default = "log_every")]
    pub log_every: u64,
    /// Checkpoint interval in steps (and always at the end of the stage).
    #[serde(default = "ckpt_every")]
    pub checkpoint_every: u64,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(rename = "source")]
    pub sources: Vec<Source>,
    #[serde(rename = "group", default)]
    pub groups: Vec<Group>,
}

/// `[stage.optim]`: big_vision's optimizer chain (see `optim.rs`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Optim {
    pub lr: f64,
    #[serde(default = "b1")]
    pub b1: f64,
    #[serde(default = "b2")]
    pub b2: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the schedule, not the lr, as big_vision).
    #[serde(default)]
    pub weight_decay: f64,
    /// Which parameters decay (a regex over whole parameter paths): big_vision decays only the
    /// ViT / projector kernels.
    #[serde(default = "wd_params")]
    pub weight_decay_params: Parsed<Pattern>,
    /// Global-norm gradient clip over trainable parameters; 0 = off.
    #[serde(default = "clip")]
    pub grad_clip: f64,
}

impl Optim {
    /// What makes these settings meaningless ("key value: why"), if anything.
    pub fn problem(&self) -> Option<String> {
        let bad = |key: &str, v: f64, why: &str| Some(format!("{key} {v}: {why}"));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad("lr", self.lr, "must be a finite number ≥ 0");
        }
        for (key, v) in [("b1", self.b1), ("b2", self.b2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, v, "must be in [0, 1)");
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", self.eps, "must be > 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", self.weight_decay, "must be ≥ 0");
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad("grad_clip", self.grad_clip, "must be ≥ 0 (0 = no clipping)");
        }
        None
    }

    /// Learning rate `lr` and every other setting at its default.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            b1: b1(),
            b2: b2(),
            eps: eps(),
            weight_decay: 0.0,
            weight_decay_params: wd_params(),
            grad_clip: clip(),
        }
    }
}

/// `[stage.eval]`: the stage's evaluation (decoded task metrics and validation perplexity).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Validation examples decoded and scored at each evaluation (0 = no eval).
    #[serde(default)]
    pub examples: usize,
    /// Evaluate every this many steps as well as at the end of the stage (0 = only at the end).
    #[serde(default)]
    pub every: u64,
    /// Metric family: caption, vqa, vqav2, docvqa, chartqa, detect, refcoco (default: from the
    /// first source's task; `vqa` for JSONL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Parsed<Task>>,
    /// Decoding: greedy, beam:K, temperature:T, nucleus:P[:T], best_of:N[:T].
    #[serde(default = "greedy")]
    pub decode: Parsed<Sampler>,
    /// Validation JSONL. Without it a synthetic first source uses its validation split; a
    /// JSONL first source is not evaluated (it would be its training data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonl: Option<PathBuf>,
    /// Also decode the same examples with every image replaced by a constant grey one (the
    /// blind control: what the model answers from the text alone).
    #[serde(default, skip_serializing_if = "is_false")]
    pub blind: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            examples: 0,
            every: 0,
            task: None,
            decode: greedy(),
            jsonl: None,
            blind: false,
        }
    }
}

/// A model part a stage may re-initialise (`reset`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    VisionTower,
    MultiModalProjector,
    LanguageModel,
}

impl Part {
    /// The parameter path prefix of the part.
    pub fn name(self) -> &'static str {
        match self {
            Part::VisionTower => "vision_tower",
            Part::MultiModalProjector => "multi_modal_projector",
            Part::LanguageModel => "language_model",
        }
    }
}

/// A value written as a string in TOML and parsed once, when the config is read; it is written
/// back as it was given.
#[derive(Debug, Clone)]
pub struct Parsed<T> {
    text: String,
    value: T,
}

impl<T: FromStr> Parsed<T>
where
    T::Err: std::fmt::Display,
{
    pub fn new(text: &str) -> std::result::Result<Self, String> {
        let value = text.parse::<T>().map_err(|e| format!("`{text}`: {e}"))?;
        Ok(Self {
            text: text.to_string(),
            value,
        })
    }
}

impl<T> Parsed<T> {
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<T> std::ops::Deref for Parsed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> PartialEq for Parsed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<T> Serialize for Parsed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de, T: FromStr> Deserialize<'de> for Parsed<T>
where
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Parsed::new(&text).map_err(serde::de::Error::custom)
    }
}

/// A regex that must match a whole parameter path.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::Regex);

impl FromStr for Pattern {
    type Err = regex::Error;
    fn from_str(s: &str) -> std::result::Result<Self, regex::Error> {
        regex::Regex::new(&format!("^(?:{s})$")).map(Pattern)
    }
}

impl Pattern {
    pub fn is_match(&self, path: &str) -> bool {
        self.0.is_match(path)
    }
}

/// Stage keys that moved into a section: (old key, section, new key). Old configs and `--set`s
/// keep working: the key is moved before the config is typed.
const MOVED: &[(&str, &str, &str)] = &[
    ("lr", "optim", "lr"),
    ("b1", "optim", "b1"),
    ("b2", "optim", "b2"),
    ("eps", "optim", "eps"),
    ("weight_decay", "optim", "weight_decay"),
    ("weight_decay_params", "optim", "weight_decay_params"),
    ("grad_clip", "optim", "grad_clip"),
    ("eval_examples", "eval", "examples"),
    ("eval_every", "eval", "every"),
    ("eval_task", "eval", "task"),
    ("eval_decode", "eval", "decode"),
    ("eval_jsonl", "eval", "jsonl"),
];

/// Moves the flat keys of older configs into their sections (see [`MOVED`]).
fn move_old_keys(doc: &mut toml::Value) -> std::result::Result<(), String> {
    let Some(stages) = doc.get_mut("stage").and_then(|s| s.as_array_mut()) else {
        return Ok(());
    };
    for (i, st) in stages.iter_mut().enumerate() {
        let Some(t) = st.as_table_mut() else { continue };
        for (old, section, new) in MOVED {
            let Some(v) = t.remove(*old) else { continue };
            let sec = t
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            let Some(sec) = sec.as_table_mut() else {
                return Err(format!("stage {}: `{section}` must be a table", i + 1));
            };
            if sec.contains_key(*new) {
                return Err(format!(
                    "stage {}: `{old}` is now `{section}.{new}`; give it once",
                    i + 1
                ));
            }
            sec.insert(new.to_string(), v);
        }
    }
    Ok(())
}

/// Non-empty lines of a JSONL file, read in a stream (a dataset may be large).
fn count_lines(path: &Path) -> Result<usize> {
    use std::io::BufRead;
    let err = |e: std::io::Error| Error::Config(format!("{}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(err)?;
    let mut n = 0;
    for line in std::io::BufReader::new(f).lines() {
        n += usize::from(!line.map_err(err)?.trim().is_empty());
    }
    Ok(n)
}

fn one_usize() -> usize {
    1
}
fn greedy() -> Parsed<Sampler> {
    Parsed::new("greedy").expect("greedy parses")
}
fn b1() -> f64 {
    0.9
}
fn b2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}
/// big_vision's default `wd_mults = [(".*/kernel$", 1.0)]`: dense and convolution kernels. In
/// PaliGemma only the image tower and the projector have `kernel`s (Gemma's are einsum `w`s), and
/// LayerNorm scales and the position embedding are not kernels, although HF names them `weight`.
pub const DEFAULT_WEIGHT_DECAY_PARAMS: &str = r"vision_tower\..*\.(patch_embedding|q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.weight|multi_modal_projector\..*\.weight";

fn wd_params() -> Parsed<Pattern> {
    Parsed::new(DEFAULT_WEIGHT_DECAY_PARAMS).expect("valid regex")
}
fn clip() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn log_every() -> u64 {
    10
}
fn ckpt_every() -> u64 {
    100
}

/// Applies `key=value` overrides: `run.seed=3`, `stage.1.lr=3e-5` (1-based stage index or the
/// stage name), `stage.stage2.group.0.frozen=true`.
pub fn apply_override(doc: &mut toml::Value, spec: &str) -> Result<()> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set {spec}: expected KEY=VALUE")))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .map(|t| t["v"].clone())
        .unwrap_or_else(|_| toml::Value::String(value.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    // `stage.1.lr` of older configs is `stage.1.optim.lr` now.
    if let ["stage", sel, old] = parts[..] {
        if let Some((_, section, new)) = MOVED.iter().find(|m| m.0 == old) {
            parts = vec!["stage", sel, section, new];
        }
    }
    let key = parts.join(".");
    let mut cur = doc;
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let last = i + 1 == parts.len();
        let table = cur
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("--set {key}: `{p}` is not a table")))?;
        if last {
            // A key the schema lacks is refused when the tree is typed (deny_unknown_fields).
            table.insert(p.to_string(), value);
            return Ok(());
        }
        // A missing table is created (`--set stage.1.augment.random_resize=true`); a key the
        // schema lacks is refused when the tree is typed.
        let next = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let toml::Value::Array(items) = next {
            let sel = parts[i + 1];
            let idx = match sel.parse::<usize>() {
                Ok(n) if (1..=items.len()).contains(&n) && p == "stage" => n - 1,
                Ok(n) if n < items.len() && p != "stage" => n,
                _ => items
                    .iter()
                    .position(|s| s.get("name").and_then(|n| n.as_str()) == Some(sel))
                    .ok_or_else(|| Error::Config(format!("--set {key}: no {p} `{sel}`")))?,
            };
            cur = &mut items[idx];
            i += 2;
            if i == parts.len() {
                return Err(Error::Config(format!(
                    "--set {key}: cannot replace a whole {p}"
                )));
            }
        } else {
            cur = next;
            i += 1;
        }
    }
    Ok(())
}

/// A TOML error on one line: `FILE:LINE:COLUMN: message` where the parser knows the place
/// (`text` is the file's), else `FILE: message in `key`` (errors found after `--set` overrides
/// were applied name the key, not a line).
fn toml_error(path: &Path, text: Option<&str>, e: &toml::de::Error) -> Error {
    if let (Some(text), Some(span)) = (text, e.span()) {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let msg = e.message().trim().replace('\n', " ");
        return Error::Config(format!("{}:{line}:{col}: {msg}", path.display()));
    }
    let full = e.to_string();
    let msg: Vec<&str> = full
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Error::Config(format!("{}: {}", path.display(), msg.join(" ")))
}

impl RunConfig {
    /// Reads, overrides and validates a run config; relative paths are resolved against the
    /// config file's directory.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut c = Self::parse(path, overrides)?;
        c.validate(path)?;
        c.resolve_lengths()?;
        Ok(c)
    }

    /// Fills `steps` of stages given in `epochs` or `examples`. An epoch is one pass over the
    /// stage's sources (few-shot subsets counted as K; a JSONL file as its non-empty lines).
    fn resolve_lengths(&mut self) -> Result<()> {
        for s in &mut self.stages {
            if s.steps > 0 {
                continue;
            }
            let examples = match (s.epochs, s.examples) {
                (_, Some(n)) => n as f64,
                (Some(e), None) => {
                    let mut n = 0usize;
                    for src in &s.sources {
                        let size = match &src.kind {
                            SourceKind::Synth { size, .. } => *size,
                            SourceKind::Jsonl { path: p } => count_lines(p)?,
                            SourceKind::Shards { path: p } => {
                                pali_data::shards::Index::read(p)
                                    .map_err(|e| Error::Config(e.to_string()))?
                                    .rows as usize
                            }
                        };
                        n += src.few_shot.map_or(size, |k| k.min(size));
                    }
                    e * n as f64
                }
                (None, None) => continue, // refused by validate
            };
            s.steps = (examples / s.batch_size as f64).ceil().max(1.0) as u64;
        }
        Ok(())
    }

    /// A config as `pali train` writes it (`config.resolved.toml`), also one written before
    /// the `optim` / `eval` sections existed.
    pub fn from_resolved(text: &str) -> std::result::Result<Self, String> {
        let mut doc: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        move_old_keys(&mut doc)?;
        doc.try_into().map_err(|e: toml::de::Error| e.to_string())
    }

    /// [`RunConfig::load`] without the checks of [`RunConfig::validate`] (files may not exist
    /// yet: an ablation's runs that start from a preparatory run's output).
    pub fn parse(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut doc: toml::Value =
            toml::from_str(&text).map_err(|e| toml_error(path, Some(&text), &e))?;
        move_old_keys(&mut doc).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let mut c: RunConfig = doc.try_into().map_err(|e: toml::de::Error| {
            // The same error read from the text itself knows its line (unless the key came
            // from an override or an old-key migration).
            match toml::from_str::<RunConfig>(&text) {
                Err(at) if at.span().is_some() && at.message() == e.message() => {
                    let key = e.to_string();
                    let key = key.lines().map(str::trim).find(|l| l.starts_with("in `"));
                    match (toml_error(path, Some(&text), &at), key) {
                        (Error::Config(m), Some(k)) => Error::Config(format!("{m} {k}")),
                        (other, _) => other,
                    }
                }
                _ => toml_error(path, None, &e),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.resolve_paths(base);
        if let Some(keep) = &c.run.stages {
            if let Some(n) = keep
                .iter()
                .find(|n| !c.stages.iter().any(|s| &s.name == *n))
            {
                let have: Vec<&str> = c.stages.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::Config(format!(
                    "{}: run.stages: no stage `{n}` (stages: {})",
                    path.display(),
                    have.join(", ")
                )));
            }
            c.stages.retain(|s| keep.contains(&s.name));
        }
        Ok(c)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.run.out_dir);
        fix(&mut self.tokenizer.path);
        for p in [
            &mut self.model.init_hf,
            &mut self.model.init_big_vision,
            &mut self.model.init_siglip,
            &mut self.model.init_gemma,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        for s in &mut self.stages {
            if let Some(p) = &mut s.eval.jsonl {
                fix(p);
            }
            for src in &mut s.sources {
                if let SourceKind::Jsonl { path } | SourceKind::Shards { path } = &mut src.kind {
                    fix(path);
                }
                if let Some(path) = &mut src.vqvae {
                    fix(path);
                }
            }
        }
    }

    /// Stage-0 stages come first, one of each kind at most, and replace the matching `init_*`
    /// checkpoint; options that only PaliGemma has are refused on them.
    fn validate_stage_kinds(&self) -> std::result::Result<(), String> {
        let mut seen_vlm = false;
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("stage {} (`{}`)", i + 1, s.name);
            if s.kind.is_vlm() {
                seen_vlm = true;
                if s.text_tower.is_some() {
                    return Err(format!(
                        "{at}: text_tower applies to kind = \"siglip\" stages"
                    ));
                }
                continue;
            }
            let kind = if s.kind == StageKind::Siglip {
                "siglip"
            } else {
                "lm"
            };
            if seen_vlm {
                return Err(format!(
                    "{at}: a kind = \"{kind}\" stage (stage 0) must come before every PaliGemma \
                     stage"
                ));
            }
            if let Some(o) = self.stages[..i].iter().find(|o| o.kind == s.kind) {
                return Err(format!(
                    "{at}: a second kind = \"{kind}\" stage (the first is `{}`)",
                    o.name
                ));
            }
            let (key, given) = match s.kind {
                StageKind::Siglip => ("init_siglip", self.model.init_siglip.is_some()),
                _ => ("init_gemma", self.model.init_gemma.is_some()),
            };
            if given || self.model.whole_start().is_some() {
                return Err(format!(
                    "{at}: the kind = \"{kind}\" stage trains the tower that `model.{}` would \
                     load; give one or the other",
                    if given {
                        key
                    } else {
                        self.model.whole_start().unwrap_or_default()
                    }
                ));
            }
            if s.kind == StageKind::Lm && s.text_tower.is_some() {
                return Err(format!(
                    "{at}: text_tower applies to kind = \"siglip\" stages"
                ));
            }
            if s.kind == StageKind::Siglip && self.model.encoder == EncoderChoice::None {
                return Err(format!(
                    "{at}: model.encoder = \"none\" has no image encoder to pretrain"
                ));
            }
            if !s.reset.is_empty()
                || s.window != 1
                || s.images != 1
                || s.llm_dropout != 0.0
                || s.grad_accum != 1
            {
                return Err(format!(
                    "{at}: reset, window, images, llm_dropout and grad_accum apply to PaliGemma \
                     stages"
                ));
            }
            if s.kind == StageKind::Siglip && s.batch_size < 2 {
                return Err(format!(
                    "{at}: the sigmoid loss needs negatives: batch_size ≥ 2"
                ));
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked before training starts.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(Error::Config(format!("{}: {m}", path.display())));
        if self.stages.is_empty() {
            return err("no [[stage]]".into());
        }
        if !self.tokenizer.path.is_file() {
            return err(format!(
                "tokenizer.path: file not found: {}",
                self.tokenizer.path.display()
            ));
        }
        for (key, p) in [
            ("init_siglip", &self.model.init_siglip),
            ("init_gemma", &self.model.init_gemma),
        ] {
            if let Some(p) = p {
                if !p.exists() {
                    return err(format!("model.{key}: not found: {}", p.display()));
                }
                if let Some(whole) = self.model.whole_start() {
                    return err(format!(
                        "model.{key}: give either `{whole}` or unimodal checkpoints"
                    ));
                }
            }
        }
        if let Some(whole) = self.model.whole_start() {
            if let Some(k) = [("vision", &self.model.vision), ("text", &self.model.text)]
                .iter()
                .find_map(|(k, t)| (!t.is_empty()).then_some(k))
            {
                return err(format!(
                    "model.{k}: with `{whole}` the checkpoint defines the model"
                ));
            }
            if self.model.projector != ProjectorChoice::Linear
                || self.model.encoder != EncoderChoice::Siglip
            {
                return err(format!(
                    "model.projector / model.encoder: with `{whole}` the checkpoint defines the \
                     model (a linear projector and a SigLIP encoder)"
                ));
            }
        }
        with_changes(
            "vision",
            &pali_model::SiglipConfig::new(),
            &self.model.vision,
        )
        .map(|_| ())
        .or_else(err)?;
        with_changes("text", &pali_model::GemmaConfig::new(), &self.model.text)
            .map(|_| ())
            .or_else(err)?;
        if self.model.init_siglip.is_some() && self.model.encoder == EncoderChoice::None {
            return err(
                "model.init_siglip: model.encoder = \"none\" has no image encoder to load it into"
                    .into(),
            );
        }
        if let Some(p) = &self.model.init_big_vision {
            if self.model.init_hf.is_some() {
                return err("model.init_big_vision: give either it or `init_hf`".into());
            }
            if !p.is_file() {
                return err(format!("model.init_big_vision: not found: {}", p.display()));
            }
        }
        if let Some(p) = &self.model.init_hf {
            if !p.join("config.json").is_file() {
                return err(format!("model.init_hf: no config.json in {}", p.display()));
            }
        } else if self.model.preset.is_none() && self.model.init_big_vision.is_none() {
            return err("model: give `preset`, `init_hf` or `init_big_vision`".into());
        }
        self.validate_stage_kinds().or_else(err)?;
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("stage {} (`{}`)", i + 1, s.name);
            if s.sources.is_empty() {
                return err(format!("{at}: no [[stage.source]]"));
            }
            for (k, src) in s.sources.iter().enumerate() {
                let at = format!("{at}: source {}", k + 1);
                match &src.kind {
                    SourceKind::Jsonl { path } if !path.is_file() => {
                        return err(format!("{at}: file not found: {}", path.display()));
                    }
                    SourceKind::Shards { path } => {
                        if let Err(e) = pali_data::shards::Index::read(path) {
                            return err(format!("{at}: {e}"));
                        }
                    }
                    _ => {}
                }
                let task = src.synth_task();
                if task == Some(SynthTask::Segment) {
                    match &src.vqvae {
                        None => {
                            return err(format!(
                                "{at}: task `segment` needs `vqvae = \"PATH\"` (train one with \
                                 `pali vqvae train --synthetic`)"
                            ))
                        }
                        Some(p) if !p.is_file() => {
                            return err(format!("{at}: vqvae: file not found: {}", p.display()))
                        }
                        _ => {}
                    }
                }
                if src.noise_boxes.is_some() && task != Some(SynthTask::Detect) {
                    return err(format!(
                        "{at}: noise_boxes applies to synthetic `detect` sources (JSONL data \
                         carries its own noise boxes)"
                    ));
                }
            }
            if let Some(p) = &s.eval.jsonl {
                if !p.is_file() {
                    return err(format!("{at}: eval.jsonl: file not found: {}", p.display()));
                }
            }
            if s.eval.task.as_deref() == Some(&Task::Perplexity) {
                return err(format!(
                    "{at}: eval.task: validation perplexity is always reported; pick a decoding \
                     task"
                ));
            }
            if s.window == 0 || s.images == 0 || s.downscale == Some(0) {
                return err(format!("{at}: window, images and downscale must be > 0"));
            }
            if s.images != 1 {
                if let Some(k) = s.sources.iter().position(|x| x.synth_task().is_some()) {
                    return err(format!(
                        "{at}: source {}: a synthetic source has one image per example, the \
                         stage `images = {}`",
                        k + 1,
                        s.images
                    ));
                }
            }
            if let Err(m) = s.augment.validate() {
                return err(format!("{at}: {m}"));
            }
            if s.augment.crop_min_area.is_some() {
                // A crop moves objects: box and mask targets would no longer match the image.
                let spatial = s.sources.iter().filter_map(Source::synth_task).find(|t| {
                    matches!(
                        t,
                        SynthTask::Detect | SynthTask::GroundedCaption | SynthTask::Segment
                    )
                });
                if let Some(t) = spatial {
                    return err(format!(
                        "{at}: augment.crop_min_area moves objects, but task `{}` has box or \
                         mask targets",
                        t.name()
                    ));
                }
            }
            if s.batch_size == 0 || s.text_len == 0 {
                return err(format!("{at}: batch_size and text_len must be > 0"));
            }
            if s.loss.on == LossOn::PrefixAndSuffix && s.attention == Attention::PrefixLm {
                // Under the prefix-LM mask every prefix position sees the token it would be
                // asked to predict: the paper puts loss on the prefix only once it is
                // autoregressively masked.
                return err(format!(
                    "{at}: loss.on = \"prefix_and_suffix\" needs a causal prefix: under \
                     attention = \"prefix_lm\" each prefix position sees its own target; set \
                     attention = \"causal_text\" (or \"causal_all\")"
                ));
            }
            if s.grad_accum == 0 || !s.batch_size.is_multiple_of(s.grad_accum) {
                return err(format!(
                    "{at}: grad_accum {} must be > 0 and divide batch_size {}",
                    s.grad_accum, s.batch_size
                ));
            }
            if !(0.0..1.0).contains(&s.llm_dropout) {
                return err(format!(
                    "{at}: llm_dropout {} is not in [0, 1)",
                    s.llm_dropout
                ));
            }
            if s.log_every == 0 || s.checkpoint_every == 0 {
                return err(format!("{at}: log_every and checkpoint_every must be > 0"));
            }
            if let Some(m) = s.optim.problem() {
                return err(format!("{at}: optim.{m}"));
            }
            if let Some(other) = self.stages[..i].iter().find(|o| o.name == s.name) {
                return err(format!(
                    "{at}: stage name `{}` is already used by an earlier stage",
                    other.name
                ));
            }
            for (j, g) in s.groups.iter().enumerate() {
                if let Some(m) = g.problem() {
                    return err(format!(
                        "{at}: group {} (`{}`): {m}",
                        j + 1,
                        g.params.as_str()
                    ));
                }
            }
            match (s.steps, s.epochs, s.examples) {
                (0, None, None) => {
                    return err(format!("{at}: give `steps`, `epochs` or `examples`"))
                }
                (_, Some(_), Some(_)) => {
                    return err(format!("{at}: give `epochs` or `examples`, not both"))
                }
                (_, Some(e), _) if !(e > 0.0 && e.is_finite()) => {
                    return err(format!("{at}: epochs {e} is not a positive number"))
                }
                (_, _, Some(0)) => return err(format!("{at}: examples must be > 0")),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/tokenizer/tokenizer.json"
    );

    fn load(dir: &Path, stage: &str, sets: &[&str]) -> Result<RunConfig> {
        let p = dir.join("run.toml");
        let text = format!(
            "[run]\nname = \"t\"\nout_dir = \"out\"\n[model]\npreset = \"tiny\"\n\
             [tokenizer]\npath = \"{TOKENIZER}\"\n[[stage]]\nname = \"s\"\nresolution = 32\n\
             text_len = 16\nsteps = 1\nbatch_size = 1\n{stage}\n\
             source = [{{ kind = \"synth\", task = \"vqa\", size = 10 }}]\n"
        );
        std::fs::write(&p, text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(&p, &sets)
    }

    #[test]
    fn flat_keys_of_older_configs_load_into_their_sections() {
        let d = tempfile::tempdir().unwrap();
        let old = load(
            d.path(),
            "lr = 1e-3\nb2 = 0.99\ngrad_clip = 0.5\neval_examples = 4\neval_decode = \"beam:2\"",
            &[],
        )
        .unwrap();
        let new = load(
            d.path(),
            "optim = { lr = 1e-3, b2 = 0.99, grad_clip = 0.5 }\n\
             eval = { examples = 4, decode = \"beam:2\" }",
            &[],
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(*new.stages[0].eval.decode, Sampler::Beam(2));
        // `--set` with the old key path reaches the new place.
        let set = load(d.path(), "optim = { lr = 1e-3 }", &["stage.1.lr=2e-3"]).unwrap();
        assert_eq!(set.stages[0].optim.lr, 2e-3);
        let both = load(d.path(), "lr = 1e-3\noptim = { lr = 2e-3 }", &[]).unwrap_err();
        assert!(
            both.to_string()
                .contains("`lr` is now `optim.lr`; give it once"),
            "{both}"
        );
    }

    #[test]
    fn strings_are_parsed_once_when_the_config_is_read() {
        let d = tempfile::tempdir().unwrap();
        let base = "optim = { lr = 1e-3 }";
        for (set, want) in [
            ("stage.1.reset=[\"vision\"]", "unknown variant `vision`"),
            ("stage.1.eval.task=\"sing\"", "unknown task `sing`"),
            ("stage.1.eval.decode=\"beam\"", "`beam`"),
            (
                "stage.1.optim.weight_decay_params=\"(\"",
                "regex parse error",
            ),
            ("stage.1.source=[{ kind = \"jsonl\" }]", "needs `path`"),
            (
                "stage.1.source=[{ kind = \"synth\", task = \"vqa\", size = 1, weight = -1.0 }]",
                "weight -1",
            ),
            (
                "stage.1.eval.task=\"perplexity\"",
                "perplexity is always reported",
            ),
            (
                "stage.1.log_every=0",
                "log_every and checkpoint_every must be > 0",
            ),
        ] {
            let e = load(d.path(), base, &[set]).unwrap_err().to_string();
            assert!(e.contains(want), "{set}: {e}");
            assert!(e.contains("run.toml"), "{set}: {e}");
        }
        let c = load(d.path(), base, &["stage.1.reset=[\"vision_tower\"]"]).unwrap();
        assert_eq!(c.stages[0].reset, vec![Part::VisionTower]);
        // What is written back reads the same.
        let again = RunConfig::from_resolved(&toml::to_string_pretty(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }
}
