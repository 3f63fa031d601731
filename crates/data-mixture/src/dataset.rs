//! Datasets: a list of examples `{images, prefix, suffix}`. Sources are the built-in synthetic
//! shapes world (one task per source) and big_vision / Roboflow JSONL files.
//!
//! JSONL: one object per line, `{"image": "rel/path.jpg" | ["a.jpg", "b.jpg"], "prefix": "...",
//! "suffix": "..."}` and an optional `"id"`, image paths relative to the JSONL file. Every problem is reported as
//! `file:line: field: what`; with `OnError::Skip` bad lines are counted and skipped instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::image::{self as img, ResizeMethod};
use crate::masks::{BinaryMask, MaskEncoder};
use crate::rng::Rng;
use crate::synth::{Kind, Scene};
use crate::tasks;

/// Where an image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    /// A synthetic scene, rendered natively at the requested resolution.
    Synth(Box<Scene>),
    /// A constant mid-grey image: what a model sees in the blind control of an evaluation.
    Grey,
    /// An encoded file's bytes, as a shard stores them.
    Encoded(Arc<EncodedImage>),
}

/// An image file's bytes (JPEG, PNG, …) and where they were read, for errors.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedImage {
    pub bytes: Vec<u8>,
    /// `DIR/shard-00003.db:row 17: image 1`.
    pub at: String,
}

impl EncodedImage {
    pub fn decode8(&self) -> Result<img::Rgb8> {
        img::decode8(&self.bytes, Path::new(&self.at))
    }
}

impl ImageSource {
    /// CHW pixels in [−1, 1] at `res × res`.
    pub fn pixels(&self, res: usize, method: ResizeMethod) -> Result<Vec<f32>> {
        match self {
            ImageSource::File(p) => Ok(img::preprocess8(&img::load8(p)?, res, method)),
            ImageSource::Encoded(e) => Ok(img::preprocess8(&e.decode8()?, res, method)),
            ImageSource::Synth(s) => Ok(img::to_pixel_values(&s.render(res))),
            ImageSource::Grey => Ok(img::to_pixel_values(&grey(res))),
        }
    }

    /// The image as decoded; a synthetic scene is rendered at `res × res`.
    pub fn rgb(&self, res: usize) -> Result<img::Rgb> {
        match self {
            ImageSource::File(p) => img::load(p),
            ImageSource::Encoded(e) => img::decode(&e.bytes, Path::new(&e.at)),
            ImageSource::Synth(s) => Ok(s.render(res)),
            ImageSource::Grey => Ok(grey(res)),
        }
    }
}

fn grey(res: usize) -> img::Rgb {
    img::Rgb::from_u8(res, res, &vec![128; res * res * 3])
}

#[derive(Debug, Clone)]
pub struct Example {
    /// `file:line` or `synth:task:split:index`.
    pub id: String,
    pub images: Vec<ImageSource>,
    pub prefix: String,
    pub suffix: String,
}

pub trait Dataset: Send + Sync {
    fn name(&self) -> &str;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, index: usize) -> Result<Example>;
}

/// What to do with a bad example.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

/// Tasks of the synthetic world.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SynthTask {
    Caption,
    Vqa,
    Count,
    Detect,
    Ocr,
    GroundedCaption,
    /// Referring segmentation; needs a VQ-VAE mask encoder.
    Segment,
}

impl SynthTask {
    pub const ALL: [SynthTask; 6] = [
        SynthTask::Caption,
        SynthTask::Vqa,
        SynthTask::Count,
        SynthTask::Detect,
        SynthTask::Ocr,
        SynthTask::GroundedCaption,
    ];
    pub fn name(self) -> &'static str {
        match self {
            SynthTask::Caption => "caption",
            SynthTask::Vqa => "vqa",
            SynthTask::Count => "count",
            SynthTask::Detect => "detect",
            SynthTask::Ocr => "ocr",
            SynthTask::GroundedCaption => "grounded_caption",
            SynthTask::Segment => "segment",
        }
    }
}

