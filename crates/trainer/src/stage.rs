//! What a run needs before its first step, built once: the tokenizer, the VQ-VAE mask encoders,
//! and per stage the model config, the parameter groups, the data sources and the one data-stream
//! recipe (mixture + batch builder) that training, evaluation, `pali data inspect` and `pali bench
//! data` all use. (`pali eval --task perplexity` has no run config: it shares the step inputs
//! and `evaluate::batch_nll`, with a batch builder from its flags.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use pali_data::batch::BatchBuilder;
use pali_data::dataset::{Dataset, JsonlDataset, SynthDataset, SynthTask};
use pali_data::masks::MaskEncoder;
use pali_data::mixture::{FewShot, Mixture};
use pali_data::shards::ShardDataset;
use pali_data::transform::Transforms;
use pali_data::{PaliTokenizer, SequenceBuilder};
use pali_eval::Task;
use pali_model::two_tower::{SiglipTextConfig, TwoTowerConfig};
use pali_model::{GemmaConfig, ImageEncoder, PaliGemmaConfig, ProjectorKind};

use crate::config::{
    EncoderChoice, ModelSection, ProjectorChoice, RunConfig, SourceKind, Stage, StageKind,
};
use crate::error::{Error, Result};
use crate::optim::{self, Groups};
use crate::vqvae::VqVaeEncoder;

/// VQ-VAE mask encoders of the `segment` sources, by checkpoint path.
pub type MaskEncoders = HashMap<PathBuf, Arc<dyn MaskEncoder>>;

/// A run, checked and ready: everything but the model.
pub struct RunPlan<'a> {
    pub config: &'a RunConfig,
    pub tokenizer: Arc<PaliTokenizer>,
    /// Stage 0 (`kind = "siglip"` / `"lm"`), trained first.
    pub towers: Vec<TowerPlan<'a>>,
    /// The PaliGemma stages.
    pub stages: Vec<StagePlan<'a>>,
    /// `[model]` as the first PaliGemma stage starts from it: with the stage-0 towers as
    /// `init_siglip` / `init_gemma`.
    pub init: ModelSection,
}

/// The model a stage-0 stage trains.
#[derive(Debug, Clone)]
pub enum TowerModel {
    Siglip(TwoTowerConfig),
    /// The decoder, its vocabulary without the `<loc>`/`<seg>` rows when the tokenizer keeps
    /// them at its end (stage 1 adds them with `token_init`, as the paper does).
    Lm(GemmaConfig),
}

/// One stage-0 stage, checked and ready.
pub struct TowerPlan<'a> {
    /// Position in the run's stage list.
    pub index: usize,
    pub stage: &'a Stage,
    pub config: &'a RunConfig,
    pub model: TowerModel,
    pub groups: Groups,
    pub train: Vec<Arc<dyn Dataset>>,
    pub val: Vec<Option<Arc<dyn Dataset>>>,
    pub eval_set: Option<Arc<dyn Dataset>>,
    pub tokenizer: Arc<PaliTokenizer>,
}

impl TowerPlan<'_> {
    /// The stage's own directory: checkpoints, metrics, and the finished tower.
    pub fn dir(&self) -> PathBuf {
        self.config.run.out_dir.join(&self.stage.name)
    }

    /// The finished tower (an HF checkpoint directory), written once at the end of the stage.
    pub fn output(&self) -> PathBuf {
        self.dir().join("final")
    }

    pub fn mixture(&self) -> Result<Mixture> {
        mixture(self.stage, &self.train, self.config.run.seed, self.index)
    }

    pub fn batch_builder(&self) -> BatchBuilder {
        recipe(
            self.stage,
            &self.tokenizer,
            self.config.run.seed.wrapping_add(self.index as u64),
        )
    }

    /// Validation examples: `eval.jsonl`, else the first source's validation split.
    pub fn validation(&self) -> Option<Arc<dyn Dataset>> {
        self.eval_set.clone().or_else(|| self.val[0].clone())
    }
}

