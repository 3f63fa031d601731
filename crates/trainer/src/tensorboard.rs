//! TensorBoard event files (`events.out.tfevents.*`), which TensorBoard, W&B, Aim and the HF Hub
//! read: TFRecord framing (length, masked CRC-32C of the length, data, masked CRC-32C of the
//! data) around `tensorflow.Event` protobufs holding scalar summaries.
//!
//! Written by hand: the format is two small messages and a checksum, and the crates that write
//! it pull in a protobuf stack or are unmaintained. `tests/fixtures/tensorboard/` holds events
//! encoded by tensorboard's own `event_pb2` and `RecordWriter` (scripts/tensorboard_reference.py);
//! the writer's bytes must equal them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An open event file; every event is flushed as it is written, so a killed run loses none.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, named as TensorBoard's writers name theirs (one per process
    /// start, so a resumed run adds a file instead of rewriting one), starting with the
    /// `file_version` event. TensorBoard reads a directory's files in name order: the name's
    /// timestamp is later than those of the `earlier` files ([`event_files`]), even when they
    /// were written within the same second.
    pub fn create(dir: &Path, wall_time: f64, earlier: &[PathBuf]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let newest = earlier.iter().filter_map(|p| stamp(p)).max();
        let secs = newest.map_or(wall_time as u64, |n| (wall_time as u64).max(n + 1));
        let name = format!(
            "events.out.tfevents.{secs:010}.{}.{}.0",
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        w.write(&file_version(wall_time))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars at `step`.
    pub fn scalars(
        &mut self,
        wall_time: f64,
        step: i64,
        values: &[(String, f32)],
    ) -> std::io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&scalar_event(wall_time, step, values))
    }

    /// A restart at `step` (SessionLog START): TensorBoard drops the events of earlier files
    /// past this step, which a resumed run writes again.
    pub fn restart(&mut self, wall_time: f64, step: i64) -> std::io::Result<()> {
        self.write(&session_start(wall_time, step))
    }

    fn write(&mut self, event: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&record(event))?;
        self.file.flush()
    }
}

/// The event files in `dir` (none when it does not exist), in the order TensorBoard reads them.
pub fn event_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let p = e?.path();
                if stamp(&p).is_some() {
                    v.push(p);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    v.sort();
    Ok(v)
}

/// The timestamp in an event file's name.
fn stamp(p: &Path) -> Option<u64> {
    let name = p.file_name()?.to_str()?;
    name.strip_prefix("events.out.tfevents.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// This machine's name (file-name safe), `localhost` when unknown.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "localhost".into())
}

/// The numeric leaves of a metrics.jsonl line as `(tag, value)`, nested keys joined by `/`
/// (`lr/<group>`, `eval/cider`, `val_perplexity/<source>`); its `step` and `stage_step` are not
/// scalars to plot, and lists are skipped.
pub fn scalars_of(line: &serde_json::Value) -> Vec<(String, f32)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f32)>) {
        match v {
            serde_json::Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    out.push((prefix.to_string(), x as f32));
                }
            }
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let tag = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    walk(&tag, x, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let serde_json::Value::Object(m) = line {
        for (k, v) in m {
            if k != "step" && k != "stage_step" {
                walk(k, v, &mut out);
            }
        }
    }
    out
}

/// One event read back by [`read`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    FileVersion(String),
    Scalars(Vec<(String, f32)>),
    /// A SessionLog START: a (resumed) run continues from this step.
    Restart,
}

/// The events of a file as (wall time, step, event), every record's checksums verified; the
/// kinds this writer emits only (for tests and tools; TensorBoard itself reads any).
pub fn read(path: &Path) -> std::io::Result<Vec<(f64, i64, Event)>> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let head = data
            .get(at..at + 12)
            .ok_or_else(|| bad("truncated record"))?;
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if crc != masked_crc(&head[..8]) {
            return Err(bad("length checksum"));
        }
        let body = data
            .get(at + 12..at + 12 + n + 4)
            .ok_or_else(|| bad("truncated record"))?;
        let (event, crc) = body.split_at(n);
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(event) {
            return Err(bad("data checksum"));
        }
        out.push(parse_event(event).ok_or_else(|| bad("not an event this writer makes"))?);
        at += 12 + n + 4;
    }
    Ok(out)
}

/// The fields of a protobuf message as (number, varint or fixed value, length-delimited bytes).
fn fields(mut b: &[u8]) -> Option<Vec<(u64, u64, &[u8])>> {
    fn uvarint(b: &mut &[u8]) -> Option<u64> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            x |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(x);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = uvarint(&mut b)?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((number, uvarint(&mut b)?, &b[..0])),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let (v, rest) = (b.get(..n)?, &b[n..]);
                let mut x = [0u8; 8];
                x[..n].copy_from_slice(v);
                out.push((number, u64::from_le_bytes(x), &b[..0]));
                b = rest;
            }
            2 => {
                let n = uvarint(&mut b)? as usize;
                out.push((number, 0, b.get(..n)?));
                b = &b[n..];
            }
            _ => return None,
        }
    }
    Some(out)
}

