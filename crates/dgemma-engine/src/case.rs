//! Reference case files (`reference/cases/*.safetensors`) and their contract.
//!
//! * metadata `dtype`: `"float32"` or `"bfloat16"`, the precision transformers ran in;
//!   `model`: the model directory under `reference/models/` (informational).
//! * `prompt_ids` i64 `[P]`: encoded as the KV cache for every decoder pass.
//! * `pass{k}.canvas_ids` i64 `[C]`, `pass{k}.sc_logits` f32 `[C, V]` (optional: absent means
//!   no self-conditioning), `pass{k}.logits` f32 `[C, V]` (softcapped, before temperature).
//! * optional generation trace: `gen.max_new_tokens`, `gen.max_denoising_steps` i64 `[1]`,
//!   `gen.block{b}.init` i64 `[C]`, `gen.block{b}.step{s}.sample` and `.renoise` i64 `[C]`,
//!   `gen.output_ids` i64 `[N]`.

use crate::error::{EngineError, Result};
use dgemma_model::Precision;
use dgemma_sampler::{TapeBlock, TapeNoise, TorchDevice};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One teacher-forced decoder pass.
#[derive(Clone, Debug)]
pub struct Pass {
    pub canvas: Vec<u32>,
    pub sc_logits: Option<Vec<f32>>,
    pub logits: Vec<f32>,
}

/// A recorded generation: settings, the noise tape and the expected output.
#[derive(Clone, Debug)]
pub struct Trace {
    pub max_new_tokens: usize,
    pub max_denoising_steps: usize,
    pub blocks: Vec<TapeBlock>,
    pub output_ids: Vec<u32>,
}

impl Trace {
    pub fn tape(&self) -> TapeNoise {
        TapeNoise::new(self.blocks.clone())
    }
}

/// A parsed case file.
#[derive(Clone, Debug)]
pub struct Case {
    pub path: PathBuf,
    pub precision: Precision,
    pub metadata: HashMap<String, String>,
    pub prompt_ids: Vec<u32>,
    pub passes: Vec<Pass>,
    pub trace: Option<Trace>,
}

fn bad(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Case { path: path.to_path_buf(), message: msg.into() }
}

struct Reader<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
}

impl Reader<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.names().contains(&name)
    }

    fn ids(&self, name: &str) -> Result<Vec<u32>> {
        let t = self.st.tensor(name).map_err(|_| bad(self.path, format!("missing tensor {name}")))?;
        if t.dtype() != Dtype::I64 {
            return Err(bad(self.path, format!("tensor {name} is {:?}, expected I64", t.dtype())));
        }
        t.data()
            .chunks_exact(8)
            .map(|b| {
                let v = i64::from_le_bytes(b.try_into().unwrap());
                u32::try_from(v).map_err(|_| bad(self.path, format!("tensor {name} holds {v}, not a token id")))
            })
            .collect()
    }

    fn scalar(&self, name: &str) -> Result<usize> {
        let v = self.ids(name)?;
        match v.as_slice() {
            [x] => Ok(*x as usize),
            _ => Err(bad(self.path, format!("tensor {name} should hold one value, holds {}", v.len()))),
        }
    }

    fn floats(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.st.tensor(name).map_err(|_| bad(self.path, format!("missing tensor {name}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(self.path, format!("tensor {name} is {:?}, expected F32", t.dtype())));
        }
        Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    }
}

impl Case {
    pub fn open(path: &Path) -> Result<Case> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let dtype = metadata.get("dtype").ok_or_else(|| bad(path, "metadata has no \"dtype\""))?;
        let precision = Precision::from_dtype_name(dtype)
            .ok_or_else(|| bad(path, format!("metadata dtype {dtype:?} is neither \"float32\" nor \"bfloat16\"")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let r = Reader { path, st };
        let prompt_ids = r.ids("prompt_ids")?;
        let mut passes = Vec::new();
        while r.has(&format!("pass{}.canvas_ids", passes.len())) {
            let k = passes.len();
            let canvas = r.ids(&format!("pass{k}.canvas_ids"))?;
            let sc_name = format!("pass{k}.sc_logits");
            let sc_logits = if r.has(&sc_name) { Some(r.floats(&sc_name)?) } else { None };
            let logits = r.floats(&format!("pass{k}.logits"))?;
            if logits.is_empty() || logits.len() % canvas.len().max(1) != 0 {
                return Err(bad(path, format!("pass{k}.logits length {} is not a multiple of the canvas", logits.len())));
            }
            if sc_logits.as_ref().is_some_and(|s| s.len() != logits.len()) {
                return Err(bad(path, format!("pass{k}.sc_logits and pass{k}.logits differ in size")));
            }
            passes.push(Pass { canvas, sc_logits, logits });
        }
        let trace = if r.has("gen.output_ids") {
            let mut blocks = Vec::new();
            while r.has(&format!("gen.block{}.init", blocks.len())) {
                let b = blocks.len();
                let init = r.ids(&format!("gen.block{b}.init"))?;
                let mut steps = Vec::new();
                while r.has(&format!("gen.block{b}.step{}.sample", steps.len())) {
                    let s = steps.len();
                    steps.push((r.ids(&format!("gen.block{b}.step{s}.sample"))?, r.ids(&format!("gen.block{b}.step{s}.renoise"))?));
                }
                blocks.push(TapeBlock { init, steps });
            }
            Some(Trace {
                max_new_tokens: r.scalar("gen.max_new_tokens")?,
                max_denoising_steps: r.scalar("gen.max_denoising_steps")?,
                blocks,
                output_ids: r.ids("gen.output_ids")?,
            })
        } else {
            None
        };
        if passes.is_empty() && trace.is_none() {
            return Err(bad(path, "holds neither decoder passes (pass0.*) nor a generation trace (gen.*)"));
        }
        Ok(Case { path: path.to_path_buf(), precision, metadata, prompt_ids, passes, trace })
    }

    /// The torch device the reference ran on (metadata `device`, e.g. `"cpu"` or `"cuda:0"`;
    /// `reference/make_cases.py` runs on the CPU, which is the default). CPU and CUDA torch
    /// round the temperature and the entropy cumsum differently (see `dgemma_sampler::schedule`).
    pub fn torch_device(&self) -> TorchDevice {
        match self.metadata.get("device") {
            Some(d) if d.starts_with("cuda") => TorchDevice::Cuda,
            _ => TorchDevice::Cpu,
        }
    }

    /// The model directory named by the `model` metadata, relative to `models_root`.
    pub fn model_dir(&self, models_root: &Path) -> Option<PathBuf> {
        self.metadata.get("model").map(|m| models_root.join(m))
    }
}
