//! Training a small Gemma-style tokenizer for a corpus (the synthetic world's by default):
//! BPE with byte fallback, `" " → "▁"` normalisation, the Gemma special ids (pad 0, eos 1,
//! bos 2, unk 3), the 256 byte pieces, then `<image>` and the 1024 `<locNNNN>` + 128 `<segNNN>`
//! tokens as added tokens — the layout of the HF fixtures' tokenizer.

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::{NormalizerWrapper, Replace};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerImpl};

use crate::error::{Error, Result};
use crate::tokenizer::{NUM_LOC, NUM_SEG};

type Impl = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Trains on `corpus` and writes `tokenizer.json` to `out`. `vocab_size` counts the BPE part
/// (specials and byte pieces included), before `<image>`, loc and seg tokens are appended.
pub fn train(corpus: &[String], vocab_size: usize, out: &Path) -> Result<()> {
    let e = |m: String| Error::Tokenizer {
        path: out.to_path_buf(),
        msg: m,
    };
    let model = BPE::builder()
        .byte_fallback(true)
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .build()
        .map_err(|x| e(x.to_string()))?;
    let mut tk: Impl = TokenizerImpl::new(ModelWrapper::BPE(model));
    tk.with_normalizer(Some(NormalizerWrapper::Replace(
        Replace::new(" ", "▁").map_err(|x| e(x.to_string()))?,
    )));
    let decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(|x| e(x.to_string()))?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    tk.with_decoder(Some(DecoderWrapper::Sequence(Sequence::new(decoders))));
    let mut specials: Vec<AddedToken> = ["<pad>", "<eos>", "<bos>", "<unk>"]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    specials.extend((0..=255u8).map(|b| AddedToken::from(format!("<0x{b:02X}>"), true)));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(specials)
            .build(),
    );
    tk.train(&mut trainer, corpus.iter())
        .map_err(|x| e(x.to_string()))?;
    tk.add_special_tokens(&[AddedToken::from("<image>", true)]);
    let extra: Vec<AddedToken> = (0..NUM_LOC)
        .map(|i| format!("<loc{i:04}>"))
        .chain((0..NUM_SEG).map(|i| format!("<seg{i:03}>")))
        .map(|t| AddedToken::from(t, false))
        .collect();
    tk.add_tokens(&extra);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    tk.save(out, true).map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// Every prefix and suffix of `n` synthetic examples of every task.
pub fn synth_corpus(n: usize, seed: u64) -> Result<Vec<String>> {
    use crate::dataset::{Dataset, SynthDataset, SynthTask};
    // The prefix/suffix separator, so that it is one piece.
    let mut out = vec!["\n".to_string()];
    for task in SynthTask::ALL {
        for tp in [true, false] {
            let ds = SynthDataset::new(task, seed, 0, n, tp);
            for i in 0..n {
                let ex = ds.get(i)?;
                out.push(ex.prefix);
                out.push(ex.suffix);
            }
        }
    }
    Ok(out)
}

/// Appends `tokens` (those it lacks) to the tokenizer at `input` as special tokens, after every
/// existing id, and writes it to `out`.
pub fn add_tokens(input: &Path, tokens: &[String], out: &Path) -> Result<()> {
    let err = |p: &Path, e: String| Error::Tokenizer {
        path: p.to_path_buf(),
        msg: e,
    };
    let mut t = tokenizers::Tokenizer::from_file(input).map_err(|e| err(input, e.to_string()))?;
    let new: Vec<AddedToken> = tokens
        .iter()
        .filter(|s| t.token_to_id(s).is_none())
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    t.add_special_tokens(&new);
    t.save(out, true).map_err(|e| err(out, e.to_string()))
}
