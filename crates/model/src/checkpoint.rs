//! HF safetensors checkpoint IO: single file or sharded (`model.safetensors.index.json`), both
//! naming generations, tied `lm_head`, and export back to the HF layout.
//!
//! The Burn module tree mirrors the HF key tree, so the mapping is a short declared table of
//! prefix rewrites (file key → module path) plus two per-type rules:
//!
//! | file key prefix                          | module path prefix        |
//! |------------------------------------------|---------------------------|
//! | `language_model.model.` (hub, 4.x)       | `language_model.`         |
//! | `model.language_model.` (5.x in memory)  | `language_model.`         |
//! | `vision_tower.vision_model.` (hub, 4.x)  | `vision_tower.`           |
//! | `model.vision_tower.` / `vision_tower.`  | `vision_tower.`           |
//! | `model.multi_modal_projector.`           | `multi_modal_projector.`  |
//! | `lm_head.weight`, `language_model.lm_head.weight` | tied to `embed_tokens` (skipped) |
//!
//! - `Linear.weight` is `[out, in]` in PyTorch and `[in, out]` in Burn: transposed both ways.
//! - `LayerNorm.{weight,bias}` are Burn's `gamma`/`beta`.
//!
//! A missing tensor, an unexpected one, or a shape mismatch is an error naming the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{bf16, f16, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{io_err, Error, Result};

/// Which part of a model a checkpoint fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    /// A full PaliGemma checkpoint.
    All,
    /// A SigLIP checkpoint (`SiglipVisionModel` or `SiglipModel`) into PaliGemma's image
    /// encoder; the text tower, the pooling head and the temperature are not used.
    Vision,
    /// Keys are the module's own parameter paths: a two-tower SigLIP (`SiglipModel`) into
    /// [`crate::two_tower::TwoTower`], a causal LM (`GemmaForCausalLM`, `model.*`) into a module
    /// whose decoder field is `model`, a checkpoint pali wrote of the same module.
    Exact,
    /// A Gemma checkpoint (`GemmaForCausalLM` / `Gemma2ForCausalLM`).
    Language,
}

/// Maps a file key to a module path, `None` for keys that are deliberately ignored.
pub fn module_path(key: &str, tower: Tower) -> Option<String> {
    let rules: &[(&str, &str)] = match tower {
        Tower::All => &[
            ("language_model.model.", "language_model."),
            ("model.language_model.", "language_model."),
            ("vision_tower.vision_model.", "vision_tower."),
            ("model.vision_tower.", "vision_tower."),
            ("vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("multi_modal_projector.", "multi_modal_projector."),
        ],
        Tower::Vision => &[
            ("vision_model.", "vision_tower."),
            ("vision_tower.vision_model.", "vision_tower."),
        ],
        Tower::Language => &[
            ("model.", "language_model."),
            ("language_model.model.", "language_model."),
        ],
        Tower::Exact => &[("", "")],
    };
    let tied = ["lm_head.weight", "language_model.lm_head.weight"];
    if tied.contains(&key) {
        return None;
    }
    if tower == Tower::Vision && skipped_part(key).is_some() {
        return None;
    }
    rules
        .iter()
        .find_map(|(from, to)| key.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        .or_else(|| Some(format!("?{key}")))
}

/// The part of a SigLIP checkpoint that PaliGemma's image encoder does not use, if `key` is
/// in one: the other tower and the temperature of a two-tower checkpoint, and the pooling
/// head (PaliGemma uses every patch token).
pub fn skipped_part(key: &str) -> Option<&'static str> {
    if key.starts_with("text_model.") {
        Some("text tower")
    } else if key.starts_with("vision_model.head.") {
        Some("pooling head")
    } else if key == "logit_scale" || key == "logit_bias" {
        Some("logit scale and bias")
    } else {
        None
    }
}

/// The parts of `file` that a load into PaliGemma's image encoder leaves out, in first-seen
/// order (for a one-line notice).
pub fn skipped_parts(file: &TensorFile) -> Vec<&'static str> {
    let mut parts = Vec::new();
    for p in file.names().filter_map(skipped_part) {
        if !parts.contains(&p) {
            parts.push(p);
        }
    }
    parts
}

