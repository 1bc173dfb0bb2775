//! config.json parsing: the real 26B-A4B config in both schemas, defaults, and bad input.

use std::path::{Path, PathBuf};

use dgemma_model::{
    BidirectionalAttention, ConfigSchema, LayerKind, ModelConfig, RopeKind, RopeSpec,
    SyntheticSpec, TextConfig,
};
use serde_json::{json, Value};

mod common;
use common::fixture;

/// config.json written by transformers 5.23 `DiffusionGemmaConfig.save_pretrained` (per_layer_config).
fn real_per_layer() -> ModelConfig {
    ModelConfig::from_file(fixture("diffusiongemma-26b-a4b.config.json")).unwrap()
}

/// The same model with the flat `global_head_dim` / `num_global_key_value_heads` fields.
fn real_flat() -> ModelConfig {
    ModelConfig::from_file(fixture("diffusiongemma-26b-a4b.flat.config.json")).unwrap()
}

fn real_json() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("diffusiongemma-26b-a4b.config.json")).unwrap(),
    )
    .unwrap()
}

fn parse(v: &Value) -> dgemma_model::Result<ModelConfig> {
    ModelConfig::from_json_str(&v.to_string())
}

fn err(v: &Value) -> String {
    parse(v).expect_err("config should be rejected").to_string()
}

#[test]
fn real_config_values() {
    let c = real_per_layer();
    let t = &c.text;
    assert_eq!(c.canvas_length, 256);
    assert_eq!(c.eos_token_ids, vec![1, 106, 50]);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.boi_token_id, Some(255999));
    assert_eq!(c.eoi_token_id, Some(258882));
    assert_eq!(c.image_token_id, Some(258880));
    assert_eq!(t.vocab_size, 262144);
    assert_eq!(t.hidden_size, 2816);
    assert_eq!(t.intermediate_size, 2112);
    assert_eq!(t.self_conditioning_size, 2112);
    assert_eq!(t.num_hidden_layers, 30);
    assert_eq!(t.num_attention_heads, 16);
    assert_eq!((t.head_dim, t.num_key_value_heads), (256, 8));
    assert_eq!((t.global_head_dim, t.num_global_key_value_heads), (512, 2));
    assert_eq!(
        (t.num_experts, t.top_k_experts, t.moe_intermediate_size),
        (128, 8, 704)
    );
    assert_eq!(t.sliding_window, 1024);
    assert_eq!(t.max_position_embeddings, 262144);
    assert_eq!(t.rms_norm_eps, 1e-6);
    assert_eq!(t.final_logit_softcapping, Some(30.0));
    assert_eq!((t.pad_token_id, t.bos_token_id), (0, 2));
    assert_eq!(t.eos_token_ids, vec![1]);
    assert!(t.attention_k_eq_v);
    assert_eq!(
        t.use_bidirectional_attention,
        BidirectionalAttention::Vision
    );
    assert_eq!(
        t.rope_sliding,
        RopeSpec {
            kind: RopeKind::Default,
            theta: 10000.0,
            partial_rotary_factor: 1.0
        }
    );
    assert_eq!(
        t.rope_full,
        RopeSpec {
            kind: RopeKind::Proportional,
            theta: 1e6,
            partial_rotary_factor: 0.25
        }
    );
    assert_eq!(t.full_layers(), vec![5, 11, 17, 23, 29]);
}

