//! Sharded datasets for pretraining-scale data: `DIR/shard-00000.db …` plus `DIR/index.json`.
//!
//! Each shard is a burn-dataset SQLite file written by [`SqliteDatasetWriter`]: one table
//! `train (row_id, item)`, `item` a MessagePack [`Row`] holding the encoded image files as
//! stored (JPEG/PNG, optionally re-encoded at a maximum side), prefix, suffix, task and id;
//! burn-dataset's `SqliteDataset<Row>` reads them as they are. pali reads them through
//! rusqlite itself ([`ShardDataset`]) because `SqliteDataset::get` panics on a corrupt row
//! and prepares its statement on every read: here a bad row is an error naming `shard:row`,
//! and a statement is prepared once per connection.
//!
//! The index records each shard's rows, bytes and CRC-32 and each source's CRC-32, so a
//! truncated or replaced shard is named when the dataset is opened, and a corrupt one by
//! `pali data validate`. Reading needs memory for the open connections only, whatever the
//! number of rows.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn_dataset::SqliteDatasetWriter;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::dataset::{
    parse_line, utf8_line, Dataset, EncodedImage, Example, ImageSource, OnError, SynthDataset,
    SynthTask,
};
use crate::error::{Error, Result};
use crate::image::{self as img, ResizeMethod};

/// The index file of a shard directory.
pub const INDEX: &str = "index.json";
/// `format` of the index this code writes and reads.
pub const FORMAT: &str = "pali-shards/1";
/// burn-dataset's split name: the table of every shard.
pub const SPLIT: &str = "train";

/// One example as a shard stores it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Row {
    /// The JSONL `id`, or `file:line` of the source.
    pub id: String,
    /// The source's task (the JSONL file's stem unless given).
    pub task: String,
    pub prefix: String,
    pub suffix: String,
    /// Encoded image files in order (several for multi-image examples; none for text-only).
    pub images: Vec<ByteBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub path: String,
    pub bytes: u64,
    pub crc32: u32,
    pub rows: u64,
    /// `file:line: problem` of the lines left out (`on_error = "skip"`), the first 100.
    pub skipped: Vec<String>,
    pub skipped_count: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: String,
    pub rows: u64,
    pub images: u64,
    pub shards: Vec<ShardInfo>,
    pub sources: Vec<SourceInfo>,
}

/// Whether `path` is a shard directory (it has an index).
pub fn is_shard_dir(path: &Path) -> bool {
    path.join(INDEX).is_file()
}

