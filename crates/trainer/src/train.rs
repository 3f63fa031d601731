//! The training loop. A run is planned and checked first ([`RunPlan`]), then each stage reads top
//! to bottom: enter the stage → per step: batch → [`train_step`] (forward, loss, backward,
//! optimizer) → log → checkpoint; evaluations every `eval.every` steps and at the end of each
//! stage.
//!
//! Where the model starts (the order matters):
//! 1. with `resume`, the newest checkpoint under `out_dir/checkpoints` (model, Adam moments,
//!    data-stream state, step) — the run continues exactly where it stopped;
//! 2. else `model.init_hf` (an HF PaliGemma checkpoint);
//! 3. else a random initialisation from `run.seed` (projector zero-initialised), with the towers
//!    named by `model.init_siglip` / `model.init_gemma` loaded from unimodal checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, ElementConversion, Tensor};
use pali_data::batch::{Batch, Loader, Share};
use pali_data::mixture::MixtureState;
use pali_model::checkpoint::{load_into, TensorFile, Tower};
use pali_model::PaliGemma;
use serde_json::json;

use crate::ckpt::{self, RunState};
use crate::config::{Part, RunConfig};
use crate::dist::{self, Peer, Topology};
use crate::error::{io, Error, Result};
use crate::evaluate::{evaluate, Eval};
pub use crate::events::StageSummary;
use crate::events::{Event, Observer, Silent, StepLog};
use crate::inputs::step_inputs;
use crate::metrics::Metrics;
use crate::optim::{self, AdamState};
use crate::posemb::set_resolution;
use crate::rundir::{check_resume_config, Existing, RunDir};
use crate::stage::{model_config, RunPlan, StagePlan};
use crate::step::{train_step, StepResult, StepSettings};

/// Options that are not part of the config.
#[derive(Clone, Copy)]
pub struct TrainOptions<'a> {
    /// What to do with a run already in `run.out_dir`: refuse it, continue it from its newest
    /// checkpoint, or move it aside (to `DIR.old-N`) and start afresh.
    pub existing: Existing,
    /// Stop after this many optimizer steps of the whole run (tests, debugging).
    pub max_steps: Option<u64>,
    /// Receives progress and messages ([`Event`]).
    pub observer: &'a dyn Observer,
}

impl Default for TrainOptions<'static> {
    fn default() -> Self {
        Self {
            existing: Existing::Refuse,
            max_steps: None,
            observer: &Silent,
        }
    }
}

/// Runs every stage of `config` on backend `B` (gradients through `Autodiff<B>`, with Burn's
/// balanced checkpointing when `run.gradient_checkpointing`), data-parallel over `devices` in
/// this process (one rank per device; see [`crate::dist`]).
pub fn train<B: Backend>(
    config: &RunConfig,
    devices: &[B::Device],
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    train_on::<B>(config, devices, &Topology::single(), opts)
}

/// [`train`] as one process (node) of a multi-process run `topo`: ranks
/// `node_rank × devices.len() ..` of `nodes × devices.len()`. Node 0 holds rank 0, the one that
/// writes the run directory (checkpoints, metrics) and reports to `opts.observer`; the other
/// nodes return an empty summary list.
pub fn train_on<B: Backend>(
    config: &RunConfig,
    devices: &[B::Device],
    topo: &Topology,
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    let out = train_ranks::<B>(config, devices, topo, opts);
    remove_big_vision_scratch();
    out
}

fn train_ranks<B: Backend>(
    config: &RunConfig,
    devices: &[B::Device],
    topo: &Topology,
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    let world = topo.nodes * devices.len();
    let device = check_devices::<B>(config, devices, world)?;
    let run = |device: &B::Device, peer: Option<&Peer<B>>, opts: &TrainOptions| {
        if config.run.gradient_checkpointing {
            train_with::<B, BalancedCheckpointing>(config, device, peer, opts)
        } else {
            train_with::<B, NoCheckpointing>(config, device, peer, opts)
        }
    };
    if world == 1 {
        return run(device, None, opts);
    }
    if topo.nodes == 1 {
        Peer::<B>::reset();
    }
    dist::start_node(topo)?;
    let n = devices.len();
    let silent = TrainOptions {
        observer: &Silent,
        ..*opts
    };
    let rank = |i: usize, device: &B::Device, opts: &TrainOptions| {
        let peer = Peer::<B>::join(topo, i, n, device.clone());
        let out = peer.and_then(|peer| run(device, Some(&peer), opts));
        if out.is_err() {
            Peer::<B>::abort();
        }
        out
    };
    // The process's first device runs on this thread (it reports, on node 0); the others each
    // on their own.
    let mut outs: Vec<Result<Vec<StageSummary>>> = std::thread::scope(|s| {
        let others: Vec<_> = devices[1..]
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let silent = &silent;
                s.spawn(move || rank(i + 1, d, silent))
            })
            .collect();
        let first = rank(0, device, if topo.node_rank == 0 { opts } else { &silent });
        std::iter::once(first)
            .chain(others.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Train("a data-parallel rank panicked".into())))
            }))
            .collect()
    });
    // The cause, not a rank that stopped because another failed; else this thread's result.
    let cause = outs
        .iter()
        .position(|r| r.as_ref().is_err_and(|e| !dist::follows_another(e)))
        .or_else(|| outs.iter().position(Result::is_err));
    outs.swap_remove(cause.unwrap_or(0))
}

/// Held while a rank seeds the backend's generator and draws from it (initialisation, a stage's
/// `reset`): on the CPU backend the ranks of a process share one generator, and draws of another
/// thread in between would change rank 0's weights.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The HF directory a `model.init_big_vision` file was converted into, shared by this
/// process's ranks (converted once) and removed when [`train_on`] returns.
static BIG_VISION: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

