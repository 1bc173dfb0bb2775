//! DiffusionGemma's two forward passes, written straight through (model-spec 3.2-3.7).
//!
//! * [`encode`]: embedding x sqrt(H), 30 causal layers that append K/V to the cache. Its
//!   output is discarded, so the last layer stops once its K/V are written.
//! * [`denoise`]: embedding plus the self-conditioning block, 30 bidirectional layers that
//!   read the cache and the canvas without writing, final norm, LM head, softcap.
//!
//! Activations are `[tokens, hidden]` float32 rows; `round` marks every point where a bf16
//! run stores a bf16 tensor.

use crate::cache::{KvCache, LayerCache};
use crate::ops::activation::geglu;
use crate::ops::attention::{attention, AttentionShape, Mask};
use crate::ops::linear::{linear, Matrix};
use crate::ops::moe::{experts_forward, route, Router};
use crate::ops::norm::rms_norm;
use crate::ops::rope::{apply_rope, RopeTable};
use crate::ops::softmax::{softcap, softmax_row};
use crate::precision::{round, round_slice, Precision};
use crate::weights::{CpuLayer, CpuWeights, TensorMatrix};
use dgemma_model::config::LayerKind;
use rayon::prelude::*;

/// How a layer's attention treats the cache.
enum CacheUse<'a> {
    /// Encoder: causal over cache + new tokens, then the new K/V are appended.
    Append(&'a mut LayerCache),
    /// Decoder: bidirectional over cache + canvas; the cache is left untouched.
    Read(&'a LayerCache),
}

/// A fresh cache shaped for `w`'s layers.
pub fn new_cache(w: &CpuWeights) -> KvCache {
    KvCache::new(
        w.layers
            .iter()
            .map(|l| {
                let keep = match l.spec.kind {
                    LayerKind::Sliding => Some(l.spec.sliding_window.unwrap_or(usize::MAX).saturating_sub(1)),
                    LayerKind::Full => None,
                };
                LayerCache::new(l.spec.num_kv_heads * l.spec.head_dim, keep)
            })
            .collect(),
    )
}

/// `emb(ids) = round(E[ids] * round(sqrt(H)))`.
fn embed(w: &CpuWeights, ids: &[u32]) -> Vec<f32> {
    let h = w.config.hidden_size;
    let p = w.precision;
    let mut x = vec![0.0f32; ids.len() * h];
    x.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(row, &id)| {
        w.embed.read_row(id as usize, row);
        for v in row.iter_mut() {
            *v = round(*v * w.embed_scale, p);
        }
    });
    x
}

fn add_rounded(a: &mut [f32], b: &[f32], p: Precision) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = round(*x + y, p);
    }
}

/// `down(gelu(gate(x)) * up(x))` for `tokens` rows.
fn mlp(x: &[f32], tokens: usize, gate: &TensorMatrix, up: &TensorMatrix, down: &TensorMatrix, p: Precision) -> Vec<f32> {
    let inter = gate.rows();
    let mut g = vec![0.0f32; tokens * inter];
    let mut u = vec![0.0f32; tokens * inter];
    linear(x, tokens, gate, &mut g, p);
    linear(x, tokens, up, &mut u, p);
    let mut a = vec![0.0f32; tokens * inter];
    geglu(&g, &u, &mut a, p);
    let mut out = vec![0.0f32; tokens * down.rows()];
    linear(&a, tokens, down, &mut out, p);
    out
}

/// Projects, normalises and rotates K and V of `x` (`[tokens, H]`) at positions `pos0..`.
fn keys_values(l: &CpuLayer, x: &[f32], tokens: usize, rope: &RopeTable, eps: f32, p: Precision) -> (Vec<f32>, Vec<f32>) {
    let s = &l.spec;
    let width = s.num_kv_heads * s.head_dim;
    let mut k = vec![0.0f32; tokens * width];
    linear(x, tokens, &l.k_proj, &mut k, p);
    // K = V on full layers: V is the raw k_proj output, taken before k_norm and RoPE.
    let mut v = match &l.v_proj {
        Some(vp) => {
            let mut v = vec![0.0f32; tokens * width];
            linear(x, tokens, vp, &mut v, p);
            v
        }
        None => k.clone(),
    };
    rms_norm(&mut k, s.head_dim, Some(&l.k_norm), eps, p);
    apply_rope(&mut k, s.num_kv_heads, rope, p);
    rms_norm(&mut v, s.head_dim, None, eps, p);
    (k, v)
}

