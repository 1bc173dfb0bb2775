//! The forward passes as static step lists (model-spec 3.2-3.7), written straight through.
//!
//! [`Planner::encode`] and [`Planner::denoise`] turn a pass (its token count and first position)
//! into a list of [`Step`]s over the preallocated [`Workspace`], [`KvCache`] and
//! [`DeviceWeights`]: no allocation, no host value read back, so a list runs as it is or is
//! recorded once as a CUDA graph and replayed. Inputs are read from fixed buffers (the
//! encoder's `Workspace::ids`, a sequence's [`DecoderInputs`]), so a replay sees whatever they
//! hold.
//!
//! Each step mirrors one line of the CPU backend (`dgemma-cpu/src/model.rs`), with the same bf16
//! rounding points; the fused norms are documented in `csrc/rmsnorm.cuh`.
//!
//! The KV cache ([`KvCache`], `kv_cache.rs`) is one ring of logical rows per layer and tensor,
//! position p in logical row `p % rows`: a sequence's own ring on sliding layers, its pages of
//! the shared pool on full layers (through its page table). The encoder writes the new tokens'
//! K/V at their rows; the decoder writes its canvas's K/V at the rows of positions `len .. len +
//! C`, where the commit will put them. Attention reads the key range by absolute position through
//! the ring and the page table (`ops::KvView`, csrc/attention.cuh).
//!
//! Positions and pages are known when a pass is planned, so so is where its new rows land
//! ([`KvCache::placement`]). When a single sequence's rows are one contiguous run, k_proj /
//! v_proj write straight into it and the norms and RoPE run there; otherwise (several sequences,
//! the ring's end, non-adjacent pages) they write into contiguous staging buffers of the
//! workspace, the norms and RoPE run there, and one copy per run and tensor moves them into the
//! cache. Either way every value is computed by the same kernels on the same inputs, so neither
//! the ring nor the pages change a bit of the results.

use dgemma_cuda::codegen::shapes::{attention_spec_for, soft_embedding_spec_for};
use dgemma_cuda::codegen::MaskKind;
use dgemma_cuda::ops::{self, Buf, Routing};
use dgemma_cuda::{Executor, Region, Step};
use dgemma_model::config::{LayerKind, TextConfig};

use crate::error::{backend_error, cuda, Result};
use crate::kernels::{AttentionKernels, Kernels};
use crate::kv_cache::KvCache;
use crate::weights::{DeviceWeights, LayerRegions};

/// Scratch buffers for passes of up to `max_tokens` rows (`canvas` for the decoder-only ones).
pub struct Workspace {
    pub max_tokens: usize,
    pub canvas: usize,
    /// Token ids of an encoder pass (i32 `[max_tokens]`): the prompt chunk or the commit.
    pub ids: Region,
    /// Softcapped f32 logits `[host canvas, V]`: a host-sampled decoder pass's output (one
    /// canvas; the device sampler reads `logits_bf16` instead).
    pub logits: Region,
    /// Absolute positions 0..capacity (i32), read by RoPE at offset `pos0`.
    positions: Region,
    /// RoPE tables `[capacity, rotary_pairs]` bf16 of the sliding and the full layers.
    rope_sliding: (Region, Region),
    rope_full: (Region, Region),
    h: Region,
    a: Region,
    attn: Region,
    d: Region,
    e: Region,
    moe: Region,
    q: Region,
    ctx: Region,
    gate: Region,
    up: Region,
    act: Region,
    experts: Region,
    expert_weights: Region,
    /// The routing sort's outputs: i32 `[num_experts + 1]` offsets and i32 `[max_tokens * top_k]`
    /// pair indices grouped by expert (`csrc/moe_sort.cuh`).
    moe_offsets: Region,
    moe_sorted: Region,
    /// GeGLU activations `[max_tokens * top_k, moe width]` and the down projection's per-pair
    /// outputs `[max_tokens * top_k, hidden]` (bf16), before the routing-weighted combine.
    moe_act: Region,
    moe_y: Region,
    soft: Region,
    /// The LM head's bf16 output `[canvas, V]`, every canvas of a batched pass: the only
    /// vocab-wide buffer of the device path (the sampler and the soft embedding recompute
    /// `P = softcap(x) / T` from it). The host's self-conditioning logits are staged here too.
    pub logits_bf16: Region,
    /// Softmax statistics (max, 1 / sum) of each row's bf16(P), f32 `[canvas, 2]`.
    pub sc_stats: Region,
    /// The soft embedding's scratch, for one canvas (`host_canvas` rows: soft embeddings run per
    /// sequence): its probabilities bf16 `[canvas, V]` and the split-K GEMM's partial sums f32
    /// `[splits, canvas, hidden]` (`ops::SoftEmbeddingScratch`; 134 MB and 17 MB for the 26B
    /// model).
    soft_probs: Region,
    soft_partials: Region,
    /// Attention's split-KV scratch (f32 partial row maxima, denominators and accumulators,
    /// `ops::attention_scratch_len` for passes of up to `max_tokens` rows; attention runs one
    /// segment at a time, so one serves them all): 17 MB for the 26B model's full layers.
    attn_scratch: Region,
    /// The new tokens' K and V, `[max_tokens, max kv width]` bf16, for a pass whose ring rows
    /// wrap around a layer's ring (see the module doc).
    k_stage: Region,
    v_stage: Region,
}