#[test]
fn real_config_layer_specs() {
    let t = real_per_layer().text;
    for i in 0..30 {
        let l = t.layer(i);
        if (i + 1) % 6 == 0 {
            assert_eq!(l.kind, LayerKind::Full, "layer {i}");
            assert_eq!((l.num_heads, l.num_kv_heads, l.head_dim), (16, 2, 512));
            assert_eq!(l.sliding_window, None);
            assert!(l.k_eq_v);
            assert_eq!(l.rope, RopeSpec::FULL_DEFAULT);
            assert_eq!((l.q_dim(), l.kv_dim(), l.gqa_group()), (8192, 1024, 8));
            assert_eq!(l.inv_freq().len(), 256);
        } else {
            assert_eq!(l.kind, LayerKind::Sliding, "layer {i}");
            assert_eq!((l.num_heads, l.num_kv_heads, l.head_dim), (16, 8, 256));
            assert_eq!(l.sliding_window, Some(1024));
            assert!(!l.k_eq_v);
            assert_eq!(l.rope, RopeSpec::SLIDING_DEFAULT);
            assert_eq!((l.q_dim(), l.kv_dim(), l.gqa_group()), (4096, 2048, 2));
        }
    }
    assert_eq!(t.layers().count(), 30);
}

#[test]
fn both_schemas_give_identical_text_config() {
    assert_eq!(real_per_layer(), real_flat());
    // And our own writer round-trips in both schemas.
    let c = real_per_layer();
    for schema in [ConfigSchema::PerLayerConfig, ConfigSchema::GlobalFields] {
        assert_eq!(parse(&c.to_json(schema)).unwrap(), c, "{schema:?}");
    }
    let tiny = SyntheticSpec::tiny().model_config();
    for schema in [ConfigSchema::PerLayerConfig, ConfigSchema::GlobalFields] {
        assert_eq!(parse(&tiny.to_json(schema)).unwrap(), tiny, "{schema:?}");
    }
}

#[test]
fn per_layer_config_keys_by_layer_type_and_unpadded_index() {
    let mut v = real_json();
    v["text_config"]["per_layer_config"] =
        json!({"full_attention": {"head_dim": 512, "num_key_value_heads": 2}});
    assert_eq!(parse(&v).unwrap(), real_per_layer());
    let mut v = real_json();
    let plc: serde_json::Map<String, Value> = [5, 11, 17, 23, 29]
        .iter()
        .map(|i| {
            (
                i.to_string(),
                json!({"head_dim": 512, "num_key_value_heads": 2}),
            )
        })
        .collect();
    v["text_config"]["per_layer_config"] = Value::Object(plc);
    assert_eq!(parse(&v).unwrap(), real_per_layer());
}

#[test]
fn per_layer_config_wins_over_flat_fields() {
    // transformers pops global_head_dim when per_layer_config is present.
    let mut v = real_json();
    v["text_config"]["global_head_dim"] = json!(128);
    assert_eq!(parse(&v).unwrap().text.global_head_dim, 512);
}

#[test]
fn empty_per_layer_config_means_full_layers_use_global_shape() {
    let mut v = real_json();
    v["text_config"]["per_layer_config"] = json!({});
    let t = parse(&v).unwrap().text;
    assert_eq!((t.global_head_dim, t.num_global_key_value_heads), (256, 8));
}

#[test]
fn defaults_when_optional_fields_are_absent() {
    let mut v = real_json();
    let t = v["text_config"].as_object_mut().unwrap();
    for k in [
        "layer_types",
        "rope_parameters",
        "sliding_window",
        "max_position_embeddings",
        "rms_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "use_bidirectional_attention",
        "hidden_activation",
    ] {
        t.remove(k);
    }
    v.as_object_mut().unwrap().remove("canvas_length");
    v.as_object_mut().unwrap().remove("eos_token_id");
    v.as_object_mut().unwrap().remove("tie_word_embeddings");
    let c = parse(&v).unwrap();
    let t = &c.text;
    assert_eq!(t.layer_types, TextConfig::default_layer_types(30));
    assert_eq!(t.full_layers(), vec![5, 11, 17, 23, 29]);
    assert_eq!(
        (t.rope_sliding, t.rope_full),
        (RopeSpec::SLIDING_DEFAULT, RopeSpec::FULL_DEFAULT)
    );
    assert_eq!(t.sliding_window, 512);
    assert_eq!(t.max_position_embeddings, 131072);
    assert_eq!(t.rms_norm_eps, 1e-6);
    assert_eq!(
        (t.pad_token_id, t.bos_token_id, t.eos_token_ids.clone()),
        (0, 2, vec![1])
    );
    assert_eq!(t.use_bidirectional_attention, BidirectionalAttention::None);
    assert_eq!(t.final_logit_softcapping, Some(30.0));
    assert_eq!(c.canvas_length, 256);
    assert_eq!(
        c.eos_token_ids,
        vec![1],
        "top-level eos falls back to the text config's"
    );
    assert!(c.tie_word_embeddings);
}

