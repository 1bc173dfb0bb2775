use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::read_json;
use crate::{CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE};

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message. `role` is `system`, `user` or `assistant` (rendered as `model` by Gemma).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Template switches, as passed to HF `apply_chat_template`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChatOptions {
    /// Append the opening of the model turn (`<|turn>model\n`, plus the empty thought channel when
    /// thinking is off, for Gemma 4).
    pub add_generation_prompt: bool,
    /// Gemma 4: emit the `<|think|>` system turn.
    pub enable_thinking: bool,
}

/// A compiled chat template, rendered like HF `apply_chat_template(..., tokenize=False)`.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: PathBuf,
    bos_token: String,
    eos_token: String,
    pad_token: Option<String>,
    unk_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn config_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// HF `tojson`: plain JSON (no HTML escaping), optional `indent`, non-ASCII kept as is.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let to_err = |e: serde_json::Error| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson failed").with_source(e)
    };
    let out = match indent {
        None => serde_json::to_string(value).map_err(to_err)?,
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut buf = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value.serialize(&mut ser).map_err(to_err)?;
            String::from_utf8(buf).expect("serde_json writes UTF-8")
        }
    };
    Ok(Value::from_safe_string(out))
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source` with HF's Jinja settings (`trim_blocks`, `lstrip_blocks`, Python string
    /// and dict methods, `raise_exception`, HF-style `tojson`).
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        Self::build(
            source.into(),
            PathBuf::from("<memory>"),
            bos_token.into(),
            eos_token.into(),
            None,
            None,
        )
    }

    fn build(
        source: String,
        origin: PathBuf,
        bos_token: String,
        eos_token: String,
        pad_token: Option<String>,
        unk_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| match Error::template(&e) {
                Error::Template(m) => Error::malformed(&origin, m),
                other => other,
            })?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
        })
    }

    /// Loads the chat template of a checkpoint directory: `chat_template.jinja` if present, else
    /// the `chat_template` field of `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` from which `"default"` is taken). `Ok(None)` if there is neither.
    /// `bos_token` / `eos_token` come from `tokenizer_config.json` (Gemma defaults otherwise).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = read_json(&config_path)?;
        if let Some(c) = &config {
            if !c.is_object() {
                return Err(Error::malformed(&config_path, "expected a JSON object"));
            }
        }
        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let (source, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(s) => (s, jinja_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let from_config = match &config {
                    Some(c) => Self::template_from_config(c, &config_path)?,
                    None => None,
                };
                match from_config {
                    Some(s) => (s, config_path),
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(Error::read(&jinja_path, e)),
        };
        let get = |key: &str| config.as_ref().and_then(|c| config_token(c, key));
        Self::build(
            source,
            origin,
            get("bos_token").unwrap_or_else(|| "<bos>".into()),
            get("eos_token").unwrap_or_else(|| "<eos>".into()),
            get("pad_token"),
            get("unk_token"),
        )
        .map(Some)
    }

    fn template_from_config(config: &serde_json::Value, path: &Path) -> Result<Option<String>> {
        match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Array(list)) => {
                let mut names = Vec::new();
                for item in list {
                    let name = item.get("name").and_then(|v| v.as_str());
                    let template = item.get("template").and_then(|v| v.as_str());
                    match (name, template) {
                        (Some("default"), Some(t)) => return Ok(Some(t.to_owned())),
                        (Some(n), Some(_)) => names.push(n.to_owned()),
                        _ => return Err(Error::malformed(
                            path,
                            "chat_template list entries must be {\"name\", \"template\"} strings",
                        )),
                    }
                }
                Err(Error::malformed(
                    path,
                    format!(
                        "chat_template has no \"default\" entry (found: {})",
                        names.join(", ")
                    ),
                ))
            }
            Some(_) => Err(Error::malformed(
                path,
                "chat_template must be a string or a list of {name, template}",
            )),
        }
    }

    /// Renders `messages` with the variables HF passes: `messages`, `add_generation_prompt`,
    /// `enable_thinking`, `tools` (none), `documents` (none), `bos_token`, `eos_token`,
    /// `pad_token`, `unk_token`, and the `raise_exception` function.
    pub fn render(&self, messages: &[Message], opts: &ChatOptions) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::template(&e))?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => opts.add_generation_prompt,
            enable_thinking => opts.enable_thinking,
            tools => (),
            documents => (),
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            pad_token => &self.pad_token,
            unk_token => &self.unk_token,
        };
        tmpl.render(ctx).map_err(|e| Error::template(&e))
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (`chat_template.jinja`, `tokenizer_config.json`, `<memory>`).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}