/// The vocabulary of a stage-0 decoder: the tokenizer's, less a `<loc>`/`<seg>` block at its
/// end.
pub fn lm_vocab(tok: &PaliTokenizer) -> usize {
    let v = tok.vocab_size();
    let mut special: Vec<u32> = tok.loc.iter().chain(&tok.seg).copied().collect();
    special.sort_unstable();
    let at_end = special.first().is_some_and(|&first| {
        special.len() == v - first as usize
            && special
                .iter()
                .enumerate()
                .all(|(i, &id)| id as usize == first as usize + i)
    });
    if at_end {
        special[0] as usize
    } else {
        v
    }
}

/// The model of stage-0 stage `stage`.
fn tower_model(config: &RunConfig, tok: &PaliTokenizer, stage: &Stage) -> Result<TowerModel> {
    let c = model_config(config, tok, stage.resolution)?;
    match stage.kind {
        StageKind::Lm => {
            let mut t = c.text;
            t.vocab_size = lm_vocab(tok);
            Ok(TowerModel::Lm(t))
        }
        _ => {
            let ImageEncoder::Siglip(v) = c.vision else {
                return Err(Error::Config(format!(
                    "stage `{}`: the model has no image encoder to pretrain",
                    stage.name
                )));
            };
            if stage.resolution < v.patch_size || !stage.resolution.is_multiple_of(v.patch_size) {
                return Err(Error::Config(format!(
                    "stage `{}`: resolution {} is not a multiple of the patch size {}",
                    stage.name, stage.resolution, v.patch_size
                )));
            }
            let tt = stage.text_tower.unwrap_or_default();
            let text = SiglipTextConfig::new(tok.vocab_size(), v.hidden_size)
                .with_hidden_size(tt.hidden_size.unwrap_or(v.hidden_size))
                .with_num_layers(tt.num_layers.unwrap_or(v.num_layers))
                .with_num_heads(tt.num_heads.unwrap_or(v.num_heads))
                .with_intermediate_size(tt.intermediate_size.unwrap_or(v.intermediate_size))
                .with_max_position_embeddings(stage.text_len)
                .with_layer_norm_eps(v.layer_norm_eps);
            if !text.hidden_size.is_multiple_of(text.num_heads) {
                return Err(Error::Config(format!(
                    "stage `{}`: text_tower.hidden_size {} is not a multiple of its {} heads",
                    stage.name, text.hidden_size, text.num_heads
                )));
            }
            Ok(TowerModel::Siglip(TwoTowerConfig { vision: v, text }))
        }
    }
}

/// A stage's training stream: its sources mixed by weight, seeded by the run's seed and the
/// stage's position.
fn mixture(stage: &Stage, train: &[Arc<dyn Dataset>], seed: u64, index: usize) -> Result<Mixture> {
    let weights: Vec<f64> = stage.sources.iter().map(|s| s.weight).collect();
    Ok(Mixture::new(
        train.to_vec(),
        &weights,
        seed.wrapping_add(index as u64),
    )?)
}

/// One stage, checked and ready.
pub struct StagePlan<'a> {
    /// Position in the run (seeds the stage's data stream).
    pub index: usize,
    pub stage: &'a Stage,
    /// The run it belongs to.
    pub config: &'a RunConfig,
    /// The model at the stage's resolution.
    pub model: PaliGemmaConfig,
    pub groups: Groups,
    /// Training split of every source.
    pub train: Vec<Arc<dyn Dataset>>,
    /// Validation split of every source that has one (synthetic sources; `None` for JSONL).
    pub val: Vec<Option<Arc<dyn Dataset>>>,
    /// `eval.jsonl`, opened.
    pub eval_set: Option<Arc<dyn Dataset>>,
    /// Groups whose regex matches no parameter of the model (reported when the stage starts).
    pub idle_groups: Vec<String>,
    tokenizer: Arc<PaliTokenizer>,
}