#[test]
fn transformers_quirks() {
    // Last layer forced to full attention.
    let mut v = real_json();
    v["text_config"]["layer_types"][29] = json!("sliding_attention");
    assert_eq!(parse(&v).unwrap().text.layer_types[29], LayerKind::Full);
    // "all" halves the sliding window, and to_json writes back the original.
    let mut v = real_json();
    v["text_config"]["use_bidirectional_attention"] = json!("all");
    let c = parse(&v).unwrap();
    assert_eq!(c.text.sliding_window, 513);
    assert_eq!(
        c.text.use_bidirectional_attention,
        BidirectionalAttention::All
    );
    assert_eq!(parse(&c.to_json(ConfigSchema::PerLayerConfig)).unwrap(), c);
    // Explicit null softcap = none; self_conditioning_size is honoured.
    let mut v = real_json();
    v["text_config"]["final_logit_softcapping"] = Value::Null;
    v["text_config"]["self_conditioning_size"] = json!(1024);
    let t = parse(&v).unwrap().text;
    assert_eq!(t.final_logit_softcapping, None);
    assert_eq!(t.self_conditioning_size, 1024);
    // Legacy layer type name and top-level rope_theta fallback.
    let mut v = real_json();
    v["text_config"]["layer_types"][5] = json!("attention");
    v["text_config"]["rope_theta"] = json!(10000.0);
    v["text_config"]["rope_parameters"]["sliding_attention"]
        .as_object_mut()
        .unwrap()
        .remove("rope_theta");
    let t = parse(&v).unwrap().text;
    assert_eq!(t.layer_types[5], LayerKind::Full);
    assert_eq!(t.rope_sliding.theta, 10000.0);
    // A bare text config is accepted.
    let bare = real_json()["text_config"].clone();
    assert_eq!(parse(&bare).unwrap().text, real_per_layer().text);
}

#[test]
fn malformed_json_names_the_file() {
    let dir = tempdir("malformed");
    let path = dir.join("config.json");
    std::fs::write(&path, "{\"text_config\": {\"vocab_size\": 12,,}").unwrap();
    let e = ModelConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("malformed JSON"),
        "{e}"
    );
    let e = ModelConfig::from_file(dir.join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
}

#[test]
fn missing_required_fields_are_named() {
    for key in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "num_experts",
        "top_k_experts",
        "moe_intermediate_size",
    ] {
        let mut v = real_json();
        v["text_config"].as_object_mut().unwrap().remove(key);
        let e = err(&v);
        assert!(
            e.contains(&format!("`text_config.{key}`")) && e.contains("missing"),
            "{key}: {e}"
        );
        assert!(e.contains("config.json"), "{e}");
    }
    // Neither schema for the full-layer shape.
    let mut v = real_json();
    v["text_config"]
        .as_object_mut()
        .unwrap()
        .remove("per_layer_config");
    let e = err(&v);
    assert!(
        e.contains("global_head_dim") && e.contains("per_layer_config"),
        "{e}"
    );
    // No text config at all.
    let e = err(&json!({"model_type": "diffusion_gemma", "canvas_length": 256}));
    assert!(e.contains("`text_config`"), "{e}");
    // Missing file name in from_file errors.
    let dir = tempdir("missing-field");
    let path = dir.join("config.json");
    let mut v = real_json();
    v["text_config"]
        .as_object_mut()
        .unwrap()
        .remove("hidden_size");
    std::fs::write(&path, v.to_string()).unwrap();
    let e = ModelConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("text_config.hidden_size"),
        "{e}"
    );
}

