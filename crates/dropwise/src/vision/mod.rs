//! Image classification: the IDX image sets (MNIST's format, Fashion-MNIST), training a vision
//! transformer on them, and measuring one (accuracy, throughput, token reduction).

pub mod forget;
pub mod idx;
pub mod train;
pub mod vit_eval;