impl<'a> RunPlan<'a> {
    /// Every check that needs the tokenizer, the data or the model's parameter names, before
    /// any training: the tokenizer fits the model, groups cover every parameter exactly once,
    /// every source opens. `device` loads the VQ-VAE encoders of `segment` sources.
    pub fn new<B: Backend>(config: &'a RunConfig, device: &B::Device) -> Result<Self> {
        let tokenizer = Arc::new(PaliTokenizer::from_file(&config.tokenizer.path)?);
        if tokenizer.noise.is_none() {
            if let Some(st) = config
                .stages
                .iter()
                .find(|st| st.sources.iter().any(|x| x.noise_boxes.is_some()))
            {
                return Err(Error::Config(format!(
                    "stage `{}`: noise_boxes needs a `<noise>` token, which {} lacks (add it \
                     with `pali tokenizer add --tokens \"<noise>\"`)",
                    st.name,
                    config.tokenizer.path.display()
                )));
            }
        }
        let encoders = mask_encoders::<B>(config, device)?;
        let mut stages = Vec::with_capacity(config.stages.len());
        let mut paths = None;
        let mut towers = Vec::new();
        let mut init = config.model.clone();
        for (index, stage) in config.stages.iter().enumerate() {
            let eval_set: Option<Arc<dyn Dataset>> = match &stage.eval.jsonl {
                Some(p) => Some(Arc::new(JsonlDataset::open(p, stage.on_error, false)?)),
                None => None,
            };
            if !stage.kind.is_vlm() {
                let model = tower_model(config, &tokenizer, stage)?;
                let paths = match &model {
                    TowerModel::Siglip(c) => optim::param_paths::<B, _>(&c.init::<B>(device)),
                    TowerModel::Lm(c) => optim::param_paths::<B, _>(&crate::stage0::CausalLm {
                        model: c.init::<B>(device),
                        sliding_window: c.sliding_window,
                    }),
                };
                let groups = Groups::new(stage);
                groups.assign(&paths).map_err(|e| {
                    Error::Config(format!("stage {} (`{}`): {e}", index + 1, stage.name))
                })?;
                let plan = TowerPlan {
                    index,
                    stage,
                    config,
                    model,
                    groups,
                    train: sources(stage, config.run.seed, &encoders)?,
                    val: validation_sources(stage, config.run.seed, &encoders),
                    eval_set,
                    tokenizer: tokenizer.clone(),
                };
                if stage.eval.examples > 0 && plan.validation().is_none() {
                    return Err(Error::Config(format!(
                        "stage {} (`{}`): eval.examples > 0 needs validation data: a synthetic \
                         first source, or eval.jsonl",
                        index + 1,
                        stage.name
                    )));
                }
                let out = Some(plan.output());
                match stage.kind {
                    StageKind::Siglip => init.init_siglip = out,
                    _ => init.init_gemma = out,
                }
                towers.push(plan);
                continue;
            }
            let model = model_config(config, &tokenizer, stage.resolution)?;
            if let ImageEncoder::Siglip(v) = &model.vision {
                if stage.resolution < v.patch_size || !stage.resolution.is_multiple_of(v.patch_size)
                {
                    return Err(Error::Config(format!(
                        "stage {} (`{}`): resolution {} is not a multiple of the patch size {} \
                         (pixels past the last whole patch would be dropped)",
                        index + 1,
                        stage.name,
                        stage.resolution,
                        v.patch_size
                    )));
                }
            }
            // Parameter paths do not depend on the resolution: one probe serves every stage.
            let paths =
                paths.get_or_insert_with(|| optim::param_paths::<B, _>(&model.init::<B>(device)));
            let groups = Groups::new(stage);
            groups.assign(paths).map_err(|e| {
                Error::Config(format!("stage {} (`{}`): {e}", index + 1, stage.name))
            })?;
            // Not an error: a base config's groups may name a tower some variants lack.
            let idle_groups = groups
                .groups
                .iter()
                .enumerate()
                .filter(|(_, g)| !paths.iter().any(|p| g.params.is_match(p)))
                .map(|(i, g)| format!("group {} (`{}`)", i + 1, g.params.as_str()))
                .collect();
            stages.push(StagePlan {
                index,
                stage,
                config,
                model,
                groups,
                train: sources(stage, config.run.seed, &encoders)?,
                val: validation_sources(stage, config.run.seed, &encoders),
                eval_set,
                idle_groups,
                tokenizer: tokenizer.clone(),
            });
        }
        Ok(Self {
            config,
            tokenizer,
            towers,
            stages,
            init,
        })
    }
}

