//! `pali data synth|pack|validate|inspect|import|dedup`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pali_data::batch::next_batch;
use pali_data::dataset::{write_synth, Dataset, JsonlDataset, OnError};
use pali_data::shards::{pack_jsonl, PackOptions, ShardDataset};
use pali_data::{PaliTokenizer, SequenceBuilder};
use pali_trainer::config::RunConfig;
use pali_trainer::stage::RunPlan;

use crate::st::Writer;

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Write the synthetic shapes world as JSONL + PNG (one JSONL per task).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value_t = 224)]
        resolution: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// 0 = train, 1 = val, 2 = test.
        #[arg(long, default_value_t = 0)]
        split: u64,
        /// Write one shard directory per task (`OUT/caption/` …, PNG images inside) instead
        /// of JSONL + PNG files.
        #[arg(long)]
        shards: bool,
    },
    /// Pack JSONL files (big_vision layout) into a shard directory for `kind = "shards"`
    /// sources: image files stored as they are (or re-encoded at `--max-side`), an index with
    /// row counts and checksums.
    Pack {
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// A new directory.
        #[arg(long)]
        out: PathBuf,
        /// Start a new shard after this much data (bytes; K/M/G suffixes, e.g. 1G, 512M).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        shard_size: u64,
        /// Re-encode images whose longest side is over this as JPEG at this side.
        #[arg(long)]
        max_side: Option<usize>,
        #[arg(long, default_value_t = 95)]
        jpeg_quality: u8,
        /// Task recorded in every row (default: each JSONL file's stem).
        #[arg(long)]
        task: Option<String>,
        /// Leave out bad lines (counted in the index) instead of stopping at the first.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Check a JSONL dataset or a shard directory (every row, image and shard checksum) and
    /// summarise it.
    Validate {
        dataset: PathBuf,
        #[arg(long, default_value = "data/tokenizer/tokenizer.json")]
        tokenizer: PathBuf,
        /// Text length to check against (tokens of prefix + "\n" + suffix + EOS).
        #[arg(long, default_value_t = 128)]
        text_len: usize,
    },
    /// Convert a public dataset's annotations to pali JSONL (+ a references file for
    /// `pali eval --references`).
    Import {
        #[command(subcommand)]
        format: ImportFormat,
    },
    /// Remove training lines whose image is a near-duplicate (perceptual hash) of an image of
    /// the evaluation sets; writes the kept lines and a report of what was removed.
    Dedup {
        /// Training JSONL.
        train: PathBuf,
        /// Evaluation JSONL(s) to protect.
        #[arg(long, required = true)]
        against: Vec<PathBuf>,
        /// Largest Hamming distance (of 64 bits) counted as a near-duplicate.
        #[arg(long, default_value_t = 4)]
        threshold: u32,
        /// Output JSONL (image paths become absolute when it is in another directory).
        #[arg(long)]
        out: PathBuf,
        /// Report of the removed lines (JSONL; default: OUT with `.removed.jsonl`).
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Print the first batches of a run config's stage token by token, and write the tensors.
    Inspect {
        #[arg(long)]
        config: PathBuf,
        /// Stage name (default: the first).
        #[arg(long)]
        stage: Option<String>,
        #[arg(long, default_value_t = 1)]
        batches: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where an import goes.
#[derive(clap::Args, Debug)]
pub struct ImportOut {
    /// Output JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the references file (docs/eval.md) here.
    #[arg(long)]
    pub references: Option<PathBuf>,
    /// Image directory as the JSONL should see it (relative to the JSONL file).
    #[arg(long, default_value = "")]
    pub image_dir: String,
    /// Also pack the JSONL and its images into a shard directory here (`pali data pack`,
    /// 1 GB shards), for a `kind = "shards"` source.
    #[arg(long)]
    pub pack: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ImportFormat {
    /// COCO captions (`captions_*.json`): `caption en` → a caption.
    CocoCaptions {
        annotations: PathBuf,
        /// One line per image (first caption; all of them as references), for evaluation.
        #[arg(long)]
        per_image: bool,
        #[command(flatten)]
        out: ImportOut,
    },
    /// VQAv2 questions (+ annotations): `answer en QUESTION` → the most common answer.
    Vqav2 {
        questions: PathBuf,
        #[arg(long)]
        annotations: Option<PathBuf>,
        /// Image file name from its id: `{id}` or `{id:012}`.
        #[arg(long, default_value = "COCO_val2014_{id:012}.jpg")]
        image_pattern: String,
        #[command(flatten)]
        out: ImportOut,
    },
    /// COCO detection (`instances_*.json`): `detect a ; b` → `<loc×4> a ; …`.
    CocoDetection {
        instances: PathBuf,
        #[command(flatten)]
        out: ImportOut,
    },
    /// RefCOCO/+/g (`refs.json` = the refs pickle as JSON, + COCO `instances.json`):
    /// `detect SENTENCE` → `<loc×4>`, or with `--vqvae` `segment SENTENCE` → `<loc×4><seg×16>`.
    Refcoco {
        refs: PathBuf,
        #[arg(long)]
        instances: PathBuf,
        /// Keep one split (`train`, `val`, `testA`, …).
        #[arg(long)]
        split: Option<String>,
        /// VQ-VAE checkpoint: encode the masks as `<seg>` tokens.
        #[arg(long)]
        vqvae: Option<PathBuf>,
        #[command(flatten)]
        out: ImportOut,
    },
}

fn import(format: ImportFormat) -> Result<()> {
    use pali_data::import;
    let (got, out) = match format {
        ImportFormat::CocoCaptions {
            annotations,
            per_image,
            out,
        } => (
            import::coco_captions(&annotations, &out.image_dir, per_image)?,
            out,
        ),
        ImportFormat::Vqav2 {
            questions,
            annotations,
            image_pattern,
            out,
        } => (
            import::vqav2(
                &questions,
                annotations.as_deref(),
                &out.image_dir,
                &image_pattern,
            )?,
            out,
        ),
        ImportFormat::CocoDetection { instances, out } => {
            (import::coco_detection(&instances, &out.image_dir)?, out)
        }
        ImportFormat::Refcoco {
            refs,
            instances,
            split,
            vqvae,
            out,
        } => {
            let encoder = match &vqvae {
                Some(p) => Some(
                    pali_trainer::vqvae::VqVaeEncoder::<crate::backend::Cpu>::load(
                        p,
                        &Default::default(),
                    )?,
                ),
                None => None,
            };
            let enc = encoder
                .as_ref()
                .map(|e| e as &dyn pali_data::masks::MaskEncoder);
            (
                import::refcoco(&refs, &instances, &out.image_dir, split.as_deref(), enc)?,
                out,
            )
        }
    };
    import::write_jsonl(&out.out, &got.data)?;
    eprintln!("{} lines → {}", got.data.len(), out.out.display());
    if let Some(dir) = &out.pack {
        let index = pack_jsonl(
            std::slice::from_ref(&out.out),
            dir,
            &PackOptions::default(),
            &|_| {},
        )?;
        eprintln!(
            "{} rows → {} ({} shards)",
            index.rows,
            dir.display(),
            index.shards.len()
        );
    }
    if let Some(r) = &out.references {
        import::write_jsonl(r, &got.references)?;
        eprintln!("{} references → {}", got.references.len(), r.display());
    }
    if !got.skipped.is_empty() {
        eprintln!("left out: {}", got.skipped.len());
        for s in got.skipped.iter().take(10) {
            eprintln!("  {s}");
        }
    }
    Ok(())
}

fn dedup(
    train: &std::path::Path,
    against: &[PathBuf],
    threshold: u32,
    out: &std::path::Path,
    report: Option<PathBuf>,
) -> Result<()> {
    use pali_data::dedup::{absolute_images, filter_jsonl};
    let t0 = std::time::Instant::now();
    let (kept, removed) = filter_jsonl(train, against, threshold)?;
    // Image paths are relative to the JSONL file: absolute when the output lives elsewhere.
    let dir_of = |p: &std::path::Path| -> Result<PathBuf> {
        let a = std::path::absolute(p)?;
        Ok(a.parent()
            .unwrap_or(std::path::Path::new("/"))
            .to_path_buf())
    };
    let train_dir = dir_of(train)?;
    let moved = train_dir != dir_of(out)?;
    let lines = kept
        .iter()
        .map(|(line, l)| -> Result<String> {
            if !moved {
                return Ok(l.clone());
            }
            absolute_images(l, &train_dir).with_context(|| format!("{}:{line}", train.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    pali_data::import::write_jsonl(out, &lines)?;
    let report = report.unwrap_or_else(|| out.with_extension("removed.jsonl"));
    let rows = removed
        .iter()
        .map(|r| serde_json::to_value(r).expect("json"));
    pali_data::import::write_jsonl(&report, rows)?;
    eprintln!(
        "{} kept, {} removed (within {threshold} bits of an evaluation image) in {:.1} s → {}; report {}",
        kept.len(),
        removed.len(),
        t0.elapsed().as_secs_f64(),
        out.display(),
        report.display()
    );
    Ok(())
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Import { format } => import(format),
        DataCommand::Dedup {
            train,
            against,
            threshold,
            out,
            report,
        } => dedup(&train, &against, threshold, &out, report),
        DataCommand::Synth {
            out,
            n,
            resolution,
            seed,
            split,
            shards,
        } => {
            if shards {
                for task in pali_data::dataset::SynthTask::ALL {
                    let dir = out.join(task.name());
                    let index = pali_data::shards::pack_synth(
                        task,
                        &dir,
                        n,
                        resolution,
                        seed,
                        split,
                        &PackOptions::default(),
                    )?;
                    println!("wrote {}: {} rows", dir.display(), index.rows);
                }
                return Ok(());
            }
            for f in write_synth(&out, n, resolution, seed, split)? {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        DataCommand::Pack {
            sources,
            out,
            shard_size,
            max_side,
            jpeg_quality,
            task,
            skip_bad,
        } => {
            let opts = PackOptions {
                shard_bytes: shard_size,
                max_side,
                jpeg_quality,
                task,
                on_error: if skip_bad {
                    OnError::Skip
                } else {
                    OnError::Fail
                },
            };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} packing: {pos} rows ({per_sec})",
                )
                .expect("template"),
            );
            let index = pack_jsonl(&sources, &out, &opts, &|n| bar.set_position(n))?;
            bar.finish_and_clear();
            let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
            println!(
                "wrote {}: {} rows, {} images, {} shards, {:.1} MB",
                out.display(),
                index.rows,
                index.images,
                index.shards.len(),
                bytes as f64 / 1e6
            );
            for s in &index.sources {
                if s.skipped_count > 0 {
                    println!("{}: {} bad lines left out:", s.path, s.skipped_count);
                    for p in &s.skipped {
                        println!("  {p}");
                    }
                }
            }
            Ok(())
        }
        DataCommand::Validate {
            dataset,
            tokenizer,
            text_len,
        } if pali_data::shards::is_shard_dir(&dataset) => {
            validate_shards(&dataset, &tokenizer, text_len)
        }
        DataCommand::Validate {
            dataset,
            tokenizer,
            text_len,
        } => validate(&dataset, &tokenizer, text_len),
        DataCommand::Inspect {
            config,
            stage,
            batches,
            out,
        } => inspect(&config, stage.as_deref(), batches, out),
    }
}

/// The text-length summary of `pali data validate`: the longest, how many overflow the stage's
/// text length, and a histogram in buckets of 16 tokens.
fn print_lengths(hist: &BTreeMap<usize, u64>, max_len: usize, too_long: u64, text_len: usize) {
    println!(
        "text length (tokens incl. BOS, \\n, EOS): max {max_len}; {too_long} longer than \
         text_len+1 = {}",
        text_len + 1
    );
    let rows: u64 = hist.values().sum();
    for (bucket, n) in hist {
        println!(
            "  ≤{bucket:>4}: {n:>7} {}",
            "#".repeat((60 * n).div_ceil(rows.max(1)) as usize)
        );
    }
}

/// `1G`, `512M`, `64K` or bytes.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().trim_end_matches(['B', 'b']);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 => Ok((v * mult as f64) as u64),
        _ => Err(format!("`{s}`: expected a size such as 1G, 512M or 65536")),
    }
}

/// What validation found in a set of rows (merged across threads).
#[derive(Default)]
struct Summary {
    rows: u64,
    images: u64,
    max_len: usize,
    too_long: u64,
    hist: BTreeMap<usize, u64>,
    tasks: BTreeMap<String, u64>,
    problems: Vec<String>,
    bad: u64,
}

impl Summary {
    fn merge(mut self, o: Summary) -> Summary {
        self.rows += o.rows;
        self.images += o.images;
        self.max_len = self.max_len.max(o.max_len);
        self.too_long += o.too_long;
        for (k, v) in o.hist {
            *self.hist.entry(k).or_default() += v;
        }
        for (k, v) in o.tasks {
            *self.tasks.entry(k).or_default() += v;
        }
        self.bad += o.bad;
        self.problems.extend(o.problems);
        self.problems.truncate(100);
        self
    }
}

fn validate_shards(
    dir: &std::path::Path,
    tokenizer: &std::path::Path,
    text_len: usize,
) -> Result<()> {
    use rayon::prelude::*;
    let tok = PaliTokenizer::from_file(tokenizer)?;
    let ds = ShardDataset::open(dir)?;
    let seq = SequenceBuilder::new(usize::MAX - 1);
    let corrupt: Vec<String> = (0..ds.index.shards.len())
        .into_par_iter()
        .filter_map(|k| ds.check_crc(k).err().map(|e| e.to_string()))
        .collect();
    let bar = indicatif::ProgressBar::new(ds.len() as u64);
    let s = (0..ds.len())
        .into_par_iter()
        .fold(Summary::default, |mut s, i| {
            bar.inc(1);
            let checked = pali_data::shards::check_row(&ds, i).and_then(|r| {
                match seq.train_unpadded(&tok, &r.prefix, &r.suffix) {
                    Ok(t) => Ok((t.ids.len(), r)),
                    Err(e) => {
                        let (shard, row) = ds.locate(i).expect("read above");
                        Err(format!("{}: {e}", ds.at(shard, row)))
                    }
                }
            });
            match checked {
                Ok((len, r)) => {
                    s.rows += 1;
                    s.images += r.images.len() as u64;
                    s.max_len = s.max_len.max(len);
                    s.too_long += u64::from(len > text_len + 1);
                    *s.hist.entry(len.div_ceil(16) * 16).or_default() += 1;
                    *s.tasks.entry(r.task).or_default() += 1;
                }
                Err(e) => {
                    s.bad += 1;
                    if s.problems.len() < 100 {
                        s.problems.push(e);
                    }
                }
            }
            s
        })
        .reduce(Summary::default, Summary::merge);
    bar.finish_and_clear();
    println!(
        "{}: {} rows in {} shards, {} images, {} bad rows, {} corrupt shards",
        dir.display(),
        s.rows,
        ds.index.shards.len(),
        s.images,
        s.bad,
        corrupt.len()
    );
    for (task, n) in &s.tasks {
        println!("  task {task}: {n}");
    }
    print_lengths(&s.hist, s.max_len, s.too_long, text_len);
    for p in corrupt.iter().chain(&s.problems) {
        println!("problem: {p}");
    }
    if s.bad > s.problems.len() as u64 {
        println!("… and {} more bad rows", s.bad - s.problems.len() as u64);
    }
    if s.bad > 0 || !corrupt.is_empty() {
        bail!("{} bad rows, {} corrupt shards", s.bad, corrupt.len());
    }
    Ok(())
}

fn validate(path: &std::path::Path, tokenizer: &std::path::Path, text_len: usize) -> Result<()> {
    let tok = PaliTokenizer::from_file(tokenizer)?;
    let ds = JsonlDataset::open(path, OnError::Skip, true)?;
    let seq = SequenceBuilder::new(usize::MAX - 1);
    let mut hist: BTreeMap<usize, u64> = BTreeMap::new();
    let (mut too_long, mut images, mut max_len) = (0u64, 0, 0);
    for i in 0..ds.len() {
        let ex = ds.get(i)?;
        images += ex.images.len();
        let len = seq.train_unpadded(&tok, &ex.prefix, &ex.suffix)?.ids.len();
        max_len = max_len.max(len);
        too_long += u64::from(len > text_len + 1);
        *hist.entry(len.div_ceil(16) * 16).or_default() += 1;
    }
    println!(
        "{}: {} examples, {} images, {} bad lines",
        path.display(),
        ds.len(),
        images,
        ds.skipped.len()
    );
    print_lengths(&hist, max_len, too_long, text_len);
    for p in &ds.skipped {
        println!("problem: {p}");
    }
    if !ds.skipped.is_empty() {
        bail!("{} bad lines", ds.skipped.len());
    }
    Ok(())
}

fn inspect(
    config: &std::path::Path,
    stage: Option<&str>,
    batches: usize,
    out: Option<PathBuf>,
) -> Result<()> {
    let cfg =
        RunConfig::load(config, &[]).with_context(|| format!("loading {}", config.display()))?;
    let si = match stage {
        Some(name) => cfg
            .stages
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no stage `{name}`"))?,
        None => 0,
    };
    // The stream the trainer draws for this stage.
    let plan = RunPlan::new::<crate::backend::Cpu>(&cfg, &Default::default())?;
    let st = &cfg.stages[si];
    let tok = plan.tokenizer.clone();
    // A stage-0 stage draws its stream as the PaliGemma stages do.
    let (mut mix, builder) = match plan.stages.iter().find(|sp| sp.index == si) {
        Some(sp) => (sp.mixture()?, sp.batch_builder()),
        None => {
            let tp = plan.towers.iter().find(|t| t.index == si).expect("a stage");
            (tp.mixture()?, tp.batch_builder())
        }
    };
    let mut w = Writer::default();
    for bi in 0..batches {
        let b = next_batch(&mut mix, &builder, st.batch_size, st.on_error)?;
        for row in 0..b.batch_size {
            println!(
                "batch {bi} row {row}: {} ({})",
                b.ids[row],
                mix.sources[b.sources[row]].name()
            );
            println!(
                "  {:>4} {:>8} {:>3} {:>3} {:>3}  token",
                "pos", "id", "ar", "ls", "in"
            );
            for t in 0..b.seq_len {
                let k = row * b.seq_len + t;
                if b.mask_input[k] == 0 && t > 0 && b.mask_input[k - 1] == 0 {
                    continue; // one padding line is enough
                }
                println!(
                    "  {t:>4} {:>8} {:>3} {:>3} {:>3}  {:?}",
                    b.text[k],
                    b.mask_ar[k],
                    b.mask_loss[k],
                    b.mask_input[k],
                    tok.token(b.text[k] as u32)
                );
            }
        }
        if bi == 0 {
            let r = b.resolution;
            if b.frames > 0 {
                w.f32("pixel_values", vec![b.batch_size, 3, r, r], &b.pixel_values);
            }
            for (name, v) in [
                ("text_ids", &b.text),
                ("mask_ar", &b.mask_ar),
                ("mask_loss", &b.mask_loss),
                ("mask_input", &b.mask_input),
            ] {
                w.i64(name, vec![b.batch_size, b.seq_len], v);
            }
        }
    }
    if let Some(out) = out {
        w.write(&out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