/// Module path → the legacy hub key (what transformers 4.x and 5.x both load).
pub fn hub_key(path: &str) -> String {
    for (from, to) in [
        ("language_model.", "language_model.model."),
        ("vision_tower.", "vision_tower.vision_model."),
    ] {
        if let Some(rest) = path.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    path.to_string()
}

/// A tensor read from a file, kept as raw bytes until used.
struct RawTensor {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint (one or more memory-mapped safetensors files).
pub struct TensorFile {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    tensors: BTreeMap<String, RawTensor>,
}

impl TensorFile {
    /// Opens `path`: a `.safetensors` file, a `model.safetensors.index.json`, or a directory
    /// holding either.
    pub fn open(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.exists() {
                shard_files(&index)?
            } else {
                vec![path.join("model.safetensors")]
            }
        } else if path.extension().is_some_and(|e| e == "json") {
            shard_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let mut out = TensorFile {
            maps: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for (i, f) in files.iter().enumerate() {
            let file = File::open(f).map_err(io_err(f))?;
            // SAFETY: the file is opened read-only and not modified while the map lives; a
            // concurrent writer would be a user error that at worst yields wrong values.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(f))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
                path: f.clone(),
                msg: e.to_string(),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                out.tensors.insert(
                    name,
                    RawTensor {
                        file: i,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
            out.maps.push((f.clone(), map));
        }
        Ok(out)
    }

    /// Opens `STEM.safetensors.index.json` in `dir` if it exists (shards), else
    /// `STEM.safetensors`.
    pub fn open_stem(dir: &Path, stem: &str) -> Result<Self> {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            Self::open(&index)
        } else {
            Self::open(&dir.join(format!("{stem}.safetensors")))
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    fn describe(&self) -> String {
        match self.maps.as_slice() {
            [(p, _)] => p.display().to_string(),
            m => format!("{} shards starting at {}", m.len(), m[0].0.display()),
        }
    }

    /// The tensor as f32 values (F32, F16, BF16 and F64 are converted).
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: vec![],
            source_desc: self.describe(),
        })?;
        let bytes = &self.maps[t.file].1[t.start..t.end];
        let vals: Vec<f32> = match t.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                    source_desc: self.maps[t.file].0.display().to_string(),
                })
            }
        };
        self.release(t);
        Ok((vals, t.shape.clone()))
    }

    /// Drops the pages of a tensor that was read from the process's memory (they stay in the
    /// page cache and are read again if needed), so that loading a model holds the model and
    /// one tensor's copy, not also the whole mapped file.
    fn release(&self, t: &RawTensor) {
        #[cfg(unix)]
        {
            // SAFETY: the map is read-only and file-backed: MADV_DONTNEED only drops pages,
            // which later reads fault back in from the file with the same contents.
            let _ = unsafe {
                self.maps[t.file].1.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    t.start,
                    t.end - t.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = t;
    }

    /// The tensor as i64 values (I64, I32, U8, BOOL).
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: vec![],
            source_desc: self.describe(),
        })?;
        let bytes = &self.maps[t.file].1[t.start..t.end];
        let vals: Vec<i64> = match t.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            Dtype::U8 | Dtype::BOOL => bytes.iter().map(|b| *b as i64).collect(),
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                    source_desc: self.maps[t.file].0.display().to_string(),
                })
            }
        };
        Ok((vals, t.shape.clone()))
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(io_err(index))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            field: "weight_map".into(),
            msg: "missing or not an object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Path of a parameter inside the module tree, with the PyTorch name of its last component.
/// Feed it from `ModuleVisitor`/`ModuleMapper::{enter_module, exit_module}`.
#[derive(Default, Debug, Clone)]
pub struct PathStack {
    names: Vec<String>,
    owners: Vec<String>,
}