fn big_vision_scratch(
    config: &RunConfig,
    npz: &Path,
    model: &pali_model::PaliGemmaConfig,
) -> Result<PathBuf> {
    let mut done = BIG_VISION.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = done.as_ref() {
        return Ok(dir.clone());
    }
    // Host and process: ranks on several machines may share `out_dir`.
    let dir = config.run.out_dir.join(format!(
        ".big_vision-{}-{}",
        crate::tensorboard::hostname(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    pali_model::big_vision::convert(npz, model, &[], &dir)?;
    *done = Some(dir.clone());
    Ok(dir)
}

fn remove_big_vision_scratch() {
    if let Some(dir) = BIG_VISION.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The result `r` of a step that only rank 0 takes (or that could fail on some ranks only), once
/// every rank has reached it: a failure anywhere stops every rank.
fn agree<T, B: Backend>(peer: Option<&Peer<B>>, what: &str, r: Result<T>) -> Result<T> {
    let Some(p) = peer else { return r };
    let synced = p.barrier(what, r.is_ok());
    let v = r?;
    synced?;
    Ok(v)
}

fn train_with<B: Backend, C: CheckpointStrategy>(
    config: &RunConfig,
    device: &B::Device,
    peer: Option<&Peer<B>>,
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    // Rank 0 writes the run directory; every rank trains.
    let lead = peer.is_none_or(|p| p.rank == 0);
    let (rank, world) = peer.map_or((0, 1), |p| (p.rank, p.world));
    let plan = RunPlan::new::<B>(config, device)?;
    let out_dir = &config.run.out_dir;
    let obs = opts.observer;
    let opened = if lead {
        RunDir::open(out_dir, opts.existing).map(Some)
    } else {
        Ok(None)
    };
    let run_dir = agree(peer, "opening the run directory", opened)?;
    if let Some(aside) = run_dir.as_ref().and_then(|r| r.moved_aside.as_ref()) {
        let line = format!("moved the earlier run to {}", aside.display());
        obs.on(Event::Info(&line));
    }

    // Stage 0 first, each stage in its own directory, on rank 0's device alone: its loss
    // couples every example of a batch. The other ranks wait; they start the PaliGemma stages
    // from rank 0's weights (synced at every stage start).
    let mut plan = plan;
    let (tower_summaries, opts) = match plan.towers.first() {
        None => (Vec::new(), *opts),
        Some(_) => {
            let r = if lead {
                run_stage0::<B>(&plan, device, opts)
            } else {
                plan.init = config.model.clone();
                Ok(Vec::new())
            };
            let done = agree(peer, "stage 0", r)?;
            if ends_in_stage0(&plan, opts) {
                return Ok(done);
            }
            let rest = TrainOptions {
                max_steps: opts.max_steps.map(|m| m - stage0_steps(&plan)),
                ..*opts
            };
            (done, rest)
        }
    };
    let opts = &opts;
    let started = {
        let _alone = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        start::<Autodiff<B, C>>(&plan, opts, device)
    };
    let (mut model, mut adam, resumed) = agree(peer, "loading the start", started)?;
    // What the run logged up to its checkpoint; lines after it are logged again.
    let (kept, restart_at) = match &resumed {
        None => (Some(0), config.run.start_step),
        Some(st) => (st.metrics_bytes, st.global_step),
    };
    let metrics = if lead {
        write_resolved(config)?;
        Metrics::open(out_dir, kept, restart_at)?
    } else {
        Metrics::none()
    };
    let mut resolution = resumed
        .as_ref()
        .map_or(plan.stages[0].stage.resolution, |s| s.resolution);
    let mut global_step = resumed
        .as_ref()
        .map_or(config.run.start_step, |s| s.global_step);
    let first_stage = resumed.as_ref().map_or(0, |s| s.stage);
    let mut summaries = resumed
        .as_ref()
        .map_or(tower_summaries, |s| s.stages_done.clone());

    for sp in plan.stages.iter().filter(|sp| sp.index >= first_stage) {
        let (si, stage) = (sp.index, sp.stage);
        let here = resumed.as_ref().filter(|s| s.stage == si);
        let start_step = here.map_or(0, |s| s.stage_step);
        if start_step >= stage.steps {
            continue;
        }
        // Steps of the run before this stage (schedules with `continues` count from there).
        let stage_start = global_step - start_step;
        if resolution != stage.resolution {
            model = set_resolution(model, resolution, stage.resolution);
            resolution = stage.resolution;
        }
        (model, adam) = {
            let _alone = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
            enter_stage(
                model,
                adam,
                sp,
                start_step == 0,
                config.run.dtype,
                device,
                obs,
            )?
        };
        // The replicas start every stage from rank 0's weights (after a reset or a resolution
        // change too).
        if let Some(p) = peer {
            model = p.sync_model(model)?;
        }
        let mut mixture = sp.mixture()?;
        if let Some(ms) = here.and_then(|st| st.mixture.clone()) {
            mixture.restore(ms)?;
        }
        obs.on(Event::Begin {
            name: &stage.name,
            steps: stage.steps,
            start: start_step,
            details: &stage_header(sp, &mixture.describe()),
        });
        let mut loader = Loader::spawn_share(
            mixture,
            sp.batch_builder(),
            stage.batch_size,
            stage.on_error,
            2,
            Share { rank, ranks: world },
        );
        let steps = StageSteps::new(sp, device, peer, stage_start);
        let started = Instant::now();
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        let mut window = LogWindow::new();
        let mut guard = Guard::new(device);
        let trains = sp.groups.groups.iter().any(|g| !g.frozen);
        let mut divergence = Divergence::new(config.run.divergence_factor, trains);

        // The step of the newest checkpoint, and the data-stream state after the last batch.
        let mut saved_at = global_step;
        let mut mixture_after = None;
        for step in start_step..stage.steps {
            if opts.max_steps.is_some_and(|m| global_step >= m) {
                guard.check(&stage.name, guard.read())?;
                if saved_at < global_step {
                    let at = Position {
                        global_step,
                        done: step,
                        resolution,
                    };
                    let saved = lead
                        .then(|| {
                            save_checkpoint(
                                &model.valid(),
                                &adam,
                                sp,
                                mixture_after,
                                &at,
                                &metrics,
                                &summaries,
                            )
                        })
                        .transpose();
                    agree(peer, "writing the checkpoint", saved)?;
                }
                return Ok(summaries);
            }
            // Mid-stage evaluations every `eval.every` steps, the first before step 0: where a
            // curve starts matters to some ablations (new-token init: the step-0 perplexity).
            if stage.eval.every > 0 && step % stage.eval.every == 0 && sp.evaluates() {
                guard.check(&stage.name, guard.read())?;
            }
            if lead && stage.eval.every > 0 && step % stage.eval.every == 0 && sp.evaluates() {
                log_eval(
                    &model.valid(),
                    sp,
                    global_step,
                    false,
                    &metrics,
                    device,
                    obs,
                )?;
            }
            let waited = Instant::now();
            let mut batch = loader.recv()?;
            window.data_wait_s += waited.elapsed().as_secs_f64();
            let done = step + 1;
            // The end-of-stage checkpoint follows the stage's evaluation (below).
            let checkpoint = done % stage.checkpoint_every == 0 && done < stage.steps;
            // Checkpoint steps are logged too: the NaN and divergence checks run before every
            // checkpoint, so none is written once an anomaly shows, and retention never rotates
            // out the checkpoints taken before it.
            let log = done % stage.log_every == 0
                || done == stage.steps
                || step == start_step
                || checkpoint;
            let (m, out, sched) = steps
                .take(model, &mut adam, &mut batch, step, global_step, log)
                .map_err(|e| stopped(&stage.name, done, e))?;
            model = m;
            window.count(&batch);
            window.steps += 1;
            global_step += 1;
            window.tokens += out.tokens * world;
            guard.record(done, &out.stats.applied);
            mixture_after = batch.state_after.clone();
            let logged = if log {
                // The one device-to-host transfer of a logging step.
                let r = Readout::of(&out, &guard);
                guard.check(&stage.name, r.first_skipped)?;
                if first_loss.is_nan() {
                    first_loss = r.loss;
                }
                last_loss = r.loss;
                let record = LogRecord {
                    stage: sp,
                    global_step,
                    done,
                    sched: &sched,
                    batch: &batch,
                };
                let logged = if lead {
                    log_step(&record, &r, &mut window, &metrics)?
                } else {
                    StepLog::default()
                };
                divergence
                    .observe(r.loss, r.grad_norm)
                    .map_err(|why| stopped(&stage.name, done, Error::Train(why)))?;
                Some(logged)
            } else {
                None
            };
            obs.on(Event::Step {
                done,
                log: logged.as_ref(),
            });
            if checkpoint {
                let at = Position {
                    global_step,
                    done,
                    resolution,
                };
                let saved = lead
                    .then(|| {
                        save_checkpoint(
                            &model.valid(),
                            &adam,
                            sp,
                            mixture_after.clone(),
                            &at,
                            &metrics,
                            &summaries,
                        )
                    })
                    .transpose();
                agree(peer, "writing the checkpoint", saved)?;
                saved_at = global_step;
            }
        }
        obs.on(Event::End);
        if lead {
            let svg = out_dir.join(format!("curves-{}.svg", stage.name));
            crate::plot::stage_curves(&metrics.path, &stage.name, &svg)?;
        }
        let eval = if lead && sp.evaluates() {
            Some(log_eval(
                &model.valid(),
                sp,
                global_step,
                true,
                &metrics,
                device,
                obs,
            )?)
        } else {
            None
        };
        let s = StageSummary {
            name: stage.name.clone(),
            steps: stage.steps,
            first_loss,
            last_loss,
            seconds: started.elapsed().as_secs_f64(),
            eval_accuracy: eval.as_ref().map(|e| e.accuracy),
            eval_baseline: eval.as_ref().map(|e| e.majority_baseline),
            eval_metrics: eval.as_ref().map(|e| e.metrics.clone()),
            val_perplexity: eval.map(|e| e.perplexity).unwrap_or_default(),
        };
        obs.on(Event::StageDone(&s));
        summaries.push(s);
        let at = Position {
            global_step,
            done: stage.steps,
            resolution,
        };
        let saved = lead
            .then(|| save_checkpoint(&model.valid(), &adam, sp, None, &at, &metrics, &summaries))
            .transpose();
        agree(peer, "writing the checkpoint", saved)?;
    }
    if !lead {
        return Ok(Vec::new());
    }
    write_summary(out_dir, &summaries)?;
    Ok(summaries)
}

/// Trains the stage-0 stages (see [`crate::stage0`]); writes `summary.json` when the run ends
/// there (stopped by `max_steps`, or nothing else to train).
fn run_stage0<B: Backend>(
    plan: &RunPlan,
    device: &B::Device,
    opts: &TrainOptions,
) -> Result<Vec<StageSummary>> {
    let config = plan.config;
    let out_dir = &config.run.out_dir;
    if opts.existing == Existing::Resume {
        // The first unfinished stage-0 stage and later ones may change their steps.
        if let Some(t) = plan.towers.iter().find(|t| !t.output().is_dir()) {
            check_resume_config(out_dir, config, t.index)?;
        }
    }
    if plan.towers.iter().any(|t| !t.output().is_dir()) {
        write_resolved(config)?;
    }
    let done = crate::stage0::run::<B>(&plan.towers, device, opts)?;
    if ends_in_stage0(plan, opts) {
        write_summary(out_dir, &done)?;
    }
    Ok(done)
}

/// Whether this invocation ends with stage 0: no PaliGemma stage, or `max_steps` reached by
/// then (stage 0 stops exactly there, so every rank knows it without asking rank 0).
fn ends_in_stage0(plan: &RunPlan, opts: &TrainOptions) -> bool {
    plan.stages.is_empty() || opts.max_steps.is_some_and(|m| m <= stage0_steps(plan))
}

fn stage0_steps(plan: &RunPlan) -> u64 {
    plan.towers.iter().map(|t| t.stage.steps).sum()
}

/// `config.resolved.toml`: the config the run is made with (a resume is checked against it).
fn write_resolved(config: &RunConfig) -> Result<()> {
    let resolved = config.run.out_dir.join("config.resolved.toml");
    std::fs::write(&resolved, toml::to_string_pretty(config).expect("toml")).map_err(io(&resolved))
}

fn write_summary(out_dir: &Path, summaries: &[StageSummary]) -> Result<()> {
    let sp = out_dir.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(summaries).expect("json")).map_err(io(&sp))
}

/// How the steps of stage `sp` are taken; the loop and [`replay`] share it.
struct StageSteps<'p, 'a, B: Backend> {
    sp: &'p StagePlan<'a>,
    settings: StepSettings<'p, B>,
    device: &'p B::Device,
    /// Steps of the run before this stage (schedules with `continues` count from there).
    stage_start: u64,
}

impl<'p, 'a, B: Backend> StageSteps<'p, 'a, B> {
    fn new(
        sp: &'p StagePlan<'a>,
        device: &'p B::Device,
        peer: Option<&'p Peer<B>>,
        stage_start: u64,
    ) -> Self {
        let stage = sp.stage;
        let settings = StepSettings {
            optim: &stage.optim,
            loss: &stage.loss,
            groups: &sp.groups,
            grad_accum: stage.grad_accum,
            peer,
        };
        Self {
            sp,
            settings,
            device,
            stage_start,
        }
    }

    /// Stage step `step` (run step `global_step`) on `batch`: its inputs, each group's schedule
    /// value (also returned, for the log) and its dropout masks, seeded by (seed, step) so a
    /// resumed run draws the same ones.
    #[allow(clippy::type_complexity)]
    fn take<AD: AutodiffBackend<InnerBackend = B, Device = B::Device>>(
        &self,
        model: PaliGemma<AD>,
        adam: &mut AdamState<AD::InnerBackend>,
        batch: &mut Batch,
        step: u64,
        global_step: u64,
        norms: bool,
    ) -> Result<(PaliGemma<AD>, StepResult<AD::InnerBackend>, Vec<f64>)> {
        let (sp, stage) = (self.sp, self.sp.stage);
        let device = self.device;
        let inputs = step_inputs::<AD>(batch, &sp.model, stage.attention, stage.loss.on, device)?;
        let sched: Vec<f64> = (0..sp.groups.groups.len())
            .map(|g| sp.groups.at(g, self.stage_start, stage.steps, step))
            .collect();
        let seed = (stage.llm_dropout > 0.0).then(|| {
            (sp.config.run.seed)
                .wrapping_mul(1_000_003)
                .wrapping_add(global_step)
        });
        let (model, out) = train_step(
            model,
            inputs,
            adam,
            &self.settings,
            sched.clone(),
            seed,
            norms,
        )?;
        Ok((model, out, sched))
    }
}

/// The first `steps` optimizer steps of `config`'s first stage, taken as [`train`] takes them
/// (initial weights, stage entry, data stream, schedule, dropout seeds, [`train_step`]) on one
/// device, writing nothing: what `pali bench train-step --run` times. After each step has
/// finished on the device (one weight is read back), `each` gets the step's number, its
/// tokens (image slots included) and the seconds it waited for its batch. Returns the trained
/// weights.
pub fn replay<B: Backend>(
    config: &RunConfig,
    device: &B::Device,
    steps: u64,
    each: &mut dyn FnMut(u64, usize, f64),
) -> Result<PaliGemma<B>> {
    if config.run.gradient_checkpointing {
        replay_with::<B, BalancedCheckpointing>(config, device, steps, each)
    } else {
        replay_with::<B, NoCheckpointing>(config, device, steps, each)
    }
}

fn replay_with<B: Backend, C: CheckpointStrategy>(
    config: &RunConfig,
    device: &B::Device,
    steps: u64,
    each: &mut dyn FnMut(u64, usize, f64),
) -> Result<PaliGemma<B>> {
    let mut plan = RunPlan::new::<B>(config, device)?;
    // Timing needs no trained towers: a config with stage 0 replays from random ones.
    plan.init = config.model.clone();
    let sp = plan
        .stages
        .first()
        .ok_or_else(|| Error::Config("the run config has no PaliGemma stage".into()))?;
    let stage = sp.stage;
    if steps > stage.steps {
        return Err(Error::Config(format!(
            "stage `{}` has {} steps, fewer than the {steps} asked for",
            stage.name, stage.steps
        )));
    }
    let opts = TrainOptions::default();
    let (model, adam, _) = start::<Autodiff<B, C>>(&plan, &opts, device)?;
    let (mut model, mut adam) =
        enter_stage(model, adam, sp, true, config.run.dtype, device, &Silent)?;
    let mut loader = Loader::spawn(
        sp.mixture()?,
        sp.batch_builder(),
        stage.batch_size,
        stage.on_error,
        2,
    );
    let first = config.run.start_step;
    let stage_steps = StageSteps::new(sp, device, None, first);
    for step in 0..steps {
        let waited = Instant::now();
        let mut batch = loader.recv()?;
        let wait = waited.elapsed().as_secs_f64();
        let (m, out, _) =
            stage_steps.take(model, &mut adam, &mut batch, step, first + step, false)?;
        model = m;
        let _ = model.language_model.norm.weight.val().sum().into_scalar();
        each(step, out.tokens, wait);
    }
    Ok(model.valid())
}

/// The first device, after checking that every stage's batch splits over the `world` ranks and
/// that the device computes in `run.dtype`.
fn check_devices<'d, B: Backend>(
    config: &RunConfig,
    devices: &'d [B::Device],
    world: usize,
) -> Result<&'d B::Device> {
    let device = devices.first().expect("at least one device");
    for s in config.stages.iter().filter(|s| s.kind.is_vlm()) {
        let parts = s.grad_accum * world;
        if !s.batch_size.is_multiple_of(parts) {
            return Err(Error::Config(format!(
                "stage `{}`: batch_size {} does not split into grad_accum {} × {} ranks",
                s.name, s.batch_size, s.grad_accum, world
            )));
        }
    }
    let dtype = config.run.dtype;
    if !dtype.supported::<B>(device) {
        return Err(Error::Config(format!(
            "run.dtype = \"{dtype}\": device {device:?} does not support {dtype}; use \"f32\""
        )));
    }
    Ok(device)
}

/// The model and optimizer state the run starts from, and the state of a resumed run (see the
/// module doc for the precedence).
#[allow(clippy::type_complexity)]
fn start<AD: AutodiffBackend>(
    plan: &RunPlan,
    opts: &TrainOptions,
    device: &AD::Device,
) -> Result<(PaliGemma<AD>, AdamState<AD::InnerBackend>, Option<RunState>)> {
    let config = plan.config;
    // The newest checkpoint whose files match their checksums; damaged ones are named.
    let resume = opts.existing == Existing::Resume;
    let latest = if resume {
        ckpt::newest_intact(&config.run.out_dir, &mut |e| {
            let line = format!("skipping a damaged checkpoint: {e}");
            opts.observer.on(Event::Info(&line));
        })?
    } else {
        None
    };
    // Before any weights are loaded: a resumed run continues under its own config.
    if resume {
        // Without a checkpoint the run is at its first PaliGemma stage (stage 0 is done).
        let first = plan.stages.first().map_or(0, |sp| sp.index);
        let stage = latest.as_ref().map_or(first, |(_, st)| st.stage);
        check_resume_config(&config.run.out_dir, config, stage)?;
    }
    AD::seed(device, config.run.seed);
    let (model, adam, state) = match latest {
        Some((dir, st)) => {
            let dir = &dir;
            let cfg = model_config(config, &plan.tokenizer, st.resolution)?;
            let file = TensorFile::open(dir)?;
            let m = load_into(cfg.init::<AD>(device), &file, Tower::All)?;
            let a = ckpt::load_adam::<AD::InnerBackend>(dir, st.adam_t.clone(), device)?;
            let line = format!(
                "resuming from {} (stage {}, step {})",
                dir.display(),
                st.stage + 1,
                st.stage_step
            );
            opts.observer.on(Event::Info(&line));
            (m, a, Some(st))
        }
        None => {
            let bv = crate::stage::big_vision_config(config)?;
            let m = match (&config.model.init_hf, &config.model.init_big_vision, bv) {
                (Some(p), ..) => {
                    let (hf, m) = pali_model::load_hf::<AD>(p, device)?;
                    set_resolution(m, hf.vision.image_size(), plan.stages[0].stage.resolution)
                }
                (None, Some(npz), Some(bv)) => {
                    let (hf, m) =
                        pali_model::load_hf::<AD>(&big_vision_scratch(config, npz, &bv)?, device)?;
                    let line = format!("model from the big_vision checkpoint {}", npz.display());
                    opts.observer.on(Event::Info(&line));
                    set_resolution(m, hf.vision.image_size(), plan.stages[0].stage.resolution)
                }
                _ => {
                    let c0 = &plan.stages[0].model;
                    let (m, notes) =
                        crate::init::unimodal(c0.init::<AD>(device), c0, &plan.init, device)?;
                    for n in &notes {
                        opts.observer.on(Event::Info(n));
                    }
                    m
                }
            };
            (m, AdamState::default(), None)
        }
    };
    crate::init::materialize(&model);
    Ok((model, adam, state))
}

/// Prepares the model and the optimizer state for a stage: at its first step, the `reset`
/// parts re-initialised and the optimizer state dropped unless `carry_optimizer`; always, the
/// frozen groups, the matmul dtype and the decoder's dropout.
fn enter_stage<AD: AutodiffBackend>(
    mut model: PaliGemma<AD>,
    mut adam: AdamState<AD::InnerBackend>,
    sp: &StagePlan,
    at_start: bool,
    dtype: pali_model::Compute,
    device: &AD::Device,
    obs: &dyn Observer,
) -> Result<(PaliGemma<AD>, AdamState<AD::InnerBackend>)> {
    let stage = sp.stage;
    if at_start && !stage.reset.is_empty() {
        // Seeded by the stage, so a run resumed at this boundary resets to the same weights.
        AD::seed(device, sp.seed().wrapping_add(1000 + sp.index as u64));
        let fresh = sp.model.init::<AD>(device);
        for part in &stage.reset {
            match part {
                Part::VisionTower => model.vision_tower = fresh.vision_tower.clone(),
                Part::MultiModalProjector => {
                    model.multi_modal_projector = fresh.multi_modal_projector.clone()
                }
                Part::LanguageModel => model.language_model = fresh.language_model.clone(),
            }
            adam.forget(&format!("{}.", part.name()));
        }
        let parts: Vec<&str> = stage.reset.iter().map(|p| p.name()).collect();
        let line = format!(
            "stage `{}`: re-initialised {}",
            stage.name,
            parts.join(", ")
        );
        obs.on(Event::Info(&line));
    }
    let mut model = optim::apply_freeze(model, &sp.groups)?.with_compute(dtype);
    for layer in model.language_model.layers.iter_mut() {
        layer.dropout = burn::nn::DropoutConfig::new(stage.llm_dropout).init();
    }
    let first = sp.config.stages.iter().position(|s| s.kind.is_vlm());
    if at_start && Some(sp.index) != first && !stage.carry_optimizer {
        adam = AdamState::default();
    }
    Ok((model, adam))
}

/// Where a run is, for its checkpoint.
struct Position {
    global_step: u64,
    /// Steps of the stage done.
    done: u64,
    resolution: usize,
}

/// Writes a checkpoint after `at.done` steps of stage `sp`: the model, the optimizer state and
/// what a resumed run needs to continue exactly (the data stream's state `mixture` after the
/// last batch, the length of metrics.jsonl, the summaries of the finished stages).
fn save_checkpoint<B: Backend>(
    model: &PaliGemma<B>,
    adam: &AdamState<B>,
    sp: &StagePlan,
    mixture: Option<MixtureState>,
    at: &Position,
    metrics: &Metrics,
    stages_done: &[StageSummary],
) -> Result<()> {
    let config = sp.config;
    let end = at.done == sp.stage.steps;
    let st = RunState {
        global_step: at.global_step,
        stage: if end { sp.index + 1 } else { sp.index },
        stage_step: if end { 0 } else { at.done },
        resolution: at.resolution,
        mixture: (!end).then(|| mixture.expect("loader sets the state")),
        adam_t: adam.t.clone(),
        metrics_bytes: Some(metrics.len()?),
        stages_done: stages_done.to_vec(),
        files: Default::default(),
    };
    let card = model_card(sp, at, stages_done);
    let extras = ckpt::HfExtras {
        config: &sp.model,
        tokenizer: &config.tokenizer.path,
        card: Some(&card),
    };
    let keep = config.run.keep_checkpoints;
    ckpt::save(&config.run.out_dir, model, adam, &st, keep, Some(extras))?;
    Ok(())
}

/// A checkpoint's `README.md`: where the model started, what each stage trained on and for how
/// long, and the stages' final metrics.
fn model_card(sp: &StagePlan, at: &Position, stages_done: &[StageSummary]) -> String {
    use std::fmt::Write as _;
    let config = sp.config;
    let m = &config.model;
    let base = if let Some(p) = &m.init_hf {
        format!("the HF checkpoint `{}`", p.display())
    } else if let Some(p) = &m.init_big_vision {
        format!("the big_vision checkpoint `{}`", p.display())
    } else {
        let stage0 = |kind| {
            config
                .stages
                .iter()
                .find(|s| s.kind == kind)
                .map(|s| format!("this run's stage 0 `{}`", s.name))
        };
        let from = |p: &Option<std::path::PathBuf>, kind| {
            p.as_ref()
                .map(|p| format!("`{}`", p.display()))
                .or_else(|| stage0(kind))
        };
        let towers: Vec<String> = [
            (
                "SigLIP",
                from(&m.init_siglip, crate::config::StageKind::Siglip),
            ),
            ("Gemma", from(&m.init_gemma, crate::config::StageKind::Lm)),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| format!("{n} from {p}")))
        .collect();
        let preset = m.preset.as_deref().unwrap_or("the config's shape");
        if towers.is_empty() {
            format!("random weights (`{preset}`)")
        } else {
            format!("`{preset}` with {}", towers.join(", "))
        }
    };
    let mut c = format!(
        "---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [paligemma, pali]\n---\n\n\
         # {name}, step {step}\n\nA PaliGemma-style model (`PaliGemmaForConditionalGeneration` \
         layout) trained with pali from {base}, tokenizer `{tok}`.\n\n",
        name = config.run.name,
        step = at.global_step,
        tok = config.tokenizer.path.display(),
    );
    c.push_str("| stage | steps | resolution | batch | data | loss (first → last) | eval |\n");
    c.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for (i, stage) in config.stages.iter().enumerate() {
        let data: Vec<String> = stage
            .sources
            .iter()
            .map(|s| match &s.kind {
                crate::config::SourceKind::Synth { task, size } => {
                    format!("synth {} ({size}) ×{}", task.name(), s.weight)
                }
                crate::config::SourceKind::Jsonl { path }
                | crate::config::SourceKind::Shards { path } => {
                    format!("`{}` ×{}", path.display(), s.weight)
                }
            })
            .collect();
        let done = stages_done.iter().find(|d| d.name == stage.name);
        let (steps, loss, eval) = match done {
            Some(d) => (
                format!("{}", d.steps),
                format!("{:.4} → {:.4}", d.first_loss, d.last_loss),
                d.eval_metrics
                    .as_ref()
                    .map_or("-".into(), |e| format!("`{e}`")),
            ),
            None if i == sp.index => (
                format!("{} of {} (in progress)", at.done, stage.steps),
                "-".into(),
                "-".into(),
            ),
            None if i < sp.index => ("skipped".into(), "-".into(), "-".into()),
            None => (format!("0 of {}", stage.steps), "-".into(), "-".into()),
        };
        let _ = writeln!(
            c,
            "| {} | {steps} | {} | {} | {} | {loss} | {eval} |",
            stage.name,
            stage.resolution,
            stage.batch_size,
            data.join(", ")
        );
    }
    c.push_str(
        "\nThe run's full configuration is `config.resolved.toml` in its output directory; \
         `metrics.jsonl` and the TensorBoard event files beside it hold every logged step.\n",
    );
    c
}

