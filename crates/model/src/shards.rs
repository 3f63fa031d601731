//! Streamed, sharded safetensors writing: the header of every shard is computed from the
//! tensors' names, dtypes and shapes first, then each tensor's bytes are written as they are
//! produced, so memory holds one tensor, not the file. Shards follow HF: one file is
//! `STEM.safetensors`; more are `STEM-0000i-of-0000n.safetensors` plus
//! `STEM.safetensors.index.json` (`metadata.total_size`, `weight_map`), which
//! [`crate::checkpoint::TensorFile::open`] reads. Files appear under their names only when
//! [`Writer::finish`] succeeds (written as `NAME.tmp`, fsynced, renamed).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{io_err, Error, Result};

/// HF's default shard size (`save_pretrained(max_shard_size="5GB")`).
pub const SHARD_BYTES: u64 = 5_000_000_000;

/// A tensor to be written: its name, dtype and shape.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn bytes(&self) -> u64 {
        (self.dtype.bitsize() * self.shape.iter().product::<usize>()).div_ceil(8) as u64
    }
}

struct Shard {
    path: PathBuf,
    tmp: PathBuf,
    /// Indices into the entries.
    range: std::ops::Range<usize>,
}

/// Writes `entries` in order, one [`Writer::put`] per tensor.
pub struct Writer {
    entries: Vec<Entry>,
    shards: Vec<Shard>,
    index: Option<PathBuf>,
    next: usize,
    out: Option<(usize, std::io::BufWriter<std::fs::File>)>,
    metadata: BTreeMap<String, String>,
    stem: String,
}

impl Writer {
    /// Plans the shards of `entries` (at most `max_bytes` of data each, one tensor at least)
    /// under `dir` as `STEM…`.
    pub fn create(
        dir: &Path,
        stem: &str,
        entries: Vec<Entry>,
        max_bytes: u64,
        metadata: &[(&str, &str)],
    ) -> Result<Writer> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        let mut size = 0u64;
        for (i, e) in entries.iter().enumerate() {
            let b = e.bytes();
            match ranges.last_mut() {
                Some(r) if size + b <= max_bytes => {
                    r.end = i + 1;
                    size += b;
                }
                _ => {
                    ranges.push(i..i + 1);
                    size = b;
                }
            }
        }
        if ranges.is_empty() {
            ranges.push(0..0);
        }
        let n = ranges.len();
        let shards = ranges
            .into_iter()
            .enumerate()
            .map(|(k, range)| {
                let name = if n == 1 {
                    format!("{stem}.safetensors")
                } else {
                    format!("{stem}-{:05}-of-{n:05}.safetensors", k + 1)
                };
                Shard {
                    tmp: dir.join(format!("{name}.tmp")),
                    path: dir.join(name),
                    range,
                }
            })
            .collect();
        Ok(Writer {
            entries,
            shards,
            index: (n > 1).then(|| dir.join(format!("{stem}.safetensors.index.json"))),
            next: 0,
            out: None,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            stem: stem.to_string(),
        })
    }

    /// The entry the next [`Writer::put`] writes.
    pub fn next_entry(&self) -> Option<&Entry> {
        self.entries.get(self.next)
    }

    fn open_shard(&mut self, k: usize) -> Result<()> {
        let shard = &self.shards[k];
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!(self.metadata));
        let mut at = 0u64;
        for e in &self.entries[shard.range.clone()] {
            let len = e.bytes();
            header.insert(
                e.name.clone(),
                serde_json::json!({
                    "dtype": format!("{:?}", e.dtype),
                    "shape": e.shape,
                    "data_offsets": [at, at + len],
                }),
            );
            at += len;
        }
        let mut text = serde_json::to_string(&header).expect("json");
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let file = std::fs::File::create(&shard.tmp).map_err(io_err(&shard.tmp))?;
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(text.as_bytes()))
            .map_err(io_err(&shard.tmp))?;
        self.out = Some((k, w));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((k, mut w)) = self.out.take() {
            let tmp = &self.shards[k].tmp;
            w.flush().map_err(io_err(tmp))?;
            w.get_ref().sync_all().map_err(io_err(tmp))?;
        }
        Ok(())
    }

    /// Writes the next tensor's little-endian bytes.
    pub fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let e = self
            .entries
            .get(self.next)
            .ok_or_else(|| Error::Input("safetensors writer: more tensors than planned".into()))?;
        if bytes.len() as u64 != e.bytes() {
            return Err(self.length_error(bytes.len() as u64));
        }
        self.put_with(|sink| sink(bytes))
    }

    fn length_error(&self, got: u64) -> Error {
        let e = &self.entries[self.next];
        Error::Input(format!(
            "safetensors writer: `{}` has {got} bytes, its shape {:?} of {:?} needs {}",
            e.name,
            e.shape,
            e.dtype,
            e.bytes()
        ))
    }

    /// Writes the next tensor in consecutive pieces: `fill` passes each to the sink it gets, so
    /// a large tensor never needs to be in memory as bytes whole. Its total length is checked
    /// after (a wrong one fails the save).
    pub fn put_with(
        &mut self,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<()> {
        if self.next >= self.entries.len() {
            return Err(Error::Input(
                "safetensors writer: more tensors than planned".into(),
            ));
        }
        let k = self
            .shards
            .iter()
            .position(|s| s.range.contains(&self.next))
            .expect("every entry is in a shard");
        if self.out.as_ref().map(|(o, _)| *o) != Some(k) {
            self.close_shard()?;
            self.open_shard(k)?;
        }
        let (_, w) = self.out.as_mut().expect("open shard");
        let tmp = &self.shards[k].tmp;
        let mut written = 0u64;
        fill(&mut |b: &[u8]| {
            written += b.len() as u64;
            w.write_all(b).map_err(io_err(tmp))
        })?;
        if written != self.entries[self.next].bytes() {
            return Err(self.length_error(written));
        }
        self.next += 1;
        Ok(())
    }

    /// Removes files of an earlier save under the same stem that this one does not replace (a
    /// stale index would be read in preference to a new single file).
    fn remove_stale(&self) -> Result<()> {
        let Some(dir) = self.shards[0].path.parent() else {
            return Ok(());
        };
        let stem = self.stem.as_str();
        let ours: Vec<&Path> = self.shards.iter().map(|s| s.path.as_path()).collect();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let p = e.map_err(io_err(dir))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let shard = name.starts_with(&format!("{stem}-"))
                && name.contains("-of-")
                && name.ends_with(".safetensors");
            let single = name == format!("{stem}.safetensors");
            let index = name == format!("{stem}.safetensors.index.json");
            if (shard || single || index)
                && !ours.contains(&p.as_path())
                && self.index.as_deref() != Some(p.as_path())
            {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        Ok(())
    }

    /// Closes the last shard, renames every shard into place and writes the index (if
    /// sharded). Returns the files written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if self.next != self.entries.len() {
            return Err(Error::Input(format!(
                "safetensors writer: {} of {} tensors written",
                self.next,
                self.entries.len()
            )));
        }
        if self.entries.is_empty() {
            self.open_shard(0)?;
        }
        self.close_shard()?;
        self.remove_stale()?;
        let mut files = Vec::new();
        for s in &self.shards {
            std::fs::rename(&s.tmp, &s.path).map_err(io_err(&s.path))?;
            files.push(s.path.clone());
        }
        if let Some(index) = &self.index {
            let mut map = serde_json::Map::new();
            for s in &self.shards {
                let file = s.path.file_name().expect("file").to_string_lossy();
                for e in &self.entries[s.range.clone()] {
                    map.insert(e.name.clone(), serde_json::json!(file));
                }
            }
            let total: u64 = self.entries.iter().map(Entry::bytes).sum();
            let json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
            let tmp = index.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_string_pretty(&json).expect("json"))
                .map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, index).map_err(io_err(index))?;
            files.push(index.clone());
        }
        Ok(files)
    }
}