impl PathStack {
    pub fn enter(&mut self, name: &str, container: &str) {
        self.names.push(name.to_string());
        self.owners.push(container.to_string());
    }
    pub fn exit(&mut self) {
        self.names.pop();
        self.owners.pop();
    }
    /// (PyTorch-style path, whether the tensor is a Linear weight needing a transpose).
    pub fn current(&self) -> (String, bool) {
        let owner = self.owners.last().map(String::as_str).unwrap_or("");
        let mut names = self.names.clone();
        let mut transpose = false;
        if let Some(last) = names.last_mut() {
            match (owner, last.as_str()) {
                ("Struct:LayerNorm", "gamma") => *last = "weight".into(),
                ("Struct:LayerNorm", "beta") => *last = "bias".into(),
                ("Struct:Linear", "weight") => transpose = true,
                _ => {}
            }
        }
        (names.join("."), transpose)
    }
}

fn transpose2(vals: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; vals.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = vals[r * cols + c];
        }
    }
    out
}

/// Every parameter of a module: (PyTorch-style path, Burn shape).
pub fn parameter_shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    parameters(module)
        .into_iter()
        .map(|(path, shape, _)| (path, shape))
        .collect()
}

/// Every parameter of a module, in visiting order: (PyTorch-style path, Burn shape, stored
/// transposed in PyTorch files). Reads no data.
fn parameters<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>, bool)> {
    struct V(PathStack, Vec<(String, Vec<usize>, bool)>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.0.enter(name, container)
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.exit()
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let (path, transpose) = self.0.current();
            self.1
                .push((path, p.lazy_shape().dims::<D>().to_vec(), transpose));
        }
    }
    let mut v = V(PathStack::default(), Vec::new());
    module.visit(&mut v);
    v.1
}

struct Loader<'a> {
    file: &'a TensorFile,
    /// module path → file key
    by_path: HashMap<String, String>,
    used: Vec<String>,
    errors: Vec<Error>,
    /// Parameters whose path starts with one of these are left as they are (other tower).
    only: Option<&'a str>,
    stack: PathStack,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.stack.enter(name, container)
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.exit()
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (path, transpose) = self.stack.current();
        if self.only.is_some_and(|p| !path.starts_with(p)) {
            return param;
        }
        let burn_shape = param.lazy_shape().dims::<D>().to_vec();
        let torch_shape: Vec<usize> = if transpose {
            vec![burn_shape[1], burn_shape[0]]
        } else {
            burn_shape.clone()
        };
        let Some(key) = self.by_path.get(&path).cloned() else {
            self.errors.push(Error::MissingTensor {
                name: hub_key(&path),
                expected: torch_shape,
                source_desc: self.file.describe(),
            });
            return param;
        };
        let (vals, found) = match self.file.f32(&key) {
            Ok(v) => v,
            Err(e) => {
                self.errors.push(e);
                return param;
            }
        };
        self.used.push(key.clone());
        if found != torch_shape {
            self.errors.push(Error::ShapeMismatch {
                name: key,
                expected: torch_shape,
                found,
                source_desc: self.file.describe(),
            });
            return param;
        }
        let vals = if transpose {
            transpose2(&vals, torch_shape[0], torch_shape[1])
        } else {
            vals
        };
        let device = param.lazy_device();
        let tensor = Tensor::<B, D>::from_data(TensorData::new(vals, burn_shape), &device);
        let id: ParamId = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Loads `file` into `module`. With `Tower::Vision` / `Tower::Language` only that tower's
/// parameters are filled (a unimodal start); every parameter of the filled part must be in the
/// file, and every tensor in the file must be used.
pub fn load_into<B: Backend, M: Module<B>>(
    module: M,
    file: &TensorFile,
    tower: Tower,
) -> Result<M> {
    let mut by_path = HashMap::new();
    for key in file.names() {
        if let Some(path) = module_path(key, tower) {
            by_path.insert(path, key.to_string());
        }
    }
    let only = match tower {
        Tower::All | Tower::Exact => None,
        Tower::Vision => Some("vision_tower."),
        Tower::Language => Some("language_model."),
    };
    let mut loader = Loader {
        file,
        by_path,
        used: Vec::new(),
        errors: Vec::new(),
        only,
        stack: PathStack::default(),
    };
    let module = module.map(&mut loader);
    // Shape errors first: they are the most informative.
    let mut errors = loader.errors;
    errors.sort_by_key(|e| !matches!(e, Error::ShapeMismatch { .. }));
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    let used: std::collections::HashSet<_> = loader.used.into_iter().collect();
    for key in file.names() {
        if module_path(key, tower).is_some() && !used.contains(key) {
            return Err(Error::UnexpectedTensor {
                name: key.to_string(),
                shape: file.shape(key).unwrap_or(&[]).to_vec(),
                source_desc: file.describe(),
            });
        }
    }
    Ok(module)
}

