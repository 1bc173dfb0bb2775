use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// Ids of the special tokens named in `tokenizer_config.json` (Gemma defaults when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: String,
    pub eos_token: String,
    pub pad_token: String,
    pub unk_token: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
}

/// A loaded `tokenizer.json` plus the bookkeeping the rest of the crate needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    vocab_size: usize,
    /// True when some id below `vocab_size` has no token.
    has_holes: bool,
    /// Added tokens flagged `special` (dropped by `decode(.., skip_special_tokens = true)`).
    special_ids: HashSet<u32>,
    /// Ids whose piece is a byte-fallback piece `<0xNN>` (what the ByteFallback decoder fuses).
    byte_ids: HashSet<u32>,
    specials: SpecialTokens,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("specials", &self.specials)
            .finish_non_exhaustive()
    }
}

/// `"<bos>"` or `{"content": "<bos>", ...}` (both appear in HF tokenizer configs).
fn token_field(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::read(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::malformed(path, e))
}

/// Same test as the `tokenizers` ByteFallback decoder.
fn is_byte_piece(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && u8::from_str_radix(&token[3..5], 16).is_ok()
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, and the special-token names from `dir/tokenizer_config.json`
    /// when that file exists.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join(TOKENIZER_FILE))?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        if let Some(config) = read_json(&config_path)? {
            if !config.is_object() {
                return Err(Error::malformed(&config_path, "expected a JSON object"));
            }
            let s = &mut tok.specials;
            for (key, slot) in [
                ("bos_token", &mut s.bos_token),
                ("eos_token", &mut s.eos_token),
                ("pad_token", &mut s.pad_token),
                ("unk_token", &mut s.unk_token),
            ] {
                if let Some(v) = token_field(&config, key) {
                    *slot = v;
                }
            }
            tok.resolve_special_ids();
        }
        Ok(tok)
    }

    /// Loads a `tokenizer.json` file. Special-token names default to Gemma's
    /// (`<bos>`, `<eos>`, `<pad>`, `<unk>`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
        Self::from_bytes_with_source(&bytes, path.to_path_buf())
    }

    /// Loads a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes_with_source(bytes, PathBuf::from("<memory>"))
    }

    fn from_bytes_with_source(bytes: &[u8], source: PathBuf) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::malformed(&source, e))?;
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let has_holes = vocab.len() != vocab_size;
        let byte_ids = vocab
            .iter()
            .filter(|(t, _)| is_byte_piece(t))
            .map(|(_, &id)| id)
            .collect();
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut tok = Tokenizer {
            inner,
            source,
            vocab_size,
            has_holes,
            special_ids,
            byte_ids,
            specials: SpecialTokens {
                bos_token: "<bos>".into(),
                eos_token: "<eos>".into(),
                pad_token: "<pad>".into(),
                unk_token: "<unk>".into(),
                bos_id: None,
                eos_id: None,
                pad_id: None,
                unk_id: None,
            },
        };
        tok.resolve_special_ids();
        Ok(tok)
    }

    fn resolve_special_ids(&mut self) {
        let s = &mut self.specials;
        s.bos_id = self.inner.token_to_id(&s.bos_token);
        s.eos_id = self.inner.token_to_id(&s.eos_token);
        s.pad_id = self.inner.token_to_id(&s.pad_token);
        s.unk_id = self.inner.token_to_id(&s.unk_token);
    }

    /// Encodes `text` without adding any special token (no BOS). Special-token strings inside the
    /// text (`<bos>`, `<|turn>`, ...) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids`. Unknown ids are an [`Error::UnknownTokenId`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.decode_unchecked(ids, skip_special_tokens)
    }

    pub(crate) fn decode_unchecked(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Decode(e.to_string()))
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            self.check_id(id)?;
        }
        Ok(())
    }

    /// Errors if `id` has no token.
    pub fn check_id(&self, id: u32) -> Result<()> {
        let known = (id as usize) < self.vocab_size
            && (!self.has_holes || self.inner.id_to_token(id).is_some());
        if known {
            Ok(())
        } else {
            Err(Error::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            })
        }
    }

    /// Number of ids: one more than the largest id (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// True for added tokens flagged special (what `skip_special_tokens` drops).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// True for byte-fallback pieces `<0xNN>`.
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.byte_ids.contains(&id)
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.specials
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.specials.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.specials.eos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.specials.pad_id
    }

    /// The file this tokenizer was loaded from (`<memory>` for [`Tokenizer::from_bytes`]).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The wrapped HF tokenizer, for anything this API does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