#[allow(clippy::too_many_arguments)]
/// One transformer layer over `h` (`[tokens, H]`) at positions `pos0..`, in place.
/// With `kv_only` (the encoder's last layer) it stops after appending K/V.
fn layer(w: &CpuWeights, l: &CpuLayer, h: &mut [f32], tokens: usize, pos0: usize, cache: CacheUse, scalar: f32, kv_only: bool) {
    let p = w.precision;
    let eps = w.config.rms_norm_eps as f32;
    let hid = w.config.hidden_size;
    let s = &l.spec;
    let rope = RopeTable::new(&l.inv_freq, pos0, tokens, p);

    let mut a = h.to_vec();
    rms_norm(&mut a, hid, Some(&l.input_layernorm), eps, p);
    let (k_new, v_new) = keys_values(l, &a, tokens, &rope, eps, p);
    let (stored, mask): (&LayerCache, Mask) = match &cache {
        CacheUse::Append(c) => {
            let window = match s.kind {
                LayerKind::Sliding => s.sliding_window,
                LayerKind::Full => None,
            };
            (c, Mask::Causal { window })
        }
        CacheUse::Read(c) => (c, Mask::Bidirectional),
    };
    let attn = if kv_only {
        None
    } else {
        let (keys, values, k_pos0) = stored.with_new(&k_new, &v_new);
        Some(attend(l, &a, tokens, pos0, &keys, &values, k_pos0, &rope, mask, eps, p))
    };
    if let CacheUse::Append(c) = cache {
        c.append(&k_new, &v_new);
    }
    if let Some(attn) = attn {
        finish_layer(w, l, h, tokens, attn, scalar);
    }
}

/// Query projection, attention over `keys`/`values`, and the output projection.
#[allow(clippy::too_many_arguments)]
fn attend(
    l: &CpuLayer,
    a: &[f32],
    tokens: usize,
    pos0: usize,
    keys: &[f32],
    values: &[f32],
    k_pos0: usize,
    rope: &RopeTable,
    mask: Mask,
    eps: f32,
    p: Precision,
) -> Vec<f32> {
    let s = &l.spec;
    let mut q = vec![0.0f32; tokens * s.num_heads * s.head_dim];
    linear(a, tokens, &l.q_proj, &mut q, p);
    rms_norm(&mut q, s.head_dim, Some(&l.q_norm), eps, p);
    apply_rope(&mut q, s.num_heads, rope, p);
    let shape = AttentionShape { heads: s.num_heads, kv_heads: s.num_kv_heads, head_dim: s.head_dim };
    let mut ctx = vec![0.0f32; q.len()];
    attention(&q, pos0, keys, values, k_pos0, shape, mask, p, &mut ctx);
    let mut out = vec![0.0f32; tokens * l.o_proj.rows()];
    linear(&ctx, tokens, &l.o_proj, &mut out, p);
    out
}

/// Everything after attention: post-attention norm and residual, the dense MLP and the MoE in
/// parallel branches, their norms, the residual and the layer scalar.
fn finish_layer(w: &CpuWeights, l: &CpuLayer, h: &mut [f32], tokens: usize, mut attn: Vec<f32>, scalar: f32) {
    let p = w.precision;
    let eps = w.config.rms_norm_eps as f32;
    let hid = w.config.hidden_size;
    rms_norm(&mut attn, hid, Some(&l.post_attention_layernorm), eps, p);
    add_rounded(h, &attn, p);

    // Dense ("shared expert") branch.
    let mut d = h.to_vec();
    rms_norm(&mut d, hid, Some(&l.pre_feedforward_layernorm), eps, p);
    let mut d = mlp(&d, tokens, &l.mlp_gate, &l.mlp_up, &l.mlp_down, p);
    rms_norm(&mut d, hid, Some(&l.post_feedforward_layernorm_1), eps, p);

    // MoE branch: the router and the experts both read the pre-norm residual.
    let router = Router { proj: &l.router_proj, scale: &l.router_scale, per_expert_scale: &l.router_per_expert_scale };
    let routing = route(h, tokens, &router, w.config.top_k_experts, eps, p);
    let mut e = h.to_vec();
    rms_norm(&mut e, hid, Some(&l.pre_feedforward_layernorm_2), eps, p);
    let mut moe = vec![0.0f32; e.len()];
    experts_forward(&e, tokens, &routing, &l.experts, p, &mut moe);
    rms_norm(&mut moe, hid, Some(&l.post_feedforward_layernorm_2), eps, p);

    add_rounded(&mut d, &moe, p);
    rms_norm(&mut d, hid, Some(&l.post_feedforward_layernorm), eps, p);
    add_rounded(h, &d, p);
    for x in h.iter_mut() {
        *x = round(*x * scalar, p);
    }
}

