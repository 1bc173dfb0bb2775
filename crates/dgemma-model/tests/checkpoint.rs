//! Synthetic checkpoints: round trips (single file and sharded, f32 / bf16 / f16), weight
//! validation, and every kind of bad input giving an error that names the culprit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dgemma_model::synthetic::{synthetic_files, synthetic_values};
use dgemma_model::{
    write_synthetic_checkpoint, Checkpoint, ConfigSchema, DType, Error, LayerKind, ModelWeights,
    SyntheticSpec,
};
use safetensors::{Dtype as StDtype, SafeTensors};

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
    let dir = std::env::temp_dir().join(format!("dgemma-model-ck-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn spec(dtype: DType, shards: usize) -> SyntheticSpec {
    SyntheticSpec {
        dtype,
        shards,
        seed: 7,
        ..SyntheticSpec::tiny()
    }
}

fn write(tag: &str, spec: &SyntheticSpec) -> TempDir {
    let dir = tempdir(tag);
    write_synthetic_checkpoint(&dir, spec).unwrap();
    dir
}

fn check_round_trip(dir: &Path, spec: &SyntheticSpec) {
    let ck = Checkpoint::open(dir).unwrap();
    assert_eq!(ck.config(), &spec.model_config());
    assert_eq!(ck.generation_config(), &spec.generation_config());
    let list = spec.tensor_list();
    assert_eq!(ck.tensor_count(), list.len());
    for (name, shape) in &list {
        let t = ck.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dtype, spec.dtype, "{name}");
        assert_eq!(&t.shape, shape, "{name}");
        let want = synthetic_values(spec, name, shape);
        let got = t.to_f32_vec();
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: values differ"
        );
        // Zero-copy views agree with the widening reader.
        match spec.dtype {
            DType::BF16 => assert!(t
                .as_bf16()
                .unwrap()
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_f32() == *b)),
            DType::F16 => assert!(t
                .as_f16()
                .unwrap()
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_f32() == *b)),
            DType::F32 => assert_eq!(t.as_f32().unwrap(), &want[..]),
            DType::F8E4M3 => unreachable!("synthetic checkpoints are written in a float dtype"),
        }
    }
    let file_bytes: u64 = ck
        .files()
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(ck.total_bytes(), file_bytes);

    let w = ModelWeights::load(&ck).unwrap();
    let text = &spec.text;
    assert_eq!(w.layers.len(), text.num_hidden_layers);
    assert_eq!(
        w.embed_tokens.shape,
        vec![text.vocab_size, text.hidden_size]
    );
    assert_eq!(w.lm_head.is_none(), spec.tie_word_embeddings);
    assert_eq!(
        w.lm_head().name,
        if spec.tie_word_embeddings {
            "model.decoder.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    );
    for (i, l) in w.layers.iter().enumerate() {
        assert_eq!(l.spec, text.layer(i));
        assert_eq!(
            l.v_proj.is_some(),
            text.layer_types[i] == LayerKind::Sliding
        );
        let ls = synthetic_values(
            spec,
            &format!("model.decoder.layers.{i}.layer_scalar"),
            &[1],
        )[0];
        let els = synthetic_values(
            spec,
            &format!("model.encoder.language_model.layers.{i}.layer_scalar"),
            &[1],
        )[0];
        assert_eq!((l.layer_scalar, l.encoder_layer_scalar), (ls, els));
        assert_eq!(
            l.experts_gate_up.shape(),
            [
                text.num_experts,
                2 * text.moe_intermediate_size,
                text.hidden_size
            ]
        );
        assert!(!l.experts_gate_up.is_fp8());
    }
}

#[test]
fn round_trip_single_file_every_dtype() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let s = spec(dtype, 1);
        let dir = write(&format!("single-{dtype}"), &s);
        assert!(dir.join("model.safetensors").is_file());
        assert!(!dir.join("model.safetensors.index.json").exists());
        check_round_trip(&dir, &s);
    }
}

