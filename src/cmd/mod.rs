pub mod bench;
pub mod data;
pub mod forward;
pub mod generate;
pub mod inputs;
pub mod model;
pub mod tokenizer;
pub mod train;