#[test]
fn inconsistent_or_unsupported_configs_are_rejected() {
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "layer_types",
            Box::new(|v| {
                v["text_config"]["layer_types"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
        ),
        (
            "layer_types",
            Box::new(|v| v["text_config"]["layer_types"][3] = json!("linear_attention")),
        ),
        (
            "num_key_value_heads",
            Box::new(|v| v["text_config"]["num_key_value_heads"] = json!(6)),
        ),
        (
            "num_key_value_heads (3)",
            Box::new(|v| {
                v["text_config"]["per_layer_config"] =
                    json!({"full_attention": {"head_dim": 512, "num_key_value_heads": 3}})
            }),
        ),
        (
            "top_k_experts",
            Box::new(|v| v["text_config"]["top_k_experts"] = json!(200)),
        ),
        (
            "hidden_activation",
            Box::new(|v| v["text_config"]["hidden_activation"] = json!("silu")),
        ),
        (
            "hidden_size",
            Box::new(|v| v["text_config"]["hidden_size"] = json!("2816")),
        ),
        (
            "hidden_size",
            Box::new(|v| v["text_config"]["hidden_size"] = json!(0)),
        ),
        (
            "per_layer_config.30",
            Box::new(|v| v["text_config"]["per_layer_config"]["30"] = json!({"head_dim": 512})),
        ),
        (
            "per_layer_config.bogus",
            Box::new(|v| v["text_config"]["per_layer_config"]["bogus"] = json!({"head_dim": 512})),
        ),
        (
            "intermediate_size",
            Box::new(|v| {
                v["text_config"]["per_layer_config"]["05"]["intermediate_size"] = json!(64)
            }),
        ),
        (
            "layer 11",
            Box::new(|v| v["text_config"]["per_layer_config"]["11"]["head_dim"] = json!(256)),
        ),
        (
            "layer 3 (sliding_attention)",
            Box::new(|v| v["text_config"]["per_layer_config"]["03"] = json!({"head_dim": 512})),
        ),
        (
            "rope_type",
            Box::new(|v| {
                v["text_config"]["rope_parameters"]["full_attention"]["rope_type"] = json!("yarn")
            }),
        ),
        (
            "full_attention",
            Box::new(|v| {
                v["text_config"]["rope_parameters"]
                    .as_object_mut()
                    .unwrap()
                    .remove("full_attention");
            }),
        ),
        (
            "rope_theta",
            Box::new(|v| {
                v["text_config"]["rope_parameters"]["full_attention"]
                    .as_object_mut()
                    .unwrap()
                    .remove("rope_theta");
            }),
        ),
        (
            "attention_k_eq_v",
            Box::new(|v| v["text_config"]["attention_k_eq_v"] = json!(false)),
        ),
        (
            "attention_bias",
            Box::new(|v| v["text_config"]["attention_bias"] = json!(true)),
        ),
        (
            "eos_token_id",
            Box::new(|v| v["eos_token_id"] = json!([1, 300000])),
        ),
        (
            "eos_token_id",
            Box::new(|v| v["eos_token_id"] = json!("one")),
        ),
        (
            "model_type",
            Box::new(|v| v["model_type"] = json!("gemma4")),
        ),
        (
            "use_bidirectional_attention",
            Box::new(|v| v["text_config"]["use_bidirectional_attention"] = json!("text")),
        ),
    ];
    for (needle, mutate) in cases {
        let mut v = real_json();
        mutate(&mut v);
        let e = err(&v);
        assert!(
            e.contains(needle),
            "expected the error to mention `{needle}`, got: {e}"
        );
    }
}

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    let dir =
        std::env::temp_dir().join(format!("dgemma-model-config-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