fn rope_tables(exec: &mut dyn Executor, inv_freq: &[f32], pairs: usize, capacity: usize) -> Result<(Region, Region)> {
    let mut cos = Vec::with_capacity(capacity * pairs);
    let mut sin = Vec::with_capacity(capacity * pairs);
    for p in 0..capacity {
        for &f in &inv_freq[..pairs] {
            // The CPU's RopeTable: angle = float32(p) * inv_freq, cos/sin in f32, rounded to bf16.
            let angle = p as f32 * f;
            cos.push(half::bf16::from_f32(angle.cos()));
            sin.push(half::bf16::from_f32(angle.sin()));
        }
    }
    let upload = |exec: &mut dyn Executor, v: &[half::bf16], what: &str| -> Result<Region> {
        let r = exec.alloc(2 * v.len(), what).map_err(cuda)?;
        exec.upload_bytes(r, bytemuck::cast_slice(v)).map_err(cuda)?;
        Ok(r)
    };
    Ok((upload(exec, &cos, "RoPE cos table")?, upload(exec, &sin, "RoPE sin table")?))
}

impl Workspace {
    /// Allocates everything a pass of up to `max_tokens` rows needs; the decoder's vocab-wide
    /// buffers are sized for `canvas` rows (every canvas of a batched pass), the fp32 logits of a
    /// host-sampled pass and the soft embedding's scratch for `host_canvas` rows (one canvas).
    pub fn new(
        cfg: &TextConfig,
        exec: &mut dyn Executor,
        max_tokens: usize,
        canvas: usize,
        host_canvas: usize,
        capacity: usize,
    ) -> Result<Workspace> {
        let (t, h, v, c) = (max_tokens, cfg.hidden_size, cfg.vocab_size, canvas);
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.head_dim.max(cfg.global_head_dim);
        let inter = cfg.intermediate_size.max(cfg.self_conditioning_size);
        let k = cfg.top_k_experts;
        let arch = exec.arch();
        let mut alloc = |bytes: usize, what: &str| exec.alloc(bytes, what).map_err(cuda);
        let ws_ids = alloc(4 * t, "token ids")?;
        let logits = alloc(4 * host_canvas.min(c) * v, "logits")?;
        let h_buf = alloc(2 * t * h, "hidden states")?;
        let a = alloc(2 * t * h, "normed hidden states")?;
        let attn = alloc(2 * t * h, "attention output")?;
        let d = alloc(2 * t * h, "dense MLP output")?;
        let e = alloc(2 * t * h, "MoE input")?;
        let moe = alloc(2 * t * h, "MoE output")?;
        let q = alloc(2 * t * heads * head_dim, "queries")?;
        let ctx = alloc(2 * t * heads * head_dim, "attention context")?;
        let gate = alloc(2 * t * inter, "MLP gate")?;
        let up = alloc(2 * t * inter, "MLP up")?;
        let act = alloc(2 * t * inter, "MLP activation")?;
        let experts = alloc(4 * t * k, "routed experts")?;
        let expert_weights = alloc(4 * t * k, "routing weights")?;
        if t * k > ops::MOE_SORT_MAX_PAIRS {
            return Err(backend_error(format!(
                "passes of {t} tokens route {} (token, slot) pairs, over the {} the MoE routing sort takes: \
                 use a smaller prefill chunk or batch",
                t * k,
                ops::MOE_SORT_MAX_PAIRS
            )));
        }
        let moe_offsets = alloc(4 * (cfg.num_experts + 1), "expert offsets")?;
        let moe_sorted = alloc(4 * t * k, "pairs sorted by expert")?;
        let moe_act = alloc(2 * t * k * cfg.moe_intermediate_size, "expert activations")?;
        let moe_y = alloc(2 * t * k * h, "expert outputs")?;
        let soft = alloc(2 * c * h, "soft embeddings")?;
        let logits_bf16 = alloc(2 * c * v, "bf16 logits")?;
        let sc_stats = alloc(4 * 2 * c, "self-conditioning softmax statistics")?;
        let soft_spec = soft_embedding_spec_for(h as u32, v as u32, arch);
        let (soft_probs_len, soft_partials_len) = ops::soft_embedding_scratch(&soft_spec, host_canvas.min(c)).map_err(cuda)?;
        let soft_probs = alloc(2 * soft_probs_len, "soft embedding probabilities")?;
        let soft_partials = alloc(4 * soft_partials_len, "soft embedding partial sums")?;
        let shape = crate::kernels::model_shape(cfg);
        let mut attn_scratch_len = 0;
        for (l, encoder_mask) in [(shape.sliding, MaskKind::CausalSliding), (shape.full, MaskKind::Causal)] {
            for mask in [encoder_mask, MaskKind::Bidirectional] {
                let spec = attention_spec_for(l.head_dim, shape.heads, l.kv_heads, mask, arch);
                attn_scratch_len = attn_scratch_len.max(ops::attention_scratch_len(&spec, t).map_err(cuda)?);
            }
        }
        let attn_scratch = alloc(4 * attn_scratch_len.max(1), "attention split scratch")?;
        let kv_width = (0..cfg.num_hidden_layers).map(|i| cfg.layer(i).kv_dim()).max().unwrap_or(0);
        let k_stage = alloc(2 * t * kv_width, "staged keys")?;
        let v_stage = alloc(2 * t * kv_width, "staged values")?;
        let positions: Vec<i32> = (0..capacity as i32).collect();
        let pos_region = exec.alloc(4 * capacity, "positions").map_err(cuda)?;
        exec.upload_bytes(pos_region, bytemuck::cast_slice(&positions)).map_err(cuda)?;
        let sliding_pairs = cfg.rope_sliding.rotary_pairs(cfg.head_dim);
        let full_pairs = cfg.rope_full.rotary_pairs(cfg.global_head_dim);
        let rope_sliding = rope_tables(exec, &cfg.rope_sliding.inv_freq(cfg.head_dim), sliding_pairs, capacity)?;
        let rope_full = rope_tables(exec, &cfg.rope_full.inv_freq(cfg.global_head_dim), full_pairs, capacity)?;
        Ok(Workspace {
            max_tokens,
            canvas,
            ids: ws_ids,
            logits,
            positions: pos_region,
            rope_sliding,
            rope_full,
            h: h_buf,
            a,
            attn,
            d,
            e,
            moe,
            q,
            ctx,
            gate,
            up,
            act,
            experts,
            expert_weights,
            moe_offsets,
            moe_sorted,
            moe_act,
            moe_y,
            soft,
            logits_bf16,
            sc_stats,
            soft_probs,
            soft_partials,
            attn_scratch,
            k_stage,
            v_stage,
        })
    }
}

