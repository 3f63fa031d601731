//! Shards against the JSONL path: the same batches, bit for bit, from the same seed; a resumed
//! stream continues mid-shard exactly; a corrupt row is skipped with `skip` and named with
//! `fail`; multi-image rows keep their images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pali_data::batch::{next_batch, Batch, BatchBuilder};
use pali_data::dataset::{write_synth, Dataset, JsonlDataset, OnError};
use pali_data::mixture::Mixture;
use pali_data::shards::{pack_jsonl, PackOptions, ShardDataset};

fn builder(frames: usize) -> BatchBuilder {
    let tok = pali_data::PaliTokenizer::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer/tokenizer.json"),
    )
    .unwrap();
    BatchBuilder {
        tokenizer: Arc::new(tok),
        seq: pali_data::SequenceBuilder::new(24),
        resolution: 16,
        resize: pali_data::image::ResizeMethod::Bicubic,
        frames,
        transforms: Default::default(),
    }
}

/// Pixels (as bits), text, loss and attention masks, sources and ids of a batch.
type View<'a> = (
    Vec<u32>,
    &'a [i64],
    &'a [i64],
    &'a [i64],
    &'a [usize],
    &'a [String],
);

/// The batch as the model sees it, and where each row came from.
fn model_view(b: &Batch) -> View<'_> {
    (
        b.pixel_values.iter().map(|x| x.to_bits()).collect(),
        &b.text,
        &b.mask_loss,
        &b.mask_ar,
        &b.sources,
        &b.ids,
    )
}

/// Three synthetic tasks as JSONL, and each packed into its own shard directory of small shards.
fn world(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let files: Vec<PathBuf> = write_synth(&dir.join("synth"), 40, 24, 7, 0).unwrap()[..3].to_vec();
    let opts = PackOptions {
        shard_bytes: 2 << 10,
        ..Default::default()
    };
    let shards = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let out = dir.join(format!("shards-{i}"));
            let index = pack_jsonl(std::slice::from_ref(f), &out, &opts, &|_| {}).unwrap();
            assert!(index.shards.len() >= 3, "{} shards", index.shards.len());
            out
        })
        .collect();
    (files, shards)
}

#[test]
fn shard_batches_equal_jsonl_batches_and_resume_mid_shard() {
    let t = tempfile::tempdir().unwrap();
    let (files, shards) = world(t.path());
    let jsonl: Vec<Arc<dyn Dataset>> = files
        .iter()
        .map(|f| Arc::new(JsonlDataset::open(f, OnError::Fail, false).unwrap()) as _)
        .collect();
    let sharded: Vec<Arc<dyn Dataset>> = shards
        .iter()
        .map(|d| Arc::new(ShardDataset::open(d).unwrap()) as _)
        .collect();
    let weights = [3.0, 1.0, 2.0];
    let b = builder(1);
    let mut a = Mixture::new(jsonl, &weights, 11).unwrap();
    let mut s = Mixture::new(sharded.clone(), &weights, 11).unwrap();
    // 12 batches of 8 = 96 draws: past an epoch of the first source (40 rows).
    let mut saved = None;
    let mut rest = Vec::new();
    for k in 0..12 {
        let (x, y) = (
            next_batch(&mut a, &b, 8, OnError::Fail).unwrap(),
            next_batch(&mut s, &b, 8, OnError::Fail).unwrap(),
        );
        assert_eq!(model_view(&x), model_view(&y), "batch {k}");
        assert_eq!(x.state_after, y.state_after);
        if k == 4 {
            saved = y.state_after.clone();
        } else if k > 4 {
            rest.push(y);
        }
    }
    assert!(s.state.sources[0].epoch >= 1, "{:?}", s.state.sources[0]);
    // A fresh process over the same shards, resumed from batch 4's state.
    let mut r = Mixture::new(sharded, &weights, 11).unwrap();
    r.restore(saved.unwrap()).unwrap();
    for (k, want) in rest.iter().enumerate() {
        let got = next_batch(&mut r, &b, 8, OnError::Fail).unwrap();
        assert_eq!(model_view(&got), model_view(want), "resumed batch {k}");
    }
}

