//! `EngineOptions::quant`: an engine with FP8 experts generates exactly what a CPU backend on the
//! FP8 weights generates (the engine only changes how the weights are loaded).

use dgemma_engine::generate::{generate, Silent};
use dgemma_model::checkpoint::Checkpoint;
use dgemma_model::weights::ModelWeights;
use dgemma_runtime::{Engine, EngineOptions, Quant, Request};
use dgemma_sampler::SeededNoise;

#[test]
fn fp8_engine_equals_a_backend_on_fp8_weights() {
    let dir = dgemma_runtime::bundled_tiny_model();
    let engine = Engine::load(&dir, EngineOptions { quant: Quant::Fp8, ..Default::default() }).unwrap();
    assert_eq!(engine.options().quant, Quant::Fp8);
    let request = Request::ids(vec![2, 17, 33, 90]).seed(9).max_new_tokens(32);
    let prepared = engine.prepare(&request).unwrap();
    let got = engine.submit(request).unwrap().wait().unwrap();

    let ck = Checkpoint::open(&dir).unwrap();
    let w = ModelWeights::load_with(&ck, Quant::Fp8).unwrap();
    let mut backend = dgemma_cpu::CpuBackend::new(&ck.config.text, &w, prepared.settings.precision);
    let mut noise = SeededNoise::new(prepared.seed, prepared.settings.vocab_size);
    let want = generate(&mut backend, &prepared.prompt_ids, &prepared.settings, &mut noise, &mut Silent).unwrap();
    assert_eq!(got.ids, want.ids[want.prompt_len..]);
}