/// The lines that introduce a stage: its shape, then its data mixture.
fn stage_header(sp: &StagePlan, mixture: &[String]) -> Vec<String> {
    let s = sp.stage;
    let mut lines = vec![format!(
        "stage {} `{}`: {} px, text_len {}, {} steps × batch {}",
        sp.index + 1,
        s.name,
        s.resolution,
        s.text_len,
        s.steps,
        s.batch_size
    )];
    lines.extend(mixture.iter().map(|l| format!("  {l}")));
    for g in &sp.idle_groups {
        lines.push(format!("  warning: {g} matches no parameter of this model"));
    }
    lines
}

/// The error that stops a run at a step.
/// `step` counts as metrics.jsonl's `stage_step` and the checkpoints do: the stage's n-th update.
fn stopped(stage: &str, step: u64, e: Error) -> Error {
    Error::Train(format!(
        "stage `{stage}` step {step}: {e}; the last good checkpoint is kept"
    ))
}

/// Tokens and data problems since the last logged step.
struct LogWindow {
    tokens: usize,
    since: Instant,
    steps: usize,
    /// Seconds spent waiting for the loader's next batch (0 when it keeps ahead).
    data_wait_s: f64,
    /// Rows whose text was cut, rows that lost their EOS, examples skipped.
    truncated: usize,
    eos_cut: usize,
    skipped: usize,
}