/// Element type of saved weights: f32 (checkpoints, exact resume) or bf16 (exports: half the
/// bytes; round to nearest even).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for SaveDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(SaveDtype::F32),
            "bf16" => Ok(SaveDtype::Bf16),
            o => Err(format!("unknown dtype `{o}` (f32 or bf16)")),
        }
    }
}

/// Writes every parameter of `module` to `path` as f32 safetensors with hub (4.x-style) names,
/// atomically (temp file + rename), one tensor in memory at a time.
pub fn save_safetensors<B: Backend, M: Module<B>>(module: &M, path: &Path) -> Result<()> {
    let (dir, stem) = dir_and_stem(path)?;
    save_sharded(module, dir, stem, u64::MAX, SaveDtype::F32).map(|_| ())
}

/// `DIR/STEM.safetensors` → (DIR, STEM).
fn dir_and_stem(path: &Path) -> Result<(&Path, &str)> {
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".safetensors"))
        .ok_or_else(|| Error::Input(format!("{}: not a .safetensors path", path.display())))?;
    Ok((path.parent().unwrap_or(Path::new(".")), stem))
}

/// Writes every parameter of `module` under `dir` as `STEM.safetensors`, or as shards of at
/// most `max_bytes` with `STEM.safetensors.index.json` (HF's layout), streamed: the headers
/// from the parameters' shapes first, then one tensor at a time. Returns the files written.
pub fn save_sharded<B: Backend, M: Module<B>>(
    module: &M,
    dir: &Path,
    stem: &str,
    max_bytes: u64,
    dtype: SaveDtype,
) -> Result<Vec<PathBuf>> {
    // Pass 1: names and shapes (no data read).
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let entries = parameters(module)
        .into_iter()
        .map(|(path, mut shape, transpose)| {
            if transpose {
                shape.swap(0, 1);
            }
            crate::shards::Entry {
                name: hub_key(&path),
                dtype: st_dtype,
                shape,
            }
        })
        .collect();
    let writer = crate::shards::Writer::create(dir, stem, entries, max_bytes, &[("format", "pt")])?;
    // Pass 2: each tensor's bytes, in the same order.
    struct Put(PathStack, crate::shards::Writer, SaveDtype, Option<Error>);
    impl<B: Backend> ModuleVisitor<B> for Put {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.0.enter(name, container)
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.exit()
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.3.is_some() {
                return;
            }
            let (_, transpose) = self.0.current();
            let t = p.val();
            let shape = t.dims().to_vec();
            let dtype = self.2;
            if !transpose {
                if let Err(e) = put_in_pieces(&mut self.1, &t, dtype) {
                    self.3 = Some(e);
                }
                return;
            }
            // A linear weight, transposed to HF's [out, in] (at most mlp × width here).
            let data = t.into_data().convert::<f32>();
            let vals = data.as_slice::<f32>().expect("f32 data");
            let put = self
                .1
                .put(&encode(&transpose2(vals, shape[0], shape[1]), dtype));
            if let Err(e) = put {
                self.3 = Some(e);
            }
        }
    }
    let mut put = Put(PathStack::default(), writer, dtype, None);
    module.visit(&mut put);
    match put.3 {
        Some(e) => Err(e),
        None => put.1.finish(),
    }
}

/// Values of one piece of a tensor written in storage order (64 MB of f32); a few in the unit
/// tests, so that their saves go through many pieces and are compared with HF's files.
#[cfg(not(test))]
const PIECE_VALUES: usize = 16 << 20;
#[cfg(test)]
const PIECE_VALUES: usize = 7;