/// What a layer runs over: the first `decoders` segments are decoder canvases (bidirectional
/// over their cache and canvas, `layer_scalar`), the rest encoder tokens (causal,
/// `encoder_layer_scalar`); `kv_only` (an encoder-only pass's last layer, whose output is
/// discarded) stops after writing the K/V.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Pass {
    decoders: usize,
    kv_only: bool,
}

/// The decoder's inputs of one sequence: its canvas (i32 `[canvas]`) and its self-conditioning
/// input, the soft embedding `round(round(softmax(bf16(P))) @ E) * round(sqrt(H))` of the previous
/// step's processed logits P (bf16 `[canvas, hidden]`: 1.4 MB for the 26B model, where the
/// logits themselves would be 134 MB). Per sequence, so that sequences denoised in turn each keep
/// theirs on the device between steps (the device sampler writes the next step's into them).
#[derive(Clone, Copy, Debug)]
pub struct DecoderInputs {
    pub canvas: Region,
    pub soft: Region,
}

impl DecoderInputs {
    pub fn new(cfg: &TextConfig, exec: &mut dyn Executor, canvas: usize) -> Result<DecoderInputs> {
        Ok(DecoderInputs {
            canvas: exec.alloc(4 * canvas, "canvas ids").map_err(cuda)?,
            soft: exec.alloc(2 * canvas * cfg.hidden_size, "self-conditioning soft embedding").map_err(cuda)?,
        })
    }

    /// Bytes [`DecoderInputs::new`] allocates.
    pub fn bytes(cfg: &TextConfig, canvas: usize) -> usize {
        4 * canvas + 2 * canvas * cfg.hidden_size
    }
}

/// One sequence's tokens in a pass: `tokens` consecutive workspace rows (after those of the
/// segments before it) at positions `pos0..` of its cache.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    pub kv: &'a KvCache,
    pub pos0: usize,
    pub tokens: usize,
}

/// One sequence's canvas in a (batched) decoder pass.
#[derive(Clone, Copy)]
pub struct DecoderSegment<'a> {
    pub seg: Segment<'a>,
    pub inputs: DecoderInputs,
    pub self_conditioning: bool,
}

