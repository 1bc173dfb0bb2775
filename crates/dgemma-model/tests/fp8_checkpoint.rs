//! FP8 experts: quantise-at-load against compressed-tensors FP8 checkpoints (the synthetic
//! writer's `fp8_experts` layout: per-expert `experts.{e}.{gate,up,down}_proj.weight` F8_E4M3 and
//! `.weight_scale`), scale dtypes, the fused e4m3 layout, FP8 Linears outside the experts, and
//! errors naming the culprit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dgemma_model::fp8;
use dgemma_model::quant::{ExpertTensor, Fp8Experts, Quant};
use dgemma_model::{write_synthetic_checkpoint, Checkpoint, DType, Error, ModelWeights, SyntheticSpec};
use safetensors::{Dtype as StDtype, SafeTensors};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(tag: &str, spec: &SyntheticSpec) -> TempDir {
    let dir = std::env::temp_dir().join(format!("dgemma-fp8-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_synthetic_checkpoint(&dir, spec).unwrap();
    TempDir(dir)
}

fn spec(fp8_experts: bool, shards: usize) -> SyntheticSpec {
    SyntheticSpec { seed: 11, shards, fp8_experts, ..SyntheticSpec::tiny() }
}

fn load(dir: &Path, quant: Quant) -> ModelWeights {
    let ck = Checkpoint::open(dir).unwrap();
    ModelWeights::load_with(&ck, quant).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn fp8_of(t: &ExpertTensor) -> &Fp8Experts {
    t.as_fp8().unwrap_or_else(|| panic!("{} is not FP8", t.name()))
}

/// Same shape, bit-identical scales and codes, row by row.
fn assert_same_fp8(a: &Fp8Experts, b: &Fp8Experts) {
    assert_eq!(a.shape, b.shape, "{}", a.name);
    assert_eq!(a.name, b.name);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.scales), bits(&b.scales), "{}: scales", a.name);
    for r in 0..a.rows() {
        assert_eq!(a.row_codes(r), b.row_codes(r), "{}: row {r}", a.name);
    }
    assert_eq!(a.codes(), b.codes());
}

#[test]
fn compressed_tensors_checkpoint_matches_quantise_at_load() {
    for shards in [1, 3] {
        let float_dir = write(&format!("float-{shards}"), &spec(false, shards));
        let fp8_dir = write(&format!("ct-{shards}"), &spec(true, shards));
        let quantised = load(&float_dir.0, Quant::Fp8);
        let as_stored = load(&float_dir.0, Quant::None);
        let ct = load(&fp8_dir.0, Quant::None);
        let ct_fp8 = load(&fp8_dir.0, Quant::Fp8);
        assert_eq!(quantised.layers.len(), ct.layers.len());
        for (i, (q, c)) in quantised.layers.iter().zip(&ct.layers).enumerate() {
            assert!(!as_stored.layers[i].experts_gate_up.is_fp8() && !as_stored.layers[i].experts_down.is_fp8());
            for (a, b) in [(&q.experts_gate_up, &c.experts_gate_up), (&q.experts_down, &c.experts_down)] {
                assert_same_fp8(fp8_of(a), fp8_of(b));
            }
            assert_same_fp8(fp8_of(&ct_fp8.layers[i].experts_down), fp8_of(&c.experts_down));
            // The quantised values are those of the float checkpoint's weights, row by row.
            let float = as_stored.layers[i].experts_gate_up.as_float().unwrap();
            let fq = fp8_of(&c.experts_gate_up);
            let k = fq.cols();
            let mut row = vec![0.0f32; k];
            let mut deq = vec![0.0f32; k];
            for r in [0, 1, fq.rows() / 2, fq.rows() - 1] {
                float.read_f32(r * k, &mut row);
                fq.dequantize_row(r, &mut deq);
                let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0;
                assert_eq!(fq.scales[r], scale, "layer {i} row {r}");
                for (w, d) in row.iter().zip(&deq) {
                    assert!((w - d).abs() <= (w.abs() / 16.0).max(scale / 1024.0) * 1.0001, "layer {i} row {r}: {w} vs {d}");
                }
            }
            // Everything else is the same tensor in both checkpoints.
            assert_eq!(q.q_proj.to_f32_vec(), c.q_proj.to_f32_vec());
            assert_eq!(q.router_proj.to_f32_vec(), c.router_proj.to_f32_vec());
        }
        assert_eq!(quantised.embed_tokens.to_f32_vec(), ct.embed_tokens.to_f32_vec());
        // The FP8 checkpoint's data is smaller by one byte per expert weight, less 4 bytes of
        // scale per expert row.
        let (sf, sq) = (spec(false, shards), spec(true, shards));
        let t = &sf.text;
        let per_layer = |n: usize, k: usize| t.num_experts * n * (k - 4);
        let saved = t.num_hidden_layers
            * (per_layer(2 * t.moe_intermediate_size, t.hidden_size) + per_layer(t.hidden_size, t.moe_intermediate_size));
        assert_eq!(sf.data_bytes() - sq.data_bytes(), saved as u64);
    }
}

#[test]
fn the_fp8_checkpoint_is_a_compressed_tensors_one() {
    let s = spec(true, 1);
    let dir = write("layout", &s);
    let bytes = std::fs::read(dir.0.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), s.tensor_list().len());
    let (e, m, h) = (s.text.num_experts, s.text.moe_intermediate_size, s.text.hidden_size);
    let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
    assert_eq!(data as u64, s.data_bytes());
    for (name, shape, dtype) in [
        ("model.decoder.layers.1.experts.3.gate_proj.weight", vec![m, h], StDtype::F8_E4M3),
        ("model.decoder.layers.1.experts.3.gate_proj.weight_scale", vec![m, 1], StDtype::F32),
        ("model.decoder.layers.1.experts.3.up_proj.weight", vec![m, h], StDtype::F8_E4M3),
        ("model.decoder.layers.2.experts.7.down_proj.weight", vec![h, m], StDtype::F8_E4M3),
        ("model.decoder.layers.2.experts.7.down_proj.weight_scale", vec![h, 1], StDtype::F32),
        ("model.decoder.layers.0.mlp.gate_proj.weight", vec![s.text.intermediate_size, h], StDtype::BF16),
    ] {
        let v = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((v.dtype(), v.shape()), (dtype, shape.as_slice()), "{name}");
    }
    assert!(st.tensor("model.decoder.layers.0.experts.gate_up_proj").is_err());
    assert!(st.tensor(&format!("model.decoder.layers.0.experts.{e}.gate_proj.weight")).is_err());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "compressed-tensors");
    assert_eq!(config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"], "channel");
    // The header's F8_E4M3 tensors are TensorRefs of that dtype.
    let ck = Checkpoint::open(&dir.0).unwrap();
    let t = ck.tensor("model.decoder.layers.1.experts.3.gate_proj.weight").unwrap();
    assert_eq!(t.dtype, DType::F8E4M3);
    assert_eq!(t.as_e4m3().unwrap().len(), m * h);
}

