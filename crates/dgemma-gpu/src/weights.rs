//! The checkpoint's tensors in executor memory, as bf16.
//!
//! A bf16 tensor is copied straight from the memory-mapped file; an f32 or f16 tensor is
//! rounded to bf16 on the host first (what `from_pretrained(dtype=torch.bfloat16)` does, and
//! what the CPU backend's bf16 mode reads). Uploads go in chunks of at most 64 MiB, reporting
//! progress after each.
//!
//! FP8 experts ([`dgemma_model::Quant::Fp8`], or a compressed-tensors FP8 checkpoint) are
//! uploaded as they are held: the e4m3 codes `[E, N, K]` (one byte each, half the bf16 bytes)
//! and one fp32 scale per row `[E * N]` ([`ExpertRegion::Fp8`]); the grouped GEMMs dequantise them
//! while staging (`csrc/grouped_gemm.cuh`, WeightE4m3). [`DeviceWeights::upload`] with
//! [`Quant::Fp8`] quantises float experts one tensor at a time right before uploading it (the
//! same per-row quantisation as `ModelWeights::load_with`), so loading a bf16 checkpoint as FP8
//! holds at most one expert tensor's codes in host memory (0.5 GB for the 26B model), not all of
//! them (23 GB).

use dgemma_cuda::{Executor, Region};
use dgemma_model::config::{LayerSpec, TextConfig};
use dgemma_model::quant::{ExpertTensor, Fp8Experts, Quant};
use dgemma_model::tensor::{DType, TensorRef};
use dgemma_model::weights::ModelWeights;
use half::bf16;

use crate::error::{cuda, Result};

/// Bytes per upload chunk.
const CHUNK: usize = 64 << 20;

/// Progress of a weight upload: `(bytes done, bytes total)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// A MoE expert tensor `[E, N, K]` in executor memory.
#[derive(Clone, Copy, Debug)]
pub enum ExpertRegion {
    /// bf16 weights.
    Bf16(Region),
    /// e4m3 codes (one byte per weight) and one fp32 scale per row (`[E * N]`).
    Fp8 { codes: Region, scales: Region },
}

impl ExpertRegion {
    pub fn is_fp8(&self) -> bool {
        matches!(self, ExpertRegion::Fp8 { .. })
    }

    /// The tensor as the grouped GEMMs take it.
    pub fn weights(&self) -> dgemma_cuda::ops::ExpertWeights {
        use dgemma_cuda::ops::ExpertWeights;
        match *self {
            ExpertRegion::Bf16(w) => ExpertWeights::bf16(w.b16()),
            ExpertRegion::Fp8 { codes, scales } => ExpertWeights::e4m3(codes.buf(1), scales.b32()),
        }
    }
}

/// One layer's tensors.
pub struct LayerRegions {
    pub spec: LayerSpec,
    pub q_proj: Region,
    pub k_proj: Region,
    pub v_proj: Option<Region>,
    pub o_proj: Region,
    pub q_norm: Region,
    pub k_norm: Region,
    pub input_layernorm: Region,
    pub post_attention_layernorm: Region,
    pub pre_feedforward_layernorm: Region,
    pub post_feedforward_layernorm_1: Region,
    pub pre_feedforward_layernorm_2: Region,
    pub post_feedforward_layernorm_2: Region,
    pub post_feedforward_layernorm: Region,
    pub mlp_gate: Region,
    pub mlp_up: Region,
    pub mlp_down: Region,
    pub router_proj: Region,
    pub router_scale: Region,
    pub router_per_expert_scale: Region,
    /// `[E, 2I, H]`, gate rows first.
    pub experts_gate_up: ExpertRegion,
    /// `[E, H, I]`.
    pub experts_down: ExpertRegion,
    /// bf16-rounded, like the activations.
    pub layer_scalar: f32,
    pub encoder_layer_scalar: f32,
}

