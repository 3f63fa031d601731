//! Bad JSONL input: every case gives `file:line` and the field; `on_error = skip` counts instead.

use std::path::Path;

use pali_data::dataset::{write_synth, Dataset, JsonlDataset, OnError};

fn setup(dir: &Path, lines: &[&str]) -> std::path::PathBuf {
    write_synth(&dir.join("d"), 2, 16, 0, 0).unwrap();
    std::fs::write(dir.join("d/images/broken.png"), b"not a png").unwrap();
    let p = dir.join("d/train.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

#[test]
fn each_bad_line_is_named() {
    let d = tempfile::tempdir().unwrap();
    let good = r#"{"image": "images/000000.png", "prefix": "caption en", "suffix": "a cat"}"#;
    let cases = [
        (
            r#"{"image": "images/000000.png", "prefix": "caption en""#,
            "malformed JSON",
        ),
        (
            r#"{"image": "images/000000.png", "suffix": "x"}"#,
            "missing field `prefix`",
        ),
        (
            r#"{"image": "images/000000.png", "prefix": 3, "suffix": "x"}"#,
            "field `prefix`: expected a string",
        ),
        (
            r#"{"image": 7, "prefix": "p", "suffix": "x"}"#,
            "field `image`",
        ),
        (
            r#"{"image": "images/nope.png", "prefix": "p", "suffix": "x"}"#,
            "file not found",
        ),
        (
            r#"{"image": "images/broken.png", "prefix": "p", "suffix": "x"}"#,
            "cannot decode",
        ),
        (r#"[1, 2]"#, "expected a JSON object"),
        (r#"{"text": 5}"#, "field `text`: expected a string"),
        (
            r#"{"text": "a", "suffix": "b"}"#,
            "field `suffix`: a text-only row",
        ),
        (r#"{"text": "a <eos> b"}"#, "field `text`: contains `<eos>`"),
    ];
    for (bad, want) in cases {
        let p = setup(d.path(), &[good, bad]);
        let e = JsonlDataset::open(&p, OnError::Fail, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{}:2:", p.display())) && e.contains(want),
            "{bad}: {e}"
        );
        let ok = JsonlDataset::open(&p, OnError::Skip, true).unwrap();
        assert_eq!((ok.len(), ok.skipped.len()), (1, 1), "{bad}");
    }
}

/// Stage-0 language-model data: `{"text": ...}` rows have no image and the text as suffix.
#[test]
fn text_only_rows_read_as_suffixes() {
    let d = tempfile::tempdir().unwrap();
    let p = setup(
        d.path(),
        &[r#"{"text": "one two"}"#, r#"{"text": "three", "id": 7}"#],
    );
    let ds = JsonlDataset::open(&p, OnError::Fail, true).unwrap();
    let a = ds.get(0).unwrap();
    assert!(a.images.is_empty());
    assert_eq!((a.prefix.as_str(), a.suffix.as_str()), ("", "one two"));
    assert_eq!(ds.get(1).unwrap().id, "7");
}

#[test]
fn synthetic_export_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let files = write_synth(d.path(), 3, 32, 1, 0).unwrap();
    assert_eq!(files.len(), 6);
    for f in files {
        let ds = JsonlDataset::open(&f, OnError::Fail, true).unwrap();
        assert_eq!(ds.len(), 3);
        let ex = ds.get(2).unwrap();
        assert!(!ex.prefix.is_empty(), "{}", f.display());
    }
}

/// An image that turns out unreadable while batching: `skip` replaces it by the next example and
/// reports it; `fail` stops with the file named.
#[test]
fn loader_skips_or_fails_on_unreadable_images() {
    use pali_data::batch::{next_batch, BatchBuilder};
    use pali_data::mixture::Mixture;
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let good = r#"{"image": "images/000000.png", "prefix": "caption en", "suffix": "a cat"}"#;
    let bad = r#"{"image": "images/broken.png", "prefix": "caption en", "suffix": "a dog"}"#;
    let p = setup(d.path(), &[good, bad, good, good]);
    let ds: Arc<dyn Dataset> = Arc::new(JsonlDataset::open(&p, OnError::Fail, false).unwrap());
    let tok = Arc::new(
        pali_data::PaliTokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer/tokenizer.json"),
        )
        .unwrap(),
    );
    let builder = BatchBuilder {
        tokenizer: tok,
        seq: pali_data::SequenceBuilder::new(16),
        resolution: 16,
        resize: pali_data::image::ResizeMethod::Bicubic,
        frames: 1,
        transforms: Default::default(),
    };
    let mut mix = Mixture::new(vec![ds.clone()], &[1.0], 0).unwrap();
    let b = next_batch(&mut mix, &builder, 6, OnError::Skip).unwrap();
    assert_eq!(b.batch_size, 6);
    assert_eq!(b.pixel_values.len(), 6 * 3 * 16 * 16);
    assert!(
        !b.skipped.is_empty()
            && b.skipped
                .iter()
                .all(|s| s.contains("train.jsonl:2") && s.contains("cannot decode")),
        "{:?}",
        b.skipped
    );
    assert!(b.ids.iter().all(|id| !id.ends_with(":2")));
    let mut mix = Mixture::new(vec![ds], &[1.0], 0).unwrap();
    let e = next_batch(&mut mix, &builder, 6, OnError::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.jsonl:2") && e.contains("broken.png"),
        "{e}"
    );
}

/// Data-parallel shares: rank r's batch is rows r·B/n.. of the one-process batch (with `skip`
/// too, where an unreadable example shifts every later row), and every rank's mixture state
/// after the batch is the one-process state.
#[test]
fn shares_of_a_batch_are_its_rows() {
    use pali_data::batch::{next_batch, next_share, BatchBuilder, Share};
    use pali_data::mixture::Mixture;
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let good = r#"{"image": "images/000000.png", "prefix": "caption en", "suffix": "a cat"}"#;
    let other = r#"{"image": "images/000000.png", "prefix": "caption en", "suffix": "a bird"}"#;
    let bad = r#"{"image": "images/broken.png", "prefix": "caption en", "suffix": "a dog"}"#;
    let tok = Arc::new(
        pali_data::PaliTokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer/tokenizer.json"),
        )
        .unwrap(),
    );
    let builder = BatchBuilder {
        tokenizer: tok,
        seq: pali_data::SequenceBuilder::new(16),
        resolution: 16,
        resize: pali_data::image::ResizeMethod::Bicubic,
        frames: 1,
        transforms: Default::default(),
    };
    for (on_error, lines) in [
        (OnError::Fail, vec![good, other, good, other, other]),
        (OnError::Skip, vec![good, bad, other, good, bad, other]),
    ] {
        let p = setup(d.path(), &lines);
        let ds: Arc<dyn Dataset> = Arc::new(JsonlDataset::open(&p, OnError::Fail, false).unwrap());
        let mix = || Mixture::new(vec![ds.clone()], &[1.0], 0).unwrap();
        let mut one = mix();
        let (whole, next) = (
            next_batch(&mut one, &builder, 6, on_error).unwrap(),
            next_batch(&mut one, &builder, 6, on_error).unwrap(),
        );
        for ranks in [2, 3] {
            let t1 = whole.seq_len;
            let (mut text, mut ids, mut text2) = (Vec::new(), Vec::new(), Vec::new());
            for rank in 0..ranks {
                let mut m = mix();
                let share = Share { rank, ranks };
                let b = next_share(&mut m, &builder, 6, on_error, share).unwrap();
                assert_eq!(b.batch_size, 6 / ranks);
                assert_eq!(b.state_after, whole.state_after, "{on_error:?} {ranks}");
                assert_eq!(b.skipped, whole.skipped);
                let px = 3 * 16 * 16;
                let rows = share.rows(6);
                assert_eq!(
                    b.pixel_values,
                    whole.pixel_values[rows.start * px..rows.end * px]
                );
                text.extend(b.text);
                ids.extend(b.ids);
                text2.extend(
                    next_share(&mut m, &builder, 6, on_error, share)
                        .unwrap()
                        .text,
                );
            }
            assert_eq!(text, whole.text, "{on_error:?} over {ranks} ranks");
            assert_eq!(ids, whole.ids);
            assert_eq!(text2, next.text, "the second batch");
            assert_eq!(text.len(), 6 * t1);
        }
    }
}