impl StagePlan<'_> {
    /// The stage's training stream, seeded by the run's seed and the stage's position.
    pub fn mixture(&self) -> Result<Mixture> {
        mixture(self.stage, &self.train, self.seed(), self.index)
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.config.run.seed
    }

    /// Seeds this stage's data stream and augmentations.
    fn stream_seed(&self) -> u64 {
        self.seed().wrapping_add(self.index as u64)
    }

    /// Turns the stream's examples into batches (training draws augmentations from it;
    /// evaluation encodes without them).
    pub fn batch_builder(&self) -> BatchBuilder {
        recipe(self.stage, &self.tokenizer, self.stream_seed())
    }

    /// Whether the stage evaluates: it asks for examples and has validation data (a synthetic
    /// first source, or `eval.jsonl`).
    pub fn evaluates(&self) -> bool {
        self.stage.eval.examples > 0 && (self.eval_set.is_some() || self.val[0].is_some())
    }

    /// The metric family the stage is scored with.
    pub fn eval_task(&self) -> Task {
        eval_task(self.stage)
    }
}

/// The batch builder of `stage`: its text length and truncation, resolution, resize method and
/// image transforms; `seed` seeds the augmentations.
fn recipe(stage: &Stage, tokenizer: &Arc<PaliTokenizer>, seed: u64) -> BatchBuilder {
    let mut seq = SequenceBuilder::new(stage.text_len);
    seq.truncation = stage.truncation;
    seq.text_only = !stage.kind.is_vlm();
    BatchBuilder {
        tokenizer: tokenizer.clone(),
        seq,
        resolution: stage.resolution,
        resize: stage.resize,
        // A language-model stage reads no image.
        frames: if stage.kind == StageKind::Lm {
            0
        } else {
            stage.images
        },
        transforms: Transforms {
            downscale: stage.downscale,
            window: stage.window,
            augment: stage.augment,
            seed,
        },
    }
}

/// The metric family a stage is scored with: `eval.task`, else from its first source.
pub fn eval_task(stage: &Stage) -> Task {
    if let Some(t) = &stage.eval.task {
        return **t;
    }
    match stage.sources[0].synth_task() {
        Some(SynthTask::Caption | SynthTask::GroundedCaption) => Task::Caption,
        Some(SynthTask::Vqa | SynthTask::Count) => Task::Vqa,
        Some(SynthTask::Detect) => Task::Detect,
        Some(SynthTask::Ocr) => Task::Docvqa,
        Some(SynthTask::Segment) => Task::Refcoco,
        None => Task::Vqa,
    }
}