/// Builds step lists over fixed buffers.
pub struct Planner<'a> {
    pub cfg: &'a TextConfig,
    pub kernels: &'a Kernels,
    pub weights: &'a DeviceWeights,
    pub ws: &'a Workspace,
}

/// `rows` rows of `row_elems` bf16 elements starting at row `row0` of `r`.
fn rows16(r: Region, row0: usize, rows: usize, row_elems: usize) -> Result<Buf> {
    Ok(rows_region(r, row0, rows, row_elems)?.b16())
}

/// [`rows16`] as a region (for copies).
fn rows_region(r: Region, row0: usize, rows: usize, row_elems: usize) -> Result<Region> {
    r.sub(2 * row0 * row_elems, 2 * rows * row_elems).map_err(cuda)
}

impl Planner<'_> {
    fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps as f32
    }

    /// `round(sqrt(H))` in bf16 (53.0 for hidden 2816).
    fn embed_scale(&self) -> f32 {
        half::bf16::from_f32((self.cfg.hidden_size as f64).sqrt() as f32).to_f32()
    }

    /// Checks a pass of `segs` against the workspace's `limit` rows and each cache's positions.
    fn check_pass(&self, segs: &[Segment], limit: usize, what: &str) -> Result<usize> {
        let total: usize = segs.iter().map(|g| g.tokens).sum();
        if segs.is_empty() || segs.iter().any(|g| g.tokens == 0) || total > limit {
            return Err(backend_error(format!(
                "{what} of {total} tokens in {} segments: the workspace holds 1..={limit} (no empty segment)",
                segs.len()
            )));
        }
        for g in segs {
            if g.pos0 + g.tokens > g.kv.capacity {
                return Err(backend_error(format!(
                    "{what} would reach position {}, over the KV cache's {} positions",
                    g.pos0 + g.tokens,
                    g.kv.capacity
                )));
            }
        }
        Ok(total)
    }

    /// Encoder pass over `ws.ids[..tokens]` at positions `pos0..` of `kv`: writes their K/V
    /// into the cache.
    pub fn encode(&self, kv: &KvCache, tokens: usize, pos0: usize) -> Result<Vec<Step>> {
        let segs = [Segment { kv, pos0, tokens }];
        self.check_pass(&segs, self.ws.max_tokens, "an encoder pass")?;
        let mut s = Vec::new();
        self.embed(&mut s, self.ws.ids, tokens)?;
        let n = self.weights.layers.len();
        for (i, l) in self.weights.layers.iter().enumerate() {
            self.layer(&mut s, i, l, &segs, Pass { decoders: 0, kv_only: i + 1 == n })?;
        }
        Ok(s)
    }

    /// Decoder pass over one or more sequences' canvases (`inputs.canvas[..tokens]` each, at
    /// positions `pos0..` of its cache, with its self-conditioning input `inputs.soft` when
    /// `self_conditioning`), stacked in the workspace rows in order: writes `ws.logits_bf16`
    /// rows in the same order, and with `fp32_logits` (a host-sampled pass of one canvas) the
    /// softcapped `ws.logits` too. Every op but attention runs once over all rows (one read of
    /// the weights for the whole batch); attention runs per sequence over its own cache. Each
    /// row's result is bit-identical to a pass over its sequence alone.
    pub fn denoise(&self, dsegs: &[DecoderSegment], fp32_logits: bool) -> Result<Vec<Step>> {
        self.mixed(dsegs, &[], fp32_logits)
    }

    /// A decoder pass ([`denoise`](Self::denoise)) that also encodes other sequences' tokens
    /// (prompt chunks, committed canvases: `esegs`, whose ids the caller has put in `ws.ids`
    /// after the canvases' rows): one read of the weights serves the canvases' denoising steps
    /// and the encoder work, as an encoder pass of its own would have read them again. The
    /// encoder rows follow the decoder rows; they skip the self-conditioning block and the LM
    /// head, attend causally and scale by `encoder_layer_scalar`, so every row's result, and the
    /// K/V the encoder rows write, are bit-identical to separate passes.
    pub fn mixed(&self, dsegs: &[DecoderSegment], esegs: &[Segment], fp32_logits: bool) -> Result<Vec<Step>> {
        let dec: Vec<Segment> = dsegs.iter().map(|d| d.seg).collect();
        let tokens = self.check_pass(&dec, self.ws.canvas, "a decoder pass")?;
        let segs: Vec<Segment> = dec.iter().chain(esegs).copied().collect();
        let all = match esegs {
            [] => tokens,
            _ => self.check_pass(&segs, self.ws.max_tokens, "a decoder pass with encoder segments")?,
        };
        let (ws, w, k) = (self.ws, self.weights, self.kernels);
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let eps = self.eps();
        let hb = rows16(ws.h, 0, tokens, h)?;
        let mut s = Vec::new();
        // The canvases side by side in `ws.ids`, then one embedding over all rows.
        let mut row0 = 0;
        for d in dsegs {
            let n = d.seg.tokens;
            s.push(Step::Copy { src: d.inputs.canvas.sub(0, 4 * n).map_err(cuda)?, dst: ws.ids.sub(4 * row0, 4 * n).map_err(cuda)? });
            row0 += n;
        }
        self.embed(&mut s, ws.ids, all)?;
        if dsegs.iter().any(|d| d.self_conditioning) {
            // soft = round(round(softmax(sc)) @ E) * round(sqrt(H)), kept per sequence since the
            // step that produced sc (`self_conditioning`); signal = MLP(pre_norm(soft)). A
            // sequence without a self-conditioning input gets soft = 0, hence signal = 0 exactly
            // (no biases; norm(0) = 0), and round(norm(round(h + 0))) = round(norm(h)).
            let soft = rows16(ws.soft, 0, tokens, h)?;
            let mut row0 = 0;
            for d in dsegs {
                let n = d.seg.tokens;
                let dst = rows_region(ws.soft, row0, n, h)?;
                s.push(if d.self_conditioning {
                    Step::Copy { src: rows_region(d.inputs.soft, 0, n, h)?, dst }
                } else {
                    Step::Zero { dst }
                });
                row0 += n;
            }
            s.push(launch(ops::plan_rms_norm(&k.norm, None, None, Some(w.sc_pre_norm.b16()), soft, tokens, eps, 1.0))?);
            let d = self.mlp(&mut s, tokens, soft, w.sc_gate, w.sc_up, w.sc_down, (k.sc_up, k.sc_down))?;
            // h = round(norm(round(h + signal))), no scale.
            s.push(launch(ops::plan_rms_norm(&k.norm_plain_add, Some(hb), Some(d), None, hb, tokens, eps, 1.0))?);
        } else {
            // No signal: the block adds exactly zero.
            s.push(launch(ops::plan_rms_norm(&k.norm_plain, None, None, None, hb, tokens, eps, 1.0))?);
        }
        for (i, l) in w.layers.iter().enumerate() {
            self.layer(&mut s, i, l, &segs, Pass { decoders: dsegs.len(), kv_only: false })?;
        }
        let a = rows16(ws.a, 0, tokens, h)?;
        s.push(launch(ops::plan_rms_norm(&k.norm, Some(hb), None, Some(w.final_norm.b16()), a, tokens, eps, 1.0))?);
        let logits16 = rows16(ws.logits_bf16, 0, tokens, v)?;
        s.push(launch(ops::plan_linear(&k.lm_head, a, w.lm_head.b16(), logits16, tokens))?);
        if fp32_logits {
            let logits = ws.logits.sub(0, 4 * tokens * v).map_err(cuda)?.b32();
            s.push(launch(ops::plan_softcap(&k.softcap, logits16, logits, self.softcap()?, tokens * v))?);
        }
        Ok(s)
    }

    /// The final-logit soft cap (models without one are refused).
    pub fn softcap(&self) -> Result<f32> {
        let cap = self
            .cfg
            .final_logit_softcapping
            .ok_or_else(|| backend_error("models without final_logit_softcapping are not supported yet"))?;
        Ok(cap as f32)
    }

    /// The self-conditioning input of the next step, `soft` = `[rows, hidden]` bf16, from `x`
    /// (the processed logits of this step, or the host's bf16 ones) whose softmax statistics are
    /// in `ws.sc_stats` rows `row0..` (the row pass wrote them): three launches
    /// (`ops::plan_soft_embedding`: probabilities, split-K GEMM, reduction) through the
    /// workspace's soft embedding scratch, so at most one canvas (`rows` <= its rows) per call.
    pub fn soft_embedding(&self, x: ops::ProcessedLogits, row0: usize, rows: usize, soft: Region) -> Result<Vec<Step>> {
        let (ws, k, w) = (self.ws, self.kernels, self.weights);
        let stats = ws.sc_stats.sub(4 * 2 * row0, 4 * 2 * rows).map_err(cuda)?.b32();
        let out = rows16(soft, 0, rows, self.cfg.hidden_size)?;
        let scratch = ops::SoftEmbeddingScratch { probs: ws.soft_probs.b16(), partials: ws.soft_partials.b32() };
        let plans = ops::plan_soft_embedding(&k.soft_embedding, x, stats, w.embed.b16(), scratch, out, self.embed_scale(), rows)
            .map_err(cuda)?;
        Ok(plans.into_iter().map(Step::Launch).collect())
    }

    /// The host-sampled path's self-conditioning: the host's bf16 processed logits of the
    /// previous step, uploaded into `ws.logits_bf16` rows `0..rows`, into `soft` (softmax
    /// statistics, then the soft embedding; the same kernels as the device path, with no soft
    /// cap and T = 1, so the two paths give the same bits).
    pub fn soft_from_host_logits(&self, rows: usize, soft: Region) -> Result<Vec<Step>> {
        let v = self.cfg.vocab_size;
        let x = ops::ProcessedLogits { logits: rows16(self.ws.logits_bf16, 0, rows, v)?, cap: 0.0, params: None };
        let stats = self.ws.sc_stats.sub(0, 4 * 2 * rows).map_err(cuda)?.b32();
        let mut s = vec![launch(ops::plan_row_softmax_entropy_argmax(&self.kernels.row_stats, x, None, None, Some(stats), rows))?];
        s.extend(self.soft_embedding(x, 0, rows, soft)?);
        Ok(s)
    }

    /// `h = round(E[ids] * round(sqrt(H)))` over the first `tokens` ids of `ids`.
    fn embed(&self, s: &mut Vec<Step>, ids: Region, tokens: usize) -> Result<()> {
        let ws = self.ws;
        let ids = ids.sub(0, 4 * tokens).map_err(cuda)?.b32();
        let out = rows16(ws.h, 0, tokens, self.cfg.hidden_size)?;
        s.push(launch(ops::plan_embedding(&self.kernels.embedding, ids, self.weights.embed.b16(), out, self.embed_scale(), tokens))?);
        Ok(())
    }

    /// `down(round(gelu(gate(x))) * up(x))` into `ws.d`.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        s: &mut Vec<Step>,
        tokens: usize,
        x: Buf,
        gate_w: Region,
        up_w: Region,
        down_w: Region,
        (up_k, down_k): (dgemma_cuda::KernelSpec, dgemma_cuda::KernelSpec),
    ) -> Result<Buf> {
        let ws = self.ws;
        let inter = gate_w.bytes / 2 / self.cfg.hidden_size;
        let gate = rows16(ws.gate, 0, tokens, inter)?;
        let up = rows16(ws.up, 0, tokens, inter)?;
        let act = rows16(ws.act, 0, tokens, inter)?;
        let d = rows16(ws.d, 0, tokens, self.cfg.hidden_size)?;
        s.push(launch(ops::plan_linear(&up_k, x, gate_w.b16(), gate, tokens))?);
        s.push(launch(ops::plan_linear(&up_k, x, up_w.b16(), up, tokens))?);
        s.push(launch(ops::plan_geglu(&self.kernels.geglu, gate, up, inter, act, inter, tokens))?);
        s.push(launch(ops::plan_linear(&down_k, act, down_w.b16(), d, tokens))?);
        Ok(d)
    }

    /// One transformer layer over `ws.h`: the segments' tokens stacked in its rows, each at its
    /// positions in its own cache; in place.
    fn layer(&self, s: &mut Vec<Step>, index: usize, l: &LayerRegions, segs: &[Segment], pass: Pass) -> Result<()> {
        let (ws, k) = (self.ws, self.kernels);
        let spec = &l.spec;
        let ak: &AttentionKernels = k.attention(spec);
        let (hid, eps) = (self.cfg.hidden_size, self.eps());
        let (heads, kv_heads, dim) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let kv_width = kv_heads * dim;
        let tokens: usize = segs.iter().map(|g| g.tokens).sum();
        let hb = rows16(ws.h, 0, tokens, hid)?;
        let a = rows16(ws.a, 0, tokens, hid)?;
        let (cos, sin) = match spec.kind {
            LayerKind::Sliding => ws.rope_sliding,
            LayerKind::Full => ws.rope_full,
        };
        let positions = |g: &Segment| -> Result<Buf> { Ok(ws.positions.sub(4 * g.pos0, 4 * g.tokens).map_err(cuda)?.b32()) };

        // The key range attention reads per segment: sliding layers see the last window - 1
        // cached positions (and, causally, the new ones); full layers every position. Writing
        // position p overwrites p - ring: the keys still read, k_start.., survive when the ring
        // holds the whole range.
        let window = spec.sliding_window;
        let key_range = |g: &Segment| -> (usize, usize) {
            let k_start = match window {
                Some(w) => g.pos0.saturating_sub(w.saturating_sub(1)),
                None => 0,
            };
            (k_start, g.pos0 + g.tokens - k_start)
        };
        for g in segs {
            let ring = g.kv.rows[index];
            let (_, kv_len) = key_range(g);
            if kv_len > ring {
                return Err(backend_error(format!(
                    "layer {index}: a pass of {} tokens at position {} reads {kv_len} keys, over the {ring} rows of \
                     its KV ring (window - 1 + tokens must fit; the cache was sized for shorter passes)",
                    g.tokens, g.pos0
                )));
            }
        }

        // Keys and values of the new tokens: a single segment whose rows land in one contiguous
        // run is written in place; otherwise (several segments, the ring's end, non-adjacent
        // pages) they are computed in the staging rows and copied into the runs afterwards.
        s.push(launch(ops::plan_rms_norm(&k.norm, Some(hb), None, Some(l.input_layernorm.b16()), a, tokens, eps, 1.0))?);
        let placements: Vec<_> = segs.iter().map(|g| g.kv.placement(index, g.pos0, g.tokens)).collect();
        let in_place = match (segs, placements.as_slice()) {
            ([g], [runs]) => runs.len() == 1 && runs[0].len == g.tokens,
            _ => false,
        };
        let (k_dst, v_dst) = if in_place {
            let (g, phys) = (&segs[0], placements[0][0].phys);
            (rows_region(g.kv.k[index], phys, tokens, kv_width)?, rows_region(g.kv.v[index], phys, tokens, kv_width)?)
        } else {
            (rows_region(ws.k_stage, 0, tokens, kv_width)?, rows_region(ws.v_stage, 0, tokens, kv_width)?)
        };
        let (k_new, v_new) = (k_dst.b16(), v_dst.b16());
        s.push(launch(ops::plan_linear(&ak.kv_proj, a, l.k_proj.b16(), k_new, tokens))?);
        match l.v_proj {
            Some(vp) => s.push(launch(ops::plan_linear(&ak.kv_proj, a, vp.b16(), v_new, tokens))?),
            // K = V on full layers: V is the raw k_proj output, before k_norm and RoPE.
            None => s.push(Step::Copy { src: k_dst, dst: v_dst }),
        }
        let head_rows = tokens * kv_heads;
        s.push(launch(ops::plan_rms_norm(&ak.head_norm, None, None, Some(l.k_norm.b16()), k_new, head_rows, eps, 1.0))?);
        let mut row = 0;
        for g in segs {
            let k_seg = rows16(k_dst, row, g.tokens, kv_width)?;
            s.push(launch(ops::plan_rope(&ak.rope, k_seg, cos.b16(), sin.b16(), positions(g)?, g.tokens, kv_heads))?);
            row += g.tokens;
        }
        s.push(launch(ops::plan_rms_norm(&ak.value_norm, None, None, None, v_new, head_rows, eps, 1.0))?);
        if !in_place {
            // Each segment's staged rows, run by run, into its cache.
            let mut row = 0;
            for (g, runs) in segs.iter().zip(&placements) {
                for (stage, cache) in [(k_dst, g.kv.k[index]), (v_dst, g.kv.v[index])] {
                    for r in runs {
                        s.push(Step::Copy {
                            src: rows_region(stage, row + r.row, r.len, kv_width)?,
                            dst: rows_region(cache, r.phys, r.len, kv_width)?,
                        });
                    }
                }
                row += g.tokens;
            }
        }
        if pass.kv_only {
            return Ok(());
        }

        // Queries, and attention per segment over its key range k_start..pos0 + tokens through
        // its ring.
        let q = rows16(ws.q, 0, tokens, heads * dim)?;
        s.push(launch(ops::plan_linear(&ak.q_proj, a, l.q_proj.b16(), q, tokens))?);
        s.push(launch(ops::plan_rms_norm(&ak.head_norm, None, None, Some(l.q_norm.b16()), q, tokens * heads, eps, 1.0))?);
        let mut row = 0;
        for (j, g) in segs.iter().enumerate() {
            let (attn_kernel, mask_window) = match j < pass.decoders {
                true => (&ak.decoder, None),
                false => (&ak.encoder, window),
            };
            let q_seg = rows16(ws.q, row, g.tokens, heads * dim)?;
            s.push(launch(ops::plan_rope(&ak.rope, q_seg, cos.b16(), sin.b16(), positions(g)?, g.tokens, heads))?);
            // One launch, or three when the key range is split (a function of this segment's
            // shape only, so batching never changes its bits); segments share the scratch.
            let (k_start, kv_len) = key_range(g);
            let plans = ops::plan_attention(
                attn_kernel,
                q_seg,
                g.kv.view(index)?,
                rows16(ws.ctx, row, g.tokens, heads * dim)?,
                Some(ws.attn_scratch.b32()),
                g.tokens,
                kv_len,
                g.pos0,
                k_start,
                mask_window,
            );
            s.extend(plans.map_err(cuda)?.into_iter().map(Step::Launch));
            row += g.tokens;
        }
        let ctx = rows16(ws.ctx, 0, tokens, heads * dim)?;
        let attn = rows16(ws.attn, 0, tokens, hid)?;
        s.push(launch(ops::plan_linear(&ak.o_proj, ctx, l.o_proj.b16(), attn, tokens))?);
        // h = round(h + post_attention_layernorm(attn)).
        s.push(launch(ops::plan_rms_norm(&k.norm_residual, Some(attn), None, Some(l.post_attention_layernorm.b16()), hb, tokens, eps, 1.0))?);

        // Dense branch: d = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h))).
        s.push(launch(ops::plan_rms_norm(&k.norm, Some(hb), None, Some(l.pre_feedforward_layernorm.b16()), a, tokens, eps, 1.0))?);
        let d = self.mlp(s, tokens, a, l.mlp_gate, l.mlp_up, l.mlp_down, (k.dense_up, k.dense_down))?;
        s.push(launch(ops::plan_rms_norm(&k.norm, None, None, Some(l.post_feedforward_layernorm_1.b16()), d, tokens, eps, 1.0))?);

        // MoE branch: the router and the experts both read the pre-norm residual h.
        let top_k = self.cfg.top_k_experts;
        let experts = ws.experts.sub(0, 4 * tokens * top_k).map_err(cuda)?.b32();
        let weights = ws.expert_weights.sub(0, 4 * tokens * top_k).map_err(cuda)?.b32();
        let root = (hid as f64).powf(-0.5) as f32;
        s.push(launch(ops::plan_router(
            &k.router,
            hb,
            l.router_scale.b16(),
            l.router_proj.b16(),
            l.router_per_expert_scale.b16(),
            experts,
            weights,
            tokens,
            eps,
            root,
        ))?);
        let e = rows16(ws.e, 0, tokens, hid)?;
        s.push(launch(ops::plan_rms_norm(&k.norm, Some(hb), None, Some(l.pre_feedforward_layernorm_2.b16()), e, tokens, eps, 1.0))?);
        // Experts: the pairs grouped by expert (so each expert's weights are read once per tile
        // of its pairs), gate_up + GeGLU and down over the groups, each writing its rows in
        // the original pair order, then the routing-weighted sum over each token's slots.
        let num_experts = self.cfg.num_experts;
        let routing = Routing { tokens, top_k, num_experts };
        let sorted = ops::SortedPairs {
            offsets: ws.moe_offsets.sub(0, 4 * (num_experts + 1)).map_err(cuda)?.b32(),
            sorted: ws.moe_sorted.sub(0, 4 * tokens * top_k).map_err(cuda)?.b32(),
        };
        s.push(launch(ops::plan_moe_sort(&k.moe_sort, experts, sorted.offsets, sorted.sorted, tokens * top_k))?);
        let moe_act = rows16(ws.moe_act, 0, tokens * top_k, self.cfg.moe_intermediate_size)?;
        let moe_y = rows16(ws.moe_y, 0, tokens * top_k, hid)?;
        // bf16 experts, or FP8 ones (e4m3 codes, one byte each, and fp32 row scales): the kernel
        // for the format, the same plan.
        let (up, down) = (&l.experts_gate_up, &l.experts_down);
        s.push(launch(ops::plan_grouped_gemm_geglu(k.experts_gate_up_for(up), e, sorted, up.weights(), moe_act, routing))?);
        s.push(launch(ops::plan_grouped_gemm_down(k.experts_down_for(down), moe_act, sorted, down.weights(), moe_y, routing))?);
        let moe = rows16(ws.moe, 0, tokens, hid)?;
        s.push(launch(ops::plan_moe_combine(&k.moe_combine, moe_y, experts, weights, moe, routing))?);
        s.push(launch(ops::plan_rms_norm(&k.norm, None, None, Some(l.post_feedforward_layernorm_2.b16()), moe, tokens, eps, 1.0))?);

        // h = round(round(h + post_feedforward_layernorm(round(d + moe))) * layer_scalar): the
        // decoder rows' scalar, then the encoder rows' (a row-wise op: two launches over the two
        // row ranges give the bits of one each).
        let decoder_rows: usize = segs[..pass.decoders].iter().map(|g| g.tokens).sum();
        for (row0, rows, scalar) in [(0, decoder_rows, l.layer_scalar), (decoder_rows, tokens - decoder_rows, l.encoder_layer_scalar)] {
            if rows == 0 {
                continue;
            }
            let (d, moe, h) = (rows16(ws.d, row0, rows, hid)?, rows16(ws.moe, row0, rows, hid)?, rows16(ws.h, row0, rows, hid)?);
            s.push(launch(ops::plan_rms_norm(&k.norm_layer_end, Some(d), Some(moe), Some(l.post_feedforward_layernorm.b16()), h, rows, eps, scalar))?);
        }
        Ok(())
    }
}

fn launch(plan: dgemma_cuda::Result<ops::LaunchPlan>) -> Result<Step> {
    plan.map(Step::Launch).map_err(cuda)
}