impl Index {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(INDEX);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let index: Index = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        if index.format != FORMAT {
            return Err(Error::Invalid(format!(
                "{}: format `{}`, this pali reads `{FORMAT}`",
                path.display(),
                index.format
            )));
        }
        let sum: u64 = index.shards.iter().map(|s| s.rows).sum();
        if sum != index.rows {
            return Err(Error::Invalid(format!(
                "{}: rows: {} but the shards hold {sum}",
                path.display(),
                index.rows
            )));
        }
        Ok(index)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sql_err(at: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{at}: {e}"))
}

/// CRC-32 and length of a file, read in 1 MiB pieces.
fn file_crc(path: &Path) -> Result<(u32, u64)> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io_err(path))?;
        if k == 0 {
            return Ok((h.finalize(), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// Writes rows into shards of about `shard_bytes` each, in `OUT.partial-PID` until
/// [`ShardWriter::finish`] renames it to `OUT`: a failed pack removes it, a killed one leaves
/// it (it is never taken for a dataset: it has no `index.json` and not the name `OUT`; another
/// host may be packing into the same parent, so nobody else removes it), and an existing
/// `OUT` is never touched.
pub struct ShardWriter {
    out: PathBuf,
    tmp: PathBuf,
    shard_bytes: u64,
    current: Option<(SqliteDatasetWriter<Row>, u64, u64)>,
    shards: Vec<ShardInfo>,
    rows: u64,
    images: u64,
    done: bool,
}

impl ShardWriter {
    pub fn create(out: &Path, shard_bytes: u64) -> Result<Self> {
        if out.exists() {
            return Err(Error::Invalid(format!(
                "{}: exists; shards are written into a new directory",
                out.display()
            )));
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", out.display())))?;
        let tmp = out.with_file_name(format!(
            "{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(Self {
            out: out.to_path_buf(),
            tmp,
            shard_bytes: shard_bytes.max(1),
            current: None,
            shards: Vec::new(),
            rows: 0,
            images: 0,
            done: false,
        })
    }

    fn shard_name(k: usize) -> String {
        format!("shard-{k:05}.db")
    }

    pub fn push(&mut self, row: &Row) -> Result<()> {
        if self.current.is_none() {
            let p = self.tmp.join(Self::shard_name(self.shards.len()));
            let w = SqliteDatasetWriter::new(&p, false)
                .map_err(|e| sql_err(&p.display().to_string(), e))?;
            self.current = Some((w, 0, 0));
        }
        let (w, rows, bytes) = self.current.as_mut().expect("opened above");
        w.write(SPLIT, row).map_err(|e| {
            sql_err(
                &self
                    .tmp
                    .join(Self::shard_name(self.shards.len()))
                    .display()
                    .to_string(),
                e,
            )
        })?;
        *rows += 1;
        *bytes += (row.images.iter().map(|b| b.len()).sum::<usize>()
            + row.prefix.len()
            + row.suffix.len()
            + row.id.len()
            + 16) as u64;
        self.rows += 1;
        self.images += row.images.len() as u64;
        if *bytes >= self.shard_bytes {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((mut w, rows, _)) = self.current.take() {
            let file = Self::shard_name(self.shards.len());
            let p = self.tmp.join(&file);
            w.set_completed()
                .map_err(|e| sql_err(&p.display().to_string(), e))?;
            let (crc32, bytes) = file_crc(&p)?;
            self.shards.push(ShardInfo {
                file,
                rows,
                bytes,
                crc32,
            });
        }
        Ok(())
    }

    /// Closes the last shard, writes the index and moves the directory into place.
    pub fn finish(mut self, sources: Vec<SourceInfo>) -> Result<Index> {
        self.close_shard()?;
        if self.rows == 0 {
            return Err(Error::Invalid(format!(
                "{}: no rows to write",
                self.out.display()
            )));
        }
        let index = Index {
            format: FORMAT.into(),
            rows: self.rows,
            images: self.images,
            shards: std::mem::take(&mut self.shards),
            sources,
        };
        let p = self.tmp.join(INDEX);
        let text = serde_json::to_string_pretty(&index).expect("the index serialises");
        std::fs::write(&p, text + "\n").map_err(io_err(&p))?;
        std::fs::rename(&self.tmp, &self.out).map_err(io_err(&self.out))?;
        self.done = true;
        Ok(index)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if !self.done {
            drop(self.current.take());
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// How `pali data pack` writes.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Start a new shard after this many bytes of rows.
    pub shard_bytes: u64,
    /// Re-encode images larger than this side (longest side, aspect kept) as JPEG.
    pub max_side: Option<usize>,
    pub jpeg_quality: u8,
    /// The task recorded in every row; by default each JSONL file's stem.
    pub task: Option<String>,
    pub on_error: OnError,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            shard_bytes: 1 << 30,
            max_side: None,
            jpeg_quality: 95,
            task: None,
            on_error: OnError::Fail,
        }
    }
}

/// An image file's bytes, re-encoded as JPEG when its longest side is over `max_side`.
fn image_bytes(path: &Path, opts: &PackOptions) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let Some(max) = opts.max_side else {
        return Ok(bytes);
    };
    let rgb = img::decode(&bytes, path)?;
    let side = rgb.width.max(rgb.height);
    if side <= max {
        return Ok(bytes);
    }
    let (w, h) = (
        (rgb.width * max).div_ceil(side).max(1),
        (rgb.height * max).div_ceil(side).max(1),
    );
    let small = img::resize(&rgb, w, h, ResizeMethod::Bicubic);
    let mut out = Vec::new();
    ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, opts.jpeg_quality)
        .encode(
            &small.to_u8(),
            w as u32,
            h as u32,
            ::image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Invalid(format!("{}: JPEG re-encode: {e}", path.display())))?;
    Ok(out)
}

/// Lines parsed and read in parallel, this many at a time (memory: their image bytes).
const CHUNK: usize = 256;

/// Packs JSONL files (big_vision layout, images relative to each file) into shards at `out`,
/// reading them line by line: memory holds one chunk of rows, whatever the files' size.
/// `progress` is called with the rows written so far.
pub fn pack_jsonl(
    sources: &[PathBuf],
    out: &Path,
    opts: &PackOptions,
    progress: &dyn Fn(u64),
) -> Result<Index> {
    if opts.max_side == Some(0) {
        return Err(Error::Invalid("max_side must be > 0".into()));
    }
    let mut w = ShardWriter::create(out, opts.shard_bytes)?;
    let mut infos = Vec::new();
    for src in sources {
        let f = std::fs::File::open(src).map_err(io_err(src))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
        let dir = src.parent().unwrap_or(Path::new("."));
        let task = opts.task.clone().unwrap_or_else(|| {
            src.file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
        });
        let mut crc = crc32fast::Hasher::new();
        let (mut bytes, mut rows, mut line_no) = (0u64, 0u64, 0usize);
        let mut skipped = Vec::new();
        let mut skipped_count = 0u64;
        loop {
            let mut lines = Vec::with_capacity(CHUNK);
            let mut buf = Vec::new();
            while lines.len() < CHUNK {
                buf.clear();
                let k = reader.read_until(b'\n', &mut buf).map_err(io_err(src))?;
                if k == 0 {
                    break;
                }
                crc.update(&buf);
                bytes += k as u64;
                line_no += 1;
                let text = if line_no == 1 {
                    buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf)
                } else {
                    &buf
                };
                lines.push((line_no, utf8_line(src, line_no, text)));
            }
            if lines.is_empty() {
                break;
            }
            let parsed: Vec<Option<Result<Row>>> = lines
                .into_par_iter()
                .map(|(n, line)| {
                    if line.as_ref().is_ok_and(|l| l.trim().is_empty()) {
                        return None;
                    }
                    Some(line.and_then(|l| {
                        let ex = parse_line(src, dir, n, &l, false)?;
                        let images = ex
                            .images
                            .iter()
                            .map(|im| match im {
                                ImageSource::File(p) => {
                                    image_bytes(p, opts).map(ByteBuf::from).map_err(|e| {
                                        Error::Invalid(format!(
                                            "{}:{n}: field `image`: {e}",
                                            src.display()
                                        ))
                                    })
                                }
                                _ => unreachable!("a JSONL line names files"),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Ok(Row {
                            id: ex.id,
                            task: task.clone(),
                            prefix: ex.prefix,
                            suffix: ex.suffix,
                            images,
                        })
                    }))
                })
                .collect();
            for r in parsed.into_iter().flatten() {
                match r {
                    Ok(row) => {
                        w.push(&row)?;
                        rows += 1;
                    }
                    Err(e) if opts.on_error == OnError::Skip => {
                        skipped_count += 1;
                        if skipped.len() < 100 {
                            skipped.push(e.to_string());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            progress(w.rows);
        }
        infos.push(SourceInfo {
            path: src.display().to_string(),
            bytes,
            crc32: crc.finalize(),
            rows,
            skipped,
            skipped_count,
        });
    }
    w.finish(infos)
}

/// Packs `n` examples of a synthetic task (images rendered at `res`, stored as PNG) into
/// shards at `out`: `pali data synth --shards`, the same rows `pali data synth` writes as
/// JSONL.
pub fn pack_synth(
    task: SynthTask,
    out: &Path,
    n: usize,
    res: usize,
    seed: u64,
    split: u64,
    opts: &PackOptions,
) -> Result<Index> {
    let ds = SynthDataset::new(task, seed, split, n, true);
    let mut w = ShardWriter::create(out, opts.shard_bytes)?;
    for start in (0..n).step_by(CHUNK) {
        let rows: Vec<Row> = (start..(start + CHUNK).min(n))
            .into_par_iter()
            .map(|i| -> Result<Row> {
                let e = ds.get(i)?;
                let rgb = e.images[0].rgb(res)?;
                let mut png = std::io::Cursor::new(Vec::new());
                ::image::RgbImage::from_raw(res as u32, res as u32, rgb.to_u8())
                    .expect("a rendered scene has res² pixels")
                    .write_to(&mut png, ::image::ImageFormat::Png)
                    .map_err(|e| Error::Invalid(format!("PNG encode: {e}")))?;
                Ok(Row {
                    id: e.id,
                    task: task.name().into(),
                    prefix: e.prefix,
                    suffix: e.suffix,
                    images: vec![ByteBuf::from(png.into_inner())],
                })
            })
            .collect::<Result<_>>()?;
        for r in &rows {
            w.push(r)?;
        }
    }
    w.finish(Vec::new())
}

/// Idle read connections kept open, over all shards (each holds a file and a small cache).
const IDLE_CONNECTIONS: usize = 64;

/// A shard directory as a [`Dataset`]: random access by global row, read on demand.
pub struct ShardDataset {
    dir: PathBuf,
    name: String,
    pub index: Index,
    /// First global row of each shard, and the total at the end.
    starts: Vec<u64>,
    idle: Mutex<Vec<(usize, rusqlite::Connection)>>,
}

impl std::fmt::Debug for ShardDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardDataset")
            .field("dir", &self.dir)
            .field("rows", &self.index.rows)
            .finish()
    }
}

impl ShardDataset {
    /// Reads the index and checks every shard is there with the length the index records.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = Index::read(dir)?;
        let mut starts = vec![0u64];
        for s in &index.shards {
            let p = dir.join(&s.file);
            let len = std::fs::metadata(&p).map_err(io_err(&p))?.len();
            if len != s.bytes {
                return Err(Error::Invalid(format!(
                    "{}: {len} bytes, but {} records {} (truncated or replaced: copy the \
                     shard again, or pack the data again)",
                    p.display(),
                    INDEX,
                    s.bytes
                )));
            }
            starts.push(starts.last().unwrap() + s.rows);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            name: dir.display().to_string(),
            index,
            starts,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn shard_path(&self, shard: usize) -> PathBuf {
        self.dir.join(&self.index.shards[shard].file)
    }

    /// `DIR/shard-00003.db:row 17` (rows count from 1 in each shard, as SQLite's `row_id`).
    pub fn at(&self, shard: usize, row: u64) -> String {
        format!("{}:row {row}", self.shard_path(shard).display())
    }

    /// (shard, row in shard from 1) of a global index.
    pub fn locate(&self, index: usize) -> Result<(usize, u64)> {
        let i = index as u64;
        if i >= self.index.rows {
            return Err(Error::Invalid(format!(
                "{}: row {index} of {}",
                self.name, self.index.rows
            )));
        }
        let shard = self.starts.partition_point(|s| *s <= i) - 1;
        Ok((shard, i - self.starts[shard] + 1))
    }

    fn connection(&self, shard: usize) -> Result<rusqlite::Connection> {
        {
            let mut idle = self.idle.lock().expect("not poisoned");
            if let Some(k) = idle.iter().rposition(|(s, _)| *s == shard) {
                return Ok(idle.swap_remove(k).1);
            }
        }
        let p = self.shard_path(shard);
        let at = p.display().to_string();
        let c = rusqlite::Connection::open_with_flags(
            &p,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_err(&at, e))?;
        // A small page cache per connection: rows are read once per epoch, at random.
        c.pragma_update(None, "cache_size", -512)
            .map_err(|e| sql_err(&at, e))?;
        Ok(c)
    }

    fn give_back(&self, shard: usize, c: rusqlite::Connection) {
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.len() >= IDLE_CONNECTIONS {
            idle.remove(0);
        }
        idle.push((shard, c));
    }

    /// Row `row` (from 1) of `shard`, decoded.
    pub fn read(&self, shard: usize, row: u64) -> Result<Row> {
        let at = || self.at(shard, row);
        let c = self.connection(shard)?;
        let blob: Vec<u8> = c
            .prepare_cached(&format!("select item from {SPLIT} where row_id = ?1"))
            .and_then(|mut st| st.query_row([row as i64], |r| r.get(0)))
            .map_err(|e| sql_err(&at(), e))?;
        self.give_back(shard, c);
        rmp_serde::from_slice(&blob).map_err(|e| sql_err(&at(), format!("not a pali row: {e}")))
    }

    pub fn row(&self, index: usize) -> Result<Row> {
        let (shard, row) = self.locate(index)?;
        self.read(shard, row)
    }

    /// Checks a shard's bytes against the CRC-32 of the index.
    pub fn check_crc(&self, shard: usize) -> Result<()> {
        let p = self.shard_path(shard);
        let (crc, len) = file_crc(&p)?;
        let s = &self.index.shards[shard];
        if (crc, len) != (s.crc32, s.bytes) {
            return Err(Error::Invalid(format!(
                "{}: corrupt: CRC-32 {crc:08x} over {len} bytes, {INDEX} records {:08x} over {}",
                p.display(),
                s.crc32,
                s.bytes
            )));
        }
        Ok(())
    }

    /// The row as an example; its images decode only when the loader reads their pixels.
    pub fn example(&self, index: usize) -> Result<Example> {
        let (shard, row) = self.locate(index)?;
        let r = self.read(shard, row)?;
        let at = self.at(shard, row);
        Ok(Example {
            id: r.id,
            images: r
                .images
                .into_iter()
                .enumerate()
                .map(|(k, b)| {
                    ImageSource::Encoded(Arc::new(EncodedImage {
                        bytes: b.into_vec(),
                        at: format!("{at}: image {k}"),
                    }))
                })
                .collect(),
            prefix: r.prefix,
            suffix: r.suffix,
        })
    }
}

impl Dataset for ShardDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.index.rows as usize
    }
    fn get(&self, index: usize) -> Result<Example> {
        self.example(index)
    }
}

/// What `pali data validate DIR` finds in one row: its problems (each `shard:row: …`).
pub fn check_row(ds: &ShardDataset, index: usize) -> std::result::Result<Row, String> {
    let (shard, row) = ds.locate(index).map_err(|e| e.to_string())?;
    let r = ds.read(shard, row).map_err(|e| e.to_string())?;
    for (field, t) in [("prefix", &r.prefix), ("suffix", &r.suffix)] {
        if let Some(tok) = crate::dataset::reserved_in(t) {
            return Err(format!(
                "{}: {field}: contains `{tok}`, which the sequence layout places itself",
                ds.at(shard, row)
            ));
        }
    }
    for (k, b) in r.images.iter().enumerate() {
        img::decode8(b, Path::new(&format!("{}: image {k}", ds.at(shard, row))))
            .map_err(|e| e.to_string())?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{write_synth, JsonlDataset};

    fn synth_jsonl(dir: &Path, n: usize) -> Vec<PathBuf> {
        write_synth(&dir.join("synth"), n, 32, 3, 0).unwrap()
    }

    #[test]
    fn packed_shards_hold_the_jsonl_rows_in_order() {
        let t = tempfile::tempdir().unwrap();
        let files = synth_jsonl(t.path(), 12);
        let out = t.path().join("shards");
        let opts = PackOptions {
            shard_bytes: 4000,
            ..Default::default()
        };
        let index = pack_jsonl(&files[..2], &out, &opts, &|_| {}).unwrap();
        assert_eq!(index.rows, 24);
        assert!(index.shards.len() > 2, "{} shards", index.shards.len());
        assert!(!t.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")));
        let ds = ShardDataset::open(&out).unwrap();
        let mut k = 0;
        for f in &files[..2] {
            let j = JsonlDataset::open(f, OnError::Fail, false).unwrap();
            for i in 0..j.len() {
                let (a, b) = (j.get(i).unwrap(), ds.get(k).unwrap());
                assert_eq!((a.id, a.prefix, a.suffix), (b.id, b.prefix, b.suffix));
                assert_eq!(
                    a.images[0].rgb(32).unwrap(),
                    b.images[0].rgb(32).unwrap(),
                    "row {k}"
                );
                k += 1;
            }
        }
        assert!(ds.get(24).is_err());
        // burn-dataset reads the shards as they are.
        use burn_dataset::Dataset as _;
        let burn =
            burn_dataset::SqliteDataset::<Row>::from_db_file(ds.shard_path(0), SPLIT).unwrap();
        assert_eq!(burn.len() as u64, index.shards[0].rows);
        assert_eq!(burn.get(0).unwrap(), ds.row(0).unwrap());
        // The output directory is never overwritten.
        assert!(pack_jsonl(&files[..1], &out, &opts, &|_| {})
            .unwrap_err()
            .to_string()
            .contains("exists"));
    }

    #[test]
    fn synth_shards_hold_what_synth_jsonl_holds() {
        let t = tempfile::tempdir().unwrap();
        let files = synth_jsonl(t.path(), 5);
        let out = t.path().join("vqa");
        pack_synth(SynthTask::Vqa, &out, 5, 32, 3, 0, &PackOptions::default()).unwrap();
        let (s, j) = (
            ShardDataset::open(&out).unwrap(),
            JsonlDataset::open(&files[1], OnError::Fail, false).unwrap(),
        );
        assert!(files[1].ends_with("vqa.jsonl"));
        for i in 0..5 {
            let (a, b) = (j.get(i).unwrap(), s.get(i).unwrap());
            assert_eq!((a.prefix, a.suffix), (b.prefix, b.suffix));
            assert_eq!(a.images[0].rgb(32).unwrap(), b.images[0].rgb(32).unwrap());
            assert_eq!(s.row(i).unwrap().task, "vqa");
        }
    }

    #[test]
    fn bad_shards_are_named() {
        let t = tempfile::tempdir().unwrap();
        let files = synth_jsonl(t.path(), 6);
        let out = t.path().join("shards");
        let opts = PackOptions {
            shard_bytes: 1000,
            ..Default::default()
        };
        let index = pack_jsonl(&files[..1], &out, &opts, &|_| {}).unwrap();
        assert!(
            index.shards.len() >= 2 && index.shards[1].rows >= 2,
            "{index:?}"
        );
        let p = out.join(&index.shards[1].file);
        // A flipped byte in the last page: the length holds, the CRC does not.
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 100] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let ds = ShardDataset::open(&out).unwrap();
        assert!(ds.check_crc(0).is_ok());
        let e = ds.check_crc(1).unwrap_err().to_string();
        assert!(e.contains("shard-00001.db: corrupt"), "{e}");
        // Truncated: refused at open, naming the shard.
        std::fs::write(&p, &bytes[..n / 2]).unwrap();
        let e = ShardDataset::open(&out).unwrap_err().to_string();
        assert!(
            e.contains("shard-00001.db") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&p, &bytes).unwrap();
        // A row that is not a pali row: an error naming shard and row, not a panic.
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute("update train set item = x'c1' where row_id = 1", [])
            .unwrap();
        drop(c);
        let ds = ShardDataset::open(&out).unwrap();
        let first = index.shards[0].rows as usize;
        let e = ds.get(first).unwrap_err().to_string();
        assert!(e.contains("shard-00001.db:row 1: not a pali row"), "{e}");
        assert_eq!(check_row(&ds, first).unwrap_err(), e);
        assert!(check_row(&ds, 0).is_ok());
    }

    #[test]
    fn validation_names_special_tokens_in_rows_other_tools_wrote() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("shards");
        let mut w = ShardWriter::create(&out, 1 << 20).unwrap();
        for prefix in ["caption en", "caption en <eos>"] {
            w.push(&Row {
                id: "x".into(),
                task: "caption".into(),
                prefix: prefix.into(),
                suffix: "a cat".into(),
                images: Vec::new(),
            })
            .unwrap();
        }
        w.finish(Vec::new()).unwrap();
        let ds = ShardDataset::open(&out).unwrap();
        assert!(check_row(&ds, 0).is_ok());
        let e = check_row(&ds, 1).unwrap_err();
        assert!(
            e.contains("shard-00000.db:row 2: prefix: contains `<eos>`"),
            "{e}"
        );
    }

    #[test]
    fn skipped_lines_are_recorded_and_max_side_reencodes() {
        let t = tempfile::tempdir().unwrap();
        let files = synth_jsonl(t.path(), 4);
        let mut text = std::fs::read_to_string(&files[0]).unwrap();
        text.push_str("{\"image\": \"missing.png\", \"prefix\": \"a\", \"suffix\": \"b\"}\n");
        std::fs::write(&files[0], text).unwrap();
        let out = t.path().join("shards");
        let opts = PackOptions {
            max_side: Some(16),
            ..Default::default()
        };
        let e = pack_jsonl(&files[..1], &out, &opts, &|_| {}).unwrap_err();
        assert!(e.to_string().contains(":5: field `image`"), "{e}");
        assert!(!out.exists());
        let opts = PackOptions {
            on_error: OnError::Skip,
            ..opts
        };
        let index = pack_jsonl(&files[..1], &out, &opts, &|_| {}).unwrap();
        assert_eq!((index.rows, index.sources[0].skipped_count), (4, 1));
        let ds = ShardDataset::open(&out).unwrap();
        let rgb = ds.get(0).unwrap().images[0].rgb(0).unwrap();
        assert_eq!((rgb.width, rgb.height), (16, 16));
    }
}