type Entry = (StDtype, Vec<usize>, Vec<u8>);

fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Entry>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, Entry> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn weights_err(dir: &Path) -> String {
    let ck = Checkpoint::open(dir).unwrap();
    ModelWeights::load(&ck).expect_err("weights should be rejected").to_string()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bf16_and_per_tensor_scales() {
    let dir = write("bf16-scale", &spec(true, 1));
    let gate = "model.decoder.layers.0.experts.2.gate_proj.weight_scale";
    let down = "model.decoder.layers.0.experts.5.down_proj.weight_scale";
    let before = load(&dir.0, Quant::None);
    let m = SyntheticSpec::tiny_text_config().moe_intermediate_size;
    rewrite(&dir.0.join("model.safetensors"), |map| {
        // A bf16 [M, 1] scale, and a per-tensor scale [1] (every row the same).
        let (_, shape, data) = map[gate].clone();
        let widened: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let narrow: Vec<u8> = widened.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        map.insert(gate.into(), (StDtype::BF16, shape, narrow));
        map.insert(down.into(), (StDtype::F32, vec![1], f32_bytes(&[0.125])));
    });
    let after = load(&dir.0, Quant::None);
    let (b, a) = (fp8_of(&before.layers[0].experts_gate_up), fp8_of(&after.layers[0].experts_gate_up));
    for r in 0..2 * m {
        let row = 2 * 2 * m + r; // expert 2's rows: gate (0..m) then up (m..2m)
        let want = if r < m { half::bf16::from_f32(b.scales[row]).to_f32() } else { b.scales[row] };
        assert_eq!(a.scales[row], want, "row {r}");
        assert_eq!(a.row_codes(row), b.row_codes(row));
    }
    let d = fp8_of(&after.layers[0].experts_down);
    let h = d.shape[1];
    assert!(d.scales[5 * h..6 * h].iter().all(|&s| s == 0.125));
    assert_eq!(d.scales[4 * h], fp8_of(&before.layers[0].experts_down).scales[4 * h]);
}

#[test]
fn fused_e4m3_experts_with_scales() {
    let dir = write("fused", &spec(false, 1));
    let quantised = load(&dir.0, Quant::Fp8);
    let name = "model.decoder.layers.1.experts.gate_up_proj";
    let q = fp8_of(&quantised.layers[1].experts_gate_up).clone();
    rewrite(&dir.0.join("model.safetensors"), |map| {
        let shape = map[name].1.clone();
        map.insert(name.into(), (StDtype::F8_E4M3, shape.clone(), q.codes()));
        map.insert(format!("{name}_scale"), (StDtype::F32, vec![shape[0], shape[1]], f32_bytes(&q.scales)));
    });
    // Whatever `quant` says, the stored FP8 experts are used as they are.
    for quant in [Quant::None, Quant::Fp8] {
        let w = load(&dir.0, quant);
        assert_same_fp8(fp8_of(&w.layers[1].experts_gate_up), &q);
        assert_eq!(w.layers[0].experts_gate_up.is_fp8(), quant == Quant::Fp8);
    }
    rewrite(&dir.0.join("model.safetensors"), |map| {
        map.remove(&format!("{name}_scale"));
    });
    let e = weights_err(&dir.0);
    assert!(e.contains(name) && e.contains(&format!("{name}_scale")) && e.contains("F8_E4M3"), "{e}");
}

#[test]
fn fp8_linears_outside_the_experts_are_dequantised_to_bf16() {
    let dir = write("dense-fp8", &spec(true, 1));
    let name = "model.decoder.layers.0.self_attn.q_proj.weight";
    let before = load(&dir.0, Quant::None);
    let original = before.layers[0].q_proj.to_f32_vec();
    let shape = before.layers[0].q_proj.shape.clone();
    let (rows, cols) = (shape[0], shape[1]);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0.0f32; rows];
    for r in 0..rows {
        scales[r] = fp8::quantize_row(&original[r * cols..(r + 1) * cols], &mut codes[r * cols..(r + 1) * cols]).unwrap();
    }
    rewrite(&dir.0.join("model.safetensors"), |map| {
        map.insert(name.into(), (StDtype::F8_E4M3, shape.clone(), codes.clone()));
        map.insert(format!("{name}_scale"), (StDtype::F32, vec![rows, 1], f32_bytes(&scales)));
    });
    let after = load(&dir.0, Quant::None);
    let q = &after.layers[0].q_proj;
    assert_eq!((q.dtype, &q.shape), (DType::BF16, &shape));
    let got = q.to_f32_vec();
    for r in 0..rows {
        for c in 0..cols {
            let want = half::bf16::from_f32(fp8::decode(codes[r * cols + c]) * scales[r]).to_f32();
            assert_eq!(got[r * cols + c], want, "[{r}, {c}]");
        }
    }
    rewrite(&dir.0.join("model.safetensors"), |map| {
        map.remove(&format!("{name}_scale"));
    });
    let e = weights_err(&dir.0);
    assert!(e.contains(name) && e.contains("weight_scale"), "{e}");
}

