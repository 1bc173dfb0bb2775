//! Every kernel family on the GPU at the real DiffusionGemma 26B-A4B shapes (criterion).
//!
//!     cargo bench --bench gpu_kernels                  # everything
//!     cargo bench --bench gpu_kernels -- grouped_gemm  # one family (criterion's name filter)
//!
//! The specs come from the heuristics table (`Kernels::resolve` on the 26B config,
//! `reference/configs/diffusiongemma-26B-A4B/config.json`, and the codegen shape helpers for the
//! families the backend does not name); launches are `ops::plan_*` over buffers allocated on a
//! `GpuExecutor` and filled with random bf16/f32 data (never zeros) and valid ids. The decoder
//! shapes use one 256-token canvas; attention also runs at contexts 4K/8K/32K and in the encoder's
//! 512-token chunks.
//!
//! Each timed run: an L2 flush (a 256 MiB device copy, outside the timed span), then the one
//! launch between CUDA events (`gpu_common`). After each figure a line gives the median time,
//! GB/s (the least bytes the op must move: each input read once, each output written once),
//! TFLOP/s where it multiplies, and the ratio to the floor (`floor.hbm_read_gbs`, measured
//! first with the read-bandwidth probe, or the bf16 peak where compute bounds).
//!
//! Without a GPU, a driver or compiled kernels it prints one line saying it is skipped and
//! exits 0. `--test` (the GPU suite's smoke run) launches each kernel once. With
//! `$DGEMMA_BENCH_RECORDS=FILE`, every timed figure is also appended to FILE as a JSON line: the
//! GPU suite times the figures behind issue #4's and #6's kernel targets that way
//! (tools/gpu-suite.sh, "kernel records").

mod gpu_common;

use criterion::{SamplingMode, Throughput};
use dgemma::gpu::kernels::Kernels;
use dgemma::gpu::{Executor, GpuExecutor};
use dgemma_cuda::codegen::shapes::{
    attention_spec, grouped_gemm_mma_spec_for, gumbel_sample_spec, linear_spec, read_bandwidth_spec, sampler_canvas_spec,
    soft_embedding_spec,
};
use dgemma_cuda::codegen::{Arch, GemmFuse, KernelSpec, Op, RowSoftmaxEntropyArgmax, WeightFormat};
use dgemma_cuda::ops::{self, ExpertWeights, LaunchPlan, Routing, SamplerParams};
use dgemma_cuda::{Region, Step};
use gpu_common::{bf16_pattern, region_of, region_with, Figure, Floors, Rng};

const BENCH: &str = "gpu_kernels";

/// Builds a case's buffers and its launch (run once, when the benchmark first runs).
type Build = Box<dyn FnOnce(&mut GpuExecutor) -> Vec<Step>>;

struct Case {
    fig: Figure,
    build: Build,
}

fn case(fig: Figure, build: impl FnOnce(&mut GpuExecutor) -> Vec<Step> + 'static) -> Case {
    Case { fig, build: Box::new(build) }
}

fn launch(plan: dgemma_cuda::Result<LaunchPlan>) -> Vec<Step> {
    vec![Step::Launch(plan.unwrap_or_else(|e| panic!("planning a launch: {e}")))]
}

/// `n` bf16 values in [-scale, scale).
fn bf16s(exec: &mut GpuExecutor, n: usize, scale: f32, seed: u64, what: &str) -> Region {
    region_with(exec, 2 * n, &bf16_pattern((1 << 20) - 3, scale, seed), what)
}

/// `n` e4m3 codes (FP8 expert weights): random finite codes of either sign (never the NaN codes
/// 0x7f / 0xff), from a repeating pattern of an odd length.
fn e4m3s(exec: &mut GpuExecutor, n: usize, seed: u64, what: &str) -> Region {
    let mut rng = Rng::new(seed);
    let pattern: Vec<u8> = (0..(1 << 20) - 3).map(|_| rng.below(0x7e) as u8 | if rng.below(2) == 1 { 0x80 } else { 0 }).collect();
    region_with(exec, n, &pattern, what)
}

