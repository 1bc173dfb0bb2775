//! dgemma-tokenizer: tokenizer, chat template and prompt construction for DiffusionGemma.
//!
//! * [`Tokenizer`] wraps a HF `tokenizer.json` (Gemma 4: SentencePiece-style BPE with byte
//!   fallback). [`Tokenizer::encode`] never adds special tokens; special-token strings that
//!   appear in the text (`<|turn>`, `<bos>`, ...) map to their ids.
//! * [`ChatTemplate`] renders the checkpoint's Jinja chat template (`chat_template.jinja`, or the
//!   `chat_template` field of `tokenizer_config.json`) with minijinja, passing the same variables as
//!   HF `apply_chat_template`.
//! * [`chat_prompt_ids`] / [`raw_prompt_ids`] build prompt ids with exactly one leading `<bos>`.
//!   Gemma's `tokenizer.json` has a post-processor that prepends `<bos>` and the Gemma 4 template
//!   also emits `<bos>`; this crate always encodes with `add_special_tokens = false` and then
//!   normalises the start of the prompt to a single `<bos>`.
//! * [`StreamDecoder`] turns a growing id sequence (e.g. each committed canvas) into text,
//!   emitting only complete text; the concatenation of its output equals a one-shot
//!   [`Tokenizer::decode`] of all ids.

mod chat;
mod error;
mod prompt;
mod stream;
mod tokenizer;

pub use chat::{ChatOptions, ChatTemplate, Message};
pub use error::{Error, Result, TokenizerError};
pub use prompt::{chat_prompt_ids, raw_prompt_ids};
pub use stream::StreamDecoder;
pub use tokenizer::{SpecialTokens, Tokenizer};

/// File names inside a checkpoint / tokenizer directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// See [`TOKENIZER_FILE`].
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// See [`TOKENIZER_FILE`].
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
