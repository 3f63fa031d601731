//! Turning a trained checkpoint into predictions and scores that agree with the reference
//! evaluators: decoding (greedy, beam, temperature, nucleus, best-of-n), parsing of detection and
//! segmentation outputs, and the paper's task metrics (CIDEr-D and BLEU as pycocoevalcap,
//! VQAv2 accuracy, ANLS, relaxed accuracy, RefCOCO mIoU, COCO mAP as pycocotools, perplexity).

pub mod caption;
pub mod decode;
pub mod detection;
pub mod error;
pub mod perplexity;
pub mod ptb;
pub mod run;
pub mod score;
pub mod segmentation;
pub mod vqa;

pub use decode::{
    decode, greedy_with_logits, DecodeOptions, Decoded, PaddedPrompts, Prompts, Sampler, StepLogits,
};
pub use error::{Error, Result};
pub use score::{score, score_files, Prediction, Reference, Task};
