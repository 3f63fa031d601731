//! The eval crate's tests in one binary: metrics against the reference Python packages, and
//! decoding on a tiny random model.

mod decode;
mod reference;
