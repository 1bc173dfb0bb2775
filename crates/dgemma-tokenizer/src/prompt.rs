use crate::chat::{ChatOptions, ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Prompt ids for one user turn, ready for prefill: the chat template rendered with
/// `add_generation_prompt = true` and `enable_thinking = thinking`, then encoded, with exactly one
/// `<bos>` at the start (any run of leading `<bos>` ids is collapsed to one, and one is added if
/// the template did not emit it).
///
/// Without a template the prompt is `<bos>` + `user` encoded as raw text (see
/// [`raw_prompt_ids`]); `system` and `thinking` are then ignored.
pub fn chat_prompt_ids(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    user: &str,
    system: Option<&str>,
    thinking: bool,
) -> Result<Vec<u32>> {
    let Some(template) = template else {
        return raw_prompt_ids(tok, user);
    };
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = system {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(user));
    let text = template.render(
        &messages,
        &ChatOptions {
            add_generation_prompt: true,
            enable_thinking: thinking,
        },
    )?;
    with_single_bos(tok, tok.encode(&text)?)
}

/// `<bos>` + `text` encoded as is (for `--no-chat`). A `<bos>` already written at the start of
/// `text` is not duplicated.
pub fn raw_prompt_ids(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    with_single_bos(tok, tok.encode(text)?)
}

fn with_single_bos(tok: &Tokenizer, ids: Vec<u32>) -> Result<Vec<u32>> {
    let bos = tok.bos_id().ok_or_else(|| Error::MissingSpecialToken {
        token: tok.special_tokens().bos_token.clone(),
    })?;
    let skip = ids.iter().take_while(|&&id| id == bos).count();
    let mut out = Vec::with_capacity(ids.len() - skip + 1);
    out.push(bos);
    out.extend_from_slice(&ids[skip..]);
    Ok(out)
}
