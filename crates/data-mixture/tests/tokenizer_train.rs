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