/// Encoder pass: appends `ids` to the cache at positions `cache.len..`.
pub fn encode(w: &CpuWeights, cache: &mut KvCache, ids: &[u32]) {
    let tokens = ids.len();
    if tokens == 0 {
        return;
    }
    let pos0 = cache.len;
    let mut h = embed(w, ids);
    let n = w.layers.len();
    for (i, (l, c)) in w.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
        layer(w, l, &mut h, tokens, pos0, CacheUse::Append(c), l.encoder_layer_scalar, i + 1 == n);
    }
    cache.len += tokens;
}

/// The self-conditioning input: `round(round(softmax(sc)) @ E) * round(sqrt(H))`, `[C, H]`.
fn soft_embeddings(w: &CpuWeights, sc_logits: &[f32], tokens: usize) -> Vec<f32> {
    let (v, hid, p) = (w.config.vocab_size, w.config.hidden_size, w.precision);
    let mut probs = sc_logits.to_vec();
    probs.par_chunks_mut(v).for_each(|row| {
        softmax_row(row);
        round_slice(row, p);
    });
    // probs [C, V] @ E [V, H], accumulated over vocabulary blocks in float32.
    const BLOCK: usize = 256;
    let acc = (0..v.div_ceil(BLOCK))
        .into_par_iter()
        .fold(
            || (vec![0.0f32; tokens * hid], vec![0.0f32; hid]),
            |(mut acc, mut row), b| {
                for id in b * BLOCK..((b + 1) * BLOCK).min(v) {
                    w.embed.read_row(id, &mut row);
                    for c in 0..tokens {
                        let pc = probs[c * v + id];
                        if pc != 0.0 {
                            for (a, &e) in acc[c * hid..(c + 1) * hid].iter_mut().zip(&row) {
                                *a += pc * e;
                            }
                        }
                    }
                }
                (acc, row)
            },
        )
        .map(|(acc, _)| acc)
        .reduce(
            || vec![0.0f32; tokens * hid],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );
    acc.into_iter().map(|x| round(round(x, p) * w.embed_scale, p)).collect()
}

/// Decoder pass over `canvas` at positions `cache.len..`; writes softcapped logits `[C, V]`.
pub fn denoise(w: &CpuWeights, cache: &KvCache, canvas: &[u32], sc_logits: Option<&[f32]>, logits: &mut [f32]) {
    let (tokens, hid, v, p) = (canvas.len(), w.config.hidden_size, w.config.vocab_size, w.precision);
    let eps = w.config.rms_norm_eps as f32;
    assert_eq!(logits.len(), tokens * v, "denoise: logits buffer is not [C, V]");
    let mut h = embed(w, canvas);
    if let Some(sc) = sc_logits {
        // With no signal the block adds exactly zero (pre_norm(0) = 0 and the MLP maps 0 to 0),
        // so it only runs when self-conditioning logits are given.
        let mut soft = soft_embeddings(w, sc, tokens);
        rms_norm(&mut soft, hid, Some(&w.sc_pre_norm), eps, p);
        let signal = mlp(&soft, tokens, &w.sc_gate, &w.sc_up, &w.sc_down, p);
        add_rounded(&mut h, &signal, p);
    }
    rms_norm(&mut h, hid, None, eps, p);
    let pos0 = cache.len;
    for (l, c) in w.layers.iter().zip(&cache.layers) {
        layer(w, l, &mut h, tokens, pos0, CacheUse::Read(c), l.layer_scalar, false);
    }
    rms_norm(&mut h, hid, Some(&w.final_norm), eps, p);
    linear(&h, tokens, w.head(), logits, p);
    if let Some(cap) = w.config.final_logit_softcapping {
        softcap(logits, cap as f32);
    }
}
