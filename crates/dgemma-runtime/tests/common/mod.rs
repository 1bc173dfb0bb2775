#![allow(dead_code)]
//! Shared helpers: the tiny model, and solo runs through `dgemma_engine::generate`.

use dgemma_cpu::CpuBackend;
use dgemma_engine::generate::{generate, Generation, Observer};
use dgemma_model::checkpoint::Checkpoint;
use dgemma_model::weights::ModelWeights;
use dgemma_runtime::PreparedRequest;
use dgemma_sampler::SeededNoise;
use std::path::PathBuf;

pub fn tiny() -> PathBuf {
    dgemma_runtime::bundled_tiny_model()
}

/// A fresh CPU backend on the tiny model, the way the CLI builds one.
pub fn cpu_backend(precision: dgemma_model::Precision) -> CpuBackend {
    let ck = Checkpoint::open(tiny()).unwrap();
    let w = ModelWeights::load(&ck).unwrap();
    CpuBackend::new(&ck.config.text, &w, precision)
}

/// Every observer callback, in order.
#[derive(Default, Debug, PartialEq)]
pub struct Record {
    pub steps: Vec<(usize, usize, Vec<u32>, usize)>,
    pub canvases: Vec<(usize, Vec<u32>)>,
}

impl Observer for Record {
    fn on_step(&mut self, block: usize, step: usize, draft: &[u32], accepted: usize) {
        self.steps.push((block, step, draft.to_vec(), accepted));
    }
    fn on_canvas(&mut self, block: usize, tokens: &[u32]) {
        self.canvases.push((block, tokens.to_vec()));
    }
}

/// The request run alone through the one-shot `generate` on its own backend.
pub fn solo(p: &PreparedRequest) -> (Generation, Record) {
    let mut backend = cpu_backend(p.settings.precision);
    let mut noise = SeededNoise::new(p.seed, p.settings.vocab_size);
    let mut rec = Record::default();
    let g = generate(
        &mut backend,
        &p.prompt_ids,
        &p.settings,
        &mut noise,
        &mut rec,
    )
    .unwrap();
    (g, rec)
}