/// The whole text model.
pub struct DeviceWeights {
    /// `[V, H]`: embedding, tied LM head and the soft-embedding matrix.
    pub embed: Region,
    /// The LM head (the embedding when tied).
    pub lm_head: Region,
    pub final_norm: Region,
    pub sc_pre_norm: Region,
    pub sc_gate: Region,
    pub sc_up: Region,
    pub sc_down: Region,
    pub layers: Vec<LayerRegions>,
    /// Bytes uploaded.
    pub bytes: usize,
}

/// The bf16 bytes of a tensor (borrowed when the file is bf16 already).
fn bf16_bytes(t: &TensorRef, start: usize, count: usize) -> std::borrow::Cow<'_, [u8]> {
    match t.dtype {
        DType::BF16 => std::borrow::Cow::Borrowed(&t.bytes()[2 * start..2 * (start + count)]),
        DType::F32 | DType::F16 | DType::F8E4M3 => {
            let mut wide = vec![0.0f32; count];
            t.read_f32(start, &mut wide);
            let narrow: Vec<bf16> = wide.iter().map(|&x| bf16::from_f32(x)).collect();
            std::borrow::Cow::Owned(bytemuck::cast_slice(&narrow).to_vec())
        }
    }
}

struct Uploader<'a> {
    exec: &'a mut dyn Executor,
    /// How float experts go to the device (FP8: quantised here, tensor by tensor).
    quant: Quant,
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl Uploader<'_> {
    fn tensor(&mut self, t: &TensorRef) -> Result<Region> {
        let n = t.numel();
        let region = self.exec.alloc(2 * n, &t.name).map_err(cuda)?;
        let per_chunk = CHUNK / 2;
        let mut start = 0;
        while start < n {
            let count = per_chunk.min(n - start);
            let bytes = bf16_bytes(t, start, count);
            let dst = region.sub(2 * start, 2 * count).map_err(cuda)?;
            self.exec.upload_bytes(dst, &bytes).map_err(cuda)?;
            start += count;
            self.done += 2 * count;
            (self.progress)(self.done, self.total);
        }
        Ok(region)
    }

    /// `bytes` into `region` at `offset`, in chunks, counting them as uploaded.
    fn bytes(&mut self, region: Region, offset: usize, bytes: &[u8]) -> Result<()> {
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            let dst = region.sub(offset + i * CHUNK, chunk.len()).map_err(cuda)?;
            self.exec.upload_bytes(dst, chunk).map_err(cuda)?;
            self.done += chunk.len();
            (self.progress)(self.done, self.total);
        }
        Ok(())
    }

    /// FP8 experts: the codes block by block (straight from the mapped checkpoint, or from the
    /// codes quantised at load), then the scales.
    fn fp8(&mut self, f: &Fp8Experts) -> Result<ExpertRegion> {
        let k = f.cols();
        let codes = self.exec.alloc(f.rows() * k, &f.name).map_err(cuda)?;
        for b in &f.blocks {
            self.bytes(codes, b.row0 * k, b.codes.bytes())?;
        }
        let scales = self.exec.alloc(4 * f.rows(), &format!("{} scales", f.name)).map_err(cuda)?;
        self.bytes(scales, 0, bytemuck::cast_slice(&f.scales))?;
        Ok(ExpertRegion::Fp8 { codes, scales })
    }

    fn experts(&mut self, t: &ExpertTensor) -> Result<ExpertRegion> {
        match (t, self.quant) {
            (ExpertTensor::Float(t), Quant::None) => Ok(ExpertRegion::Bf16(self.tensor(t)?)),
            // Quantised now and dropped once uploaded.
            (ExpertTensor::Float(t), Quant::Fp8) => self.fp8(&Fp8Experts::quantize(t)?),
            (ExpertTensor::Fp8(f), _) => self.fp8(f),
        }
    }
}

