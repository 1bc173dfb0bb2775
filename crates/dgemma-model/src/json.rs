//! Small helpers to read typed fields out of a `serde_json` object with errors that name the
//! file and the JSON path of the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Reads a JSON file (or string) into a `Value`; errors name the file.
pub(crate) fn parse(text: &str, file: &Path) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| Error::Json {
        file: file.to_path_buf(),
        source,
    })
}

pub(crate) fn read_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, path)
}

/// Short description of a JSON value's type and content, for error messages.
pub(crate) fn describe(v: &Value) -> String {
    let s = v.to_string();
    let s = if s.len() > 60 {
        format!("{}...", &s[..57])
    } else {
        s
    };
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{kind} ({s})")
}

/// A JSON object plus where it came from.
#[derive(Clone)]
pub(crate) struct Obj<'a> {
    pub file: &'a Path,
    /// JSON path prefix, e.g. "text_config." (empty at top level).
    pub prefix: String,
    pub map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub fn new(file: &'a Path, prefix: impl Into<String>, value: &'a Value) -> Result<Obj<'a>> {
        let prefix = prefix.into();
        match value {
            Value::Object(map) => Ok(Obj { file, prefix, map }),
            other => {
                let what = if prefix.is_empty() {
                    "the top level".to_string()
                } else {
                    format!("`{}`", prefix.trim_end_matches('.'))
                };
                Err(Error::config(
                    file,
                    format!("{what} must be a JSON object, got {}", describe(other)),
                ))
            }
        }
    }

    pub fn field(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    pub fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::config(self.file, format!("field `{}`: {msg}", self.field(key)))
    }

    pub fn missing(&self, key: &str) -> Error {
        Error::config(
            self.file,
            format!("missing required field `{}`", self.field(key)),
        )
    }

    /// The value of `key`, treating JSON `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x)),
                None => Err(self.err(
                    key,
                    format!("expected a non-negative integer, got {}", describe(v)),
                )),
            },
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(x) => usize::try_from(x)
                .map(Some)
                .map_err(|_| self.err(key, format!("{x} is too large"))),
        }
    }

    pub fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| self.err(key, format!("{x} does not fit in 32 bits"))),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(
                    key,
                    format!("expected a finite number, got {}", describe(v)),
                )),
            },
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {}", describe(v)))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(key, format!("expected a string, got {}", describe(v)))),
        }
    }

    /// A token-id field that may be an integer or a list of integers (`eos_token_id`).
    pub fn opt_id_list(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let bad = |v: &Value| {
            self.err(
                key,
                format!(
                    "expected a token id or a list of token ids, got {}",
                    describe(v)
                ),
            )
        };
        let one = |v: &Value| -> Result<u32> {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| bad(v))
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(one)
                .collect::<Result<Vec<u32>>>()
                .map(Some),
            Some(v) => Ok(Some(vec![one(v)?])),
        }
    }

    /// A nested object field, or `None` when absent or null.
    pub fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(Obj::new(
                self.file,
                format!("{}{}.", self.prefix, key),
                v,
            )?)),
            Some(v) => Err(self.err(key, format!("expected an object, got {}", describe(v)))),
        }
    }
}