/// The synthetic shapes world as a dataset of one task.
#[derive(Debug, Clone)]
pub struct SynthDataset {
    pub task: SynthTask,
    pub seed: u64,
    /// 0 = train, 1 = val, 2 = test: disjoint scene streams.
    pub split: u64,
    pub size: usize,
    pub task_prefix: bool,
    /// The VQ-VAE encoder the `segment` task writes its `<seg>` codes with.
    pub mask_encoder: Option<Arc<dyn MaskEncoder>>,
    /// `detect`: pad the targets with noise boxes up to this many entries (PaliGemma 2); 0 = off.
    pub noise_boxes: usize,
    name: String,
}

impl SynthDataset {
    pub fn new(task: SynthTask, seed: u64, split: u64, size: usize, task_prefix: bool) -> Self {
        let name = format!("synth:{}", task.name());
        Self {
            task,
            seed,
            split,
            size,
            task_prefix,
            mask_encoder: None,
            noise_boxes: 0,
            name,
        }
    }

    /// PaliGemma 2 detection targets: noise boxes up to `total` entries.
    pub fn with_noise_boxes(mut self, total: usize) -> Self {
        self.noise_boxes = total;
        self
    }

    /// With the mask encoder the `segment` task needs.
    pub fn with_mask_encoder(mut self, encoder: Arc<dyn MaskEncoder>) -> Self {
        self.mask_encoder = Some(encoder);
        self
    }

    /// `segment {kind}` of one shape: its visible pixels at 224 px, cropped to their box,
    /// encoded to 16 codes.
    fn segment(&self, scene: &Scene, rng: &mut Rng) -> Result<(String, String)> {
        let enc = self.mask_encoder.as_ref().ok_or_else(|| {
            Error::Invalid(
                "the `segment` task needs a VQ-VAE mask encoder: set `vqvae = \"PATH\"` on the \
                 source (train one with `pali vqvae train --synthetic`)"
                    .into(),
            )
        })?;
        let i = rng.below(scene.shapes.len());
        let m = BinaryMask {
            width: 224,
            height: 224,
            data: scene.mask(i, 224),
        };
        let bbox = m.bbox().unwrap_or(scene.shapes[i].bbox);
        let codes = enc.encode(&m.crop64(bbox)?)?;
        Ok(tasks::segment(
            scene.shapes[i].kind.name(),
            bbox,
            &codes,
            self.task_prefix,
        ))
    }

    /// (prefix, suffix) of `scene` for this task; `rng` picks among questions.
    pub fn texts(&self, scene: &Scene, rng: &mut Rng) -> (String, String) {
        let tp = self.task_prefix;
        let shapes = &scene.shapes;
        match self.task {
            SynthTask::Caption => {
                let parts: Vec<String> =
                    shapes.iter().map(|s| format!("a {}", s.label())).collect();
                tasks::caption("en", &parts.join(" and "), tp)
            }
            SynthTask::Vqa => {
                let s = rng.pick(shapes);
                let unique = scene.count(Some(s.kind)) == 1;
                match rng.below(3) {
                    0 if unique => tasks::vqa(
                        "en",
                        &format!("what color is the {}?", s.kind.name()),
                        s.color_name(),
                        tp,
                    ),
                    1 => {
                        let [y0, x0, y1, x1] = s.bbox;
                        let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
                        let pos = if (cx - 0.5).abs() > (cy - 0.5).abs() {
                            if cx < 0.5 {
                                "left"
                            } else {
                                "right"
                            }
                        } else if cy < 0.5 {
                            "top"
                        } else {
                            "bottom"
                        };
                        tasks::vqa("en", &format!("where is the {}?", s.label()), pos, tp)
                    }
                    _ => {
                        let k = *rng.pick(&Kind::ALL);
                        let c = rng.below(crate::synth::COLORS.len());
                        let yes = shapes.iter().any(|s| s.kind == k && s.color == c);
                        let q = format!("is there a {} {}?", crate::synth::COLORS[c].0, k.name());
                        tasks::vqa("en", &q, if yes { "yes" } else { "no" }, tp)
                    }
                }
            }
            SynthTask::Count => {
                let k = *rng.pick(&Kind::ALL);
                let q = format!("how many {}s are there?", k.name());
                tasks::vqa("en", &q, &scene.count(Some(k)).to_string(), tp)
            }
            SynthTask::Detect => {
                let mut classes: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                rng.shuffle(&mut classes);
                classes.truncate(1 + rng.below(2));
                let objs: Vec<(&str, [f32; 4])> =
                    shapes.iter().map(|s| (s.kind.name(), s.bbox)).collect();
                if self.noise_boxes > 0 {
                    tasks::detect_with_noise(&classes, &objs, self.noise_boxes, tp, rng)
                } else {
                    tasks::detect(&classes, &objs, tp)
                }
            }
            SynthTask::Ocr => tasks::ocr(&scene.text.text, tp),
            SynthTask::GroundedCaption => {
                let s = rng.pick(shapes);
                tasks::grounded_caption(s.bbox, &s.label(), tp)
            }
            SynthTask::Segment => unreachable!("handled in get()"),
        }
    }
}

