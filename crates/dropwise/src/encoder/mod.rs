//! The structural and pruning methods on encoders (BERT-family sentence encoders, ViTs), written
//! once against [`crate::model::encoder::Encoder`]: Wanda, SparseGPT and magnitude pruning of the
//! blocks' linears (unstructured or N:M), removing attention heads and MLP neurons by their
//! measured contribution, and dropping whole blocks by Block Influence. One calibration module
//! ([`calibrate`]) gathers what each of them needs in one pass of hooks.
//!
//! These reuse the decoder methods' arithmetic (the Wanda score and mask selection, the
//! SparseGPT solver, [`crate::calibrate::InputStats`]); the models are small enough that every
//! statistic of every block fits in memory at once.

pub mod calibrate;
pub mod depth;
pub mod prune;
pub mod surgery;
pub mod width;