#[test]
fn round_trip_sharded() {
    for (dtype, shards, schema) in [
        (DType::BF16, 3, ConfigSchema::GlobalFields),
        (DType::F32, 2, ConfigSchema::PerLayerConfig),
        (DType::F16, 5, ConfigSchema::PerLayerConfig),
    ] {
        let s = SyntheticSpec {
            schema,
            tie_word_embeddings: shards != 2,
            ..spec(dtype, shards)
        };
        let dir = write(&format!("sharded-{dtype}-{shards}"), &s);
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.files().len(), shards);
        assert_eq!(ck.files(), &synthetic_files(&dir, &s)[..]);
        assert!(ck.index_file().is_some());
        check_round_trip(&dir, &s);
    }
}

#[test]
fn tensor_views_and_slices() {
    let s = spec(DType::BF16, 1);
    let dir = write("views", &s);
    let ck = Checkpoint::open(&dir).unwrap();
    let name = "model.decoder.layers.0.experts.gate_up_proj";
    let t = ck.tensor(name).unwrap();
    let all = t.to_f32_vec();
    let per_expert = t.row_numel();
    let e3 = t.index0(3).unwrap();
    assert_eq!(e3.shape, vec![2 * 32, 64]);
    assert_eq!(e3.to_f32_vec(), all[3 * per_expert..4 * per_expert]);
    let rows = t.slice0(2, 5).unwrap();
    assert_eq!(rows.shape[0], 3);
    assert_eq!(rows.to_f32_vec(), all[2 * per_expert..5 * per_expert]);
    let mut buf = vec![0.0; 10];
    t.read_f32(100, &mut buf);
    assert_eq!(buf, all[100..110]);
    let row = e3.row(5).unwrap();
    assert_eq!(row.shape, vec![64]);
    assert_eq!(
        row.to_f32_vec(),
        all[3 * per_expert + 5 * 64..3 * per_expert + 6 * 64]
    );
    // Out-of-range access is an error naming the tensor, not a panic.
    let e = t.index0(8).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("out of range"), "{e}");
    assert!(t.slice0(4, 9).is_err());
    let e = t
        .try_read_f32(all.len() - 5, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let scalar = ck.tensor("model.decoder.layers.0.layer_scalar").unwrap();
    assert!(scalar.scalar_f32().is_ok());
    assert!(t.scalar_f32().is_err());
    assert_eq!(t.bytes().len(), t.numel() * 2);
}

#[test]
fn prefetch_reports_progress() {
    let s = spec(DType::F32, 2);
    let dir = write("prefetch", &s);
    let ck = Checkpoint::open(&dir).unwrap();
    let mut calls = Vec::new();
    ck.prefetch(&mut |done, total| calls.push((done, total)));
    assert_eq!(calls.first(), Some(&(0, ck.total_bytes())));
    assert_eq!(calls.last(), Some(&(ck.total_bytes(), ck.total_bytes())));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
}

#[test]
fn safetensors_crate_reads_our_files() {
    let s = spec(DType::BF16, 1);
    let dir = write("interop", &s);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), s.tensor_list().len());
    let v = st.tensor("model.decoder.norm.weight").unwrap();
    assert_eq!(v.dtype(), StDtype::BF16);
    assert_eq!(v.shape(), &[64]);
}

// ---------------------------------------------------------------------------------------------
// Bad input

type Entry = (StDtype, Vec<usize>, Vec<u8>);

/// Rewrites a safetensors file with the official `safetensors` crate after `edit`.
fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Entry>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, Entry> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn open_err(dir: &Path) -> String {
    Checkpoint::open(dir)
        .expect_err("checkpoint should be rejected")
        .to_string()
}

fn weights_err(dir: &Path) -> (Error, String) {
    let ck = Checkpoint::open(dir).unwrap();
    let e = ModelWeights::load(&ck).expect_err("weights should be rejected");
    let s = e.to_string();
    (e, s)
}

#[test]
fn files_rewritten_by_the_safetensors_crate_still_load() {
    let s = spec(DType::F16, 1);
    let dir = write("rewrite-noop", &s);
    rewrite(&dir.join("model.safetensors"), |_| {});
    check_round_trip(&dir, &s);
}

#[test]
fn missing_tensor() {
    let dir = write("missing-tensor", &spec(DType::BF16, 1));
    let name = "model.decoder.layers.1.mlp.up_proj.weight";
    rewrite(&dir.join("model.safetensors"), |m| {
        m.remove(name);
    });
    let (_, e) = weights_err(&dir);
    assert!(
        e.contains(name) && e.contains("missing") && e.contains("sliding_attention layer 1"),
        "{e}"
    );
    assert!(e.contains(&dir.display().to_string()), "{e}");
}

