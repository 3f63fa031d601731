//! `pali tokenizer train|add`: a small Gemma-style tokenizer for the synthetic corpus; extra
//! tokens appended to any tokenizer (e.g. PaliGemma 2's `<noise>`).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train BPE (byte fallback) on the synthetic corpus and add `<image>`, loc and seg tokens.
    Train {
        #[arg(long)]
        out: PathBuf,
        /// BPE vocabulary (specials and the 256 byte pieces included).
        #[arg(long, default_value_t = 600)]
        vocab_size: usize,
        /// Synthetic examples per task in the corpus.
        #[arg(long, default_value_t = 2000)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Append tokens to a tokenizer (after every existing id, so no id moves), e.g. `<noise>`.
    Add {
        tokenizer: PathBuf,
        /// Tokens, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Add {
            tokenizer,
            tokens,
            out,
        } => {
            let before = pali_data::PaliTokenizer::from_file(&tokenizer)?.vocab_size();
            pali_data::tokenizer_train::add_tokens(&tokenizer, &tokens, &out)?;
            let p = pali_data::PaliTokenizer::from_file(&out)?;
            for s in &tokens {
                println!("{s} = {}", p.token_id(s).expect("added"));
            }
            println!(
                "wrote {} ({} → {} tokens)",
                out.display(),
                before,
                p.vocab_size()
            );
            Ok(())
        }
        TokenizerCommand::Train {
            out,
            vocab_size,
            n,
            seed,
        } => {
            let corpus = pali_data::tokenizer_train::synth_corpus(n, seed)?;
            pali_data::tokenizer_train::train(&corpus, vocab_size, &out)?;
            let t = pali_data::PaliTokenizer::from_file(&out)?;
            println!(
                "wrote {} ({} tokens, from {} texts)",
                out.display(),
                t.vocab_size(),
                corpus.len()
            );
            Ok(())
        }
    }
}
