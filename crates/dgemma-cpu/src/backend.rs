//! [`CpuBackend`]: the CPU implementation of [`dgemma_model::Backend`].

use crate::cache::KvCache;
use crate::model;
use crate::precision::Precision;
use crate::weights::CpuWeights;
use dgemma_model::config::TextConfig;
use dgemma_model::error::{Error, Result};
use dgemma_model::weights::ModelWeights;
use dgemma_model::Backend;

/// One sequence on the CPU: the weights view and its KV cache.
pub struct CpuBackend {
    weights: CpuWeights,
    cache: KvCache,
}

impl CpuBackend {
    pub fn new(config: &TextConfig, weights: &ModelWeights, precision: Precision) -> CpuBackend {
        let weights = CpuWeights::new(config, weights, precision);
        let cache = model::new_cache(&weights);
        CpuBackend { weights, cache }
    }

    pub fn precision(&self) -> Precision {
        self.weights.precision
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Token ids must index the embedding, and positions must stay inside the context.
    fn check_input(&self, ids: &[u32], what: &str) -> Result<()> {
        let cfg = &self.weights.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "{what} holds token id {bad}, outside the vocabulary of {} tokens",
                cfg.vocab_size
            )));
        }
        let end = self.cache.len + ids.len();
        if end > cfg.max_position_embeddings {
            return Err(Error::InvalidInput(format!(
                "{what} would reach position {end}, over the model's context of {} tokens \
                 (max_position_embeddings; {} already in the cache, {} new)",
                cfg.max_position_embeddings,
                self.cache.len,
                ids.len()
            )));
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn cache_len(&self) -> usize {
        self.cache.len
    }

    fn reset(&mut self) {
        self.cache.clear();
    }

    fn encode(&mut self, ids: &[u32]) -> Result<()> {
        self.check_input(ids, "the encoder input")?;
        model::encode(&self.weights, &mut self.cache, ids);
        Ok(())
    }

    fn denoise(&mut self, canvas: &[u32], sc_logits: Option<&[f32]>, logits: &mut [f32]) -> Result<()> {
        self.check_input(canvas, "the canvas")?;
        let v = self.weights.config.vocab_size;
        let need = canvas.len() * v;
        if logits.len() != need {
            return Err(Error::InvalidInput(format!(
                "logits buffer holds {} floats, the canvas needs {} x {v}",
                logits.len(),
                canvas.len()
            )));
        }
        if let Some(sc) = sc_logits {
            if sc.len() != need {
                return Err(Error::InvalidInput(format!(
                    "self-conditioning logits hold {} floats, the canvas needs {} x {v}",
                    sc.len(),
                    canvas.len()
                )));
            }
        }
        model::denoise(&self.weights, &self.cache, canvas, sc_logits, logits);
        Ok(())
    }
}