/// Bytes the upload of expert tensor `t` allocates when float experts are held as `quant`.
fn expert_bytes(t: &ExpertTensor, quant: Quant) -> usize {
    match (t, quant) {
        (ExpertTensor::Float(t), Quant::None) => 2 * t.numel(),
        // One byte per code and an f32 scale per row [E * N].
        (ExpertTensor::Float(t), Quant::Fp8) => t.numel() + 4 * t.shape[0] * t.shape[1],
        (ExpertTensor::Fp8(f), _) => f.bytes(),
    }
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

impl DeviceWeights {
    /// Bytes [`DeviceWeights::upload`] will allocate for `w` with float experts held as `quant`.
    pub fn bytes_needed(w: &ModelWeights, quant: Quant) -> usize {
        let experts: usize =
            w.layers.iter().map(|l| expert_bytes(&l.experts_gate_up, quant) + expert_bytes(&l.experts_down, quant)).sum();
        all_tensors(w).iter().map(|t| 2 * t.numel()).sum::<usize>() + experts
    }

    /// Uploads every tensor of `w`; float experts as `quant` says (FP8: quantised per output row
    /// here, one tensor at a time; FP8 experts of `w` go as they are).
    pub fn upload(cfg: &TextConfig, w: &ModelWeights, exec: &mut dyn Executor, quant: Quant, progress: Progress) -> Result<DeviceWeights> {
        let total = Self::bytes_needed(w, quant);
        let mut up = Uploader { exec, quant, done: 0, total, progress };
        let embed = up.tensor(&w.embed_tokens)?;
        let lm_head = match &w.lm_head {
            Some(t) => up.tensor(t)?,
            None => embed,
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for (i, l) in w.layers.iter().enumerate() {
            layers.push(LayerRegions {
                spec: cfg.layer(i),
                q_proj: up.tensor(&l.q_proj)?,
                k_proj: up.tensor(&l.k_proj)?,
                v_proj: l.v_proj.as_ref().map(|t| up.tensor(t)).transpose()?,
                o_proj: up.tensor(&l.o_proj)?,
                q_norm: up.tensor(&l.q_norm)?,
                k_norm: up.tensor(&l.k_norm)?,
                input_layernorm: up.tensor(&l.input_layernorm)?,
                post_attention_layernorm: up.tensor(&l.post_attention_layernorm)?,
                pre_feedforward_layernorm: up.tensor(&l.pre_feedforward_layernorm)?,
                post_feedforward_layernorm_1: up.tensor(&l.post_feedforward_layernorm_1)?,
                pre_feedforward_layernorm_2: up.tensor(&l.pre_feedforward_layernorm_2)?,
                post_feedforward_layernorm_2: up.tensor(&l.post_feedforward_layernorm_2)?,
                post_feedforward_layernorm: up.tensor(&l.post_feedforward_layernorm)?,
                mlp_gate: up.tensor(&l.mlp_gate)?,
                mlp_up: up.tensor(&l.mlp_up)?,
                mlp_down: up.tensor(&l.mlp_down)?,
                router_proj: up.tensor(&l.router_proj)?,
                router_scale: up.tensor(&l.router_scale)?,
                router_per_expert_scale: up.tensor(&l.router_per_expert_scale)?,
                experts_gate_up: up.experts(&l.experts_gate_up)?,
                experts_down: up.experts(&l.experts_down)?,
                layer_scalar: round_bf16(l.layer_scalar),
                encoder_layer_scalar: round_bf16(l.encoder_layer_scalar),
            });
        }
        Ok(DeviceWeights {
            embed,
            lm_head,
            final_norm: up.tensor(&w.final_norm)?,
            sc_pre_norm: up.tensor(&w.sc_pre_norm)?,
            sc_gate: up.tensor(&w.sc_gate)?,
            sc_up: up.tensor(&w.sc_up)?,
            sc_down: up.tensor(&w.sc_down)?,
            layers,
            bytes: up.done,
        })
    }
}

/// Values of synthetic weights: matrices uniform in +-0.03 (about the spread of the trained
/// projections), scales around 1, so activations stay finite through 30 layers and the router
/// spreads tokens over the experts.
const SYNTHETIC_MATRIX: f32 = 0.03;

/// Fills executor memory from a repeating host pattern (64 MiB), uploaded chunk by chunk.
struct Filler<'a> {
    exec: &'a mut dyn Executor,
    matrix: Vec<bf16>,
    scale: Vec<bf16>,
    /// e4m3 codes for FP8 experts (finite, either sign; with the row scales below, weights of
    /// about the bf16 matrices' spread).
    codes: Vec<u8>,
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl Filler<'_> {
    fn tensor(&mut self, shape: &[usize], what: &str) -> Result<Region> {
        let n: usize = shape.iter().product();
        let region = self.exec.alloc(2 * n, what).map_err(cuda)?;
        // Vectors (norm and router scales) are scales: values near 1.
        let pattern = if shape.len() == 1 { &self.scale } else { &self.matrix };
        let mut start = 0;
        while start < n {
            let count = pattern.len().min(n - start);
            let dst = region.sub(2 * start, 2 * count).map_err(cuda)?;
            self.exec.upload_bytes(dst, bytemuck::cast_slice(&pattern[..count])).map_err(cuda)?;
            start += count;
            self.done += 2 * count;
            (self.progress)(self.done, self.total);
        }
        Ok(region)
    }

    /// An expert tensor `[E, N, K]`: bf16 from the matrix pattern, or FP8 codes from the code
    /// pattern with every row's scale `SYNTHETIC_MATRIX / 448`.
    fn experts(&mut self, shape: [usize; 3], what: &str, quant: Quant) -> Result<ExpertRegion> {
        if quant == Quant::None {
            return Ok(ExpertRegion::Bf16(self.tensor(&shape, what)?));
        }
        let (rows, n) = (shape[0] * shape[1], shape.iter().product::<usize>());
        let codes = self.exec.alloc(n, what).map_err(cuda)?;
        let mut start = 0;
        while start < n {
            let count = self.codes.len().min(n - start);
            let dst = codes.sub(start, count).map_err(cuda)?;
            self.exec.upload_bytes(dst, &self.codes[..count]).map_err(cuda)?;
            start += count;
            self.done += count;
            (self.progress)(self.done, self.total);
        }
        let scales = self.exec.alloc(4 * rows, what).map_err(cuda)?;
        let values = vec![SYNTHETIC_MATRIX / 448.0; rows];
        self.exec.upload_bytes(scales, bytemuck::cast_slice(&values)).map_err(cuda)?;
        self.done += 4 * rows;
        Ok(ExpertRegion::Fp8 { codes, scales })
    }
}

impl DeviceWeights {
    /// Random weights of `cfg`'s exact shapes, made without a checkpoint (benchmarks of the
    /// full-size model on a GPU: no 50 GB file needed). Deterministic in `seed`.
    pub fn synthetic(cfg: &TextConfig, exec: &mut dyn Executor, seed: u64, progress: Progress) -> Result<DeviceWeights> {
        DeviceWeights::synthetic_quant(cfg, exec, seed, Quant::None, progress)
    }

    /// [`DeviceWeights::synthetic`] with the experts held as `quant` says (FP8: random e4m3
    /// codes and per-row scales, the layout [`DeviceWeights::upload`] gives FP8 experts).
    pub fn synthetic_quant(
        cfg: &TextConfig,
        exec: &mut dyn Executor,
        seed: u64,
        quant: Quant,
        progress: Progress,
    ) -> Result<DeviceWeights> {
        let mut rng = dgemma_cuda::Rng::new(seed);
        let mut uniform = move || rng.uniform();
        // An odd length, so consecutive rows of a matrix see different values.
        let len = (32 << 20) - 7;
        let matrix = (0..len).map(|_| bf16::from_f32(uniform() * SYNTHETIC_MATRIX)).collect();
        let scale = (0..(1 << 20) + 3).map(|_| bf16::from_f32(1.0 + 0.1 * uniform())).collect();
        let codes = (0..(1 << 20) + 5).map(|_| dgemma_model::fp8::encode(448.0 * uniform())).collect();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let (e, moe, dense, sc) =
            (cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.self_conditioning_size);
        let layer_bytes = |i: usize| {
            let l = cfg.layer(i);
            let attn = 2 * l.q_dim() * h + if l.k_eq_v { 1 } else { 2 } * l.kv_dim() * h + 2 * l.head_dim;
            let experts = match quant {
                Quant::None => 2 * e * 3 * moe * h,
                Quant::Fp8 => e * 3 * moe * h + 4 * e * (2 * moe + h),
            };
            2 * (attn + 3 * dense * h + e * h + 8 * h + e) + experts
        };
        let total = 2 * (v * h + 2 * h + 3 * sc * h) + (0..cfg.num_hidden_layers).map(layer_bytes).sum::<usize>();
        let mut f = Filler { exec, matrix, scale, codes, done: 0, total, progress };
        let embed = f.tensor(&[v, h], "embedding")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let spec = cfg.layer(i);
            let (q, kv, d) = (spec.q_dim(), spec.kv_dim(), spec.head_dim);
            layers.push(LayerRegions {
                spec,
                q_proj: f.tensor(&[q, h], "q_proj")?,
                k_proj: f.tensor(&[kv, h], "k_proj")?,
                v_proj: if spec.k_eq_v { None } else { Some(f.tensor(&[kv, h], "v_proj")?) },
                o_proj: f.tensor(&[h, q], "o_proj")?,
                q_norm: f.tensor(&[d], "q_norm")?,
                k_norm: f.tensor(&[d], "k_norm")?,
                input_layernorm: f.tensor(&[h], "norm")?,
                post_attention_layernorm: f.tensor(&[h], "norm")?,
                pre_feedforward_layernorm: f.tensor(&[h], "norm")?,
                post_feedforward_layernorm_1: f.tensor(&[h], "norm")?,
                pre_feedforward_layernorm_2: f.tensor(&[h], "norm")?,
                post_feedforward_layernorm_2: f.tensor(&[h], "norm")?,
                post_feedforward_layernorm: f.tensor(&[h], "norm")?,
                mlp_gate: f.tensor(&[dense, h], "mlp gate")?,
                mlp_up: f.tensor(&[dense, h], "mlp up")?,
                mlp_down: f.tensor(&[h, dense], "mlp down")?,
                router_proj: f.tensor(&[e, h], "router")?,
                router_scale: f.tensor(&[h], "router scale")?,
                router_per_expert_scale: f.tensor(&[e], "per-expert scale")?,
                experts_gate_up: f.experts([e, 2 * moe, h], "experts gate_up", quant)?,
                experts_down: f.experts([e, h, moe], "experts down", quant)?,
                layer_scalar: 1.0,
                encoder_layer_scalar: 1.0,
            });
        }
        Ok(DeviceWeights {
            embed,
            lm_head: embed,
            final_norm: f.tensor(&[h], "final norm")?,
            sc_pre_norm: f.tensor(&[h], "self-conditioning norm")?,
            sc_gate: f.tensor(&[sc, h], "self-conditioning gate")?,
            sc_up: f.tensor(&[sc, h], "self-conditioning up")?,
            sc_down: f.tensor(&[h, sc], "self-conditioning down")?,
            layers,
            bytes: f.done,
        })
    }
}

/// Every tensor [`DeviceWeights::upload`] copies as bf16 (the embedding once when the head is
/// tied; the experts are counted by [`expert_bytes`]).
fn all_tensors(w: &ModelWeights) -> Vec<&TensorRef> {
    let mut v = vec![&w.embed_tokens, &w.final_norm, &w.sc_pre_norm, &w.sc_gate, &w.sc_up, &w.sc_down];
    v.extend(w.lm_head.as_ref());
    for l in &w.layers {
        v.extend([
            &l.q_proj,
            &l.k_proj,
            &l.o_proj,
            &l.q_norm,
            &l.k_norm,
            &l.input_layernorm,
            &l.post_attention_layernorm,
            &l.pre_feedforward_layernorm,
            &l.post_feedforward_layernorm_1,
            &l.pre_feedforward_layernorm_2,
            &l.post_feedforward_layernorm_2,
            &l.post_feedforward_layernorm,
            &l.mlp_gate,
            &l.mlp_up,
            &l.mlp_down,
            &l.router_proj,
            &l.router_scale,
            &l.router_per_expert_scale,
        ]);
        v.extend(l.v_proj.as_ref());
    }
    v
}
