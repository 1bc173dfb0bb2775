//! generation_config.json: defaults, the int-or-list eos field, and rejected settings.

mod common;
use common::fixture;

use dgemma_model::{GenerationConfig, ModelConfig};
use serde_json::{json, Value};

fn model() -> ModelConfig {
    ModelConfig::from_file(fixture("diffusiongemma-26b-a4b.config.json")).unwrap()
}

fn parse(v: &Value) -> dgemma_model::Result<GenerationConfig> {
    GenerationConfig::from_json_str(&v.to_string(), &model())
}

#[test]
fn real_generation_config() {
    let path = fixture("diffusiongemma-26b-a4b.generation_config.json");
    let g = GenerationConfig::from_file(&path, &model()).unwrap();
    assert_eq!(g.max_new_tokens, Some(256));
    assert_eq!(g.max_denoising_steps, 48);
    assert_eq!(g.entropy_bound, 0.1);
    assert_eq!((g.t_min, g.t_max), (0.4, 0.8));
    assert_eq!(g.stability_threshold, 1);
    assert_eq!(g.confidence_threshold, 0.005);
    assert_eq!(g.eos_token_ids, vec![1, 106, 50]);
    assert_eq!(g.pad_token_id, 0);
    // Round trip through our writer.
    assert_eq!(parse(&g.to_json()).unwrap(), g);
}

#[test]
fn defaults_for_an_empty_or_absent_file() {
    let m = model();
    let d = GenerationConfig::defaults_for(&m);
    assert_eq!(d.max_new_tokens, None);
    assert_eq!(d.max_new_tokens_or_default(), 256);
    assert_eq!(d.max_denoising_steps, 48);
    assert_eq!(d.entropy_bound, 0.1);
    assert_eq!((d.t_min, d.t_max), (0.4, 0.8));
    assert_eq!(d.stability_threshold, 1);
    assert_eq!(d.confidence_threshold, 0.005);
    assert_eq!(
        d.eos_token_ids,
        vec![1, 106, 50],
        "eos from the model config"
    );
    assert_eq!(d.pad_token_id, 0);
    assert_eq!(parse(&json!({})).unwrap(), d);
    // null means unset, as in transformers.
    assert_eq!(
        parse(&json!({"t_min": null, "sampler_config": null, "eos_token_id": null})).unwrap(),
        d
    );
    let absent = std::env::temp_dir().join("dgemma-model-no-such-generation-config.json");
    assert_eq!(
        GenerationConfig::from_file_or_default(&absent, &m).unwrap(),
        d
    );
}

#[test]
fn eos_token_id_int_or_list() {
    assert_eq!(
        parse(&json!({"eos_token_id": 106})).unwrap().eos_token_ids,
        vec![106]
    );
    assert_eq!(
        parse(&json!({"eos_token_id": [1, 106]}))
            .unwrap()
            .eos_token_ids,
        vec![1, 106]
    );
    assert_eq!(
        parse(&json!({"eos_token_id": []})).unwrap().eos_token_ids,
        Vec::<u32>::new()
    );
    let e = parse(&json!({"eos_token_id": "106"}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("eos_token_id") && e.contains("generation_config.json"),
        "{e}"
    );
    let e = parse(&json!({"eos_token_id": [1, -3]}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos_token_id"), "{e}");
}

#[test]
fn partial_overrides() {
    let g = parse(&json!({"max_denoising_steps": 12, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.5},
        "t_min": 0.1, "t_max": 1.5, "stability_threshold": 0, "confidence_threshold": 0.01, "pad_token_id": 3, "max_length": 100,
        "cache_implementation": "static", "transformers_version": "5.23.0"}))
    .unwrap();
    assert_eq!(g.max_denoising_steps, 12);
    assert_eq!(g.entropy_bound, 0.5);
    assert_eq!((g.t_min, g.t_max), (0.1, 1.5));
    assert_eq!(g.stability_threshold, 0);
    assert_eq!(g.confidence_threshold, 0.01);
    assert_eq!(g.pad_token_id, 3);
    assert_eq!(g.max_length, Some(100));
    assert_eq!(g.max_new_tokens, None);
}

#[test]
fn rejected_settings_are_named() {
    let cases = [
        (json!({"top_k": 50}), "top_k"),
        (json!({"top_p": 0.9}), "top_p"),
        (json!({"repetition_penalty": 1.1}), "repetition_penalty"),
        (json!({"temperature": 0.7}), "temperature"),
        (json!({"num_beams": 4}), "num_beams"),
        (json!({"foo": 1}), "foo"),
        (
            json!({"sampler_config": {"_cls_name": "TopKSamplerConfig", "entropy_bound": 0.1}}),
            "TopKSamplerConfig",
        ),
        (
            json!({"sampler_config": {"entropy_bound": 0.1}}),
            "_cls_name",
        ),
        (
            json!({"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig"}}),
            "entropy_bound",
        ),
        (
            json!({"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1, "k": 2}}),
            "sampler_config.k",
        ),
        (
            json!({"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.0}}),
            "entropy_bound",
        ),
        (json!({"sampler_config": "entropy"}), "sampler_config"),
        (json!({"max_denoising_steps": 0}), "max_denoising_steps"),
        (json!({"max_denoising_steps": 2.5}), "max_denoising_steps"),
        (json!({"max_new_tokens": 0}), "max_new_tokens"),
        (json!({"t_min": 0.9}), "t_max"),
        (json!({"t_min": -0.1}), "t_min"),
        (json!({"confidence_threshold": 0.0}), "confidence_threshold"),
        (json!({"stability_threshold": -1}), "stability_threshold"),
        (json!({"pad_token_id": 999999}), "pad_token_id"),
        (json!([1, 2]), "top level"),
    ];
    for (v, needle) in cases {
        let e = parse(&v).expect_err(&v.to_string()).to_string();
        assert!(e.contains(needle), "{v}: expected `{needle}` in: {e}");
        assert!(e.contains("generation_config.json"), "{e}");
    }
    let e = GenerationConfig::from_json_str("{\"t_min\": 0.4,", &model())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("malformed JSON"),
        "{e}"
    );
}