#[test]
fn wrong_shape_names_tensor_and_file() {
    let dir = write("wrong-shape", &spec(DType::BF16, 1));
    let name = "model.decoder.layers.1.self_attn.k_proj.weight";
    rewrite(&dir.join("model.safetensors"), |m| {
        m.insert(
            name.into(),
            (StDtype::BF16, vec![64, 64], vec![0; 64 * 64 * 2]),
        );
    });
    let (_, e) = weights_err(&dir);
    assert!(e.contains(&format!("tensor {name} in ")), "{e}");
    assert!(
        e.contains("model.safetensors has shape [64, 64], expected [32, 64]"),
        "{e}"
    );
}

#[test]
fn wrong_shape_in_a_shard_names_the_shard() {
    let s = spec(DType::F32, 3);
    let dir = write("wrong-shape-shard", &s);
    let name = "model.decoder.layers.2.self_attn.q_norm.weight";
    let ck = Checkpoint::open(&dir).unwrap();
    let shard = ck.tensor(name).unwrap().file.clone();
    drop(ck);
    rewrite(&shard, |m| {
        m.insert(name.into(), (StDtype::F32, vec![16], vec![0; 64]));
    });
    let (_, e) = weights_err(&dir);
    let shard_name = shard.file_name().unwrap().to_str().unwrap();
    assert!(
        e.contains(name) && e.contains(shard_name) && e.contains("expected [32]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype() {
    let dir = write("wrong-dtype", &spec(DType::BF16, 1));
    let name = "model.decoder.layers.0.router.per_expert_scale";
    rewrite(&dir.join("model.safetensors"), |m| {
        m.insert(name.into(), (StDtype::I64, vec![8], vec![0; 64]));
    });
    let (_, e) = weights_err(&dir);
    assert!(
        e.contains(name) && e.contains("I64") && e.contains("float"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn sliding_layer_without_v_proj() {
    let dir = write("no-vproj", &spec(DType::BF16, 1));
    let name = "model.decoder.layers.0.self_attn.v_proj.weight";
    rewrite(&dir.join("model.safetensors"), |m| {
        m.remove(name);
    });
    let (_, e) = weights_err(&dir);
    assert!(
        e.contains(name) && e.contains("sliding_attention") && e.contains("v_proj"),
        "{e}"
    );
}

#[test]
fn full_layer_v_proj_is_ignored() {
    let dir = write("full-vproj", &spec(DType::BF16, 1));
    rewrite(&dir.join("model.safetensors"), |m| {
        m.insert(
            "model.decoder.layers.2.self_attn.v_proj.weight".into(),
            (StDtype::BF16, vec![32, 64], vec![0; 32 * 64 * 2]),
        );
    });
    let ck = Checkpoint::open(&dir).unwrap();
    assert!(ModelWeights::load(&ck).unwrap().layers[2].v_proj.is_none());
}

#[test]
fn missing_encoder_layer_scalar_and_untied_lm_head() {
    let s = SyntheticSpec {
        tie_word_embeddings: false,
        ..spec(DType::BF16, 1)
    };
    let dir = write("untied", &s);
    rewrite(&dir.join("model.safetensors"), |m| {
        m.remove("lm_head.weight");
        m.remove("model.encoder.language_model.layers.1.layer_scalar");
    });
    let (e, msg) = weights_err(&dir);
    match e {
        Error::Many { errors } => assert_eq!(errors.len(), 2),
        other => panic!("expected two problems, got {other}"),
    }
    assert!(
        msg.contains("lm_head.weight") && msg.contains("tie_word_embeddings"),
        "{msg}"
    );
    assert!(
        msg.contains("model.encoder.language_model.layers.1.layer_scalar"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_file() {
    let dir = write("truncated", &spec(DType::BF16, 1));
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // Cut inside the header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(40)
        .unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated") && e.contains("header"),
        "{e}"
    );
    // Shorter than the length prefix.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5)
        .unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn malformed_safetensors_header() {
    let dir = write("bad-header", &spec(DType::BF16, 1));
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'[';
    bytes[9] = b'x';
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("malformed header JSON"),
        "{e}"
    );

    // A header whose byte count disagrees with dtype x shape.
    let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}    "#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("tensor a") && e.contains("needs 16 bytes"),
        "{e}"
    );
}

#[test]
fn index_pointing_at_a_missing_shard() {
    let s = spec(DType::BF16, 3);
    let dir = write("missing-shard", &s);
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00002-of-00003.safetensors"),
        "{e}"
    );
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn index_naming_a_tensor_its_shard_lacks() {
    let s = spec(DType::BF16, 2);
    let dir = write("index-mismatch", &s);
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.decoder.ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.decoder.ghost.weight") && e.contains("model-00001-of-00002.safetensors"),
        "{e}"
    );
    // A shard path escaping the directory.
    index["weight_map"]["model.decoder.ghost.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("../elsewhere.safetensors"), "{e}");
    // Malformed index JSON.
    std::fs::write(&index_path, "{\"weight_map\": {").unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("malformed JSON"),
        "{e}"
    );
}

#[test]
fn missing_files() {
    let dir = write("missing-files", &spec(DType::BF16, 1));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("model.safetensors.index.json"),
        "{e}"
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = open_err(&dir);
    assert!(e.contains("config.json"), "{e}");
    let e = open_err(&dir.join("does-not-exist"));
    assert!(e.contains("does-not-exist"), "{e}");
}

#[test]
fn malformed_config_in_a_checkpoint() {
    let dir = write("bad-config", &spec(DType::BF16, 1));
    std::fs::write(dir.join("config.json"), "{\"text_config\": ").unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("malformed JSON"),
        "{e}"
    );
    std::fs::write(
        dir.join("config.json"),
        "{\"text_config\": {\"vocab_size\": 512}}",
    )
    .unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("missing required field `text_config.hidden_size`"),
        "{e}"
    );
    write_synthetic_checkpoint(&dir, &spec(DType::BF16, 1)).unwrap();
    std::fs::write(dir.join("generation_config.json"), "{\"top_k\": 40}").unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("generation_config.json") && e.contains("top_k"),
        "{e}"
    );
    // generation_config.json is optional.
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.generation_config().max_new_tokens, None);
    assert_eq!(ck.generation_config().eos_token_ids, vec![1, 106, 50]);
}