/// The model config of `config` at `resolution`.
pub fn model_config(
    config: &RunConfig,
    tok: &PaliTokenizer,
    resolution: usize,
) -> Result<PaliGemmaConfig> {
    let name = config.model.preset.as_deref().unwrap_or("init_hf");
    let mut c = match (&config.model.init_hf, name) {
        (Some(dir), _) => {
            pali_model::hf::parse_config(&dir.join("config.json"))?.with_position_offset(0)
        }
        (None, _) if config.model.init_big_vision.is_some() => {
            big_vision_config(config)?.expect("init_big_vision is set")
        }
        (None, "tiny") => {
            pali_model::presets::tiny(tok.vocab_size(), tok.image as usize, resolution)
        }
        (None, name) => pali_model::presets::preset(name)?,
    };
    let change = |e: String| Error::Config(e);
    c.text = crate::config::with_changes("text", &c.text, &config.model.text).map_err(change)?;
    if let ImageEncoder::Siglip(v) = &mut c.vision {
        *v = crate::config::with_changes("vision", &*v, &config.model.vision).map_err(change)?;
    }
    if let Some(m) = shape_problem(&c) {
        return Err(Error::Config(format!("model: {m}")));
    }
    if let ImageEncoder::Siglip(v) = &mut c.vision {
        v.image_size = resolution;
    }
    if tok.vocab_size() > c.text.vocab_size {
        return Err(Error::Config(format!(
            "tokenizer {} has {} tokens but model `{}` has {} embedding rows",
            tok.path.display(),
            tok.vocab_size(),
            name,
            c.text.vocab_size
        )));
    }
    if tok.image as usize != c.image_token_id {
        let source = match (&config.model.init_hf, &config.model.init_big_vision) {
            (Some(dir), _) => Some(dir.join("config.json")),
            (None, npz) => npz.clone(),
        };
        if let Some(source) = source {
            return Err(Error::Config(format!(
                "tokenizer {} has `<image>` = {} but {} expects {}",
                tok.path.display(),
                tok.image,
                source.display(),
                c.image_token_id
            )));
        }
        // A preset with another tokenizer (e.g. a full-size model on the synthetic data): the
        // tokenizer's `<image>` id is used, and rows past its vocabulary are never predicted.
        c.image_token_id = tok.image as usize;
        c.output_vocab_size = Some(c.predictable_vocab().min(tok.vocab_size()));
    }
    if config.model.encoder == EncoderChoice::None {
        c.vision = ImageEncoder::RawPatches {
            image_size: resolution,
            patch_size: c.vision.patch_size(),
        };
    }
    if config.model.projector == ProjectorChoice::Mlp {
        c.projector = ProjectorKind::Mlp;
    }
    Ok(c)
}

/// A tower shape that cannot be built (possible with `model.vision` / `model.text` changes).
fn shape_problem(c: &PaliGemmaConfig) -> Option<String> {
    let t = &c.text;
    let sizes = [
        t.hidden_size,
        t.intermediate_size,
        t.num_layers,
        t.num_heads,
        t.head_dim,
    ];
    if sizes.contains(&0) || t.num_kv_heads == 0 || !t.num_heads.is_multiple_of(t.num_kv_heads) {
        return Some(format!(
            "text: sizes must be > 0 and num_heads ({}) a multiple of num_kv_heads ({})",
            t.num_heads, t.num_kv_heads
        ));
    }
    if let ImageEncoder::Siglip(v) = &c.vision {
        let sizes = [
            v.hidden_size,
            v.intermediate_size,
            v.num_layers,
            v.num_heads,
            v.patch_size,
        ];
        if sizes.contains(&0) || v.hidden_size % v.num_heads != 0 {
            return Some(format!(
                "vision: sizes must be > 0 and hidden_size ({}) a multiple of num_heads ({})",
                v.hidden_size, v.num_heads
            ));
        }
        if v.posemb_init == pali_model::PosembInit::Sincos2d && !v.hidden_size.is_multiple_of(4) {
            return Some(format!(
                "vision: posemb_init = \"sincos2d\" needs hidden_size ({}) a multiple of 4",
                v.hidden_size
            ));
        }
    }
    None
}

/// The model of `model.init_big_vision` at its own resolution: `preset` (checked against the
/// file's shapes) or the preset that matches them.
pub fn big_vision_config(config: &RunConfig) -> Result<Option<PaliGemmaConfig>> {
    let Some(npz) = &config.model.init_big_vision else {
        return Ok(None);
    };
    let c = match &config.model.preset {
        Some(name) => {
            let c = pali_model::presets::preset(name)?;
            pali_model::big_vision::check(npz, &c)?;
            c
        }
        None => pali_model::big_vision::infer_config(npz)?.1,
    };
    Ok(Some(c))
}

