pub mod bench;
pub mod forward;
pub mod generate;
pub mod inputs;
pub mod model;
pub mod train;
