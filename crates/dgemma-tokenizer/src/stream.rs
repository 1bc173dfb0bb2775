use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// How many already-emitted ids are kept as left context for the next decode. The Gemma decoder
/// (Replace "▁", ByteFallback, Fuse) needs none; the context only matters for decoders whose output
/// for a token depends on what precedes it (e.g. a leading-space `Strip`).
const CONTEXT: usize = 4;

/// Incremental decoding of a growing id sequence.
///
/// Feed ids with [`push`](Self::push) as they are committed (one canvas at a time, or in any other
/// chunks); each call returns only the new text. A trailing run of byte-fallback pieces (`<0xNN>`)
/// is held back until a non-byte piece (or [`finish`](Self::finish)) closes it, because the
/// ByteFallback decoder decodes such a run as one unit: a character split across chunks is printed
/// whole, never as `U+FFFD`. The concatenation of every `push` result and `finish` equals
/// `tok.decode(all_ids, skip_special_tokens)`.
///
/// Ids are validated on entry: an unknown id is an error and leaves the decoder unchanged.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special_tokens: bool,
    /// Ids not yet turned into text (after dropping skipped specials).
    pending: Vec<u32>,
    /// The last few emitted ids; always ends with a non-byte piece (or is empty).
    context: Vec<u32>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tok,
            skip_special_tokens,
            pending: Vec::new(),
            context: Vec::new(),
        }
    }

    /// Adds `ids` and returns the text that became complete.
    pub fn push(&mut self, ids: &[u32]) -> Result<String> {
        self.tok.check_ids(ids)?;
        let skip = self.skip_special_tokens;
        self.pending.extend(
            ids.iter()
                .copied()
                .filter(|&id| !(skip && self.tok.is_special(id))),
        );
        let mut split = self.pending.len();
        while split > 0 && self.tok.is_byte_token(self.pending[split - 1]) {
            split -= 1;
        }
        self.emit(split)
    }

    /// Returns whatever is still held back (an unfinished byte run decodes to `U+FFFD`s, exactly as
    /// a one-shot decode would) and resets the decoder for a new sequence.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.emit(self.pending.len());
        self.pending.clear();
        self.context.clear();
        text
    }

    /// Number of ids held back (a trailing byte-fallback run).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn emit(&mut self, n: usize) -> Result<String> {
        if n == 0 {
            return Ok(String::new());
        }
        let segment: Vec<u32> = self.pending.drain(..n).collect();
        let text = if self.context.is_empty() {
            self.tok.decode_unchecked(&segment, false)?
        } else {
            let before = self.tok.decode_unchecked(&self.context, false)?;
            let mut joined = self.context.clone();
            joined.extend_from_slice(&segment);
            let after = self.tok.decode_unchecked(&joined, false)?;
            match after.strip_prefix(before.as_str()) {
                Some(rest) => rest.to_owned(),
                None => self.tok.decode_unchecked(&segment, false)?,
            }
        };
        self.context.extend_from_slice(&segment);
        if self.context.len() > CONTEXT {
            self.context.drain(..self.context.len() - CONTEXT);
        }
        Ok(text)
    }
}