/// The training split of a stage's sources (few-shot subsets applied).
pub fn sources(stage: &Stage, seed: u64, encoders: &MaskEncoders) -> Result<Vec<Arc<dyn Dataset>>> {
    stage
        .sources
        .iter()
        .map(|s| -> Result<Arc<dyn Dataset>> {
            let d: Arc<dyn Dataset> = match &s.kind {
                SourceKind::Synth { task, size } => {
                    Arc::new(synth(stage, s, *task, *size, seed, 0, encoders))
                }
                SourceKind::Jsonl { path } => {
                    Arc::new(JsonlDataset::open(path, stage.on_error, false)?)
                }
                SourceKind::Shards { path } => Arc::new(ShardDataset::open(path)?),
            };
            Ok(match s.few_shot {
                Some(k) => Arc::new(FewShot::new(d, k, seed)?),
                None => d,
            })
        })
        .collect()
}

/// The validation split of each synthetic source, whole; a JSONL source has none (its file is
/// training data, and is not opened again).
fn validation_sources(
    stage: &Stage,
    seed: u64,
    encoders: &MaskEncoders,
) -> Vec<Option<Arc<dyn Dataset>>> {
    stage
        .sources
        .iter()
        .map(|s| match &s.kind {
            SourceKind::Synth { task, size } => {
                Some(Arc::new(synth(stage, s, *task, *size, seed, 1, encoders)) as Arc<dyn Dataset>)
            }
            SourceKind::Jsonl { .. } | SourceKind::Shards { .. } => None,
        })
        .collect()
}

/// One split of a synthetic source.
fn synth(
    stage: &Stage,
    s: &crate::config::Source,
    task: SynthTask,
    size: usize,
    seed: u64,
    split: u64,
    encoders: &MaskEncoders,
) -> SynthDataset {
    let mut d = SynthDataset::new(task, seed, split, size, stage.task_prefix);
    if let Some(e) = s.vqvae.as_ref().and_then(|p| encoders.get(p)) {
        d = d.with_mask_encoder(e.clone());
    }
    if let Some(n) = s.noise_boxes {
        d = d.with_noise_boxes(n);
    }
    d
}

/// Loads the VQ-VAE of every source that names one (on `device`).
pub fn mask_encoders<B: Backend>(config: &RunConfig, device: &B::Device) -> Result<MaskEncoders> {
    let mut out = MaskEncoders::new();
    for p in config
        .stages
        .iter()
        .flat_map(|s| s.sources.iter().filter_map(|x| x.vqvae.clone()))
    {
        if let std::collections::hash_map::Entry::Vacant(slot) = out.entry(p) {
            let enc = VqVaeEncoder::<B>::load(slot.key(), device)?;
            slot.insert(Arc::new(enc) as Arc<dyn MaskEncoder>);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn few_shot_limits_the_training_split_only() {
        let d = tempfile::tempdir().unwrap();
        let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer/tokenizer.json");
        let p = d.path().join("run.toml");
        std::fs::write(
            &p,
            format!(
                "[run]\nname = \"f\"\nout_dir = \"out\"\n[model]\npreset = \"tiny\"\n[tokenizer]\npath = \"{}\"\n\
                 [[stage]]\nname = \"s\"\nresolution = 32\ntext_len = 16\nsteps = 1\n\
                 batch_size = 1\nlr = 1e-3\n\
                 source = [{{ kind = \"synth\", task = \"vqa\", size = 100, few_shot = 7 }}]\n",
                tok.display()
            ),
        )
        .unwrap();
        let c = RunConfig::load(&p, &[]).unwrap();
        let train = sources(&c.stages[0], 3, &MaskEncoders::new()).unwrap();
        let val = validation_sources(&c.stages[0], 3, &MaskEncoders::new());
        assert_eq!((train[0].len(), val[0].as_ref().unwrap().len()), (7, 100));
        assert!(
            train[0].name().contains("7-shot, seed 3"),
            "{}",
            train[0].name()
        );
        let again = sources(&c.stages[0], 3, &MaskEncoders::new()).unwrap();
        assert_eq!(
            train[0].get(0).unwrap().suffix,
            again[0].get(0).unwrap().suffix
        );
    }
}