impl Dataset for SynthDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.size
    }
    fn get(&self, index: usize) -> Result<Example> {
        let scene = Scene::generate(self.seed, self.split, index as u64);
        let mut rng = Rng::derive(
            self.seed,
            &[self.split, index as u64, self.task as u64 + 100],
        );
        let (prefix, suffix) = if self.task == SynthTask::Segment {
            self.segment(&scene, &mut rng)?
        } else {
            self.texts(&scene, &mut rng)
        };
        Ok(Example {
            id: format!("synth:{}:{}:{index}", self.task.name(), self.split),
            images: vec![ImageSource::Synth(Box::new(scene))],
            prefix,
            suffix,
        })
    }
}

/// A big_vision / Roboflow JSONL dataset.
#[derive(Debug, Clone)]
pub struct JsonlDataset {
    pub path: PathBuf,
    examples: Vec<Example>,
    /// `file:line: problem` of every skipped line (with `OnError::Skip`).
    pub skipped: Vec<String>,
    name: String,
}

fn line_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Line {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

pub(crate) fn parse_line(
    path: &Path,
    dir: &Path,
    line_no: usize,
    line: &str,
    check_images: bool,
) -> Result<Example> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| line_err(path, line_no, format!("malformed JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| line_err(path, line_no, "expected a JSON object"))?;
    let text = |field: &str| -> Result<String> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(line_err(
                path,
                line_no,
                format!("field `{field}`: expected a string, found {other}"),
            )),
            None => Err(line_err(path, line_no, format!("missing field `{field}`"))),
        }
    };
    // A text-only row (stage-0 language-model data): `{"text": ...}`, no image.
    let text_only = obj.contains_key("text") && !obj.contains_key("image");
    let image_names: Vec<String> = match obj.get("image") {
        None if text_only => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                line_err(
                    path,
                    line_no,
                    "field `image`: expected a string or a list of strings",
                )
            })?,
        Some(other) => {
            return Err(line_err(
                path,
                line_no,
                format!(
                "field `image`: expected a string or a non-empty list of strings, found {other}"
            ),
            ))
        }
        None => return Err(line_err(path, line_no, "missing field `image`")),
    };
    let mut images = Vec::new();
    for name in image_names {
        let p = dir.join(&name);
        if check_images {
            if !p.is_file() {
                return Err(line_err(
                    path,
                    line_no,
                    format!("field `image`: file not found: {}", p.display()),
                ));
            }
            img::load(&p).map_err(|e| line_err(path, line_no, format!("field `image`: {e}")))?;
        }
        images.push(ImageSource::File(p));
    }
    // An `id` field names the example (to pair predictions with references); else file:line.
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        None | Some(Value::Null) => format!("{}:{line_no}", path.display()),
        Some(other) => {
            return Err(line_err(
                path,
                line_no,
                format!("field `id`: expected a string or a number, found {other}"),
            ))
        }
    };
    let (prefix, suffix) = if text_only {
        if let Some(k) = ["prefix", "suffix"]
            .into_iter()
            .find(|k| obj.contains_key(*k))
        {
            return Err(line_err(
                path,
                line_no,
                format!("field `{k}`: a text-only row (`text`, no `image`) has no {k}"),
            ));
        }
        (String::new(), text("text")?)
    } else {
        (text("prefix")?, text("suffix")?)
    };
    let suffix_field = if text_only { "text" } else { "suffix" };
    for (field, t) in [("prefix", &prefix), (suffix_field, &suffix)] {
        if let Some(tok) = reserved_in(t) {
            return Err(line_err(
                path,
                line_no,
                format!(
                    "field `{field}`: contains `{tok}`, which the sequence layout places itself \
                     (image slots, BOS, EOS, padding); remove it from the text"
                ),
            ));
        }
    }
    Ok(Example {
        id,
        images,
        prefix,
        suffix,
    })
}

