//! `dgemma run --quant fp8`, and a compressed-tensors FP8 checkpoint in a real checkpoint
//! directory layout (sharded, index, tokenizer, chat template, `quantization_config`): the bundled
//! tiny model's experts split into per-expert `experts.{e}.{gate,up,down}_proj.weight` F8_E4M3
//! with `.weight_scale` beside them, as LLM Compressor's FP8-dynamic checkpoints store them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dgemma_model::quant::{Fp8Experts, Quant};
use dgemma_model::{Checkpoint, ModelWeights};
use serde_json::{json, Map, Value};

fn repo() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

fn dgemma(args: &[&str]) -> Output {
    let bin: PathBuf = match std::env::var_os("DGEMMA_BIN") {
        Some(bin) if !bin.is_empty() => bin.into(),
        _ => env!("CARGO_BIN_EXE_dgemma").into(),
    };
    Command::new(bin).args(args).env_remove("DGEMMA_MODEL").output().expect("dgemma runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A safetensors file of `(name, dtype, shape, bytes)`.
fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}));
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// Expert `e`'s rows `rows` of `f` as a per-expert Linear: codes and F32 `[rows, 1]` scales.
fn part(f: &Fp8Experts, e: usize, row0: usize, rows: usize) -> (Vec<u8>, Vec<u8>) {
    let n = f.shape[1];
    let mut codes = Vec::new();
    let mut scales = Vec::new();
    for r in e * n + row0..e * n + row0 + rows {
        codes.extend_from_slice(f.row_codes(r));
        scales.extend_from_slice(&f.scales[r].to_le_bytes());
    }
    (codes, scales)
}

/// The bundled tiny model as a compressed-tensors FP8 checkpoint in `dir`: two shards (the
/// experts in the second) and an index.
fn write_fp8_checkpoint(dir: &Path) {
    let src = repo().join("reference/models/tiny-default");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": true, "dynamic": true}}},
        "ignore": ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*vision_tower.*", "re:.*self_conditioning.*"]
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let ck = Checkpoint::open(&src).unwrap();
    let quantised = ModelWeights::load_with(&ck, Quant::Fp8).unwrap();
    let mut rest = Vec::new();
    for name in ck.tensor_names() {
        if name.ends_with(".experts.gate_up_proj") || name.ends_with(".experts.down_proj") {
            continue;
        }
        let t = ck.tensor(name).expect("float tensors only in the bundled model");
        rest.push((name.to_string(), t.dtype.name(), t.shape.clone(), t.bytes().to_vec()));
    }
    let mut experts = Vec::new();
    for (i, l) in quantised.layers.iter().enumerate() {
        let (gu, down) = (l.experts_gate_up.as_fp8().unwrap(), l.experts_down.as_fp8().unwrap());
        let [e, two_m, h] = gu.shape;
        let m = two_m / 2;
        for ex in 0..e {
            let prefix = format!("model.decoder.layers.{i}.experts.{ex}");
            for (proj, f, row0, rows, cols) in
                [("gate_proj", gu, 0, m, h), ("up_proj", gu, m, m, h), ("down_proj", down, 0, h, m)]
            {
                let (codes, scales) = part(f, ex, row0, rows);
                experts.push((format!("{prefix}.{proj}.weight"), "F8_E4M3", vec![rows, cols], codes));
                experts.push((format!("{prefix}.{proj}.weight_scale"), "F32", vec![rows, 1], scales));
            }
        }
    }
    let shards = [("model-00001-of-00002.safetensors", rest), ("model-00002-of-00002.safetensors", experts)];
    let mut map = Map::new();
    for (file, tensors) in &shards {
        write_safetensors(&dir.join(file), tensors);
        for (name, ..) in tensors {
            map.insert(name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string(&index).unwrap()).unwrap();
}

#[test]
fn run_quant_fp8_and_a_compressed_tensors_checkpoint_agree() {
    let args = ["--max-new-tokens", "32", "--seed", "5", "Why is the sky blue?"];
    let run = |extra: &[&str]| {
        let mut a = vec!["run"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&args);
        let out = dgemma(&a);
        assert!(out.status.success(), "dgemma {a:?}: {}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    };
    let (bf16_out, bf16_err) = run(&[]);
    let (fp8_out, fp8_err) = run(&["--quant", "fp8"]);
    assert!(!bf16_err.contains("fp8 experts"), "{bf16_err}");
    assert!(fp8_err.contains("fp8 experts") && fp8_err.contains("stats: canvases"), "{fp8_err}");
    assert!(!fp8_out.trim().is_empty());
    eprintln!("bf16 experts: {bf16_out:?}\nfp8 experts:  {fp8_out:?}");

    let dir = std::env::temp_dir().join(format!("dgemma-cli-fp8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_fp8_checkpoint(&dir);
    let model = dir.to_str().unwrap();
    // The stored FP8 experts are the ones --quant fp8 makes of the bf16 model: the same output,
    // with or without --quant.
    for extra in [&["--model", model][..], &["--model", model, "--quant", "fp8"][..]] {
        let (out, err) = run(extra);
        assert!(err.contains("fp8 experts"), "{err}");
        assert_eq!(out, fp8_out, "{extra:?}");
    }
    let info = dgemma(&["info", "--model", model]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