impl LogWindow {
    fn new() -> Self {
        Self {
            tokens: 0,
            since: Instant::now(),
            steps: 0,
            data_wait_s: 0.0,
            truncated: 0,
            eos_cut: 0,
            skipped: 0,
        }
    }

    fn count(&mut self, b: &Batch) {
        self.truncated += b.truncated;
        self.eos_cut += b.eos_cut.len();
        self.skipped += b.skipped.len();
    }
}

/// What a logged step writes.
struct LogRecord<'a> {
    stage: &'a StagePlan<'a>,
    global_step: u64,
    /// Steps of the stage done.
    done: u64,
    sched: &'a [f64],
    batch: &'a Batch,
}

/// The device scalars a logging step reads, in one transfer.
struct Readout {
    loss: f64,
    grad_norm: f64,
    param_norm: f64,
    update_norm: f64,
    /// The first stage step whose update was skipped (+∞: none).
    first_skipped: f64,
}

impl Readout {
    fn of<B: Backend>(out: &StepResult<B>, guard: &Guard<B>) -> Self {
        let s = &out.stats;
        let all = Tensor::cat(
            vec![
                out.loss.clone(),
                s.grad_norm.clone(),
                s.param_norm.clone(),
                s.update_norm.clone(),
                guard.first_skipped.clone(),
            ],
            0,
        );
        let v: Vec<f64> = all.into_data().iter::<f64>().collect();
        Self {
            loss: v[0],
            grad_norm: v[1],
            param_norm: v[2],
            update_norm: v[3],
            first_skipped: v[4],
        }
    }
}