#[test]
fn config_and_weights_disagree() {
    // Weights written for one config, config.json edited to another hidden size: every mismatch
    // is reported together.
    let dir = write("disagree", &spec(DType::BF16, 1));
    let s2 = SyntheticSpec {
        text: dgemma_model::TextConfig {
            hidden_size: 48,
            ..SyntheticSpec::tiny_text_config()
        },
        ..spec(DType::BF16, 1)
    };
    std::fs::write(
        dir.join("config.json"),
        s2.model_config()
            .to_json(ConfigSchema::PerLayerConfig)
            .to_string(),
    )
    .unwrap();
    let (e, msg) = weights_err(&dir);
    assert!(
        matches!(e, Error::Many { ref errors } if errors.len() > 10),
        "{msg}"
    );
    assert!(
        msg.contains("model.decoder.embed_tokens.weight") && msg.contains("expected [512, 48]"),
        "{msg}"
    );
}

#[test]
fn synthetic_spec_is_validated() {
    let dir = tempdir("bad-spec");
    let bad = SyntheticSpec {
        text: dgemma_model::TextConfig {
            top_k_experts: 9,
            ..SyntheticSpec::tiny_text_config()
        },
        ..SyntheticSpec::tiny()
    };
    let e = write_synthetic_checkpoint(&dir, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_k_experts"), "{e}");
    let bad = SyntheticSpec {
        shards: 1000,
        ..SyntheticSpec::tiny()
    };
    assert!(write_synthetic_checkpoint(&dir, &bad).is_err());
    // Same seed, same bytes; another seed, other bytes.
    let a = tempdir("seed-a");
    let b = tempdir("seed-b");
    write_synthetic_checkpoint(&a, &SyntheticSpec::tiny()).unwrap();
    write_synthetic_checkpoint(&b, &SyntheticSpec::tiny()).unwrap();
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
    write_synthetic_checkpoint(
        &b,
        &SyntheticSpec {
            seed: 1,
            ..SyntheticSpec::tiny()
        },
    )
    .unwrap();
    assert_ne!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Checkpoint>();
    check::<ModelWeights>();
    check::<dgemma_model::TensorRef>();
}
