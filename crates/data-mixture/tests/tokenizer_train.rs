//! A tokenizer trained on the synthetic corpus has the PaliGemma layout and round-trips text.

use pali_data::tokenizer_train::{synth_corpus, train};
use pali_data::PaliTokenizer;

#[test]
fn trained_tokenizer_has_the_paligemma_layout() {
    let d = tempfile::tempdir().unwrap();
    let corpus = synth_corpus(200, 0).unwrap();
    let path = d.path().join("tokenizer.json");
    train(&corpus, 600, &path).unwrap();
    let t = PaliTokenizer::from_file(&path).unwrap();
    assert_eq!((t.pad, t.eos, t.bos), (0, 1, 2));
    assert_eq!(t.loc[1] - t.loc[0], 1);
    assert_eq!(t.seg[0], t.loc[1023] + 1);
    assert_eq!(t.vocab_size(), t.seg[127] as usize + 1);
    for s in corpus
        .iter()
        .take(300)
        .chain(["unseen wörds ünïcode 123 <loc0007> café".to_string()].iter())
    {
        let ids = t.encode(s).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), *s, "round trip of {s:?}");
    }
    // Trained on the corpus, common words are single pieces.
    let caption = t.encode("a red circle and a blue square").unwrap();
    assert!(caption.len() <= 10, "{} tokens", caption.len());
}

/// PaliGemma 2 noise boxes: `pali tokenizer add` appends `<noise>` without moving an id; a
/// detection target padded with noise boxes has no loss on their coordinates but keeps it on
/// `<noise>` and on the real boxes.
#[test]
fn noise_boxes_get_no_coordinate_loss() {
    use pali_data::rng::Rng;
    use pali_data::tasks::detect_with_noise;
    let d = tempfile::tempdir().unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/tokenizer/tokenizer.json");
    let out = d.path().join("tok.json");
    pali_data::tokenizer_train::add_tokens(&shipped, &["<noise>".to_string()], &out).unwrap();
    let old = pali_data::PaliTokenizer::from_file(&shipped).unwrap();
    let tok = pali_data::PaliTokenizer::from_file(&out).unwrap();
    assert_eq!(old.noise, None);
    assert_eq!(tok.noise, Some(old.vocab_size() as u32));
    assert_eq!((tok.loc.clone(), tok.image), (old.loc.clone(), old.image));

    let (p, s) = detect_with_noise(
        &["circle", "square"],
        &[("circle", [0.1, 0.2, 0.3, 0.4]), ("triangle", [0.5; 4])],
        3,
        true,
        &mut Rng::new(0),
    );
    assert_eq!(p, "detect circle ; square");
    let parts: Vec<&str> = s.split(" ; ").collect();
    assert_eq!(parts.len(), 3, "{s}");
    assert_eq!(parts[0], "<loc0102><loc0205><loc0307><loc0409> circle");
    assert!(parts[1..].iter().all(|x| x.ends_with(" <noise>")), "{s}");

    let ex = pali_data::SequenceBuilder::new(64)
        .train(&tok, &p, &s)
        .unwrap();
    let noise = tok.noise.unwrap();
    let is_loc = |t: u32| tok.loc.contains(&t);
    let suffix = ex.prefix_len..ex.prefix_len + ex.suffix_len;
    let (mut gt_locs, mut noise_locs, mut noise_tokens) = (0, 0, 0);
    for i in suffix {
        let (t, m) = (ex.ids[i], ex.mask_loss[i]);
        if t == noise {
            assert_eq!(m, 1);
            noise_tokens += 1;
        } else if is_loc(t) {
            // The first four locations are the circle's; the rest belong to noise boxes.
            if gt_locs < 4 {
                assert_eq!(m, 1);
                gt_locs += 1;
            } else {
                assert_eq!(m, 0, "noise coordinate at {i} has loss");
                noise_locs += 1;
            }
        } else {
            assert_eq!(m, 1);
        }
    }
    assert_eq!((gt_locs, noise_locs, noise_tokens), (4, 8, 2));
}