/// An output buffer of `bytes` (its contents are overwritten).
fn out(exec: &mut GpuExecutor, bytes: usize, what: &str) -> Region {
    exec.alloc(bytes, what).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `(t, j) -> expert` for `tokens` tokens, `top_k` distinct experts each, uniform over `experts`,
/// and how many distinct experts the routing touches.
fn routing(tokens: usize, top_k: usize, experts: usize, seed: u64) -> (Vec<i32>, usize) {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut chosen: Vec<i32> = Vec::with_capacity(top_k);
        while chosen.len() < top_k {
            let e = rng.below(experts) as i32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
    }
    let mut used = ids.clone();
    used.sort_unstable();
    used.dedup();
    (ids, used.len())
}

/// Query-key pairs an attention launch scores (causal and sliding masks on absolute positions).
fn visible_pairs(
    q_len: usize,
    kv_len: usize,
    q_pos0: usize,
    k_pos0: usize,
    causal: bool,
    window: Option<usize>,
) -> f64 {
    (0..q_len)
        .map(|i| {
            let qp = q_pos0 + i;
            (0..kv_len)
                .filter(|&j| {
                    let kp = k_pos0 + j;
                    !causal || (kp <= qp && window.is_none_or(|w| qp - kp < w))
                })
                .count() as f64
        })
        .sum()
}

fn cases(
    kernels: &Kernels,
    text: &dgemma::model::config::TextConfig,
    row_stats: KernelSpec,
    gumbel: KernelSpec,
    canvas_spec: KernelSpec,
    mma_experts: (KernelSpec, KernelSpec),
) -> Vec<Case> {
    let (h, v) = (text.hidden_size, text.vocab_size);
    let (heads, e, top_k, moe) =
        (text.num_attention_heads, text.num_experts, text.top_k_experts, text.moe_intermediate_size);
    let dense = text.intermediate_size;
    let eps = text.rms_norm_eps as f32;
    let m = 256usize; // one canvas
    let mut v_cases: Vec<Case> = Vec::new();
    let k = *kernels;

    // ---- RMSNorm
    v_cases.push(case(
        Figure::new(format!("rmsnorm.w{h}.scale.rows{m}"), 2.0 * (2 * m * h + h) as f64, 0.0),
        move |x| {
            let (a, w, o) = (bf16s(x, m * h, 2.0, 1, "x"), bf16s(x, h, 1.0, 2, "w"), out(x, 2 * m * h, "out"));
            launch(ops::plan_rms_norm(&k.norm, Some(a.b16()), None, Some(w.b16()), o.b16(), m, eps, 1.0))
        },
    ));
    v_cases.push(case(
        // Reads d, moe and the residual, writes the residual.
        Figure::new(format!("rmsnorm.w{h}.layer_end.rows{m}"), 2.0 * (4 * m * h + h) as f64, 0.0),
        move |x| {
            let (d, e_, w) = (bf16s(x, m * h, 2.0, 3, "d"), bf16s(x, m * h, 2.0, 4, "moe"), bf16s(x, h, 1.0, 5, "w"));
            let res = bf16s(x, m * h, 4.0, 6, "residual");
            launch(ops::plan_rms_norm(
                &k.norm_layer_end,
                Some(d.b16()),
                Some(e_.b16()),
                Some(w.b16()),
                res.b16(),
                m,
                eps,
                0.5,
            ))
        },
    ));
    let full_d = text.global_head_dim;
    v_cases.push(case(
        Figure::new(
            format!("rmsnorm.w{full_d}.q_norm.rows{}", m * heads),
            2.0 * (2 * m * heads * full_d + full_d) as f64,
            0.0,
        ),
        move |x| {
            let (q, w) = (bf16s(x, m * heads * full_d, 2.0, 7, "q"), bf16s(x, full_d, 1.0, 8, "w"));
            launch(ops::plan_rms_norm(&k.full.head_norm, None, None, Some(w.b16()), q.b16(), m * heads, eps, 1.0))
        },
    ));

    // ---- RoPE (in place on the canvas queries)
    for (label, ak, d) in [("sliding", k.sliding, text.head_dim), ("full", k.full, full_d)] {
        let Op::Rope(r) = ak.rope.op else { unreachable!() };
        let pairs = r.rotary_pairs as usize;
        let table_rows = 8192usize;
        v_cases.push(case(
            Figure::new(
                format!("rope.{label}.d{d}.p{pairs}.tokens{m}.heads{heads}"),
                2.0 * (2 * m * heads * d + 2 * m * pairs) as f64 + 4.0 * m as f64,
                0.0,
            ),
            move |x| {
                let q = bf16s(x, m * heads * d, 2.0, 9, "q");
                let (cos, sin) =
                    (bf16s(x, table_rows * pairs, 1.0, 10, "cos"), bf16s(x, table_rows * pairs, 1.0, 11, "sin"));
                let positions: Vec<i32> = (0..m as i32).map(|t| 4096 + t).collect();
                let p = region_of(x, &positions, "positions");
                launch(ops::plan_rope(&ak.rope, q.b16(), cos.b16(), sin.b16(), p.b32(), m, heads))
            },
        ));
    }

    // ---- Embedding
    v_cases.push(case(
        Figure::new(format!("embedding.h{h}.tokens{m}"), (4 * m + 2 * 2 * m * h) as f64, 0.0),
        move |x| {
            let mut rng = Rng::new(21);
            let ids: Vec<i32> = (0..m).map(|_| rng.below(v) as i32).collect();
            let ids = region_of(x, &ids, "ids");
            let table = bf16s(x, v * h, 0.03, 12, "embedding");
            let o = out(x, 2 * m * h, "out");
            launch(ops::plan_embedding(&k.embedding, ids.b32(), table.b16(), o.b16(), 53.0, m))
        },
    ));

    // ---- GeGLU (the dense MLP's, separate gate and up buffers)
    v_cases.push(case(Figure::new(format!("geglu.w{dense}.rows{m}"), 2.0 * 3.0 * (m * dense) as f64, 0.0), move |x| {
        let (g, u, o) =
            (bf16s(x, m * dense, 3.0, 13, "gate"), bf16s(x, m * dense, 3.0, 14, "up"), out(x, 2 * m * dense, "out"));
        launch(ops::plan_geglu(&k.geglu, g.b16(), u.b16(), dense, o.b16(), dense, m))
    }));

    // ---- Softcap of the LM head output
    let n = m * v;
    v_cases.push(case(Figure::new(format!("softcap.v{v}.rows{m}"), (2 * n + 4 * n) as f64, 0.0), move |x| {
        let (l, o) = (bf16s(x, n, 40.0, 15, "logits"), out(x, 4 * n, "out"));
        launch(ops::plan_softcap(&k.softcap, l.b16(), o.b32(), 30.0, n))
    }));

    // ---- The sampler's row statistics from the bf16 LM-head output (P = softcap(x) / T, argmax,
    // entropy, the self-conditioning softmax statistics); the row is read once per pass (4)
    v_cases.push(case(
        Figure::new(format!("row_softmax_entropy_argmax.v{v}.rows{m}"), (4 * 2 * n + 16 * m) as f64, 0.0),
        move |x| {
            let logits = bf16s(x, n, 40.0, 16, "logits");
            let params = SamplerParams {
                seed: 7,
                block: 0,
                step: 3,
                temperature: 0.8,
                entropy_bound: 0.1,
                confidence_threshold: 0.005,
                stability_threshold: 1,
            };
            let p = region_of(x, &params.to_words(), "params");
            let (am, en, st) = (out(x, 4 * m, "argmax"), out(x, 4 * m, "entropy"), out(x, 8 * m, "sc stats"));
            let lx = ops::ProcessedLogits { logits: logits.b16(), cap: 30.0, params: Some(p.b32()) };
            launch(ops::plan_row_softmax_entropy_argmax(&row_stats, lx, Some(am.b32()), Some(en.b32()), Some(st.b32()), m))
        },
    ));

    // ---- Attention: decoder (bidirectional over the cache and the canvas) and encoder chunks
    let window = text.sliding_window;
    let attn = |label: String,
                spec: KernelSpec,
                d: usize,
                kv_heads: usize,
                q_len: usize,
                q_pos0: usize,
                k_pos0: usize,
                kv_len: usize,
                causal: bool,
                win: Option<usize>| {
        let pairs = visible_pairs(q_len, kv_len, q_pos0, k_pos0, causal, if causal { win } else { None });
        // The least bytes: q, k and v read once, out written once (a split's fp32 partials stay
        // in L2 mostly and are not counted). FLOPs: the useful 4 x pairs x d per head (QK^T and
        // P.V); the kernel's exact max recomputes QK^T, so it executes 1.5x this.
        let bytes = 2.0 * (2 * q_len * heads * d + 2 * kv_len * kv_heads * d) as f64;
        let flops = 4.0 * pairs * (d * heads) as f64;
        case(Figure::new(label, bytes, flops), move |x| {
            let q = bf16s(x, q_len * heads * d, 1.0, 18, "q");
            let (kk, vv) =
                (bf16s(x, kv_len * kv_heads * d, 1.0, 19, "k"), bf16s(x, kv_len * kv_heads * d, 1.0, 20, "v"));
            let o = out(x, 2 * q_len * heads * d, "out");
            let scratch_len = ops::attention_scratch_len(&spec, q_len).unwrap_or_else(|e| panic!("{e}"));
            let scratch = out(x, 4 * scratch_len.max(1), "attention scratch");
            let plans = ops::plan_attention(
                &spec,
                q.b16(),
                ops::KvView { k: kk.b16(), v: vv.b16(), rows: kv_len, paging: None },
                o.b16(),
                Some(scratch.b32()),
                q_len,
                kv_len,
                q_pos0,
                k_pos0,
                win,
            );
            plans.unwrap_or_else(|e| panic!("planning a launch: {e}")).into_iter().map(Step::Launch).collect()
        })
    };
    let (sd, skv) = (text.head_dim, text.num_key_value_heads);
    let (fd, fkv) = (full_d, text.num_global_key_value_heads);
    let ctx = 4096usize;
    let back = window - 1;
    v_cases.push(attn(
        format!("attention.sliding.decoder.d{sd}.q{m}.kv{}", back + m),
        k.sliding.decoder,
        sd,
        skv,
        m,
        ctx,
        ctx - back,
        back + m,
        false,
        None,
    ));
    // 8192: the context of #4's attention target (attn.hd512.c256.ctx8192).
    for ctx in [4096usize, 8192, 32768] {
        v_cases.push(attn(
            format!("attention.full.decoder.d{fd}.q{m}.kv{}", ctx + m),
            k.full.decoder,
            fd,
            fkv,
            m,
            ctx,
            0,
            ctx + m,
            false,
            None,
        ));
    }
    // On sm_90a the backend's attention is the wgmma one; the mma.sync kernel at 8K, for the
    // comparison (".mma").
    if let Op::Attention(a) = k.full.decoder.op {
        let mma = attention_spec(a.head_dim, a.q_heads, a.kv_heads, a.mask);
        if mma != k.full.decoder {
            let ctx = 8192usize;
            v_cases.push(attn(
                format!("attention.full.decoder.mma.d{fd}.q{m}.kv{}", ctx + m),
                mma,
                fd,
                fkv,
                m,
                ctx,
                0,
                ctx + m,
                false,
                None,
            ));
        }
    }
    let chunk = 512usize;
    v_cases.push(attn(
        format!("attention.sliding.encoder.d{sd}.q{chunk}.pos{ctx}"),
        k.sliding.encoder,
        sd,
        skv,
        chunk,
        ctx,
        ctx - back,
        back + chunk,
        true,
        Some(window),
    ));
    v_cases.push(attn(
        format!("attention.full.encoder.d{fd}.q{chunk}.pos{ctx}"),
        k.full.encoder,
        fd,
        fkv,
        chunk,
        ctx,
        0,
        ctx + chunk,
        true,
        None,
    ));

    // ---- Dense projections at the canvas' 256 rows
    let linear = |label: &str, spec: KernelSpec| {
        let Op::Linear(l) = spec.op else { unreachable!() };
        let (n, kk) = (l.n as usize, l.k as usize);
        let bytes = 2.0 * (m * kk + n * kk + m * n) as f64;
        case(Figure::new(format!("linear.{label}.n{n}.k{kk}.rows{m}"), bytes, 2.0 * (m * n * kk) as f64), move |x| {
            let (a, w, y) = (bf16s(x, m * kk, 2.0, 22, "x"), bf16s(x, n * kk, 0.03, 23, "w"), out(x, 2 * m * n, "y"));
            launch(ops::plan_linear(&spec, a.b16(), w.b16(), y.b16(), m))
        })
    };
    v_cases.push(linear("q_proj.sliding", k.sliding.q_proj));
    v_cases.push(linear("kv_proj.sliding", k.sliding.kv_proj));
    v_cases.push(linear("q_proj.full", k.full.q_proj));
    v_cases.push(linear("o_proj.full", k.full.o_proj));
    v_cases.push(linear("dense_up", k.dense_up));
    v_cases.push(linear("dense_down", k.dense_down));
    v_cases.push(linear("lm_head", k.lm_head));
    // On sm_90a the backend's projections are wgmma; the mma.sync ones they replace, for the
    // comparison (".mma").
    for (label, spec) in [("q_proj.full", k.full.q_proj), ("dense_up", k.dense_up), ("lm_head", k.lm_head)] {
        let Op::Linear(l) = spec.op else { unreachable!() };
        let mma = linear_spec(l.n, l.k);
        if mma != spec {
            v_cases.push(linear(&format!("{label}.mma"), mma));
        }
    }

    // ---- MoE: router, then the expert GEMMs over 256 tokens x top-8 (uniform routing)
    v_cases.push(case(
        Figure::new(
            format!("router.h{h}.e{e}.k{top_k}.tokens{m}"),
            (2 * (m * h + h + e * h + e) + 8 * m * top_k) as f64,
            2.0 * (m * e * h) as f64,
        ),
        move |x| {
            let (hh, sc, proj, pes) = (
                bf16s(x, m * h, 3.0, 24, "h"),
                bf16s(x, h, 1.0, 25, "scale"),
                bf16s(x, e * h, 0.03, 26, "proj"),
                bf16s(x, e, 1.0, 27, "per-expert scale"),
            );
            let (ex, wt) = (out(x, 4 * m * top_k, "experts"), out(x, 4 * m * top_k, "weights"));
            let root = (h as f64).powf(-0.5) as f32;
            launch(ops::plan_router(
                &k.router,
                hh.b16(),
                sc.b16(),
                proj.b16(),
                pes.b16(),
                ex.b32(),
                wt.b32(),
                m,
                eps,
                root,
            ))
        },
    ));
    let (ids, used) = routing(m, top_k, e, 28);
    let pairs = m * top_k;
    let r = Routing { tokens: m, top_k, num_experts: e };
    // The routing sort's outputs for `ids` (computed here; the sort itself is its own case).
    let (offsets, sorted) = {
        let mut offsets = Vec::with_capacity(e + 1);
        let mut sorted = Vec::with_capacity(pairs);
        for ex in 0..e as i32 {
            offsets.push(sorted.len() as i32);
            sorted.extend((0..pairs as i32).filter(|&p| ids[p as usize] == ex));
        }
        offsets.push(sorted.len() as i32);
        (offsets, sorted)
    };
    {
        let ids = ids.clone();
        v_cases.push(case(
            Figure::new(format!("moe_sort.e{e}.pairs{pairs}"), (4 * (2 * pairs + e + 1)) as f64, 0.0),
            move |x| {
                let ex = region_of(x, &ids, "experts");
                let (o, s) = (out(x, 4 * (e + 1), "offsets"), out(x, 4 * pairs, "sorted"));
                launch(ops::plan_moe_sort(&k.moe_sort, ex.b32(), o.b32(), s.b32(), pairs))
            },
        ));
    }
    // The backend's bf16 expert GEMMs, and on sm_90a also the mma.sync kernels the wgmma ones
    // replace (".mma"), for the comparison.
    let mut engines = vec![("", k.experts_gate_up, k.experts_down)];
    if mma_experts.0 != k.experts_gate_up {
        engines.push((".mma", mma_experts.0, mma_experts.1));
    }
    for &(engine, up_spec, _) in &engines {
        let (offsets, sorted) = (offsets.clone(), sorted.clone());
        let n = 2 * moe;
        v_cases.push(case(
            Figure::new(
                format!("grouped_gemm.gate_up_geglu{engine}.n{n}.k{h}.tokens{m}.top{top_k}"),
                (2 * (m * h + used * n * h + pairs * moe) + 4 * (pairs + e + 1)) as f64,
                2.0 * (pairs * n * h) as f64,
            ),
            move |x| {
                let (a, w) = (bf16s(x, m * h, 2.0, 29, "x"), bf16s(x, e * n * h, 0.03, 30, "experts gate_up"));
                let sp = ops::SortedPairs {
                    offsets: region_of(x, &offsets, "offsets").b32(),
                    sorted: region_of(x, &sorted, "sorted").b32(),
                };
                let o = out(x, 2 * pairs * moe, "out");
                launch(ops::plan_grouped_gemm_geglu(&up_spec, a.b16(), sp, ExpertWeights::bf16(w.b16()), o.b16(), r))
            },
        ));
    }
    // The same two GEMMs on FP8 experts (e4m3 codes and one fp32 scale per row: half the weight
    // bytes), weight-only: dequantised while staged, the same fp32 SIMT math.
    for down in [false, true] {
        let (offsets, sorted) = (offsets.clone(), sorted.clone());
        let (n, kk, name) = if down { (h, moe, "down") } else { (2 * moe, h, "gate_up_geglu") };
        let (x_rows, out_cols) = if down { (pairs, h) } else { (m, moe) };
        v_cases.push(case(
            Figure::new(
                format!("grouped_gemm.{name}.e4m3.n{n}.k{kk}.tokens{m}.top{top_k}"),
                (2 * (x_rows * kk + pairs * out_cols) + used * n * kk + 4 * used * n + 4 * (pairs + e + 1)) as f64,
                2.0 * (pairs * n * kk) as f64,
            ),
            move |x| {
                let a = bf16s(x, x_rows * kk, 2.0, 34, "x");
                let codes = e4m3s(x, e * n * kk, 35, "experts (e4m3)");
                let scales: Vec<f32> = (0..e * n).map(|i| 0.03 / 448.0 * (1.0 + 0.01 * (i % 13) as f32)).collect();
                let sc = region_of(x, &scales, "expert scales");
                let sp = ops::SortedPairs {
                    offsets: region_of(x, &offsets, "offsets").b32(),
                    sorted: region_of(x, &sorted, "sorted").b32(),
                };
                let o = out(x, 2 * pairs * out_cols, "out");
                launch(if down {
                    ops::plan_grouped_gemm_down(&k.experts_down_fp8, a.b16(), sp, ExpertWeights::e4m3(codes.buf(1), sc.b32()), o.b16(), r)
                } else {
                    ops::plan_grouped_gemm_geglu(&k.experts_gate_up_fp8, a.b16(), sp, ExpertWeights::e4m3(codes.buf(1), sc.b32()), o.b16(), r)
                })
            },
        ));
    }
    for &(engine, _, down_spec) in &engines {
        let (offsets, sorted) = (offsets.clone(), sorted.clone());
        v_cases.push(case(
            Figure::new(
                format!("grouped_gemm.down{engine}.n{h}.k{moe}.tokens{m}.top{top_k}"),
                (2 * (pairs * moe + used * h * moe + pairs * h) + 4 * (pairs + e + 1)) as f64,
                2.0 * (pairs * h * moe) as f64,
            ),
            move |x| {
                let (a, w) = (bf16s(x, pairs * moe, 2.0, 31, "act"), bf16s(x, e * h * moe, 0.03, 32, "experts down"));
                let sp = ops::SortedPairs {
                    offsets: region_of(x, &offsets, "offsets").b32(),
                    sorted: region_of(x, &sorted, "sorted").b32(),
                };
                let y = out(x, 2 * pairs * h, "y");
                launch(ops::plan_grouped_gemm_down(&down_spec, a.b16(), sp, ExpertWeights::bf16(w.b16()), y.b16(), r))
            },
        ));
    }
    v_cases.push(case(
        Figure::new(format!("moe_combine.h{h}.tokens{m}.top{top_k}"), (2 * (pairs * h + m * h) + 8 * pairs) as f64, 0.0),
        move |x| {
            let y = bf16s(x, pairs * h, 2.0, 33, "y");
            let ex = region_of(x, &ids, "experts");
            let wts: Vec<f32> = (0..pairs).map(|i| 0.05 + 0.01 * (i % 7) as f32).collect();
            let wt = region_of(x, &wts, "weights");
            let o = out(x, 2 * m * h, "out");
            launch(ops::plan_moe_combine(&k.moe_combine, y.b16(), ex.b32(), wt.b32(), o.b16(), r))
        },
    ));

    // ---- Self-conditioning: softmax(bf16(P)) [256, V] @ E [V, H], P recomputed from the logits
    // (the device path: cap 30, T from the params buffer). Three launches: the probabilities into
    // a [256, V] bf16 scratch, the split-K tensor-core GEMM into fp32 partial sums, the fixed-order
    // reduction. Bytes: the logits read, pr written and read once (the GEMM's column tiles of a
    // split share it through L2), E read once, the partial sums written and read, the output
    // written, the statistics read.
    // On sm_90a the backend's GEMM is the wgmma one; the mma.sync one too, for the comparison.
    let mut soft_specs = vec![("", k.soft_embedding)];
    let soft_mma = soft_embedding_spec(h as u32, v as u32);
    if soft_mma != k.soft_embedding {
        soft_specs.push((".mma", soft_mma));
    }
    for (engine, soft_spec) in soft_specs {
        let Op::SoftEmbedding(se) = soft_spec.op else { unreachable!("the soft embedding's GEMM spec") };
        let splits = se.splits as usize;
        v_cases.push(case(
            Figure::new(
                format!("soft_embedding{engine}.h{h}.v{v}.rows{m}"),
                (2 * (3 * m * v + v * h + m * h) + 4 * 2 * splits * m * h + 8 * m) as f64,
                2.0 * (m * v * h) as f64,
            ),
            move |x| {
                let (l, t, o) =
                    (bf16s(x, m * v, 8.0, 33, "logits"), bf16s(x, v * h, 0.03, 34, "embedding"), out(x, 2 * m * h, "out"));
                // Statistics of a flat row: max 8, 1 / sum over V entries of about exp(-4).
                let stats: Vec<f32> = (0..m).flat_map(|_| [8.0f32, (-4.0f32).exp().recip() / v as f32]).collect();
                let st = region_of(x, &stats, "sc stats");
                let params = SamplerParams {
                    seed: 11,
                    block: 1,
                    step: 5,
                    temperature: 0.8,
                    entropy_bound: 0.1,
                    confidence_threshold: 0.005,
                    stability_threshold: 1,
                };
                let p = region_of(x, &params.to_words(), "params");
                let lx = ops::ProcessedLogits { logits: l.b16(), cap: 30.0, params: Some(p.b32()) };
                let (np, nq) = ops::soft_embedding_scratch(&soft_spec, m).unwrap_or_else(|e| panic!("{e}"));
                let scratch =
                    ops::SoftEmbeddingScratch { probs: out(x, 2 * np, "probs").b16(), partials: out(x, 4 * nq, "partials").b32() };
                let plans = ops::plan_soft_embedding(&soft_spec, lx, st.b32(), t.b16(), scratch, o.b16(), 53.0, m);
                plans.unwrap_or_else(|e| panic!("planning a launch: {e}")).into_iter().map(Step::Launch).collect()
            },
        ));
    }

    // ---- The device sampler: categorical draw, then the canvas step
    let sampler_params = SamplerParams {
        seed: 11,
        block: 1,
        step: 5,
        temperature: 0.8,
        entropy_bound: 0.1,
        confidence_threshold: 0.005,
        stability_threshold: 1,
    };
    v_cases.push(case(Figure::new(format!("gumbel_sample.v{v}.rows{m}"), (2 * n + 4 * m) as f64, 0.0), move |x| {
        let p = region_of(x, &sampler_params.to_words(), "params");
        let (l, s) = (bf16s(x, n, 40.0, 35, "logits"), out(x, 4 * m, "sampled"));
        let lx = ops::ProcessedLogits { logits: l.b16(), cap: 30.0, params: Some(p.b32()) };
        launch(ops::plan_gumbel_sample(&gumbel, lx, s.b32(), m))
    }));
    v_cases.push(case(Figure::new(format!("sampler_canvas.c{m}"), (4 * m * 7) as f64, 0.0), move |x| {
        let mut rng = Rng::new(36);
        let p = region_of(x, &sampler_params.to_words(), "params");
        let ent: Vec<f32> = (0..m).map(|_| 2.5 + 2.5 * rng.uniform()).collect();
        let ids = |rng: &mut Rng| (0..m).map(|_| rng.below(v) as i32).collect::<Vec<i32>>();
        let (s_ids, a_ids) = (ids(&mut rng), ids(&mut rng));
        let (en, sa, am) =
            (region_of(x, &ent, "entropy"), region_of(x, &s_ids, "sampled"), region_of(x, &a_ids, "argmax"));
        let (nc, ac) = (out(x, 4 * m, "next canvas"), out(x, 4 * m, "accepted"));
        let hist = region_of(x, &vec![-1i32; m + 1], "history");
        let st = out(x, 4 * ops::SAMPLER_STATUS_WORDS, "status");
        launch(ops::plan_sampler_canvas(
            &canvas_spec,
            p.b32(),
            en.b32(),
            sa.b32(),
            am.b32(),
            nc.b32(),
            ac.b32(),
            hist.b32(),
            st.b32(),
            v,
            m,
        ))
    }));

    // ---- The read-bandwidth probe itself (ratio ~1 by construction: the floor's own spread)
    let probe = 2usize << 30;
    v_cases.push(case(Figure::new("read_bandwidth.2GiB", probe as f64, 0.0), move |x| {
        let src = region_with(x, probe, &bf16_pattern((1 << 20) - 3, 1.0, 37), "probe source");
        let o = out(x, 16, "sentinel word");
        let spec = read_bandwidth_spec();
        launch(ops::plan_read_bandwidth(&spec, src.b32(), probe / 16, ops::READ_BANDWIDTH_SENTINEL, o.b32(), 65_536))
    }));
    v_cases
}

fn exec_of(x: &mut GpuExecutor) -> &mut GpuExecutor {
    x
}

fn main() {
    let mode = gpu_common::mode();
    let Some(dev) = gpu_common::open_or_skip(BENCH) else { return };
    let device_name = dev.name().to_string();
    let mut exec = GpuExecutor::new(dev);
    let cfg = gpu_common::config_26b();
    let text = &cfg.text;
    let resolved = Kernels::resolve(text, &exec).and_then(|k| {
        let vocab = text.vocab_size as u32;
        let (hidden, moe_k) = (text.hidden_size as u32, text.moe_intermediate_size as u32);
        let moe_n = 2 * moe_k;
        let extra = |spec: KernelSpec| exec.resolve(spec.op).map_err(dgemma::gpu::error::cuda);
        Ok((
            k,
            extra(KernelSpec::portable(Op::RowSoftmaxEntropyArgmax(RowSoftmaxEntropyArgmax { vocab })))?,
            extra(gumbel_sample_spec(vocab))?,
            extra(sampler_canvas_spec())?,
            (
                extra(grouped_gemm_mma_spec_for(moe_n, hidden, GemmFuse::Geglu, WeightFormat::Bf16, Arch::Sm90a))?,
                extra(grouped_gemm_mma_spec_for(hidden, moe_k, GemmFuse::Down, WeightFormat::Bf16, Arch::Sm90a))?,
            ),
        ))
    });
    let (kernels, row_stats, gumbel, canvas_spec, mma_experts) = match resolved {
        Ok(k) => k,
        Err(e) => {
            println!("{BENCH}: skipped, no GPU benchmark ran: the 26B-A4B kernels are not in this build: {e}");
            return;
        }
    };
    let all = cases(&kernels, text, row_stats, gumbel, canvas_spec, mma_experts);
    if !mode.list {
        println!("{BENCH}: {} on {} ({} kernel figures)", exec.describe(), device_name, all.len());
    }

    let mut c = gpu_common::criterion();
    let mut g = c.benchmark_group(BENCH);
    g.sampling_mode(SamplingMode::Flat);
    // Measured on first use (never in --list mode).
    let mut floors: Option<Floors> = None;
    let mut flush: Option<Step> = None;
    for Case { fig, build } in all {
        g.throughput(Throughput::Bytes(fig.bytes as u64));
        let mut build = Some(build);
        let mut steps: Vec<Step> = Vec::new();
        let mut samples: Vec<f64> = Vec::new();
        g.bench_function(fig.name.as_str(), |b| {
            if let Some(build) = build.take() {
                if floors.is_none() {
                    floors = Some(Floors::measure(BENCH, &mut exec, &device_name));
                    flush = Some(gpu_common::flush_step(&mut exec));
                }
                steps = build(&mut exec);
                // Warm-up: loads the function, touches the buffers.
                // SAFETY: the steps address regions this executor allocated for them.
                unsafe { exec.run(&steps) }.unwrap_or_else(|e| panic!("{}: {e}", fig.name));
                exec.synchronize().unwrap_or_else(|e| panic!("{}: {e}", fig.name));
            }
            let flush = flush.as_ref().expect("set up above");
            b.iter_custom(|iters| {
                gpu_common::timed_runs(
                    &mut exec,
                    exec_of,
                    flush,
                    iters,
                    &mut samples,
                    |_| {},
                    |x| {
                        // SAFETY: as above.
                        unsafe { x.run(&steps) }.unwrap_or_else(|e| panic!("{}: {e}", fig.name))
                    },
                )
            });
        });
        if let Some(f) = &floors {
            gpu_common::report(BENCH, &fig, &samples, f, mode);
        }
    }
    g.finish();
    c.final_summary();
}