/// Stops a stage whose training has gone wrong without a non-finite value: its smoothed loss
/// far above its best, or a gradient of exactly zero (a dead model, or no token carrying loss).
struct Divergence {
    factor: f64,
    trains: bool,
    smoothed: Option<f64>,
    best: f64,
    seen: u32,
}

impl Divergence {
    /// Logged steps before the loss check starts (the smoothed loss needs a few).
    const WARMUP: u32 = 5;

    fn new(factor: f64, trains: bool) -> Self {
        Self {
            factor,
            trains,
            smoothed: None,
            best: f64::INFINITY,
            seen: 0,
        }
    }

    /// Takes one logged step's loss and gradient norm; the reason to stop, if any.
    fn observe(&mut self, loss: f64, grad_norm: f64) -> std::result::Result<(), String> {
        if self.trains && grad_norm == 0.0 {
            return Err(if loss == 0.0 {
                "no token of the batch carries loss (does text_len leave room for the suffix?), so \
                 nothing trains"
                    .into()
            } else {
                format!(
                    "the gradient is exactly zero with the loss at {loss:.4}: the model is dead \
                     (a learning rate far too high?)"
                )
            });
        }
        if self.factor <= 0.0 {
            return Ok(());
        }
        let s = self.smoothed.map_or(loss, |s| 0.8 * s + 0.2 * loss);
        self.smoothed = Some(s);
        self.seen += 1;
        if self.seen >= Self::WARMUP && s > self.factor * self.best {
            return Err(format!(
                "the loss diverged: smoothed {s:.4}, more than {}× its lowest {:.4} in this stage \
                 (run.divergence_factor; 0 turns the check off)",
                self.factor, self.best
            ));
        }
        self.best = self.best.min(s);
        Ok(())
    }
}

