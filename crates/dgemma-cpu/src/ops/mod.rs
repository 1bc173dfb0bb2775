//! The model's operators, each with the float32 / bf16 rounding of transformers' run.
//!
//! Activations are row-major `f32` slices (`[tokens, features]`). Weights come through
//! [`linear::Matrix`], which widens any stored dtype to `f32` one row at a time, so a
//! memory-mapped checkpoint is never copied whole.

pub mod activation;
pub mod attention;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod topk;

#[cfg(test)]
pub(crate) mod test_values;