impl Drop for Writer {
    /// An unfinished writer leaves no temporary files.
    fn drop(&mut self) {
        self.out = None;
        for s in &self.shards {
            let _ = std::fs::remove_file(&s.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorFile;

    fn entry(name: &str, n: usize) -> Entry {
        Entry {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![n],
        }
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn shards_split_by_size_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let entries = vec![entry("a", 4), entry("b", 4), entry("c", 8)];
        // 16 + 16 fit in 40 bytes; c (32) starts a second shard.
        let mut w = Writer::create(d.path(), "model", entries, 40, &[("format", "pt")]).unwrap();
        w.put(&bytes(&[1., 2., 3., 4.])).unwrap();
        w.put(&bytes(&[5., 6., 7., 8.])).unwrap();
        assert!(w.put(&bytes(&[1.])).is_err(), "wrong length refused");
        w.put(&bytes(&[9.; 8])).unwrap();
        let files = w.finish().unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        let f = TensorFile::open(d.path()).unwrap();
        assert_eq!(f.f32("b").unwrap().0, [5., 6., 7., 8.]);
        assert_eq!(f.f32("c").unwrap().0, [9.; 8]);
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&files[2]).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 64);
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00002.safetensors");

        // A single-file save into the same directory removes the earlier shards and index
        // (the index would be read in preference to the new file).
        let mut w = Writer::create(d.path(), "model", vec![entry("a", 1)], 1 << 20, &[]).unwrap();
        w.put(&bytes(&[42.])).unwrap();
        w.finish().unwrap();
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["model.safetensors"]);
        assert_eq!(
            TensorFile::open(d.path()).unwrap().f32("a").unwrap().0,
            [42.]
        );
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::create(
            d.path(),
            "x",
            vec![entry("a", 2), entry("b", 2)],
            1 << 20,
            &[],
        )
        .unwrap();
        w.put(&bytes(&[1., 2.])).unwrap();
        assert!(w.finish().is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
