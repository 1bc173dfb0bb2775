//! A checkpoint directory: `config.json`, optional `generation_config.json`, and either
//! `model.safetensors` or `model.safetensors.index.json` plus its shards, all memory-mapped.
//!
//! Each safetensors header is parsed here and checked before any tensor is handed out: the
//! header must be complete, each entry well-formed, its byte count must match dtype x shape, and
//! its byte range must lie inside the file (so a truncated download is reported with the file's
//! name instead of faulting later).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::json::{self, describe};
use crate::tensor::{DType, Storage, TensorRef};

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// safetensors' own limit on the header size.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Header entry of a tensor whose dtype is not F32 / F16 / BF16 / F8_E4M3 (kept so errors can name
/// it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// safetensors dtype name, e.g. `"I64"`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

/// One parsed safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub storage: Arc<Storage>,
    /// Float tensors (F32 / F16 / BF16, and F8_E4M3 codes), in header order.
    pub tensors: Vec<TensorRef>,
    /// Tensors of other dtypes.
    pub other: Vec<TensorInfo>,
}

fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Memory-maps and validates one safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if file_len < 8 {
            return Err(Error::safetensors(
                &path,
                format!("truncated or not a safetensors file: {file_len} bytes, too short for the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only. As with any memory map, the file must not be truncated
        // or modified by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        SafetensorsFile::parse(path, Storage::Mmap(mmap))
    }

    /// Validates safetensors bytes held in memory; `path` is used in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<SafetensorsFile> {
        SafetensorsFile::parse(path.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<SafetensorsFile> {
        let data = storage.as_slice();
        let file_len = data.len() as u64;
        if file_len < 8 {
            return Err(Error::safetensors(
                &path,
                format!("truncated or not a safetensors file: {file_len} bytes, too short for the 8-byte header length"),
            ));
        }
        let header_len = u64::from_le_bytes(data[..8].try_into().unwrap());
        if header_len > MAX_HEADER_BYTES {
            return Err(Error::safetensors(
                &path,
                format!(
                    "header length {header_len} is implausible (corrupt or not a safetensors file)"
                ),
            ));
        }
        if 8 + header_len > file_len {
            return Err(Error::safetensors(
                &path,
                format!(
                    "truncated: the header needs {} bytes but the file has only {file_len}",
                    8 + header_len
                ),
            ));
        }
        let data_start = 8 + header_len;
        let header_bytes = &data[8..data_start as usize];
        let header_text = std::str::from_utf8(header_bytes)
            .map_err(|e| Error::safetensors(&path, format!("header is not valid UTF-8: {e}")))?;
        let header: Value = serde_json::from_str(header_text.trim_end_matches(['\0', ' ']))
            .map_err(|e| Error::safetensors(&path, format!("malformed header JSON: {e}")))?;
        let entries = match &header {
            Value::Object(m) => m,
            other => {
                return Err(Error::safetensors(
                    &path,
                    format!("header must be a JSON object, got {}", describe(other)),
                ))
            }
        };
        let data_len = file_len - data_start;
        let storage = Arc::new(storage);
        let mut tensors = Vec::new();
        let mut other = Vec::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                continue;
            }
            let bad = |msg: String| {
                Error::safetensors(&path, format!("header entry for tensor {name}: {msg}"))
            };
            let obj = entry
                .as_object()
                .ok_or_else(|| bad(format!("expected an object, got {}", describe(entry))))?;
            let dtype = obj
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("missing or non-string `dtype`".into()))?;
            let shape: Vec<usize> = obj
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("missing or non-list `shape`".into()))?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| bad("`shape` must be a list of non-negative integers".into()))?;
            let offsets = obj
                .get("data_offsets")
                .and_then(Value::as_array)
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
                .ok_or_else(|| {
                    bad("`data_offsets` must be a list of two non-negative integers".into())
                })?;
            let (begin, end) = offsets;
            if end < begin {
                return Err(bad(format!("data_offsets [{begin}, {end}] are reversed")));
            }
            if end > data_len {
                return Err(Error::safetensors(
                    &path,
                    format!(
                        "truncated: tensor {name} needs bytes {}..{} but the file has only {file_len} bytes",
                        data_start + begin,
                        data_start + end
                    ),
                ));
            }
            if let Some(bits) = dtype_bits(dtype) {
                let numel = shape
                    .iter()
                    .try_fold(1u128, |a, &d| a.checked_mul(d as u128));
                let need = numel.map(|n| (n * bits as u128).div_ceil(8));
                if need != Some((end - begin) as u128) {
                    return Err(bad(format!(
                        "dtype {dtype} shape {shape:?} needs {} bytes but data_offsets [{begin}, {end}] span {}",
                        need.map_or("too many".to_string(), |n| n.to_string()),
                        end - begin
                    )));
                }
            }
            match DType::from_safetensors(dtype) {
                Some(dt) => tensors.push(TensorRef::new(
                    name.clone(),
                    dt,
                    shape,
                    path.clone(),
                    storage.clone(),
                    (data_start + begin) as usize,
                )?),
                None => other.push(TensorInfo {
                    name: name.clone(),
                    dtype: dtype.to_string(),
                    shape,
                    file: path.clone(),
                }),
            }
        }
        Ok(SafetensorsFile {
            path,
            storage,
            tensors,
            other,
        })
    }
}