fn parse_event(b: &[u8]) -> Option<(f64, i64, Event)> {
    let (mut wall, mut step, mut event) = (0.0, 0, None);
    for (number, x, bytes) in fields(b)? {
        match number {
            1 => wall = f64::from_bits(x),
            2 => step = x as i64,
            3 => event = Some(Event::FileVersion(String::from_utf8(bytes.to_vec()).ok()?)),
            5 => {
                let mut values = Vec::new();
                for (_, _, v) in fields(bytes)? {
                    let (mut tag, mut value) = (String::new(), None);
                    for (n, x, t) in fields(v)? {
                        match n {
                            1 => tag = String::from_utf8(t.to_vec()).ok()?,
                            2 => value = Some(f32::from_bits(x as u32)),
                            _ => {}
                        }
                    }
                    values.push((tag, value?));
                }
                event = Some(Event::Scalars(values));
            }
            7 => event = Some(Event::Restart),
            _ => {}
        }
    }
    Some((wall, step, event?))
}

// Protobuf wire format: a field's key is (number << 3) | wire type.
fn varint(mut x: u64, out: &mut Vec<u8>) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn bytes_field(number: u64, data: &[u8], out: &mut Vec<u8>) {
    varint(number << 3 | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event.wall_time` (1, double) and `Event.step` (2, int64; omitted when 0, as protobuf does).
fn event_head(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = vec![1 << 3 | 1];
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(2 << 3, &mut e);
        varint(step as u64, &mut e);
    }
    e
}

fn file_version(wall_time: f64) -> Vec<u8> {
    let mut e = event_head(wall_time, 0);
    bytes_field(3, b"brain.Event:2", &mut e);
    e
}

/// `Event.summary` (5): `Summary.value` (1) of `{tag (1), simple_value (2, float)}`.
fn scalar_event(wall_time: f64, step: i64, values: &[(String, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, x) in values {
        let mut v = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut v);
        v.push(2 << 3 | 5);
        v.extend_from_slice(&x.to_le_bytes());
        bytes_field(1, &v, &mut summary);
    }
    let mut e = event_head(wall_time, step);
    bytes_field(5, &summary, &mut e);
    e
}

/// `Event.session_log` (7): `SessionLog.status` (1) = START (1).
fn session_start(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = event_head(wall_time, step);
    bytes_field(7, &[1 << 3, 1], &mut e);
    e
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: event files are small.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// The bytes of events encoded by tensorboard's own protobufs and RecordWriter
    /// (scripts/tensorboard_reference.py): a file version, scalars at several steps (a negative
    /// value, step 0, tags with `/` and regex characters), a restart.
    #[test]
    fn events_equal_tensorboards_own_encoding() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tensorboard"
        );
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/events.json")).unwrap())
                .unwrap();
        let want = std::fs::read(format!("{dir}/reference.tfevents")).unwrap();
        let mut got = Vec::new();
        for e in spec["events"].as_array().unwrap() {
            let t = e["wall_time"].as_f64().unwrap();
            let step = e["step"].as_i64().unwrap_or(0);
            let event = match e["kind"].as_str().unwrap() {
                "file_version" => file_version(t),
                "start" => session_start(t, step),
                "scalars" => {
                    let values: Vec<(String, f32)> = e["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| {
                            (
                                v[0].as_str().unwrap().to_string(),
                                v[1].as_f64().unwrap() as f32,
                            )
                        })
                        .collect();
                    scalar_event(t, step, &values)
                }
                k => panic!("event kind {k}"),
            };
            got.extend(record(&event));
        }
        assert_eq!(got.len(), want.len(), "file length");
        assert!(got == want, "bytes differ from tensorboard's");
        // And `read` gives the events back.
        let tmp = std::env::temp_dir().join(format!("pali-tb-{}", std::process::id()));
        std::fs::write(&tmp, &want).unwrap();
        let back = read(&tmp).unwrap();
        std::fs::remove_file(&tmp).unwrap();
        assert_eq!(back.len(), spec["events"].as_array().unwrap().len());
        assert_eq!(back[0].2, Event::FileVersion("brain.Event:2".into()));
        assert_eq!(back[4], (1764700004.0, 300, Event::Restart));
        assert_eq!(
            back[5],
            (
                1764700005.0,
                123456789012,
                Event::Scalars(vec![("tokens_per_s".into(), 1234.5678)])
            )
        );
    }

    #[test]
    fn metrics_lines_flatten_to_scalars() {
        let line = serde_json::json!({"step": 7, "stage": "s1", "stage_step": 3, "loss": 1.5,
            "lr": {"img.*": 0.5}, "seen": [1, 2], "eval": {"cider": 0.25}});
        let mut s = scalars_of(&line);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        let tags: Vec<&str> = s.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["eval/cider", "loss", "lr/img.*"]);
    }
}