/// Remembers, on the device, the first step whose update was skipped because its loss or a
/// gradient was not finite; read on logging steps and before every checkpoint.
struct Guard<B: Backend> {
    first_skipped: Tensor<B, 1>,
}

impl<B: Backend> Guard<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            first_skipped: Tensor::full([1], f32::INFINITY, device),
        }
    }

    fn record(&mut self, step: u64, applied: &Tensor<B, 1, Bool>) {
        let device = self.first_skipped.device();
        let this = Tensor::full([1], step as f32, &device)
            .mask_where(applied.clone(), Tensor::full([1], f32::INFINITY, &device));
        self.first_skipped = self.first_skipped.clone().min_pair(this);
    }

    fn read(&self) -> f64 {
        self.first_skipped.clone().into_scalar().elem::<f64>()
    }

    /// Stops the run if an update was skipped.
    fn check(&self, stage: &str, first_skipped: f64) -> Result<()> {
        if first_skipped.is_finite() {
            let step = first_skipped as u64;
            let e = Error::Train(
                "the loss or a gradient became non-finite (NaN or infinite); that update and \
                 every later one were skipped"
                    .into(),
            );
            return Err(stopped(stage, step, e));
        }
        Ok(())
    }
}

/// Appends a logging step to metrics.jsonl.
fn log_step(
    r: &LogRecord,
    read: &Readout,
    window: &mut LogWindow,
    metrics: &Metrics,
) -> Result<StepLog> {
    let stage = r.stage.stage;
    let tps = window.tokens as f64 / window.since.elapsed().as_secs_f64();
    let lrs = r.stage.groups.lrs(stage.optim.lr, r.sched);
    let seen: Vec<u64> = r
        .batch
        .state_after
        .as_ref()
        .map(|s| s.sources.iter().map(|x| x.seen).collect())
        .unwrap_or_default();
    metrics.append(&json!({
        "step": r.global_step, "stage": stage.name, "stage_step": r.done, "loss": read.loss,
        "lr": lrs, "grad_norm": read.grad_norm, "param_norm": read.param_norm,
        "update_norm": read.update_norm, "tokens_per_s": tps, "seen": seen,
        "data_wait_s": window.data_wait_s / window.steps.max(1) as f64,
        "truncated": window.truncated, "eos_cut": window.eos_cut, "skipped": window.skipped,
    }))?;
    *window = LogWindow::new();
    Ok(StepLog {
        loss: read.loss,
        lr: stage.optim.lr * r.sched[0],
        tokens_per_s: tps,
        extra: None,
    })
}