/// Writes `t` in storage order as the writer's next tensor, in pieces of rows (dimension 0) of
/// at most [`PIECE_VALUES`]: reading a tensor back from a backend copies it (the model still
/// holds it), and the copy may be copied again to align it, so whole it would cost twice its
/// size (4 GB for PaliGemma's embedding, 8 GB for its two Adam moments).
pub fn put_in_pieces<B: Backend, const D: usize>(
    w: &mut crate::shards::Writer,
    t: &Tensor<B, D>,
    dtype: SaveDtype,
) -> Result<()> {
    let shape = t.dims();
    let row: usize = shape[1..].iter().product::<usize>().max(1);
    let rows_per = (PIECE_VALUES / row).max(1);
    w.put_with(|sink| {
        let mut start = 0;
        while start < shape[0] {
            let n = rows_per.min(shape[0] - start);
            let piece = t.clone().narrow(0, start, n).into_data().convert::<f32>();
            match dtype {
                SaveDtype::F32 if cfg!(target_endian = "little") => sink(piece.as_bytes())?,
                _ => sink(&encode(piece.as_slice::<f32>().expect("f32"), dtype))?,
            }
            start += n;
        }
        Ok(())
    })
}

/// f32 values as the little-endian bytes of `dtype`.
fn encode(vals: &[f32], dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        SaveDtype::Bf16 => vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Writes one tower of a PaliGemma checkpoint as a unimodal HF checkpoint: the decoder as a
/// Gemma (`model.*`, what `init_gemma` reads) or the image encoder as a SigLIP
/// (`vision_model.*`, what `init_siglip` reads), as f32 or bf16. `vocab` keeps only the first rows of
/// the embedding: a decoder without the `<loc>`/`<seg>` rows, i.e. a plain Gemma, for the
/// token-init ablation. Written atomically. Returns the number of tensors written.
pub fn export_tower(
    src: &Path,
    tower: Tower,
    vocab: Option<usize>,
    dtype: SaveDtype,
    out: &Path,
) -> Result<usize> {
    let file = TensorFile::open(src)?;
    let (from, to) = match tower {
        Tower::Language => ("language_model.", "model."),
        Tower::Vision => ("vision_tower.", "vision_model."),
        Tower::All | Tower::Exact => {
            return Err(Error::Input(
                "export_tower: pick the language or the vision tower".into(),
            ))
        }
    };
    let embed = "model.embed_tokens.weight";
    // (file key, exported name, exported shape)
    let mut plan: Vec<(String, String, Vec<usize>)> = Vec::new();
    for key in file.names() {
        let Some(rest) = module_path(key, Tower::All)
            .and_then(|p| p.strip_prefix(from).map(|r| format!("{to}{r}")))
        else {
            continue;
        };
        let mut shape = file.shape(key).expect("listed").to_vec();
        if let (true, Some(v)) = (rest == embed, vocab) {
            if v > shape[0] {
                return Err(Error::Input(format!(
                    "export: --vocab {v} is larger than the {} rows of `{key}` in {}",
                    shape[0],
                    src.display()
                )));
            }
            shape[0] = v;
        }
        plan.push((key.to_string(), rest, shape));
    }
    if plan.is_empty() {
        return Err(Error::Input(format!(
            "{}: no `{from}*` tensors to export",
            src.display()
        )));
    }
    let st = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let entries = plan
        .iter()
        .map(|(_, name, shape)| crate::shards::Entry {
            name: name.clone(),
            dtype: st,
            shape: shape.clone(),
        })
        .collect();
    let (dir, stem) = dir_and_stem(out)?;
    let meta = [("format", "pt")];
    let mut w = crate::shards::Writer::create(dir, stem, entries, u64::MAX, &meta)?;
    for (key, _, shape) in &plan {
        let (mut vals, _) = file.f32(key)?;
        vals.truncate(shape.iter().product());
        let bytes: Vec<u8> = match dtype {
            SaveDtype::F32 => vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::Bf16 => vals
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
        };
        w.put(&bytes)?;
    }
    w.finish()?;
    Ok(plan.len())
}

/// `gemma` → [`Tower::Language`], `siglip` → [`Tower::Vision`] (names used in configs and
/// on the command line).
pub fn tower_by_name(name: &str) -> Result<Tower> {
    match name {
        "gemma" => Ok(Tower::Language),
        "siglip" => Ok(Tower::Vision),
        other => Err(Error::Input(format!(
            "unknown tower `{other}` (gemma, siglip)"
        ))),
    }
}