/// Special tokens a prefix or suffix may not spell out: the tokenizer would encode them as the
/// special ids, shifting the image slots or ending the sequence early.
const RESERVED: [&str; 4] = ["<image>", "<bos>", "<eos>", "<pad>"];

/// The first special token `text` spells out, if any.
pub fn reserved_in(text: &str) -> Option<&'static str> {
    RESERVED.into_iter().find(|tok| text.contains(tok))
}

/// The lines of a JSONL file, each checked for UTF-8 on its own (an invalid byte names its
/// line), a leading byte-order mark dropped.
fn utf8_lines(path: &Path, bytes: &[u8]) -> Vec<Result<String>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| utf8_line(path, i + 1, l))
        .collect()
}

/// Line `line_no` of a JSONL file as text, without its line ending.
pub(crate) fn utf8_line(path: &Path, line_no: usize, l: &[u8]) -> Result<String> {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    String::from_utf8(l.to_vec()).map_err(|e| {
        line_err(
            path,
            line_no,
            format!(
                "not UTF-8 (byte {} of the line)",
                e.utf8_error().valid_up_to() + 1
            ),
        )
    })
}

impl JsonlDataset {
    /// Reads and checks every line. With `check_images` every image is also opened and decoded
    /// (what `pali data validate` does; training checks images when it loads them).
    pub fn open(path: &Path, on_error: OnError, check_images: bool) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut examples = Vec::new();
        let mut skipped = Vec::new();
        for (i, line) in utf8_lines(path, &bytes).into_iter().enumerate() {
            if line.as_ref().is_ok_and(|l| l.trim().is_empty()) {
                continue;
            }
            match line.and_then(|l| parse_line(path, dir, i + 1, &l, check_images)) {
                Ok(e) => examples.push(e),
                Err(e) if on_error == OnError::Skip => skipped.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        if examples.is_empty() {
            let first = skipped
                .first()
                .map_or(String::new(), |e| format!(" (the first problem: {e})"));
            return Err(Error::Invalid(format!(
                "{}: no usable examples{first}",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            examples,
            skipped,
            name: path.display().to_string(),
        })
    }
}

impl Dataset for JsonlDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn get(&self, index: usize) -> Result<Example> {
        self.examples
            .get(index)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("{}: index {index} out of range", self.name)))
    }
}

/// Writes `n` synthetic examples of every task as JSONL + PNG under `dir` (what
/// `pali data synth` does, so users see the format).
pub fn write_synth(
    dir: &Path,
    n: usize,
    res: usize,
    seed: u64,
    split: u64,
) -> Result<Vec<PathBuf>> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::create_dir_all(dir.join("images")).map_err(io(dir))?;
    for i in 0..n {
        let scene = Scene::generate(seed, split, i as u64);
        let rgb = scene.render(res);
        let p = dir.join(format!("images/{i:06}.png"));
        ::image::save_buffer(
            &p,
            &rgb.to_u8(),
            res as u32,
            res as u32,
            ::image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
    }
    let mut files = Vec::new();
    for task in SynthTask::ALL {
        let ds = SynthDataset::new(task, seed, split, n, true);
        let mut out = String::new();
        for i in 0..n {
            let e = ds.get(i)?;
            let line = serde_json::json!({"image": format!("images/{i:06}.png"), "prefix": e.prefix, "suffix": e.suffix});
            out.push_str(&line.to_string());
            out.push('\n');
        }
        let p = dir.join(format!("{}.jsonl", task.name()));
        std::fs::write(&p, out).map_err(io(&p))?;
        files.push(p);
    }
    Ok(files)
}