/// Evaluates the model, reports it and appends it to metrics.jsonl.
fn log_eval<B: Backend>(
    model: &PaliGemma<B>,
    sp: &StagePlan,
    global_step: u64,
    end_of_stage: bool,
    metrics: &Metrics,
    device: &B::Device,
    obs: &dyn Observer,
) -> Result<Eval> {
    let ev = evaluate(model, sp, device)?;
    let ppl: serde_json::Map<String, serde_json::Value> = ev
        .perplexity
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    metrics.append(&json!({
        "step": global_step, "stage": sp.stage.name, "eval": ev.metrics,
        "eval_exact_match": ev.accuracy, "eval_majority_baseline": ev.majority_baseline,
        "eval_examples": sp.stage.eval.examples, "val_perplexity": ppl,
    }))?;
    obs.on(Event::Eval {
        stage: &sp.stage.name,
        step: global_step,
        eval: &ev,
        end_of_stage,
    });
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A loss that climbs far above its best stops the stage; a noisy healthy one, a
    /// check turned off, or a frozen stage's zero gradient do not.
    #[test]
    fn divergence_is_caught_and_noise_is_not() {
        let healthy = [5.0, 3.0, 2.0, 0.6, 1.4, 0.5, 1.2, 0.4, 1.3, 0.5, 1.5, 0.45];
        let mut d = Divergence::new(3.0, true);
        assert!(healthy.iter().all(|l| d.observe(*l, 1.0).is_ok()));
        let rising = [5.0, 3.0, 2.0, 1.0, 1.0, 1.0, 3.0, 6.0, 12.0, 24.0];
        let mut d = Divergence::new(3.0, true);
        let e = rising
            .iter()
            .find_map(|l| d.observe(*l, 1.0).err())
            .unwrap();
        assert!(e.contains("the loss diverged"), "{e}");
        let mut off = Divergence::new(0.0, true);
        assert!(rising.iter().all(|l| off.observe(*l, 1.0).is_ok()));
        let mut frozen = Divergence::new(3.0, false);
        assert!(frozen.observe(2.0, 0.0).is_ok());
        assert!(Divergence::new(3.0, true).observe(2.0, 0.0).is_err());
    }

    /// Records what it is told, one line per event.
    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl Observer for Record {
        fn on(&self, e: Event<'_>) {
            let line = match e {
                Event::Info(l) => format!("info {l}"),
                Event::Begin { name, steps, .. } => format!("begin {name} {steps}"),
                Event::Step { done, log } => format!("step {done} logged {}", log.is_some()),
                Event::End => "end".into(),
                Event::Eval { stage, .. } => format!("eval {stage}"),
                Event::StageDone(s) => format!("done {}", s.name),
            };
            self.0.lock().unwrap().push(line);
        }
    }

    /// The loop reports to the observer it is given (and prints nothing itself).
    /// A 3-step run of the tiny model on 10 synthetic VQA examples (batch 2), in `dir`.
    fn tiny_run(dir: &Path) -> std::path::PathBuf {
        let tok = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../data/tokenizer/tokenizer.json"
        );
        let p = dir.join("run.toml");
        std::fs::write(
            &p,
            format!(
                "[run]\nname = \"e\"\nout_dir = \"out\"\n[model]\npreset = \"tiny\"\n\
                 [tokenizer]\npath = \"{tok}\"\n[[stage]]\nname = \"s\"\nresolution = 16\n\
                 text_len = 12\nsteps = 3\nbatch_size = 2\nlog_every = 5\n\
                 optim = {{ lr = 1e-3 }}\neval = {{ examples = 2 }}\n\
                 source = [{{ kind = \"synth\", task = \"vqa\", size = 10 }}]\n"
            ),
        )
        .unwrap();
        p
    }

    #[test]
    fn two_local_ranks_train_twice_in_one_process() {
        // An ablation grid trains run after run in one process: the collective must forget the
        // ranks of a run so that the next run's can join, and an earlier failure must not stop
        // it. Two ranks on one CPU device, in two threads.
        let d = tempfile::tempdir().unwrap();
        let p = tiny_run(d.path());
        let devices = [Default::default(), Default::default()];
        let mut finals = Vec::new();
        for out in ["a", "b"] {
            let sets = [format!("run.out_dir=\"{out}\""), "stage.s.steps=2".into()];
            let config = RunConfig::load(&p, &sets).unwrap();
            let s = train::<burn::backend::Flex>(&config, &devices, &TrainOptions::default());
            let s = s.unwrap_or_else(|e| panic!("run {out}: {e}"));
            finals.push(s[0].last_loss);
        }
        assert_eq!(finals[0], finals[1], "the same run twice");
        crate::dist::Peer::<burn::backend::Flex>::abort();
        let sets = ["run.out_dir=\"c\"".to_string(), "stage.s.steps=2".into()];
        let config = RunConfig::load(&p, &sets).unwrap();
        let s = train::<burn::backend::Flex>(&config, &devices, &TrainOptions::default());
        assert_eq!(s.unwrap()[0].last_loss, finals[0], "after a failed run");
    }

    #[test]
    fn training_reports_its_progress_as_events() {
        let d = tempfile::tempdir().unwrap();
        let p = tiny_run(d.path());
        let config = RunConfig::load(&p, &[]).unwrap();
        let rec = Record::default();
        let opts = TrainOptions {
            observer: &rec,
            ..Default::default()
        };
        let s = train::<burn::backend::Flex>(&config, &[Default::default()], &opts).unwrap();
        assert_eq!(s.len(), 1);
        let got = rec.0.into_inner().unwrap();
        assert_eq!(
            got,
            [
                "begin s 3",
                "step 1 logged true",
                "step 2 logged false",
                "step 3 logged true",
                "end",
                "eval s",
                "done s"
            ],
        );
    }
}