/// A DiffusionGemma checkpoint directory, memory-mapped.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    /// Parsed `config.json`.
    pub config: ModelConfig,
    /// Parsed `generation_config.json` (transformers' defaults when the file is absent).
    pub generation: GenerationConfig,
    files: Vec<PathBuf>,
    storages: Vec<Arc<Storage>>,
    index_file: Option<PathBuf>,
    tensors: BTreeMap<String, TensorRef>,
    other: BTreeMap<String, TensorInfo>,
}

/// A shard name from the index must stay inside the checkpoint directory.
fn safe_relative(shard: &str) -> bool {
    let p = Path::new(shard);
    !shard.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

impl Checkpoint {
    /// Opens `dir`: parses and validates config.json, generation_config.json (if present) and
    /// the safetensors file(s). Tensor data is mapped, not read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "checkpoint directory not found",
                ),
            ));
        }
        let config = ModelConfig::from_file(dir.join(CONFIG_FILE))?;
        let generation =
            GenerationConfig::from_file_or_default(dir.join(GENERATION_CONFIG_FILE), &config)?;

        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let mut ck = Checkpoint {
            dir: dir.clone(),
            config,
            generation,
            files: Vec::new(),
            storages: Vec::new(),
            index_file: None,
            tensors: BTreeMap::new(),
            other: BTreeMap::new(),
        };
        if single.is_file() {
            let f = SafetensorsFile::open(&single)?;
            ck.add_file(f, None)?;
        } else if index_path.is_file() {
            ck.open_index(&index_path)?;
        } else {
            return Err(Error::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory"),
                ),
            ));
        }
        Ok(ck)
    }

    fn open_index(&mut self, index_path: &Path) -> Result<()> {
        let index = json::read_file(index_path)?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::safetensors(index_path, "missing or non-object `weight_map`"))?;
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::safetensors(
                    index_path,
                    format!(
                        "weight_map entry for {name} must be a file name, got {}",
                        describe(shard)
                    ),
                )
            })?;
            if !safe_relative(shard) {
                return Err(Error::safetensors(
                    index_path,
                    format!("weight_map entry for {name} names `{shard}`, which is not a file inside the checkpoint directory"),
                ));
            }
            shards.entry(shard).or_default().push(name);
        }
        if shards.is_empty() {
            return Err(Error::safetensors(index_path, "weight_map is empty"));
        }
        for (shard, names) in &shards {
            let path = self.dir.join(shard);
            if !path.is_file() {
                return Err(Error::safetensors(
                    index_path,
                    format!(
                        "weight_map refers to shard {shard} (for {} tensors, e.g. {}), but {} does not exist",
                        names.len(),
                        names[0],
                        path.display()
                    ),
                ));
            }
            let f = SafetensorsFile::open(&path)?;
            for name in names {
                if !f.tensors.iter().any(|t| t.name == *name)
                    && !f.other.iter().any(|t| t.name == *name)
                {
                    return Err(Error::safetensors(
                        index_path,
                        format!("weight_map says tensor {name} is in {shard}, but that file has no such tensor"),
                    ));
                }
            }
            self.add_file(f, Some(index_path))?;
        }
        self.index_file = Some(index_path.to_path_buf());
        Ok(())
    }

    fn add_file(&mut self, f: SafetensorsFile, index: Option<&Path>) -> Result<()> {
        let dup = |name: &str, first: &Path, second: &Path| {
            Error::safetensors(
                index.unwrap_or(second),
                format!(
                    "tensor {name} appears in both {} and {}",
                    first.display(),
                    second.display()
                ),
            )
        };
        for t in f.tensors {
            if let Some(prev) = self.tensors.get(&t.name) {
                return Err(dup(&t.name, &prev.file, &f.path));
            }
            if let Some(prev) = self.other.get(&t.name) {
                return Err(dup(&t.name, &prev.file, &f.path));
            }
            self.tensors.insert(t.name.clone(), t);
        }
        for t in f.other {
            if let Some(prev) = self.tensors.get(&t.name) {
                return Err(dup(&t.name, &prev.file, &f.path));
            }
            self.other.insert(t.name.clone(), t);
        }
        self.files.push(f.path);
        self.storages.push(f.storage);
        Ok(())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Parsed `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Parsed `generation_config.json` (defaults when the file is absent).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// `model.safetensors.index.json`, when the checkpoint is sharded.
    pub fn index_file(&self) -> Option<&Path> {
        self.index_file.as_deref()
    }

    /// A float (or F8_E4M3) tensor by name (cheap clone of the view).
    pub fn tensor(&self, name: &str) -> Option<TensorRef> {
        self.tensors.get(name).cloned()
    }

    /// A float tensor by reference.
    pub fn tensor_ref(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// Header info of a tensor whose dtype is not F32 / F16 / BF16 / F8_E4M3.
    pub fn non_float_tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.other.get(name)
    }

    /// Whether the checkpoint has a tensor of this name (any dtype).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.other.contains_key(name)
    }

    /// Names of all tensors (any dtype), sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .tensors
            .keys()
            .chain(self.other.keys())
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of tensors (any dtype).
    pub fn tensor_count(&self) -> usize {
        self.tensors.len() + self.other.len()
    }

    /// Total size of the mapped safetensors files in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.storages.iter().map(|s| s.len() as u64).sum()
    }

    /// The safetensors files, in load order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Pages the mapped files in (madvise WILLNEED, then touching every page), calling
    /// `progress(done_bytes, total_bytes)` after each chunk so a caller can draw a progress bar.
    pub fn prefetch(&self, progress: &mut dyn FnMut(u64, u64)) {
        const PAGE: usize = 4096;
        const CHUNK: usize = 64 << 20;
        let total = self.total_bytes();
        let mut done = 0u64;
        progress(0, total);
        let mut sink = 0u8;
        for storage in &self.storages {
            #[cfg(unix)]
            if let Storage::Mmap(m) = storage.as_ref() {
                let _ = m.advise(memmap2::Advice::WillNeed);
            }
            let bytes = storage.as_slice();
            for chunk in bytes.chunks(CHUNK) {
                let mut i = 0;
                while i < chunk.len() {
                    // SAFETY: `i < chunk.len()`; a volatile read keeps the page touch.
                    sink ^= unsafe { std::ptr::read_volatile(chunk.as_ptr().add(i)) };
                    i += PAGE;
                }
                done += chunk.len() as u64;
                progress(done, total);
            }
        }
        std::hint::black_box(sink);
    }
}