#[test]
fn broken_per_expert_checkpoints_name_the_tensor() {
    let dir = write("broken", &spec(true, 1));
    let path = dir.0.join("model.safetensors");
    let gone = "model.decoder.layers.2.experts.6.up_proj.weight";
    let no_scale = "model.decoder.layers.1.experts.0.down_proj.weight";
    let wrong = "model.decoder.layers.0.experts.1.gate_proj.weight";
    rewrite(&path, |map| {
        map.remove(gone);
        map.remove(&format!("{no_scale}_scale"));
        let (_, shape, data) = map[wrong].clone();
        let as_bf16: Vec<u8> = data.iter().flat_map(|&c| half::bf16::from_f32(fp8::decode(c)).to_le_bytes()).collect();
        map.insert(wrong.into(), (StDtype::BF16, shape, as_bf16));
    });
    let ck = Checkpoint::open(&dir.0).unwrap();
    let err = ModelWeights::load(&ck).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Many { ref errors } if errors.len() == 3), "{msg}");
    assert!(msg.contains(gone) && msg.contains("expert 6"), "{msg}");
    assert!(msg.contains(&format!("{no_scale}_scale")), "{msg}");
    assert!(msg.contains(wrong) && msg.contains("BF16") && msg.contains("F8_E4M3"), "{msg}");

    // No fused tensor and no per-expert ones: the fused name is reported missing.
    let dir = write("none", &spec(false, 1));
    rewrite(&dir.0.join("model.safetensors"), |map| {
        map.remove("model.decoder.layers.0.experts.down_proj");
    });
    let e = weights_err(&dir.0);
    assert!(e.contains("model.decoder.layers.0.experts.down_proj") && e.contains("experts.0.down_proj.weight"), "{e}");
}