#[test]
fn a_corrupt_row_is_skipped_or_named() {
    let t = tempfile::tempdir().unwrap();
    let (_, shards) = world(t.path());
    let ds = ShardDataset::open(&shards[0]).unwrap();
    let shard = ds.shard_path(1);
    let c = rusqlite::Connection::open(&shard).unwrap();
    c.execute("update train set item = x'00' where row_id = 2", [])
        .unwrap();
    drop(c);
    let ds: Arc<dyn Dataset> = Arc::new(ShardDataset::open(&shards[0]).unwrap());
    let b = builder(1);
    let mut m = Mixture::new(vec![ds.clone()], &[1.0], 0).unwrap();
    let mut skipped = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let batch = next_batch(&mut m, &b, 8, OnError::Skip).unwrap();
        rows += batch.batch_size;
        skipped.extend(batch.skipped);
    }
    assert_eq!(rows, 40);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].contains("shard-00001.db:row 2"), "{skipped:?}");
    let mut m = Mixture::new(vec![ds], &[1.0], 0).unwrap();
    let e = (0..5)
        .map(|_| next_batch(&mut m, &b, 8, OnError::Fail))
        .find_map(|r| r.err())
        .expect("the corrupt row is drawn in the first epoch")
        .to_string();
    assert!(e.contains("shard-00001.db:row 2: not a pali row"), "{e}");
}

#[test]
fn multi_image_rows_keep_their_images() {
    let t = tempfile::tempdir().unwrap();
    let files = write_synth(&t.path().join("synth"), 3, 16, 1, 0).unwrap();
    let dir = files[0].parent().unwrap();
    let p = dir.join("pairs.jsonl");
    std::fs::write(
        &p,
        concat!(
            r#"{"image": ["images/000000.png", "images/000001.png"], "prefix": "answer en same?", "suffix": "no"}"#,
            "\n",
            r#"{"image": ["images/000002.png", "images/000002.png"], "prefix": "answer en same?", "suffix": "yes"}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = t.path().join("pairs");
    pack_jsonl(
        std::slice::from_ref(&p),
        &out,
        &PackOptions::default(),
        &|_| {},
    )
    .unwrap();
    let j: Arc<dyn Dataset> = Arc::new(JsonlDataset::open(&p, OnError::Fail, false).unwrap());
    let s: Arc<dyn Dataset> = Arc::new(ShardDataset::open(&out).unwrap());
    assert_eq!(s.get(0).unwrap().images.len(), 2);
    let b = builder(2);
    let x = next_batch(
        &mut Mixture::new(vec![j], &[1.0], 3).unwrap(),
        &b,
        2,
        OnError::Fail,
    )
    .unwrap();
    let y = next_batch(
        &mut Mixture::new(vec![s], &[1.0], 3).unwrap(),
        &b,
        2,
        OnError::Fail,
    )
    .unwrap();
    assert_eq!(y.frames, 2);
    assert_eq!(y.pixel_values.len(), 2 * 2 * 3 * 16 * 16);
    assert_eq!(model_view(&x), model_view(&y));
}

/// Data-parallel ranks over shards: each rank reads its own rows of every batch (a disjoint
/// share), and together they are the one-process batch.
#[test]
fn ranks_read_disjoint_shares_of_shard_batches() {
    use pali_data::batch::{next_share, Share};
    let t = tempfile::tempdir().unwrap();
    let (_, shards) = world(t.path());
    let ds: Arc<dyn Dataset> = Arc::new(ShardDataset::open(&shards[0]).unwrap());
    let b = builder(1);
    let mut one = Mixture::new(vec![ds.clone()], &[1.0], 5).unwrap();
    let mut ranks: Vec<Mixture> = (0..3)
        .map(|_| Mixture::new(vec![ds.clone()], &[1.0], 5).unwrap())
        .collect();
    for k in 0..4 {
        let whole = next_batch(&mut one, &b, 6, OnError::Fail).unwrap();
        let mut ids = Vec::new();
        let mut px = Vec::new();
        for (rank, m) in ranks.iter_mut().enumerate() {
            let share = Share { rank, ranks: 3 };
            let part = next_share(m, &b, 6, OnError::Fail, share).unwrap();
            assert_eq!(part.batch_size, 2);
            assert_eq!(part.state_after, whole.state_after, "batch {k}");
            ids.extend(part.ids);
            px.extend(part.pixel_values);
        }
        assert_eq!(ids, whole.ids, "batch {k}");
        assert_eq!(px, whole.pixel_values);
    }
}
