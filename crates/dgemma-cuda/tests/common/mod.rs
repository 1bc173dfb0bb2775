//! Kernel checks shared by the GPU tests (`gpu_kernels.rs`) and the CPU-emulator tests
//! (`emulated_kernels.rs`): every kernel of the table against the CPU oracle (`dgemma-cpu` in
//! bf16 mode, `dgemma-sampler` for the sampler statistics) on random inputs at several shapes.
//!
//! An [`Exec`] runs a launch plan on host buffers: the GPU executor uploads them, launches and
//! downloads them; the emulator runs the kernel on them in place. Every output buffer starts
//! filled with NaN and NaN never compares equal, so a kernel that skips an element fails.
//!
//! Tolerances: element-wise kernels whose float32 steps are exact IEEE operations on the same
//! inputs (embedding, RoPE, the temperature division, argmax) must match bit for bit. Kernels
//! with reductions (norms, dot products, softmax sums) or transcendental functions (tanh, exp)
//! compute the same float32 formula in another order, so they may differ from the CPU by one
//! bf16 rounding step now and then: they are allowed a bf16 ulp or two per element and a small
//! fraction of elements that differ at all.

#![allow(dead_code)]

use std::sync::Arc;

use dgemma_codegen::{
    supported_specs, Arch, Family, GemmEngine, GemmFuse, GroupedGemm, KernelSpec, LinearEngine, MaskKind, Op,
    WeightFormat,
};
use dgemma_cpu::ops::activation::{geglu as cpu_geglu, gelu_tanh as cpu_gelu};
use dgemma_cpu::ops::attention::{attention as cpu_attention, AttentionShape, Mask, KV_SPLIT};
use dgemma_cpu::ops::linear::{linear as cpu_linear, Matrix};
use dgemma_cpu::ops::moe::{experts_forward, route, ExpertBank, Router as CpuRouter, Routing as CpuRouting};
use dgemma_cpu::ops::norm::{rms_norm as cpu_rms_norm, rms_norm_row};
use dgemma_cpu::ops::rope::{apply_rope, RopeTable};
use dgemma_cpu::ops::softmax::{softcap as cpu_softcap, softmax_row};
use dgemma_cpu::ops::topk::topk_torch_cpu;
use dgemma_cpu::precision::{to_bf16, Precision};
use dgemma_cpu::weights::Fp8Matrix;
use dgemma_model::quant::Fp8Experts;
use dgemma_model::tensor::{DType, TensorRef};
use dgemma_cuda::bf16;
use dgemma_cuda::ops::{self, Buf, LaunchPlan, Routing};

pub const BF16: Precision = Precision::Bf16;

// ---------------------------------------------------------------------------------------------
// Executors

/// A host buffer handed to a kernel.
#[derive(Clone, Debug)]
pub enum Host {
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// Bytes (FP8 e4m3 weight codes).
    U8(Vec<u8>),
}

impl Host {
    pub fn len(&self) -> usize {
        match self {
            Host::Bf16(v) => v.len(),
            Host::F32(v) => v.len(),
            Host::I32(v) => v.len(),
            Host::U8(v) => v.len(),
        }
    }
    pub fn bf16(&self) -> Vec<f32> {
        match self {
            Host::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            other => panic!("not a bf16 buffer: {other:?}"),
        }
    }
    pub fn f32(&self) -> &[f32] {
        match self {
            Host::F32(v) => v,
            other => panic!("not an f32 buffer: {other:?}"),
        }
    }
    pub fn i32(&self) -> &[i32] {
        match self {
            Host::I32(v) => v,
            other => panic!("not an i32 buffer: {other:?}"),
        }
    }
}

/// Runs launch plans on host buffers.
pub trait Exec {
    /// The arch whose arch-specific kernels this executor runs.
    fn arch(&self) -> Arch;
    /// Cases whose work estimate exceeds this are skipped (the emulator is slow).
    fn max_work(&self) -> usize;
    /// Makes `bufs` visible to the kernel, builds the plan from their addresses (one [`Buf`] per
    /// host buffer, same order), runs it and leaves the buffers' final contents in `bufs`.
    fn launch(&self, bufs: &mut [Host], plan: &dyn Fn(&[Buf]) -> LaunchPlan);
}

/// `b` without its first `elems` elements of `elem_size` bytes (a view).
pub fn offset(b: Buf, elems: usize, elem_size: usize) -> Buf {
    Buf { ptr: b.ptr + (elems * elem_size) as u64, len: b.len - elems }
}

/// The specs of `family` the executor can run.
pub fn specs(e: &dyn Exec, family: Family) -> Vec<KernelSpec> {
    let v: Vec<KernelSpec> =
        supported_specs().into_iter().filter(|s| s.family() == family && s.target.runs_on(e.arch())).collect();
    assert!(!v.is_empty(), "no {family:?} kernels for {:?}", e.arch());
    v
}

// ---------------------------------------------------------------------------------------------
// Data and comparison

/// Deterministic test data (xorshift64*; `bf16_values` rounds to bf16).
pub use dgemma_cuda::Rng;

/// `n` bf16 values uniform in [-scale, scale), generated on all cores (for the big weights).
pub fn big_bf16(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; n];
    let threads = std::thread::available_parallelism().map_or(4, |p| p.get());
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut rng = Rng::new(seed * 1000 + i as u64);
                for v in part {
                    *v = bf16::from_f32(rng.uniform() * scale);
                }
            });
        }
    });
    out
}

pub fn hb(v: &[f32]) -> Host {
    Host::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect())
}

pub fn nan_bf16(n: usize) -> Host {
    Host::Bf16(vec![bf16::NAN; n])
}

pub fn nan_f32(n: usize) -> Host {
    Host::F32(vec![f32::NAN; n])
}

/// A `[rows, cols]` bf16 matrix the CPU oracle reads row by row.
pub struct Bf16Matrix<'a> {
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [bf16],
}

impl Matrix for Bf16Matrix<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn read_row(&self, r: usize, out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(&self.data[r * self.cols..(r + 1) * self.cols]) {
            *o = v.to_f32();
        }
    }
}

/// One bf16 ulp at magnitude `x`.
pub fn bf16_ulp(x: f32) -> f32 {
    let m = x.abs().max(f32::MIN_POSITIVE);
    2f32.powi(m.log2().floor() as i32 - 7)
}

#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Per element: |got - want| <= ulps * bf16_ulp(max(|got|, |want|)) + atol.
    pub ulps: f32,
    pub atol: f32,
    /// Fraction of elements allowed to differ at all.
    pub max_mismatch: f64,
}

pub const EXACT: Tol = Tol { ulps: 0.0, atol: 0.0, max_mismatch: 0.0 };

/// Compares bf16-valued outputs. NaN anywhere fails.
pub fn compare(what: &str, got: &[f32], want: &[f32], tol: Tol) {
    compare_with(what, got, want, None, None, tol);
}

/// [`compare`] where the ulp of element i is taken at least at magnitude `scale[i]`: for outputs
/// that went through a rounding at a larger magnitude before a cancelling add (a residual add
/// after a norm), one ulp of the intermediate is the honest unit.
pub fn compare_scaled(what: &str, got: &[f32], want: &[f32], scale: Option<&[f32]>, tol: Tol) {
    compare_with(what, got, want, scale, None, tol);
}

/// [`compare_scaled`] with an extra per-element absolute allowance `slack[i]` (a propagated
/// input difference that the caller bounds exactly).
pub fn compare_with(what: &str, got: &[f32], want: &[f32], scale: Option<&[f32]>, slack: Option<&[f32]>, tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut mismatches = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!w.is_nan(), "{what}: the CPU reference has NaN at {i} (test bug)");
        assert!(!g.is_nan(), "{what}: NaN at element {i} of {} (expected {w})", got.len());
        if g.to_bits() == w.to_bits() || (g == 0.0 && w == 0.0) {
            continue;
        }
        mismatches += 1;
        let at = g.abs().max(w.abs()).max(scale.map_or(0.0, |s| s[i].abs()));
        let limit = tol.ulps * bf16_ulp(at) + tol.atol + slack.map_or(0.0, |s| s[i]);
        assert!((g - w).abs() <= limit, "{what}: element {i}: got {g}, expected {w} (limit {limit})");
    }
    let frac = mismatches as f64 / got.len().max(1) as f64;
    assert!(
        frac <= tol.max_mismatch,
        "{what}: {mismatches} of {} elements differ from the CPU ({:.3}%, allowed {:.3}%)",
        got.len(),
        100.0 * frac,
        100.0 * tol.max_mismatch
    );
    if mismatches > 0 {
        eprintln!("{what}: {mismatches} of {} elements differ by <= {} bf16 ulp", got.len(), tol.ulps);
    }
}

// ---------------------------------------------------------------------------------------------
// Checks, one per family

pub fn check_rms_norm(e: &dyn Exec) {
    let eps = 1e-6f32;
    let scalar = to_bf16(0.73);
    for spec in specs(e, Family::RmsNorm) {
        let Op::RmsNorm(r) = spec.op else { unreachable!() };
        let width = r.width as usize;
        for (case, rows) in [1usize, 3, 67].into_iter().enumerate() {
            if rows * width > e.max_work() {
                continue;
            }
            let name = format!("{} rows={rows}", spec.kernel_name());
            let mut rng = Rng::new(100 + case as u64);
            let n = rows * width;
            let x = rng.bf16_values(n, 4.0);
            let x_add = rng.bf16_values(n, 2.0);
            let w: Vec<f32> = (0..width).map(|_| to_bf16(1.0 + 0.5 * rng.uniform())).collect();
            let residual = rng.bf16_values(n, 3.0);

            // CPU: model.rs's sequence of rounded steps.
            let mut want = x.clone();
            if r.fuse_input_add {
                for (a, b) in want.iter_mut().zip(&x_add) {
                    *a = to_bf16(*a + b);
                }
            }
            cpu_rms_norm(&mut want, width, r.has_scale.then_some(&w[..]), eps, BF16);
            // The magnitude at which the norm's output was rounded (see compare_scaled).
            let mut scale: Vec<f32> = want.iter().map(|v| v.abs()).collect();
            if r.fuse_residual_add {
                for ((a, h), s) in want.iter_mut().zip(&residual).zip(scale.iter_mut()) {
                    *a = to_bf16(h + *a);
                    *s = s.max(h.abs());
                }
            }
            if r.fuse_layer_scalar {
                for a in want.iter_mut() {
                    *a = to_bf16(*a * scalar);
                }
            }
            // One flipped rounding of the norm output travels through the residual add (and the
            // scalar), each of which rounds again: two ulps at the intermediate magnitude.
            let ulps = if r.fuse_residual_add { 2.0 } else { 1.0 };
            let tol = Tol { ulps, atol: 0.0, max_mismatch: 0.02 };

            let out0 = if r.fuse_residual_add { hb(&residual) } else { nan_bf16(n) };
            let mut bufs = [hb(&x), hb(&x_add), hb(&w), out0];
            e.launch(&mut bufs, &|b| {
                ops::plan_rms_norm(
                    &spec,
                    Some(b[0]),
                    r.fuse_input_add.then_some(b[1]),
                    r.has_scale.then_some(b[2]),
                    b[3],
                    rows,
                    eps,
                    scalar,
                )
                .unwrap()
            });
            compare_scaled(&name, &bufs[3].bf16(), &want, Some(&scale), tol);

            // In place (x = out), for the kernels that allow it.
            if !r.fuse_residual_add {
                let mut bufs = [hb(&x_add), hb(&w), hb(&x)];
                e.launch(&mut bufs, &|b| {
                    ops::plan_rms_norm(
                        &spec,
                        None,
                        r.fuse_input_add.then_some(b[0]),
                        r.has_scale.then_some(b[1]),
                        b[2],
                        rows,
                        eps,
                        scalar,
                    )
                    .unwrap()
                });
                compare(&format!("{name} in place"), &bufs[2].bf16(), &want, tol);
            }
        }
    }
}

pub fn check_rope(e: &dyn Exec) {
    let table_rows = 4096usize;
    for spec in specs(e, Family::Rope) {
        let Op::Rope(r) = spec.op else { unreachable!() };
        let (d, pairs) = (r.head_dim as usize, r.rotary_pairs as usize);
        // Default RoPE frequencies for the rotating pairs, 0 beyond (proportional RoPE).
        let inv_freq: Vec<f32> =
            (0..d / 2).map(|j| if j < pairs { 10_000f32.powf(-(2.0 * j as f32) / d as f32) } else { 0.0 }).collect();
        let full = RopeTable::new(&inv_freq, 0, table_rows, BF16);
        let mut cos = Vec::with_capacity(table_rows * pairs);
        let mut sin = Vec::with_capacity(table_rows * pairs);
        for p in 0..table_rows {
            cos.extend_from_slice(&full.cos[p * d..p * d + pairs]);
            sin.extend_from_slice(&full.sin[p * d..p * d + pairs]);
        }

        for (heads, positions) in [(1usize, vec![0i32]), (3, vec![5, 0, 1, 17, 1000, 4095]), (16, vec![2047, 2048])] {
            let tokens = positions.len();
            let name = format!("{} heads={heads} tokens={tokens}", spec.kernel_name());
            let mut rng = Rng::new(7 + tokens as u64);
            let x = rng.bf16_values(tokens * heads * d, 2.0);
            // CPU: the table rows of each token's position.
            let mut want = x.clone();
            let gathered = RopeTable {
                dim: d,
                cos: positions.iter().flat_map(|&p| full.cos[p as usize * d..(p as usize + 1) * d].to_vec()).collect(),
                sin: positions.iter().flat_map(|&p| full.sin[p as usize * d..(p as usize + 1) * d].to_vec()).collect(),
            };
            apply_rope(&mut want, heads, &gathered, BF16);

            let mut bufs = [hb(&x), hb(&cos), hb(&sin), Host::I32(positions.clone())];
            e.launch(&mut bufs, &|b| ops::plan_rope(&spec, b[0], b[1], b[2], b[3], tokens, heads).unwrap());
            compare(&name, &bufs[0].bf16(), &want, EXACT);
        }

        // A position outside the table poisons that token's rows with NaN.
        let mut bufs = [hb(&vec![1.0; 2 * d]), hb(&cos), hb(&sin), Host::I32(vec![3, table_rows as i32])];
        e.launch(&mut bufs, &|b| ops::plan_rope(&spec, b[0], b[1], b[2], b[3], 2, 1).unwrap());
        let got = bufs[0].bf16();
        assert!(
            got[..d].iter().all(|v| v.is_finite()) && got[d..].iter().all(|v| v.is_nan()),
            "{}",
            spec.kernel_name()
        );
    }
}

pub fn check_embedding(e: &dyn Exec) {
    for spec in specs(e, Family::Embedding) {
        let Op::Embedding(emb) = spec.op else { unreachable!() };
        let h = emb.hidden as usize;
        let vocab = 1000usize;
        let mut rng = Rng::new(3);
        let table = rng.bf16_values(vocab * h, 0.1);
        let scale = to_bf16((h as f32).sqrt());
        let ids: Vec<i32> = vec![0, 999, 5, 5, 123, 42, 998];
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| table[id as usize * h..(id as usize + 1) * h].iter().map(|v| to_bf16(v * scale)))
            .collect();
        let mut bufs = [Host::I32(ids.clone()), hb(&table), nan_bf16(ids.len() * h)];
        e.launch(&mut bufs, &|b| ops::plan_embedding(&spec, b[0], b[1], b[2], scale, ids.len()).unwrap());
        compare(&spec.kernel_name(), &bufs[2].bf16(), &want, EXACT);

        // Out-of-range ids give NaN rows, not out-of-bounds reads.
        let mut bufs = [Host::I32(vec![-1, vocab as i32]), hb(&table), hb(&vec![0.0; 2 * h])];
        e.launch(&mut bufs, &|b| ops::plan_embedding(&spec, b[0], b[1], b[2], scale, 2).unwrap());
        assert!(bufs[2].bf16().iter().all(|v| v.is_nan()));
    }
}

pub fn check_geglu(e: &dyn Exec) {
    let spec = specs(e, Family::Geglu)[0];
    for (rows, width) in [(1usize, 32usize), (7, 96), (256, 704), (3, 2112)] {
        if rows * width > e.max_work() {
            continue;
        }
        let mut rng = Rng::new(rows as u64);
        let gate = rng.bf16_values(rows * width, 3.0);
        let up = rng.bf16_values(rows * width, 2.0);
        let mut want = vec![0.0; rows * width];
        cpu_geglu(&gate, &up, &mut want, BF16);
        let tol = Tol { ulps: 1.0, atol: 0.0, max_mismatch: 0.01 };

        // Separate gate and up buffers.
        let mut bufs = [hb(&gate), hb(&up), nan_bf16(rows * width)];
        e.launch(&mut bufs, &|b| ops::plan_geglu(&spec, b[0], b[1], width, b[2], width, rows).unwrap());
        compare(&format!("geglu {rows}x{width}"), &bufs[2].bf16(), &want, tol);

        // One fused [rows, 2 * width] gate_up buffer, gate first.
        let fused: Vec<f32> = (0..rows)
            .flat_map(|r| [&gate[r * width..(r + 1) * width], &up[r * width..(r + 1) * width]].concat())
            .collect();
        let mut bufs = [hb(&fused), nan_bf16(rows * width)];
        e.launch(&mut bufs, &|b| {
            ops::plan_geglu(&spec, b[0], offset(b[0], width, 2), 2 * width, b[1], width, rows).unwrap()
        });
        compare(&format!("geglu fused {rows}x{width}"), &bufs[1].bf16(), &want, tol);
    }
}

pub fn check_softcap(e: &dyn Exec) {
    let spec = specs(e, Family::Softcap)[0];
    for n in [1usize, 1000, 3 * 262_144 + 17] {
        if n > e.max_work() {
            continue;
        }
        let mut rng = Rng::new(n as u64);
        let logits = rng.bf16_values(n, 80.0);
        let mut want = logits.clone();
        cpu_softcap(&mut want, 30.0);
        let mut bufs = [hb(&logits), nan_f32(n)];
        e.launch(&mut bufs, &|b| ops::plan_softcap(&spec, b[0], b[1], 30.0, n).unwrap());
        for (i, (g, w)) in bufs[1].f32().iter().zip(&want).enumerate() {
            // tanhf versus the host libm: a few float32 ulps.
            assert!((g - w).abs() <= 4.0 * f32::EPSILON * w.abs() + 1e-7, "softcap n={n} [{i}]: {g} vs {w}");
        }
    }
}

/// `P = softcap(x) / T` as the device computes it: the softcap kernel's fp32 output (every fused
/// kernel recomputes that same expression, `csrc/common.cuh` softcap_value) divided on the host
/// (one IEEE division per element, the sampler's apply_temperature), or `x / T` without a cap.
/// Oracles built on it hold bit for bit on a GPU too, whose tanhf differs from the host's.
pub fn device_processed(e: &dyn Exec, x: &[f32], cap: f32, temperature: f32) -> Vec<f32> {
    let mut p = x.to_vec();
    if cap > 0.0 {
        let spec = specs(e, Family::Softcap)[0];
        let n = x.len();
        let mut bufs = [hb(x), nan_f32(n)];
        e.launch(&mut bufs, &|b| ops::plan_softcap(&spec, b[0], b[1], cap, n).unwrap());
        p = bufs[1].f32().to_vec();
    }
    dgemma_sampler::apply_temperature(&mut p, temperature).unwrap();
    p
}

/// The softmax statistics of bf16(P) the row pass writes for the self-conditioning input:
/// `(f32(bf16(max P)), 1 / sum exp(bf16(P) - m))`, the sum in f64 (the oracle's own error is
/// negligible against the kernel's float32 tree sum).
fn sc_stats_reference(p: &[f32]) -> (f32, f32) {
    let m = to_bf16(p.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let s: f64 = p.iter().map(|&x| ((to_bf16(x) - m) as f64).exp()).sum();
    (m, (1.0 / s) as f32)
}

pub fn check_row_softmax_entropy_argmax(e: &dyn Exec) {
    let temperature = 0.7f32;
    for spec in specs(e, Family::RowSoftmaxEntropyArgmax) {
        let Op::RowSoftmaxEntropyArgmax(r) = spec.op else { unreachable!() };
        let v = r.vocab as usize;
        let rows = 5usize;
        if rows * v > e.max_work() {
            continue;
        }
        let mut rng = Rng::new(v as u64);
        // bf16 LM-head outputs. Row 0: broad; row 1: peaked (near one-hot); row 2: a tie at the
        // maximum (the first index wins); row 3: -inf entries (a soft cap maps them to -cap);
        // row 4: NaN (invalid -> argmax -1, NaN statistics).
        let mut x = rng.bf16_values(rows * v, 15.0);
        x[v + 17] = 90.0;
        x[2 * v + 3] = 29.0;
        x[2 * v + v - 2] = 29.0;
        for i in 0..v / 2 {
            x[3 * v + 2 * i] = f32::NEG_INFINITY;
        }
        x[4 * v + v / 2] = f32::NAN;

        // The temperature travels in the sampler params buffer (word 4), like on the device.
        let params = ops::SamplerParams {
            seed: 0,
            block: 0,
            step: 0,
            temperature,
            entropy_bound: 0.1,
            confidence_threshold: 0.005,
            stability_threshold: 1,
        };
        for cap in [30.0f32, 0.0] {
            let p_all = device_processed(e, &x, cap, temperature);
            let mut bufs =
                [hb(&x), params_host(&params), Host::I32(vec![i32::MIN; rows]), nan_f32(rows), nan_f32(2 * rows)];
            e.launch(&mut bufs, &|b| {
                let x = ops::ProcessedLogits { logits: b[0], cap, params: Some(b[1]) };
                ops::plan_row_softmax_entropy_argmax(&spec, x, Some(b[2]), Some(b[3]), Some(b[4]), rows).unwrap()
            });
            let (got_a, got_h, got_s) = (bufs[2].i32(), bufs[3].f32(), bufs[4].f32());
            for row in 0..rows {
                let name = format!("{} cap={cap} row {row}", spec.kernel_name());
                let p = &p_all[row * v..(row + 1) * v];
                match (dgemma_sampler::argmax(p), dgemma_sampler::entropy(p)) {
                    (Ok(a), Ok(h)) => {
                        assert_eq!(got_a[row], a as i32, "{name}: argmax");
                        let g = got_h[row];
                        assert!(g.is_finite(), "{name}: entropy {g}");
                        let max_abs = p.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
                        let limit = 1e-5 * h.abs() + 8.0 * f32::EPSILON * max_abs + 1e-7;
                        assert!((g - h).abs() <= limit, "{name}: entropy {g} vs {h} (limit {limit})");
                        let (m, inv) = sc_stats_reference(p);
                        assert_eq!(got_s[2 * row].to_bits(), m.to_bits(), "{name}: self-conditioning max");
                        let gi = got_s[2 * row + 1];
                        assert!((gi - inv).abs() <= 1e-5 * inv, "{name}: 1 / sum {gi} vs {inv}");
                    }
                    _ => {
                        assert_eq!(got_a[row], -1, "{name}: an invalid row must give argmax -1");
                        assert!(got_h[row].is_nan(), "{name}: an invalid row must give entropy NaN");
                        assert!(got_s[2 * row].is_nan() && got_s[2 * row + 1].is_nan(), "{name}: statistics");
                    }
                }
            }
            assert_eq!(got_a[2], 3, "the first of two equal maxima wins");
        }

        // The host path's self-conditioning: its bf16 P itself (no cap, no params: T = 1), only
        // the statistics asked for.
        let mut bufs = [hb(&x), nan_f32(2 * rows)];
        e.launch(&mut bufs, &|b| {
            let x = ops::ProcessedLogits { logits: b[0], cap: 0.0, params: None };
            ops::plan_row_softmax_entropy_argmax(&spec, x, None, None, Some(b[1]), rows).unwrap()
        });
        for row in 0..4 {
            let (m, inv) = sc_stats_reference(&x[row * v..(row + 1) * v]);
            let g = bufs[1].f32();
            assert_eq!(g[2 * row].to_bits(), m.to_bits(), "{} host sc row {row}: max", spec.kernel_name());
            assert!((g[2 * row + 1] - inv).abs() <= 1e-5 * inv, "{} host sc row {row}: 1 / sum", spec.kernel_name());
        }
    }
}

/// The `kv_len` keys (or values) `src` (`[kv_len, width]`, key j at absolute position
/// `k_pos0 + j`) laid out in a ring of `rows` rows, key j in row `(k_pos0 + j) % rows`, as the
/// KV cache keeps them. Rows that hold no key are NaN: a kernel that reads one fails.
pub fn ring(src: &[f32], width: usize, k_pos0: usize, rows: usize) -> Vec<f32> {
    let kv_len = src.len() / width;
    assert!(kv_len <= rows);
    let mut out = vec![f32::NAN; rows * width];
    for (j, key) in src.chunks(width).enumerate() {
        let r = (k_pos0 + j) % rows;
        out[r * width..(r + 1) * width].copy_from_slice(key);
    }
    out
}

/// The first ring longer than `kv_len` rows, in whole multiples of `multiple` rows, over which
/// the `kv_len` keys from `k_pos0` wrap around (none when `k_pos0 == 0`: then `kv_len + 5` rows,
/// rounded up, a few spare rows as a full layer's cache has).
pub fn wrapping_ring(kv_len: usize, k_pos0: usize, multiple: usize) -> usize {
    (kv_len + 1..=2 * kv_len + 64 + multiple)
        .filter(|r| r % multiple == 0)
        .find(|&r| k_pos0 % r + kv_len > r)
        .unwrap_or((kv_len + 5).next_multiple_of(multiple))
}

/// A page table for a ring of `pages` pages in a pool of `pool_pages` (more): distinct pool
/// pages in an order shuffled by `rng` (Fisher-Yates), so that the ring's pages are in general
/// neither in order nor at the start of the pool.
pub fn shuffled_pages(pages: usize, pool_pages: usize, rng: &mut Rng) -> Vec<i32> {
    let mut order: Vec<i32> = (0..pool_pages as i32).collect();
    for i in (1..pool_pages).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order.truncate(pages);
    order
}

/// The ring `ring` (`[rows, width]`, whole pages of `page` rows) laid out through `table` in a
/// pool of `pool_pages` pages: ring page i is pool page `table[i]`; pool pages that hold no ring
/// page are NaN, like the ring's rows that hold no key.
pub fn paged(ring: &[f32], width: usize, page: usize, table: &[i32], pool_pages: usize) -> Vec<f32> {
    let chunk = page * width;
    assert_eq!(table.len() * chunk, ring.len(), "a ring of whole pages, one table entry each");
    let mut pool = vec![f32::NAN; pool_pages * chunk];
    for (src, &p) in ring.chunks(chunk).zip(table) {
        pool[p as usize * chunk..(p as usize + 1) * chunk].copy_from_slice(src);
    }
    pool
}

/// The kernel's rounding contract (`csrc/attention.cuh`) computed on the host: s = q . k (the
/// CPU's dot), m = the max over ALL visible keys, e = exp(s - m), denom = sum e, p = bf16(e),
/// acc = sum p v (ascending keys), out = bf16(acc * (1 / denom)), 0 without a visible key.
/// Identical to the CPU oracle's rounding up to [`KV_SPLIT`] keys; beyond, the CPU takes a
/// running max per KV_SPLIT-key block and rounds p relative to it, which this does not.
#[allow(clippy::too_many_arguments)]
pub fn exact_max_attention(
    q: &[f32],
    q_pos0: usize,
    k: &[f32],
    v: &[f32],
    k_pos0: usize,
    shape: AttentionShape,
    window: Option<Option<usize>>,
) -> Vec<f32> {
    let AttentionShape { heads, kv_heads, head_dim: d } = shape;
    let (s, l) = (q.len() / (heads * d), k.len() / (kv_heads * d));
    let mut out = vec![0.0f32; q.len()];
    for i in 0..s {
        let qp = q_pos0 + i;
        let visible = |j: usize| match window {
            None => true, // bidirectional
            Some(w) => k_pos0 + j <= qp && w.is_none_or(|w| qp - (k_pos0 + j) < w),
        };
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let qrow = &q[(i * heads + h) * d..(i * heads + h + 1) * d];
            let krow = |j: usize| &k[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
            let keys: Vec<usize> = (0..l).filter(|&j| visible(j)).collect();
            let scores: Vec<f32> = keys.iter().map(|&j| dgemma_cpu::ops::linear::dot(qrow, krow(j))).collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut den, mut acc) = (0.0f32, vec![0.0f32; d]);
            for (&j, &sj) in keys.iter().zip(&scores) {
                let e = (sj - m).exp();
                den += e;
                let p = to_bf16(e);
                for (a, &x) in acc.iter_mut().zip(&v[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d]) {
                    *a += p * x;
                }
            }
            let inv = 1.0 / if den == 0.0 { 1.0 } else { den };
            for (o, a) in out[(i * heads + h) * d..(i * heads + h + 1) * d].iter_mut().zip(&acc) {
                *o = to_bf16(a * inv);
            }
        }
    }
    out
}

/// Runs an attention's launches over `bufs` = [q, k ring, v ring, out, scratch], or with
/// `paging` = Some((page, pool rows)) [q, k pool, v pool, out, scratch, page table] (`rows` the
/// logical ring's): as `plan_attention` plans them (`splits` None: the heuristic's split count)
/// or split `splits` ways.
fn run_attention(
    e: &dyn Exec,
    spec: &KernelSpec,
    bufs: &mut [Host],
    (s, l, rows, q_pos0, k_pos0, window): (usize, usize, usize, usize, usize, Option<usize>),
    splits: Option<usize>,
    paging: Option<(usize, usize)>,
) {
    let Op::Attention(a) = spec.op else { unreachable!() };
    let count = splits.unwrap_or_else(|| dgemma_codegen::shapes::attention_splits(&a, s, l));
    let launches = if count == 1 { 1 } else { 3 };
    for launch in 0..launches {
        e.launch(bufs, &|b| {
            let (q, out, scratch) = (b[0], b[3], Some(b[4]));
            let paging = paging.map(|(page, physical_rows)| ops::Paging { table: b[5], page, physical_rows });
            let kv = ops::KvView { k: b[1], v: b[2], rows, paging };
            let mut plans = match splits {
                None => ops::plan_attention(spec, q, kv, out, scratch, s, l, q_pos0, k_pos0, window),
                Some(n) => ops::plan_attention_split(spec, q, kv, out, scratch, s, l, q_pos0, k_pos0, window, n),
            }
            .unwrap();
            assert_eq!(plans.len(), launches);
            plans.swap_remove(launch)
        });
    }
}

/// The tensor-core attention (`csrc/attention.cuh`) of every table shape against the CPU's bf16
/// attention (beyond its `KV_SPLIT`-key blocks, against [`exact_max_attention`], the kernel's
/// rounding contract, which the CPU's block-wise running max departs from): every GQA group of the table (1, 2, 4, 8 query heads per kv head), q_len and
/// kv_len that are no multiple of the 64-row / 64-key tiles or of an m16 / n8 fragment, key
/// ranges over 512 (the CPU's block rescaling) and over several tiles, rows with no visible key
/// (queries before the first key; a sliding window ending before them), windows narrower than a
/// tile and crossing tiles, and each case through a ring of exactly kv_len rows and a larger one
/// that the key range wraps around (its unused rows NaN: a kernel that reads one fails).
///
/// Each runs unsplit, split 3 ways (the flash-decoding launches: partial maxima, partial P.V,
/// combine) and as the heuristic splits it, with the output and the scratch poisoned with NaN
/// and one guard row past the queries: every output must be written, nothing past it. A rerun
/// of one split case must give the same bits (a fixed summation order, no atomics).
///
/// Each of those runs again paged (a KV pool's layout): the ring in whole pages of 16 or 64 rows
/// (alternating over the runs; the exact ring rounded up to whole pages, the larger one the first
/// whole-page ring the keys wrap around), scattered in a shuffled order over a pool with spare
/// pages (NaN, as the ring's rows without a key). Where a key sits in memory must not change a
/// bit: the paged output equals the unpaged one exactly.
pub fn check_attention(e: &dyn Exec) {
    const PAGES: [usize; 2] = [16, 64];
    const SPARE_PAGES: usize = 3;
    let (mut split_runs, mut paged_runs, mut paged_wraps) = (0, 0, 0);
    let mut wgmma_ran = false;
    for spec in specs(e, Family::Attention) {
        let Op::Attention(a) = spec.op else { unreachable!() };
        let (d, hq, hkv) = (a.head_dim as usize, a.q_heads as usize, a.kv_heads as usize);
        let shape = AttentionShape { heads: hq, kv_heads: hkv, head_dim: d };
        // (q_len, kv_len, q_pos0, k_pos0, window): short, and long enough to span several
        // 64-key tiles; queries at the end of the keys, as in the model, or before them.
        let cases: Vec<(usize, usize, usize, usize, Option<usize>)> = match a.mask {
            MaskKind::Causal => vec![
                (5, 9, 4, 0, None),
                (1, 1, 0, 0, None),
                (37, 200, 163, 0, None),
                (6, 20, 1014, 1000, None),
                (5, 9, 0, 3, None), // queries 0-2 see no key
                (3, 700, 697, 0, None),
            ],
            MaskKind::CausalSliding => vec![
                (6, 11, 7, 2, Some(4)),
                (40, 300, 1260, 1000, Some(100)),
                (3, 3, 0, 0, Some(1024)),
                (6, 4, 0, 4, Some(3)), // queries 0-3 see no key
                (70, 150, 1080, 1000, Some(13)),
            ],
            MaskKind::Bidirectional => vec![(4, 10, 6, 0, None), (16, 271, 1280, 1024, None), (9, 600, 2000, 1400, None)],
        };
        let (mut wrapped, mut paged_wrapped) = (0, 0);
        for (case, &(s, l, q_pos0, k_pos0, window)) in cases.iter().enumerate() {
            if s * hq * l * d > e.max_work() {
                continue;
            }
            let mut rng = Rng::new(50 + case as u64);
            let q = rng.bf16_values(s * hq * d, 1.0);
            let k = rng.bf16_values(l * hkv * d, 1.0);
            let v = rng.bf16_values(l * hkv * d, 1.0);
            let mask = match a.mask {
                MaskKind::Bidirectional => Mask::Bidirectional,
                _ => Mask::Causal { window },
            };
            // The oracle reads the keys unrolled, in position order.
            // Up to KV_SPLIT keys the CPU's rounding is the kernel's contract; beyond, the CPU
            // rounds p relative to a per-block running max (2.5-8% of the outputs then differ by
            // an ulp or two from the contract's), so the reference is the contract itself.
            let want = if l <= KV_SPLIT {
                let mut want = vec![0.0f32; q.len()];
                cpu_attention(&q, q_pos0, &k, &v, k_pos0, shape, mask, BF16, &mut want);
                want
            } else {
                let window = match a.mask {
                    MaskKind::Bidirectional => None,
                    _ => Some(window),
                };
                exact_max_attention(&q, q_pos0, &k, &v, k_pos0, shape, window)
            };
            // The weighted mass sum_j p_j |v_j| / denom of each output: a flipped rounding of
            // one p_j moves the output by up to 2^-8 of it, however much the signed sum cancels.
            let v_abs: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let mut mass = vec![0.0f32; q.len()];
            cpu_attention(&q, q_pos0, &k, &v_abs, k_pos0, shape, mask, Precision::F32, &mut mass);

            // Rings of exactly kv_len rows (a contiguous buffer when k_pos0 % kv_len == 0, a
            // rotation otherwise), and a larger ring whose unused rows are NaN: the first one
            // over which the key range wraps, or (k_pos0 = 0, no wrap possible) a few spare rows
            // as a full layer's cache has.
            let heuristic = dgemma_codegen::shapes::attention_splits(&a, s, l);
            let width = hkv * d;
            let tol = Tol { ulps: 2.0, atol: 0.0, max_mismatch: 0.02 };
            for (larger, rows) in [(false, l), (true, wrapping_ring(l, k_pos0, 1))] {
                if k_pos0 % rows + l > rows {
                    wrapped += 1;
                }
                let (kr, vr) = (hb(&ring(&k, width, k_pos0, rows)), hb(&ring(&v, width, k_pos0, rows)));
                let mut split_counts = vec![1, 3];
                if !split_counts.contains(&heuristic) {
                    split_counts.push(heuristic);
                }
                for (i, splits) in split_counts.into_iter().enumerate() {
                    let name = format!("{} case {case} ring of {rows} rows, {splits} splits", spec.kernel_name());
                    let scratch = splits * s * hq * (d + 2);
                    let mut bufs = [hb(&q), kr.clone(), vr.clone(), nan_bf16(q.len() + hq * d), nan_f32(scratch.max(1))];
                    let geometry = (s, l, rows, q_pos0, k_pos0, window);
                    let forced = if splits == heuristic { None } else { Some(splits) };
                    run_attention(e, &spec, &mut bufs, geometry, forced, None);
                    let got = bufs[3].bf16();
                    compare_scaled(&name, &got[..q.len()], &want, Some(&mass), tol);
                    assert!(got[q.len()..].iter().all(|x| x.is_nan()), "{name}: wrote past the last query");
                    if splits > 1 {
                        split_runs += 1;
                        if case == 1 && rows == l {
                            let mut again = [hb(&q), kr.clone(), vr.clone(), nan_bf16(q.len()), nan_f32(scratch)];
                            run_attention(e, &spec, &mut again, geometry, forced, None);
                            let same = again[3].bf16().iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "{name}: a rerun gave other bits");
                        }
                    }

                    // The same run paged.
                    let page = PAGES[(i + larger as usize) % PAGES.len()];
                    let logical = if larger { wrapping_ring(l, k_pos0, page) } else { l.next_multiple_of(page) };
                    let (pages, pool_pages) = (logical / page, logical / page + SPARE_PAGES);
                    let table = shuffled_pages(pages, pool_pages, &mut rng);
                    let pool = |x: &[f32]| hb(&paged(&ring(x, width, k_pos0, logical), width, page, &table, pool_pages));
                    let name = format!("{name}, paged: {pages} pages of {page} rows in a pool of {pool_pages}");
                    let mut bufs =
                        [hb(&q), pool(&k), pool(&v), nan_bf16(q.len() + hq * d), nan_f32(scratch.max(1)), Host::I32(table)];
                    let paging = Some((page, pool_pages * page));
                    run_attention(e, &spec, &mut bufs, (s, l, logical, q_pos0, k_pos0, window), forced, paging);
                    let paged_got = bufs[3].bf16();
                    let same = paged_got.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{name}: other bits than the unpaged ring's");
                    compare_scaled(&name, &paged_got[..q.len()], &want, Some(&mass), tol);
                    paged_runs += 1;
                    // Wrapping around a ring of several pages crosses from its last page to its
                    // first, two pages the shuffle put anywhere in the pool.
                    if k_pos0 % logical + l > logical && pages > 1 {
                        paged_wrapped += 1;
                    }
                }
            }
        }
        assert!(wrapped > 0, "{}: no case wrapped around its ring", spec.kernel_name());
        assert!(paged_wrapped > 0, "{}: no paged case wrapped around its ring", spec.kernel_name());
        paged_wraps += paged_wrapped;
        wgmma_ran |= a.wgmma;
    }
    // sm_90a's kernels are wgmma (S = Q K^T), where the head dim allows.
    assert!(e.arch() != Arch::Sm90a || wgmma_ran, "no wgmma attention ran");
    assert!(split_runs > 0, "no split attention ran");
    assert!(paged_runs > 0, "no paged attention ran");
    eprintln!("attention: {split_runs} split runs, {paged_runs} paged runs ({paged_wraps} wrapping across pages)");
    check_attention_chunks(e);
}

/// An encoder pass over a prompt in chunks gives the bits of one pass over it: the causal
/// kernels, unsplit (as `plan_attention` plans encoder passes), over queries 0..s at once and
/// in chunks [0, 5), [5, 23), [23, s), each chunk over the keys the model passes it (from the
/// first one its first query sees to its last query's own position; a ring of l rows).
fn check_attention_chunks(e: &dyn Exec) {
    let mut checked = 0;
    for spec in specs(e, Family::Attention) {
        let Op::Attention(a) = spec.op else { unreachable!() };
        let (d, hq, hkv) = (a.head_dim as usize, a.q_heads as usize, a.kv_heads as usize);
        let (s, l, q_pos0, k_pos0, window) = match a.mask {
            MaskKind::Causal => (37, 200, 163, 0, None),
            MaskKind::CausalSliding => (40, 300, 1260, 1000, Some(100)),
            MaskKind::Bidirectional => continue,
        };
        if s * hq * l * d > e.max_work() {
            continue;
        }
        assert_eq!(dgemma_codegen::shapes::attention_splits(&a, s, l), 1, "encoder passes are not split");
        let mut rng = Rng::new(77);
        let q = rng.bf16_values(s * hq * d, 1.0);
        let (k, v) = (rng.bf16_values(l * hkv * d, 1.0), rng.bf16_values(l * hkv * d, 1.0));
        let width = hkv * d;
        let (kr, vr) = (hb(&ring(&k, width, k_pos0, l)), hb(&ring(&v, width, k_pos0, l)));
        let run = |i0: usize, i1: usize| -> Vec<f32> {
            let qp = q_pos0 + i0;
            let first = window.map_or(k_pos0, |w| (qp + 1).saturating_sub(w).max(k_pos0));
            let end = (q_pos0 + i1).min(k_pos0 + l); // one past the last query's position
            let chunk_q = hb(&q[i0 * hq * d..i1 * hq * d]);
            let mut bufs = [chunk_q, kr.clone(), vr.clone(), nan_bf16((i1 - i0) * hq * d), nan_f32(1)];
            run_attention(e, &spec, &mut bufs, (i1 - i0, end - first, l, qp, first, window), None, None);
            bufs[3].bf16()
        };
        let whole = run(0, s);
        for (i0, i1) in [(0, 5), (5, 23), (23, s)] {
            let part = run(i0, i1);
            let same = part.iter().zip(&whole[i0 * hq * d..i1 * hq * d]).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{}: queries {i0}..{i1} as a chunk differ from the same queries in one pass", spec.kernel_name());
        }
        checked += 1;
    }
    assert!(checked > 0, "no chunked attention ran");
}

/// The tensor-core linear (`csrc/linear.cuh`) of every table shape against the CPU's bf16 linear.
///
/// Shapes: the table's own (n, k) pairs, which include column tails (n = 24, 80, 96, 320 against
/// 64-wide tiles, 2112 and 2816 against 64, ...), k that is no multiple of 16 or of the 32-wide
/// slice (24, 48, 80) and long k (2816, 4096, 8192: tens to hundreds of slices through the
/// double buffer), at rows 1 (one live fragment row), 17 (a ragged second m16 fragment) and 70
/// (a ragged second or third row tile). Every fragment register is exercised: each output
/// element of a 16 x 8 fragment comes from a different (lane, register) pair, and a layout slip
/// moves values between rows, columns or k halves, far beyond the tolerance.
///
/// The output buffer is NaN-filled with two extra rows: every element of the first `rows` rows
/// must be written (NaN never passes) and the rows past them must stay NaN (the masks).
///
/// Tolerance: both sides compute the exact bf16 x bf16 products in fp32 and round the fp32 sum
/// once to bf16; only the summation order differs (the CPU's 8-lane dot, the tensor core's own
/// order), an fp32 difference of about k * 2^-24 * sum |x_i w_i|, far below a bf16 ulp. So an
/// element differs only when its sum lies that close to a bf16 rounding boundary: by one bf16
/// ulp, in a small fraction of elements (or, near zero, by the absolute fp32 bound).
pub fn check_linear(e: &dyn Exec) {
    let mut tiles = std::collections::BTreeSet::new();
    let mut long_k = false;
    let mut wgmma_ran = false;
    for spec in specs(e, Family::Linear) {
        let Op::Linear(l) = spec.op else { unreachable!() };
        let (n, k) = (l.n as usize, l.k as usize);
        // Work: the multiply-adds of the live m16 fragments (mma.sync) or m64 tiles (wgmma).
        let m = match l.engine {
            LinearEngine::Mma { .. } => 16,
            LinearEngine::Wgmma { .. } => 64,
        };
        let cases: Vec<usize> =
            [1usize, 17, 70].into_iter().filter(|r| r.next_multiple_of(m) * n * k <= e.max_work()).collect();
        if cases.is_empty() {
            continue;
        }
        let w = big_bf16(n * k, 0.05, n as u64 + k as u64);
        let wm = Bf16Matrix { rows: n, cols: k, data: &w };
        for rows in cases {
            let name = format!("{} rows={rows}", spec.kernel_name());
            let x = Rng::new(rows as u64 + k as u64).bf16_values(rows * k, 1.0);
            let mut want = vec![0.0f32; rows * n];
            cpu_linear(&x, rows, &wm, &mut want, BF16);
            let mut bufs = [hb(&x), Host::Bf16(w.clone()), nan_bf16((rows + 2) * n)];
            e.launch(&mut bufs, &|b| ops::plan_linear(&spec, b[0], b[1], b[2], rows).unwrap());
            let got = bufs[2].bf16();
            let tol = Tol { ulps: 1.0, atol: 2e-6 * k as f32 * 0.05, max_mismatch: 0.02 };
            compare(&name, &got[..rows * n], &want, tol);
            let stray = got[rows * n..].iter().position(|v| !v.is_nan());
            assert!(stray.is_none(), "{name}: wrote past the last row (element {:?} of the guard rows)", stray);
            tiles.insert((l.block_m, l.block_n));
            long_k |= k >= 2048;
            wgmma_ran |= matches!(l.engine, LinearEngine::Wgmma { .. });
        }
    }
    assert!(!tiles.is_empty(), "no linear case ran");
    // sm_90a's kernels are wgmma (csrc/linear_wgmma.cuh).
    assert!(e.arch() != Arch::Sm90a || wgmma_ran, "no wgmma linear ran");
    eprintln!("linear: tiles {tiles:?} checked; a k >= 2048 case ran: {long_k}");
}

/// The routing of `tokens` tokens to `top_k` distinct experts, with weights.
pub fn routing(rng: &mut Rng, tokens: usize, top_k: usize, experts: usize) -> (Vec<i32>, Vec<f32>) {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for _ in 0..tokens {
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < top_k {
            let e = rng.below(experts);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen {
            ids.push(e as i32);
            weights.push(0.75 + 0.5 * rng.uniform());
        }
    }
    (ids, weights)
}

/// A skewed routing of `tokens` tokens to `top_k` distinct experts of `experts`, with weights:
/// slot 0 of every token but the last goes to one hot expert (1), so that it has more pairs than
/// one chunk of the grouped GEMMs when `tokens > 33`; the other slots go to the experts of the
/// lowest quarter (at least `top_k + 1` experts, the hot one included), so most experts have no
/// pair at all. Then `ids[pair] = id` for each `(pair, id)` of `invalid` (expert ids outside
/// `0..experts`).
pub fn skewed_routing(
    rng: &mut Rng,
    tokens: usize,
    top_k: usize,
    experts: usize,
    invalid: &[(usize, i32)],
) -> (Vec<i32>, Vec<f32>) {
    let hot = 1 % experts;
    let pool: Vec<usize> = (0..(experts / 4).max(top_k + 1).min(experts)).collect();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for t in 0..tokens {
        let mut chosen: Vec<usize> = if t + 1 < tokens { vec![hot] } else { Vec::new() };
        while chosen.len() < top_k {
            let e = pool[rng.below(pool.len())];
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen {
            ids.push(e as i32);
            weights.push(0.75 + 0.5 * rng.uniform());
        }
    }
    for &(pair, id) in invalid {
        ids[pair] = id;
    }
    (ids, weights)
}

/// The CPU oracle of the routing sort (`csrc/moe_sort.cuh`): the pair lists of `experts_forward`
/// (`(0..pairs).filter(|i| experts[i] == e)` for e in order), then the pairs whose id is outside
/// `0..experts`; `offsets[e]` = the number of pairs listed before expert e's, e = 0..=experts.
pub fn sort_pairs(ids: &[i32], experts: usize) -> (Vec<i32>, Vec<i32>) {
    let key = |id: i32| if id >= 0 && (id as usize) < experts { id as usize } else { experts };
    let mut offsets = Vec::with_capacity(experts + 1);
    let mut sorted = Vec::with_capacity(ids.len());
    for e in 0..=experts {
        offsets.push(sorted.len() as i32);
        sorted.extend((0..ids.len()).filter(|&p| key(ids[p]) == e).map(|p| p as i32));
    }
    (offsets, sorted)
}

/// Runs the routing sort on `ids`: (offsets, sorted). Both outputs start poisoned (-7). The
/// buffers have one element more than the pairs: an expert id 0 past the last pair, which the
/// sort must not count, and a guard after `sorted`, which it must not write.
fn run_moe_sort(e: &dyn Exec, spec: &KernelSpec, ids: &[i32]) -> (Vec<i32>, Vec<i32>) {
    let Op::MoeSort(m) = spec.op else { unreachable!() };
    let pairs = ids.len();
    let mut padded = ids.to_vec();
    padded.push(0);
    let mut bufs = [Host::I32(padded), Host::I32(vec![-7; m.experts as usize + 1]), Host::I32(vec![-7; pairs + 1])];
    e.launch(&mut bufs, &|b| ops::plan_moe_sort(spec, b[0], b[1], b[2], pairs).unwrap());
    let sorted = bufs[2].i32();
    assert_eq!(sorted[pairs], -7, "{}: wrote past the last pair", spec.kernel_name());
    (bufs[1].i32().to_vec(), sorted[..pairs].to_vec())
}

/// The routing sort against [`sort_pairs`], exactly: no pairs, uniform routings, skewed ones with
/// empty experts and every kind of invalid id, one expert only, invalid ids only, and sizes that
/// are not multiples of the block's slices, up to `MOE_SORT_MAX_PAIRS`.
pub fn check_moe_sort(e: &dyn Exec) {
    for spec in specs(e, Family::MoeSort) {
        let Op::MoeSort(m) = spec.op else { unreachable!() };
        let ne = m.experts as usize;
        let top_k = ne.min(8);
        let mut rng = Rng::new(ne as u64 + 11);
        let bad = [ne as i32, -1, i32::MAX, i32::MIN, ne as i32 + 1];
        let mut cases: Vec<(String, Vec<i32>)> = vec![("no pairs".into(), Vec::new())];
        cases.push(("uniform".into(), routing(&mut rng, 37, top_k, ne).0));
        let invalid: Vec<(usize, i32)> = bad.iter().enumerate().map(|(i, &id)| (7 * i + 3, id)).collect();
        cases.push(("skewed with invalid ids".into(), skewed_routing(&mut rng, 45, top_k, ne, &invalid).0));
        cases.push(("one expert".into(), vec![(ne - 1) as i32; 1000]));
        cases.push(("invalid ids only".into(), (0..333).map(|i| bad[i % bad.len()]).collect()));
        for pairs in [4097usize, ops::MOE_SORT_MAX_PAIRS] {
            let ids = (0..pairs).map(|_| rng.below(ne + 2) as i32 - 1).collect(); // -1 ..= ne
            cases.push((format!("{pairs} random pairs"), ids));
        }
        for (what, ids) in cases {
            let name = format!("{} {what}", spec.kernel_name());
            let (offsets, sorted) = run_moe_sort(e, &spec, &ids);
            let (want_offsets, want_sorted) = sort_pairs(&ids, ne);
            assert_eq!(offsets, want_offsets, "{name}: offsets");
            let first = sorted.iter().zip(&want_sorted).position(|(a, b)| a != b);
            assert!(sorted == want_sorted, "{name}: sorted pairs differ (first at {first:?})");
        }
        eprintln!("{}: checked", spec.kernel_name());
    }
}

/// Whether a grouped GEMM runs on tensor cores (`csrc/grouped_gemm_mma.cuh`,
/// `csrc/grouped_gemm_wgmma.cuh`) rather than the SIMT kernel in the CPU's dot order.
fn tensor_cores(g: &GroupedGemm) -> bool {
    g.engine != GemmEngine::Simt
}

/// Multiply-add rows a grouped GEMM runs for `ids` (chunks of `g.rows` pairs per expert, each
/// rounded up to what the kernel skips by: whole groups of `rows / 4` pair slots for SIMT, whole
/// m16 fragments for mma.sync, whole m64 tiles for wgmma): the emulator's work estimate.
fn grouped_rows(ids: &[i32], experts: usize, g: &GroupedGemm) -> usize {
    let rows = g.rows as usize;
    let group = match g.engine {
        GemmEngine::Simt => rows / 4,
        GemmEngine::Mma { .. } => 16,
        GemmEngine::Wgmma { .. } => 64,
    };
    (0..experts)
        .map(|ex| {
            let n = ids.iter().filter(|&&id| id == ex as i32).count();
            (n / rows) * rows + (n % rows).next_multiple_of(group)
        })
        .sum()
}

/// How far a grouped GEMM's outputs may be from the CPU's, for sums of `k` products with
/// weights of magnitude at most `w_max` and inputs of at most 1: bit for bit for the SIMT down
/// projection (the CPU's 8-lane dot order, exact products, one rounding), and on tensor cores
/// [`check_linear`]'s tolerance: only the fp32 summation order differs, so a bf16 rounding flips
/// (by one ulp, or near zero by the absolute fp32 bound `2e-6 * k * w_max`) in a small fraction of
/// the elements.
fn grouped_down_tol(g: &GroupedGemm, k: usize, w_max: f32) -> Tol {
    if tensor_cores(g) {
        Tol { ulps: 1.0, atol: 2e-6 * k as f32 * w_max, max_mismatch: 0.02 }
    } else {
        EXACT
    }
}

/// The largest |got - want| and the largest in bf16 ulps of the larger magnitude (near zero a
/// tiny element's ulps), how many elements differ at all (NaN-free inputs; +0 and -0 equal) and
/// how many by more than one bf16 ulp.
pub fn diff_stats(got: &[f32], want: &[f32]) -> (f32, f32, usize, usize) {
    let (mut max_abs, mut max_ulps, mut differ, mut beyond) = (0f32, 0f32, 0usize, 0usize);
    for (&g, &w) in got.iter().zip(want) {
        if g == w {
            continue;
        }
        differ += 1;
        let ulps = (g - w).abs() / bf16_ulp(g.abs().max(w.abs()));
        max_abs = max_abs.max((g - w).abs());
        max_ulps = max_ulps.max(ulps);
        beyond += usize::from(ulps > 1.0);
    }
    (max_abs, max_ulps, differ, beyond)
}

fn report_diff(what: &str, got: &[f32], want: &[f32]) {
    let (max_abs, max_ulps, differ, beyond) = diff_stats(got, want);
    eprintln!(
        "{what}: max |err| {max_abs:.3e}, {differ} of {} elements differ ({:.3}%), {beyond} by more than one bf16 \
         ulp (at most {max_ulps:.2})",
        got.len(),
        100.0 * differ as f64 / got.len().max(1) as f64
    );
}

/// Checks GeGLU outputs `got` against the CPU's, `want = bf16(bf16(gelu(g)) * u)` from the CPU's
/// rounded gate and up sums `g`, `u` (same layout), for a gate_up kernel `gg` with `k` products
/// per sum and weights of at most `w_max`.
///
/// SIMT: the kernel's g and u are the CPU's, so only tanhf (the GPU's own; the host's in the
/// emulator) may move an output, by a bf16 ulp, in at most 1% of the elements (as [`check_geglu`]).
///
/// Tensor cores: g and u may each differ from the CPU's by what [`grouped_down_tol`] allows a sum,
/// `d = ulp(bf16) + 2e-6 * k * w_max` (a flipped rounding, or the absolute fp32 bound near zero),
/// and the epilogue carries that to the output: |gelu(g') u' - gelu(g) u| <= 1.13 dg (|u| + du) +
/// |gelu(g)| du (|gelu'| <= 1.13), the per-element slack; on top of it two bf16 ulps for the
/// roundings of gelu and of the product (each side rounds its own value). Two sums per output, each
/// flipping in at most 2% of the elements: at most 4% of the outputs differ. NaN never passes.
#[allow(clippy::too_many_arguments)]
fn compare_geglu(what: &str, got: &[f32], want: &[f32], g: &[f32], u: &[f32], gg: &GroupedGemm, k: usize, w_max: f32) {
    assert!(got.len() == want.len() && g.len() == want.len() && u.len() == want.len(), "{what}: length");
    let (tol, slack) = if tensor_cores(gg) {
        let atol = 2e-6 * k as f32 * w_max;
        let slack: Vec<f32> = g
            .iter()
            .zip(u)
            .map(|(&g, &u)| {
                let (dg, du) = (bf16_ulp(g) + atol, bf16_ulp(u) + atol);
                1.13 * dg * (u.abs() + du) + cpu_gelu(g).abs() * du
            })
            .collect();
        (Tol { ulps: 2.0, atol: 0.0, max_mismatch: 0.04 }, Some(slack))
    } else {
        (Tol { ulps: 1.0, atol: 0.0, max_mismatch: 0.01 }, None)
    };
    compare_with(what, got, want, None, slack.as_deref(), tol);
}

/// The rows `keep` of a `[_, width]` matrix, concatenated.
fn rows_of(v: &[f32], width: usize, keep: &[usize]) -> Vec<f32> {
    keep.iter().flat_map(|&r| v[r * width..(r + 1) * width].iter().copied()).collect()
}

/// The pairs of `ids` with an expert id in `0..experts`.
fn valid_pairs(ids: &[i32], experts: usize) -> Vec<usize> {
    (0..ids.len()).filter(|&p| ids[p] >= 0 && (ids[p] as usize) < experts).collect()
}

/// Expert weights `[E, n, k]` as a grouped GEMM kernel takes them: bf16, or FP8 (e4m3 codes, one
/// fp32 scale per row). The CPU oracle reads FP8 weights through the CPU backend's own
/// [`Fp8Matrix`] (the dequantised `f32(code) * scale`, rounded to bf16 in bf16 mode).
pub enum ExpertWeights {
    Bf16(Vec<bf16>),
    Fp8(Arc<Fp8Experts>),
}

impl ExpertWeights {
    /// Random weights in `format`: bf16 values uniform in [-scale, scale) (quantised per row for
    /// FP8, with every row's largest magnitude exactly on 448 and some rows much smaller than
    /// others, so the scales differ row to row).
    pub fn random(format: WeightFormat, [e, n, k]: [usize; 3], scale: f32, seed: u64) -> ExpertWeights {
        let w = big_bf16(e * n * k, scale, seed);
        match format {
            WeightFormat::Bf16 => ExpertWeights::Bf16(w),
            WeightFormat::E4m3 => {
                let mut values: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                for (r, row) in values.chunks_mut(k).enumerate() {
                    // Period 5: a GeGLU column's gate and up rows (n / 2 apart) get different
                    // factors for every model width (none is a multiple of 5).
                    let f = [1.0f32, 0.25, 3.0, 0.01, 0.5][r % 5];
                    row.iter_mut().for_each(|v| *v *= f);
                }
                let t = TensorRef::from_f32("experts", DType::F32, vec![e, n, k], &values).unwrap();
                ExpertWeights::Fp8(Arc::new(Fp8Experts::quantize(&t).unwrap()))
            }
        }
    }

    /// Expert `ex`'s `[n, k]` matrix as the CPU oracle (bf16 mode) reads it.
    pub fn matrix(&self, ex: usize, n: usize, k: usize) -> Box<dyn Matrix + '_> {
        match self {
            ExpertWeights::Bf16(w) => Box::new(Bf16Matrix { rows: n, cols: k, data: &w[ex * n * k..(ex + 1) * n * k] }),
            ExpertWeights::Fp8(f) => Box::new(Fp8Matrix::slice0(f, ex, BF16)),
        }
    }

    /// The largest |weight| the oracle sees.
    pub fn max_abs(&self) -> f32 {
        match self {
            ExpertWeights::Bf16(w) => w.iter().fold(0f32, |m, v| m.max(v.to_f32().abs())),
            ExpertWeights::Fp8(f) => f.scales.iter().fold(0f32, |m, s| m.max(s.abs())) * 448.0,
        }
    }

    /// The weight buffers of a launch: `[w]` or `[codes, scales]`.
    pub fn host(&self) -> Vec<Host> {
        match self {
            ExpertWeights::Bf16(w) => vec![Host::Bf16(w.clone())],
            ExpertWeights::Fp8(f) => vec![Host::U8(f.codes()), Host::F32(f.scales.clone())],
        }
    }
}

/// Builds the grouped GEMM plan of `spec` over `b = [x, offsets, sorted, w.., out]` (`w..`: one
/// buffer for bf16 weights, codes and scales for e4m3).
fn grouped_plan(spec: &KernelSpec, b: &[Buf], routing: Routing) -> LaunchPlan {
    let Op::GroupedGemm(g) = spec.op else { unreachable!() };
    let sp = ops::SortedPairs { offsets: b[1], sorted: b[2] };
    match (g.fuse, g.weights) {
        (GemmFuse::Geglu, WeightFormat::Bf16) => ops::plan_grouped_gemm_geglu(spec, b[0], sp, ops::ExpertWeights::bf16(b[3]), b[4], routing),
        (GemmFuse::Down, WeightFormat::Bf16) => ops::plan_grouped_gemm_down(spec, b[0], sp, ops::ExpertWeights::bf16(b[3]), b[4], routing),
        (GemmFuse::Geglu, WeightFormat::E4m3) => ops::plan_grouped_gemm_geglu(spec, b[0], sp, ops::ExpertWeights::e4m3(b[3], b[4]), b[5], routing),
        (GemmFuse::Down, WeightFormat::E4m3) => ops::plan_grouped_gemm_down(spec, b[0], sp, ops::ExpertWeights::e4m3(b[3], b[4]), b[5], routing),
    }
    .unwrap()
}

/// Runs a grouped GEMM: input `x`, the pairs grouped by expert, the weights, and the output
/// buffer `out`; returns the output buffer.
#[allow(clippy::too_many_arguments)]
fn run_grouped(e: &dyn Exec, spec: &KernelSpec, x: Host, offsets: &[i32], sorted: &[i32], w: &ExpertWeights, out: Host, routing: Routing) -> Host {
    let mut bufs = vec![x, Host::I32(offsets.to_vec()), Host::I32(sorted.to_vec())];
    bufs.extend(w.host());
    bufs.push(out);
    e.launch(&mut bufs, &|b| grouped_plan(spec, b, routing));
    bufs.pop().unwrap()
}

/// Checks one grouped GEMM run over routing `ids` (pairs grouped on the CPU): `check` compares
/// the valid pairs' rows (width `out_cols`, in pair order) with the CPU's. Run twice: with the
/// output poisoned with NaN, the valid pairs' rows must pass `check` (each element written: NaN
/// never passes) and a guard row past the last pair must stay NaN; poisoned with zeros, the
/// invalid pairs' rows must be all NaN and every valid element finite.
#[allow(clippy::too_many_arguments)]
fn check_grouped_run(
    e: &dyn Exec,
    spec: &KernelSpec,
    name: &str,
    x: &[f32],
    w: &ExpertWeights,
    ids: &[i32],
    routing: Routing,
    out_cols: usize,
    check: &dyn Fn(&[f32]),
) {
    let pairs = ids.len();
    let (offsets, sorted) = sort_pairs(ids, routing.num_experts);
    let valid = valid_pairs(ids, routing.num_experts);
    for poison in [f32::NAN, 0.0] {
        let out = hb(&vec![poison; (pairs + 1) * out_cols]);
        let got = run_grouped(e, spec, hb(x), &offsets, &sorted, w, out, routing).bf16();
        let guard = &got[pairs * out_cols..];
        assert!(guard.iter().all(|v| v.to_bits() == poison.to_bits()), "{name}: wrote past the last pair");
        if poison.is_nan() {
            check(&rows_of(&got, out_cols, &valid));
        } else {
            for p in 0..pairs {
                let row = &got[p * out_cols..(p + 1) * out_cols];
                if valid.contains(&p) {
                    assert!(row.iter().all(|v| v.is_finite()), "{name}: pair {p} is valid but not finite");
                } else {
                    assert!(row.iter().all(|v| v.is_nan()), "{name}: pair {p} has an invalid expert but is not NaN");
                }
            }
        }
    }
}

/// The skewed routing the grouped GEMM checks use: 36 tokens x 2 slots over 8 experts, expert
/// 1 with 35 pairs (a full chunk of 32 and a partial one), experts 4..8 with none, the second slot
/// of tokens 3 and 10 out of range (8 and -1).
fn gemm_routing(rng: &mut Rng) -> (Vec<i32>, Vec<f32>, Routing) {
    let (tokens, top_k, num_experts) = (36usize, 2usize, 8usize);
    let (ids, weights) = skewed_routing(rng, tokens, top_k, num_experts, &[(7, 8), (21, -1)]);
    (ids, weights, Routing { tokens, top_k, num_experts })
}

/// Ragged pair counts per expert, shuffled over 69 tokens x 2 slots: 17, 65 (a full 64-pair
/// chunk of the mma kernels and one pair more, both m64 tiles of a wgmma chunk; three SIMT
/// chunks), 0, 1, 33, 0, 16, 4 pairs for experts 0..8, and two ids out of range (8 and -1).
fn ragged_routing(rng: &mut Rng) -> (Vec<i32>, Routing) {
    routing_with_counts(rng, &[17, 65, 0, 1, 33, 0, 16, 4])
}

/// A hot expert, shuffled over 74 tokens x 2 slots: 3, 137 (a full 128-pair wgmma chunk and a
/// second chunk of 9 pairs), 0, 0, 5, 0, 0, 1 pairs for experts 0..8, and two ids out of range.
fn hot_routing(rng: &mut Rng) -> (Vec<i32>, Routing) {
    routing_with_counts(rng, &[3, 137, 0, 0, 5, 0, 0, 1])
}

/// `counts[e]` pairs of expert e and two ids out of range (8 and -1), shuffled, 2 slots a token.
fn routing_with_counts(rng: &mut Rng, counts: &[usize]) -> (Vec<i32>, Routing) {
    let mut ids: Vec<i32> = counts.iter().enumerate().flat_map(|(ex, &n)| std::iter::repeat_n(ex as i32, n)).collect();
    ids.extend([8, -1]);
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let (top_k, num_experts) = (2usize, counts.len());
    assert_eq!(ids.len() % top_k, 0);
    (ids.clone(), Routing { tokens: ids.len() / top_k, top_k, num_experts })
}

/// The routings every grouped GEMM check runs (where the emulator's work limit allows).
fn gemm_cases() -> Vec<(&'static str, Vec<i32>, Routing)> {
    let mut rng = Rng::new(9);
    let (skewed, _, r) = gemm_routing(&mut rng);
    let (ragged, r2) = ragged_routing(&mut rng);
    let (hot, r3) = hot_routing(&mut rng);
    vec![("skewed", skewed, r), ("ragged", ragged, r2), ("hot", hot, r3)]
}

/// gate_up + GeGLU over pairs grouped by expert, against the CPU's linear + geglu per pair.
pub fn check_grouped_gemm_geglu(e: &dyn Exec) {
    let mut ran = Vec::new();
    let mut wgmma_ran = Vec::new();
    for spec in specs(e, Family::GroupedGemm) {
        let Op::GroupedGemm(g) = spec.op else { unreachable!() };
        if g.fuse != GemmFuse::Geglu {
            continue;
        }
        let (n, k, half) = (g.n as usize, g.k as usize, g.n as usize / 2);
        for (case, ids, routing) in gemm_cases() {
            if grouped_rows(&ids, routing.num_experts, &g) * n * k > e.max_work() {
                continue;
            }
            let name = format!("{} {case}", spec.kernel_name());
            let mut rng = Rng::new(ids.len() as u64);
            let w = ExpertWeights::random(g.weights, [routing.num_experts, n, k], 0.05, 77);
            let x = rng.bf16_values(routing.tokens * k, 1.0);
            let (mut want_g, mut want_u) = (Vec::new(), Vec::new());
            for p in valid_pairs(&ids, routing.num_experts) {
                let (t, ex) = (p / routing.top_k, ids[p] as usize);
                let m = w.matrix(ex, n, k);
                let mut gu = vec![0.0f32; n];
                cpu_linear(&x[t * k..(t + 1) * k], 1, m.as_ref(), &mut gu, BF16);
                want_g.extend_from_slice(&gu[..half]);
                want_u.extend_from_slice(&gu[half..]);
            }
            let mut want = vec![0.0f32; want_g.len()];
            cpu_geglu(&want_g, &want_u, &mut want, BF16);
            let w_max = w.max_abs();
            let check = |got: &[f32]| {
                compare_geglu(&name, got, &want, &want_g, &want_u, &g, k, w_max);
                report_diff(&name, got, &want);
            };
            check_grouped_run(e, &spec, &name, &x, &w, &ids, routing, half, &check);
            ran.push((g.weights, tensor_cores(&g), case));
            if matches!(g.engine, GemmEngine::Wgmma { .. }) {
                wgmma_ran.push((g.weights, case));
            }
        }
    }
    for format in [WeightFormat::Bf16, WeightFormat::E4m3] {
        for tc in [false, true] {
            for case in ["skewed", "ragged"] {
                assert!(ran.contains(&(format, tc, case)), "no {format:?} GeGLU grouped GEMM (tensor cores: {tc}) ran {case}");
            }
        }
    }
    // sm_90a's kernels are wgmma (csrc/grouped_gemm_wgmma.cuh), for both weight formats.
    if e.arch() == Arch::Sm90a {
        for format in [WeightFormat::Bf16, WeightFormat::E4m3] {
            for case in ["skewed", "ragged", "hot"] {
                assert!(wgmma_ran.contains(&(format, case)), "no {format:?} wgmma GeGLU grouped GEMM ran {case}");
            }
        }
    }
}

/// The down projection over pairs grouped by expert, against the CPU's linear per pair.
pub fn check_grouped_gemm_down(e: &dyn Exec) {
    let mut ran = Vec::new();
    let mut wgmma_ran = Vec::new();
    for spec in specs(e, Family::GroupedGemm) {
        let Op::GroupedGemm(g) = spec.op else { unreachable!() };
        if g.fuse != GemmFuse::Down {
            continue;
        }
        let (n, k) = (g.n as usize, g.k as usize);
        for (case, ids, routing) in gemm_cases() {
            if grouped_rows(&ids, routing.num_experts, &g) * n * k > e.max_work() {
                continue;
            }
            let name = format!("{} {case}", spec.kernel_name());
            let mut rng = Rng::new(ids.len() as u64 + 1);
            let w = ExpertWeights::random(g.weights, [routing.num_experts, n, k], 0.05, 78);
            let act = rng.bf16_values(ids.len() * k, 1.0);
            let mut want = Vec::new();
            for p in valid_pairs(&ids, routing.num_experts) {
                let ex = ids[p] as usize;
                let m = w.matrix(ex, n, k);
                let mut y = vec![0.0f32; n];
                cpu_linear(&act[p * k..(p + 1) * k], 1, m.as_ref(), &mut y, BF16);
                want.extend(y);
            }
            let tol = grouped_down_tol(&g, k, w.max_abs());
            let check = |got: &[f32]| {
                compare(&name, got, &want, tol);
                report_diff(&name, got, &want);
            };
            check_grouped_run(e, &spec, &name, &act, &w, &ids, routing, n, &check);
            ran.push((g.weights, tensor_cores(&g), case));
            if matches!(g.engine, GemmEngine::Wgmma { .. }) {
                wgmma_ran.push((g.weights, case));
            }
        }
    }
    for format in [WeightFormat::Bf16, WeightFormat::E4m3] {
        for tc in [false, true] {
            for case in ["skewed", "ragged"] {
                assert!(ran.contains(&(format, tc, case)), "no {format:?} down grouped GEMM (tensor cores: {tc}) ran {case}");
            }
        }
    }
    // sm_90a's kernels are wgmma (csrc/grouped_gemm_wgmma.cuh), for both weight formats.
    if e.arch() == Arch::Sm90a {
        for format in [WeightFormat::Bf16, WeightFormat::E4m3] {
            for case in ["skewed", "ragged", "hot"] {
                assert!(wgmma_ran.contains(&(format, case)), "no {format:?} wgmma down grouped GEMM ran {case}");
            }
        }
    }
}

/// The whole expert block on the device (routing sort, gate_up + GeGLU, down, combine) against
/// `dgemma-cpu`'s `experts_forward`, on skewed routings (a hot expert over more than one chunk,
/// experts without pairs, a token with an out-of-range expert id, whose output must be NaN and
/// only its).
pub fn check_moe_experts(e: &dyn Exec) {
    struct Bank<'a> {
        gu: Vec<Box<dyn Matrix + 'a>>,
        down: Vec<Box<dyn Matrix + 'a>>,
    }
    impl ExpertBank for Bank<'_> {
        fn num_experts(&self) -> usize {
            self.gu.len()
        }
        fn gate_up(&self, e: usize) -> &dyn Matrix {
            self.gu[e].as_ref()
        }
        fn down(&self, e: usize) -> &dyn Matrix {
            self.down[e].as_ref()
        }
    }

    let all = specs(e, Family::GroupedGemm);
    let sorts = specs(e, Family::MoeSort);
    let combines = specs(e, Family::MoeCombine);
    let mut ran = Vec::new();
    for up in all.iter().filter(|s| matches!(s.op, Op::GroupedGemm(g) if g.fuse == GemmFuse::Geglu)) {
        let Op::GroupedGemm(gu) = up.op else { unreachable!() };
        let (hidden, inter) = (gu.k as usize, gu.n as usize / 2);
        // The model shapes' down and combine kernels (the self-test GEMM shapes have none).
        let Some(down) = all.iter().find(|s| {
            matches!(s.op, Op::GroupedGemm(g)
                if g.fuse == GemmFuse::Down && g.n as usize == hidden && g.k as usize == inter
                    && g.weights == gu.weights && g.engine == gu.engine)
        }) else {
            continue;
        };
        let combine = combines
            .iter()
            .find(|s| matches!(s.op, Op::MoeCombine(m) if m.hidden as usize == hidden))
            .expect("a matching combine kernel");
        // (tokens, top_k, experts, the invalid (pair, id)s).
        type Case = (usize, usize, usize, &'static [(usize, i32)]);
        let cases: [Case; 3] = [(36, 2, 8, &[(5, 8)]), (6, 4, 8, &[(13, -3)]), (9, 8, 128, &[(70, 200)])];
        for (tokens, top_k, num_experts, invalid) in cases {
            let Some(sort) = sorts.iter().find(|s| matches!(s.op, Op::MoeSort(m) if m.experts as usize == num_experts))
            else {
                continue;
            };
            let mut rng = Rng::new(tokens as u64);
            let (ids, weights) = skewed_routing(&mut rng, tokens, top_k, num_experts, invalid);
            let work = grouped_rows(&ids, num_experts, &gu) * 3 * hidden * inter;
            if work > e.max_work() || num_experts * 3 * hidden * inter > 64 << 20 {
                continue;
            }
            let name = format!("{} + {} tokens={tokens} top_k={top_k} experts={num_experts}", up.kernel_name(), down.kernel_name());
            let pairs = tokens * top_k;
            let valid = valid_pairs(&ids, num_experts);
            let bad_tokens: Vec<usize> = invalid.iter().map(|&(p, _)| p / top_k).collect();
            let good_tokens: Vec<usize> = (0..tokens).filter(|t| !bad_tokens.contains(t)).collect();
            let w_gu = ExpertWeights::random(gu.weights, [num_experts, 2 * inter, hidden], 0.05, 5);
            let w_down = ExpertWeights::random(gu.weights, [num_experts, hidden, inter], 0.05, 6);
            let x = rng.bf16_values(tokens * hidden, 1.0);

            let bank = Bank {
                gu: (0..num_experts).map(|ex| w_gu.matrix(ex, 2 * inter, hidden)).collect(),
                down: (0..num_experts).map(|ex| w_down.matrix(ex, hidden, inter)).collect(),
            };
            // The CPU has no invalid ids: it routes those pairs to expert 0 instead, which
            // changes only the bad tokens' outputs (excluded from the comparisons).
            let cpu_ids: Vec<usize> =
                ids.iter().map(|&id| if id >= 0 && (id as usize) < num_experts { id as usize } else { 0 }).collect();
            let cpu_routing = CpuRouting { top_k, experts: cpu_ids.clone(), weights: weights.clone() };
            let mut want = vec![0.0f32; tokens * hidden];
            experts_forward(&x, tokens, &cpu_routing, &bank, BF16, &mut want);
            // The CPU activations, pair by pair (what experts_forward computes inside), and the
            // rounded gate and up sums they come from.
            let mut cpu_act = vec![0.0f32; pairs * inter];
            let (mut cpu_g, mut cpu_u) = (vec![0.0f32; pairs * inter], vec![0.0f32; pairs * inter]);
            for (pair, &ex) in cpu_ids.iter().enumerate() {
                let t = pair / top_k;
                let mut g = vec![0.0f32; 2 * inter];
                cpu_linear(&x[t * hidden..(t + 1) * hidden], 1, bank.gu[ex].as_ref(), &mut g, BF16);
                cpu_geglu(&g[..inter], &g[inter..], &mut cpu_act[pair * inter..(pair + 1) * inter], BF16);
                cpu_g[pair * inter..(pair + 1) * inter].copy_from_slice(&g[..inter]);
                cpu_u[pair * inter..(pair + 1) * inter].copy_from_slice(&g[inter..]);
            }
            // The down projection and the combine of `act`, as experts_forward does them:
            // y_j = bf16(act_j . W_down[e_j]), out = bf16(sum_j y_j * w_j) in slot order. Also
            // returns max_j |y_j w_j| per output.
            let down_of = |act: &[f32]| -> Vec<f32> {
                let mut y = vec![0.0f32; pairs * hidden];
                for (pair, &ex) in cpu_ids.iter().enumerate() {
                    let (a, o) = (&act[pair * inter..(pair + 1) * inter], &mut y[pair * hidden..(pair + 1) * hidden]);
                    cpu_linear(a, 1, bank.down[ex].as_ref(), o, BF16);
                }
                y
            };
            let combine_of = |y: &[f32]| -> (Vec<f32>, Vec<f32>) {
                let mut out = vec![0.0f32; tokens * hidden];
                let mut scale = vec![0.0f32; tokens * hidden];
                for pair in 0..pairs {
                    let t = pair / top_k;
                    for c in 0..hidden {
                        let v = y[pair * hidden + c] * weights[pair];
                        out[t * hidden + c] += v;
                        scale[t * hidden + c] = scale[t * hidden + c].max(v.abs());
                    }
                }
                (out.into_iter().map(to_bf16).collect(), scale)
            };
            let (cpu_out, scale) = combine_of(&down_of(&cpu_act));
            compare(&format!("{name}: CPU stages vs experts_forward"), &cpu_out, &want, EXACT);

            // 1. The routing sort, exactly.
            let (offsets, sorted) = run_moe_sort(e, sort, &ids);
            assert_eq!((offsets.clone(), sorted.clone()), sort_pairs(&ids, num_experts), "{name}: routing sort");
            let routing = Routing { tokens, top_k, num_experts };

            // 2. gate_up + GeGLU (valid pairs against the CPU; the invalid ones NaN).
            let act = run_grouped(e, up, hb(&x), &offsets, &sorted, &w_gu, nan_bf16(pairs * inter), routing);
            let gpu_act = act.bf16();
            let (g_rows, u_rows) = (rows_of(&cpu_g, inter, &valid), rows_of(&cpu_u, inter, &valid));
            let act_name = format!("{name}: activations");
            let (got_act, want_act) = (rows_of(&gpu_act, inter, &valid), rows_of(&cpu_act, inter, &valid));
            compare_geglu(&act_name, &got_act, &want_act, &g_rows, &u_rows, &gu, hidden, w_gu.max_abs());
            report_diff(&act_name, &got_act, &want_act);
            for (p, row) in gpu_act.chunks(inter).enumerate() {
                assert_eq!(row.iter().all(|v| v.is_nan()), !valid.contains(&p), "{name}: activations of pair {p}");
            }

            // 3. down, on the kernel's own activations.
            let y = run_grouped(e, down, act, &offsets, &sorted, &w_down, nan_bf16(pairs * hidden), routing);
            let gpu_y = y.bf16();
            let clean_act: Vec<f32> = gpu_act.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
            let want_y = down_of(&clean_act);
            let Op::GroupedGemm(gd) = down.op else { unreachable!() };
            let y_name = format!("{name}: expert outputs");
            let (got_y, want_y) = (rows_of(&gpu_y, hidden, &valid), rows_of(&want_y, hidden, &valid));
            compare(&y_name, &got_y, &want_y, grouped_down_tol(&gd, inter, w_down.max_abs()));
            report_diff(&y_name, &got_y, &want_y);
            for (p, row) in gpu_y.chunks(hidden).enumerate() {
                assert_eq!(row.iter().all(|v| v.is_nan()), !valid.contains(&p), "{name}: expert outputs of pair {p}");
            }

            // 4. The combine, on the kernel's own expert outputs: the same fp32 operations in the
            // same order as the CPU, so bit for bit; NaN rows for the tokens with an invalid id.
            let mut bufs = [y, Host::I32(ids.clone()), Host::F32(weights.clone()), nan_bf16(tokens * hidden)];
            e.launch(&mut bufs, &|b| ops::plan_moe_combine(combine, b[0], b[1], b[2], b[3], routing).unwrap());
            let got = bufs[3].bf16();
            let (want_from_gpu_y, _) = combine_of(&gpu_y);
            compare(
                &format!("{name}: combine"),
                &rows_of(&got, hidden, &good_tokens),
                &rows_of(&want_from_gpu_y, hidden, &good_tokens),
                EXACT,
            );
            for t in 0..tokens {
                let row = &got[t * hidden..(t + 1) * hidden];
                assert_eq!(row.iter().all(|v| v.is_nan()), bad_tokens.contains(&t), "{name}: output of token {t}");
            }

            // 5. End to end against experts_forward: activations that differ (a flipped
            // rounding) propagate through the down projection by at most
            // sum |d act| * max|w_down| * w_j, and each y_j may flip one rounding (at |y_j w_j|).
            let max_wd = w_down.max_abs();
            let mut slack = vec![0.0f32; tokens * hidden];
            for &pair in &valid {
                let t = pair / top_k;
                let d: f32 = (0..inter).map(|i| (gpu_act[pair * inter + i] - cpu_act[pair * inter + i]).abs()).sum();
                for s in &mut slack[t * hidden..(t + 1) * hidden] {
                    *s += d * max_wd * weights[pair].abs();
                }
            }
            let tol = Tol { ulps: 2.0, atol: 2e-6 * inter as f32 * 0.05, max_mismatch: 0.10 };
            compare_with(
                &name,
                &rows_of(&got, hidden, &good_tokens),
                &rows_of(&want, hidden, &good_tokens),
                Some(&rows_of(&scale, hidden, &good_tokens)),
                Some(&rows_of(&slack, hidden, &good_tokens)),
                tol,
            );
            report_diff(&name, &rows_of(&got, hidden, &good_tokens), &rows_of(&want, hidden, &good_tokens));
            eprintln!("{name}: checked");
            ran.push((gu.weights, tensor_cores(&gu)));
        }
    }
    for format in [WeightFormat::Bf16, WeightFormat::E4m3] {
        for tc in [false, true] {
            assert!(ran.contains(&(format, tc)), "no {format:?} MoE block case ran (tensor cores: {tc})");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MoE router

/// The router's probabilities per token, `[tokens, experts]`, computed with `route`'s own steps
/// (rms_norm_row, the rounded scale and root, the bf16 linear, softmax_row), and its logits.
fn router_probs(x: &[f32], tokens: usize, scale: &[f32], proj: &Bf16Matrix, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = scale.len();
    let root = (h as f64).powf(-0.5) as f32;
    let mut r = x.to_vec();
    for row in r.chunks_mut(h) {
        rms_norm_row(row, None, eps, BF16);
        for (v, &s) in row.iter_mut().zip(scale) {
            *v = to_bf16(to_bf16(*v * s) * root);
        }
    }
    let mut logits = vec![0.0f32; tokens * proj.rows];
    cpu_linear(&r, tokens, proj, &mut logits, BF16);
    let mut p = logits.clone();
    for row in p.chunks_mut(proj.rows) {
        softmax_row(row);
    }
    (logits, p)
}

/// `route`'s weights for the experts `chosen` of one token: p / (sum of the chosen p, in slot
/// order) * per_expert_scale.
fn router_weights(p: &[f32], chosen: &[usize], per_expert_scale: &[f32]) -> Vec<f32> {
    let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
    chosen.iter().map(|&e| p[e] / sum * per_expert_scale[e]).collect()
}

/// Runs the router kernel on `tokens` rows of `x` and compares it with `dgemma_cpu`'s `route`.
/// Returns the CPU's routing.
///
/// Tolerance. The kernel performs `route`'s float32 operations in `route`'s order (see
/// csrc/router.cuh), so the logits are the CPU's bit for bit and the experts must match EXACTLY,
/// tie order included. The one permitted source of difference is exp: the GPU's expf is within
/// 2 ulp of glibc's (the emulator uses glibc's, so it is bit-exact there), which moves the
/// probabilities, hence the weights, by a few float32 ulps (allowed: 8 ulps relative). Only if two
/// experts have DIFFERENT logits whose CPU probabilities are nevertheless within 8 ulps of each
/// other could that swap their order; such a swap is accepted (and reported). Equal logits give
/// equal probabilities on both sides, so true ties are never excused.
#[allow(clippy::too_many_arguments)]
fn router_case(
    e: &dyn Exec,
    spec: &KernelSpec,
    name: &str,
    x: &[f32],
    tokens: usize,
    scale: &[f32],
    proj: &[bf16],
    per_expert_scale: &[f32],
    eps: f32,
) -> CpuRouting {
    let Op::Router(r) = spec.op else { unreachable!() };
    let (h, ne, k) = (r.hidden as usize, r.experts as usize, r.top_k as usize);
    let root = (h as f64).powf(-0.5) as f32;
    let pm = Bf16Matrix { rows: ne, cols: h, data: proj };
    let router = CpuRouter { proj: &pm, scale, per_expert_scale };
    let want = route(x, tokens, &router, k, eps, BF16);

    // route's steps, spelled out, reproduce it exactly (the probabilities feed the tolerance).
    let (logits, p) = router_probs(x, tokens, scale, &pm, eps);
    for t in 0..tokens {
        let pt = &p[t * ne..(t + 1) * ne];
        let chosen = topk_torch_cpu(pt, k);
        assert_eq!(chosen, want.experts[t * k..(t + 1) * k], "{name}: CPU stages vs route, token {t}");
        let w = router_weights(pt, &chosen, per_expert_scale);
        for (a, b) in w.iter().zip(&want.weights[t * k..(t + 1) * k]) {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{name}: CPU stages vs route");
        }
    }

    let mut bufs = [
        hb(x),
        hb(scale),
        Host::Bf16(proj.to_vec()),
        hb(per_expert_scale),
        Host::I32(vec![i32::MIN; tokens * k]),
        nan_f32(tokens * k),
    ];
    e.launch(&mut bufs, &|b| ops::plan_router(spec, b[0], b[1], b[2], b[3], b[4], b[5], tokens, eps, root).unwrap());
    let (got_e, got_w) = (bufs[4].i32(), bufs[5].f32());
    let close = |a: f32, b: f32| (a - b).abs() <= 8.0 * f32::EPSILON * a.abs().max(b.abs());
    let mut swapped = 0;
    for t in 0..tokens {
        let (lt, pt) = (&logits[t * ne..(t + 1) * ne], &p[t * ne..(t + 1) * ne]);
        let mut chosen = Vec::with_capacity(k);
        for j in 0..k {
            let (g, w) = (got_e[t * k + j], want.experts[t * k + j]);
            assert!(g >= 0 && (g as usize) < ne, "{name}: token {t} slot {j}: expert {g}");
            let g = g as usize;
            if g != w {
                assert!(
                    lt[g] != lt[w] && close(pt[g], pt[w]),
                    "{name}: token {t} slot {j}: expert {g} (logit {}, p {}), the CPU chose {w} (logit {}, p {}); \
                     got {:?}, want {:?}",
                    lt[g],
                    pt[g],
                    lt[w],
                    pt[w],
                    &got_e[t * k..(t + 1) * k],
                    &want.experts[t * k..(t + 1) * k]
                );
                swapped += 1;
            }
            chosen.push(g);
        }
        // The weights of the experts the kernel chose (the CPU's weights when it chose the same).
        let want_w = router_weights(pt, &chosen, per_expert_scale);
        for (j, (&g, &w)) in got_w[t * k..(t + 1) * k].iter().zip(&want_w).enumerate() {
            let ok = if w.is_nan() { g.is_nan() } else { g.to_bits() == w.to_bits() || close(g, w) };
            assert!(ok, "{name}: token {t} slot {j}: weight {g}, expected {w}");
        }
    }
    if swapped > 0 {
        eprintln!("{name}: {swapped} slots hold an expert whose probability is within 8 ulps of the CPU's choice");
    }
    want
}

pub fn check_router(e: &dyn Exec) {
    let eps = 1e-6f32;
    for spec in specs(e, Family::Router) {
        let Op::Router(r) = spec.op else { unreachable!() };
        let (h, ne, k) = (r.hidden as usize, r.experts as usize, r.top_k as usize);
        let mut rng = Rng::new(h as u64 * 1000 + ne as u64);
        let scale: Vec<f32> = (0..h).map(|_| to_bf16(1.0 + 0.5 * rng.uniform())).collect();
        let per_expert_scale: Vec<f32> = (0..ne).map(|_| to_bf16(1.0 + 0.5 * rng.uniform())).collect();

        // Random weights: logits of order 1 on a bf16 grid, so some ties occur naturally. Token 1
        // holds a NaN (NaN logits and probabilities: the CPU comparator's order, NaN weights);
        // token 2 is zero (every logit 0, every probability equal: a full tie).
        let tokens = 37usize;
        if tokens * ne * h <= e.max_work() {
            let proj: Vec<bf16> = rng.bf16_values(ne * h, 1.0).into_iter().map(bf16::from_f32).collect();
            let mut x = rng.bf16_values(tokens * h, 4.0);
            x[h + h / 3] = f32::NAN;
            x[2 * h..3 * h].fill(0.0);
            let name = format!("{} random", spec.kernel_name());
            let want = router_case(e, &spec, &name, &x, tokens, &scale, &proj, &per_expert_scale, eps);
            assert!(want.weights[k..2 * k].iter().all(|w| w.is_nan()), "{name}: the NaN token");
            assert!(want.weights[2 * k..3 * k].iter().all(|w| w.is_finite()), "{name}: the zero token");
        }

        // Deliberate ties: every proj row is a copy of one of `distinct` rows, so experts tie in
        // groups (identical rows give identical logits on both sides, whatever the arithmetic)
        // and the top-k cuts through the groups. The kernel must reproduce torch's CPU order
        // (libstdc++'s introselect + insertion sort), not just pick the right set.
        let tokens = 24usize;
        if tokens * ne * h > e.max_work() {
            continue;
        }
        let (mut straddled, mut not_index_order) = (0, 0);
        for distinct in [2usize, 3, 5] {
            let rows: Vec<Vec<f32>> = (0..distinct).map(|_| rng.bf16_values(h, 1.0)).collect();
            let copy: Vec<usize> = (0..ne).map(|i| if i < distinct { i } else { rng.below(distinct) }).collect();
            let proj: Vec<bf16> = copy.iter().flat_map(|&c| rows[c].iter().map(|&v| bf16::from_f32(v))).collect();
            let x = rng.bf16_values(tokens * h, 4.0);
            let name = format!("{} ties of {distinct} rows", spec.kernel_name());
            let want = router_case(e, &spec, &name, &x, tokens, &scale, &proj, &per_expert_scale, eps);
            // The test means something: ties straddle the k-th place, and torch's order is not
            // simply "lower index first among equals".
            let (_, p) = router_probs(&x, tokens, &scale, &Bf16Matrix { rows: ne, cols: h, data: &proj }, eps);
            for t in 0..tokens {
                let pt = &p[t * ne..(t + 1) * ne];
                let mut by_index: Vec<usize> = (0..ne).collect();
                by_index.sort_by(|&a, &b| pt[b].total_cmp(&pt[a]).then(a.cmp(&b)));
                if k < ne && pt[by_index[k - 1]] == pt[by_index[k]] {
                    straddled += 1;
                }
                if by_index[..k] != want.experts[t * k..(t + 1) * k] {
                    not_index_order += 1;
                }
            }
        }
        assert!(straddled > 0, "{}: no tie straddles the k-th place", spec.kernel_name());
        assert!(not_index_order > 0, "{}: torch's order always equals index order here", spec.kernel_name());
    }
}

// ---------------------------------------------------------------------------------------------
// Self-conditioning soft embedding

/// `soft_embeddings`' formula on bf16 probs (dgemma-cpu model.rs, single-threaded): per output,
/// `a += p * e` over v in float32 (skipping p == 0), then `bf16(bf16(a) * scale)`. Also returns
/// `sum_v |p e|` per output (the scale of the summation error).
fn soft_embedding_reference(probs: &[f32], rows: usize, table: &[bf16], h: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let v = table.len() / h;
    let mut out = vec![0.0f32; rows * h];
    let mut mass = vec![0.0f32; rows * h];
    let threads = std::thread::available_parallelism().map_or(4, |p| p.get()).min(h);
    let cols = h.div_ceil(threads);
    // Columns are independent: split them across threads, each running the CPU's loop order.
    let parts: Vec<(usize, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..h)
            .step_by(cols)
            .map(|c0| {
                s.spawn(move || {
                    let c1 = (c0 + cols).min(h);
                    let w = c1 - c0;
                    let (mut acc, mut abs) = (vec![0.0f32; rows * w], vec![0.0f32; rows * w]);
                    for id in 0..v {
                        let e = &table[id * h + c0..id * h + c1];
                        for c in 0..rows {
                            let pc = probs[c * v + id];
                            if pc != 0.0 {
                                for (j, ev) in e.iter().enumerate() {
                                    let ev = ev.to_f32();
                                    acc[c * w + j] += pc * ev;
                                    abs[c * w + j] += (pc * ev).abs();
                                }
                            }
                        }
                    }
                    (c0, acc, abs)
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (c0, acc, abs) in parts {
        let w = acc.len() / rows.max(1);
        for c in 0..rows {
            for j in 0..w {
                out[c * h + c0 + j] = to_bf16(to_bf16(acc[c * w + j]) * scale);
                mass[c * h + c0 + j] = abs[c * w + j];
            }
        }
    }
    (out, mass)
}

/// Runs the soft embedding's three launches (probabilities, split-K GEMM, reduction) over
/// `bufs` = [logits, params, sc_stats, table, probs scratch, partials scratch, out].
fn run_soft_embedding(e: &dyn Exec, spec: &KernelSpec, bufs: &mut [Host], cap: f32, with_params: bool, scale: f32, rows: usize) {
    for launch in 0..3 {
        e.launch(bufs, &|b| {
            let x = ops::ProcessedLogits { logits: b[0], cap, params: with_params.then_some(b[1]) };
            let scratch = ops::SoftEmbeddingScratch { probs: b[4], partials: b[5] };
            ops::plan_soft_embedding(spec, x, b[2], b[3], scratch, b[6], scale, rows).unwrap().swap_remove(launch)
        });
    }
}

/// Fresh buffers for [`run_soft_embedding`]: the scratch and the output poisoned with NaN.
fn soft_embedding_bufs(spec: &KernelSpec, x: &[f32], params: &SamplerParams, stats: &[f32], table: &[bf16], rows: usize) -> Vec<Host> {
    let Op::SoftEmbedding(se) = spec.op else { unreachable!() };
    let (np, nq) = ops::soft_embedding_scratch(spec, rows).unwrap();
    vec![
        hb(x),
        params_host(params),
        Host::F32(stats.to_vec()),
        Host::Bf16(table.to_vec()),
        nan_bf16(np),
        nan_f32(nq),
        nan_bf16(rows * se.hidden as usize),
    ]
}

pub fn check_soft_embedding(e: &dyn Exec) {
    let mut wgmma_ran = false;
    for spec in specs(e, Family::SoftEmbedding) {
        let Op::SoftEmbedding(se) = spec.op else { unreachable!() };
        let (h, v) = (se.hidden as usize, se.vocab as usize);
        if v * h > e.max_work() {
            continue;
        }
        wgmma_ran |= matches!(se.engine, LinearEngine::Wgmma { .. });
        let scale = to_bf16((h as f32).sqrt());
        let table = big_bf16(v * h, 0.05, h as u64 + v as u64);
        let params = sampler_params(1, 0, 0, 0.1, 0.005, 1); // T = 0.6

        // The decoder's probabilities pr = bf16(softmax(bf16(P))) (soft_embeddings' own first
        // step), computed by the kernels from the bf16 logits and the row pass's statistics: the
        // device path (cap 30, T from params) and the host path's form (cap 0, T = 1); broad rows
        // and a peaked one (row 2). Row counts: one row; 19 (a ragged second m16 fragment); 261
        // (two row tiles of the 256-row block, the second ragged), where the CPU reference is
        // affordable. Every call reads a prefix of the same rows, so a row's bits can be compared
        // across calls: the result of a row must not depend on the others in the call.
        let row_counts: Vec<usize> =
            [1usize, 19, 261].into_iter().filter(|&r| r * v * h <= e.max_work() && (r <= 19 || r * v * h <= 1 << 30)).collect();
        let Some(&max_rows) = row_counts.last() else { continue };
        let mut rng = Rng::new(5);
        let mut x_all = rng.bf16_values(max_rows * v, 12.0);
        if max_rows > 2 {
            x_all[2 * v + 7] = 40.0;
        }
        for (cap, with_params) in [(30.0f32, true), (0.0, false)] {
            let t = if with_params { params.temperature } else { 1.0 };
            let mut first_row: Option<Vec<f32>> = None;
            for &rows in &row_counts {
                let name = format!("{} rows={rows} cap={cap}", spec.kernel_name());
                let x = &x_all[..rows * v];
                let p = device_processed(e, x, cap, t);
                let mut stats = Vec::with_capacity(2 * rows);
                let mut probs = Vec::with_capacity(rows * v);
                for row in p.chunks(v) {
                    let (m, inv) = sc_stats_reference(row);
                    stats.extend([m, inv]);
                    // softmax_row's last step, with these statistics: exp(x - max) * (1 / sum).
                    probs.extend(row.iter().map(|&y| to_bf16((to_bf16(y) - m).exp() * inv)));
                }
                let (want, mass) = soft_embedding_reference(&probs, rows, &table, h, scale);
                let mut bufs = soft_embedding_bufs(&spec, x, &params, &stats, &table, rows);
                run_soft_embedding(e, &spec, &mut bufs, cap, with_params, scale, rows);
                // pr: the same formula on the same P and statistics. Bit for bit on the emulator
                // (glibc's expf on both sides); a GPU's expf is within 2 fp32 ulps of glibc's, which
                // moves a bf16 rounding now and then.
                let pr_tol = Tol { ulps: 1.0, atol: 0.0, max_mismatch: 0.001 };
                compare(&format!("{name} probabilities"), &bufs[4].bf16(), &probs, pr_tol);
                // The float32 sums run in another order than the CPU's (per output: the tensor
                // core's k16 steps, ascending within each of the splits, then the split sums in
                // ascending order; the CPU splits v across threads). Any order's rounding walk is a
                // small multiple of eps * sqrt(V) * sum |p e| (split-K's chains, V / splits adds
                // then `splits`, are shorter than one ascending sum's), which flips the first
                // rounding now and then. One flip is an ulp of the sum, times the scale, rounded
                // again: two ulps of the output. The slack covers a sum that cancels to far below
                // sum |p e| (a few sigma of the two orders' rounding walk).
                let slack: Vec<f32> =
                    mass.iter().map(|m| 8.0 * f32::EPSILON * (v as f32).sqrt() * m * scale).collect();
                let tol = Tol { ulps: 2.0, atol: 0.0, max_mismatch: 0.05 };
                let got = bufs[6].bf16();
                compare_with(&name, &got, &want, None, Some(&slack), tol);
                // Row 0 is the same input in every call: the same bits whatever rows come with it.
                match &first_row {
                    None => first_row = Some(got[..h].to_vec()),
                    Some(r0) => assert!(
                        r0.iter().zip(&got[..h]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{name}: row 0 differs from the same row in a call of 1 row"
                    ),
                }
                // And the same bits again on a rerun (fixed summation order, no atomics).
                if rows == 19 {
                    let mut again = soft_embedding_bufs(&spec, x, &params, &stats, &table, rows);
                    run_soft_embedding(e, &spec, &mut again, cap, with_params, scale, rows);
                    let same = again[6].bf16().iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{name}: a rerun gave other bits");
                }
            }
        }

        // One-hot rows: x = 0 at the id and -inf elsewhere (no cap, T = 1) gives pr exactly
        // one-hot with statistics (0, 1), so out = bf16(E[id] * scale) exactly, whatever the
        // summation order (the embedding kernel's result): catches any indexing slip bit for bit,
        // in the probabilities, the GEMM's tiles and splits and the reduction.
        let ids = [0usize, v - 1, 3, v / 2, 3, v / 3 + 1, 33];
        let rows = ids.len();
        if rows * v * h > e.max_work() {
            continue;
        }
        let mut x = vec![f32::NEG_INFINITY; rows * v];
        for (c, &id) in ids.iter().enumerate() {
            x[c * v + id] = 0.0;
        }
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| table[id * h..(id + 1) * h].iter().map(|x| to_bf16(x.to_f32() * scale)))
            .collect();
        let stats: Vec<f32> = (0..rows).flat_map(|_| [0.0f32, 1.0]).collect();
        let mut bufs = soft_embedding_bufs(&spec, &x, &params, &stats, &table, rows);
        run_soft_embedding(e, &spec, &mut bufs, 0.0, false, scale, rows);
        let onehot: Vec<f32> = x.iter().map(|&l| if l == 0.0 { 1.0 } else { 0.0 }).collect();
        compare(&format!("{} one-hot probabilities", spec.kernel_name()), &bufs[4].bf16(), &onehot, EXACT);
        compare(&format!("{} one-hot", spec.kernel_name()), &bufs[6].bf16(), &want, EXACT);
    }
    // sm_90a's GEMM is wgmma (E as an N-major operand).
    assert!(e.arch() != Arch::Sm90a || wgmma_ran, "no wgmma soft embedding ran");
}

// ---------------------------------------------------------------------------------------------
// Device sampler: gumbel_sample and sampler_canvas against dgemma-sampler (bit for bit)

use dgemma_cuda::ops::{SamplerParams, SamplerStatus, SAMPLER_STATUS_WORDS};
use dgemma_sampler::{
    accept_mask_on, AcceptScratch, NoiseSource, SamplerSettings, SeededNoise, StableAndConfident, TorchDevice,
};

/// A u32 buffer as the executors carry it (i32 words, same bits).
pub fn words(w: &[u32]) -> Host {
    Host::I32(w.iter().map(|&x| x as i32).collect())
}

fn params_host(p: &SamplerParams) -> Host {
    words(&p.to_words())
}

fn status_of(h: &Host) -> SamplerStatus {
    let w = h.i32();
    assert_eq!(w.len(), SAMPLER_STATUS_WORDS);
    SamplerStatus::from_words([w[0] as u32, w[1] as u32, w[2] as u32, w[3] as u32])
}

/// Status words poisoned with garbage (a kernel that skips one fails the comparisons).
fn poisoned_status() -> Host {
    Host::I32(vec![0x7fc0_dead; SAMPLER_STATUS_WORDS])
}

fn sampler_params(seed: u64, block: u32, step: u32, bound: f32, confidence: f32, stability: u32) -> SamplerParams {
    SamplerParams {
        seed,
        block,
        step,
        temperature: 0.6,
        entropy_bound: bound,
        confidence_threshold: confidence,
        stability_threshold: stability,
    }
}

/// Runs gumbel_sample over `rows` rows of the bf16 logits `x` (P = softcap(x) / T, T in `p`).
fn run_gumbel(e: &dyn Exec, spec: &KernelSpec, p: &SamplerParams, x: &[f32], cap: f32, rows: usize) -> Vec<i32> {
    let mut bufs = [params_host(p), hb(x), Host::I32(vec![i32::MIN; rows])];
    e.launch(&mut bufs, &|b| {
        ops::plan_gumbel_sample(spec, ops::ProcessedLogits { logits: b[1], cap, params: Some(b[0]) }, b[2], rows).unwrap()
    });
    bufs[2].i32().to_vec()
}

/// The finite bf16 values whose bit patterns lie within `k` of bf16(x)'s.
fn bf16_near(x: f32, k: i32) -> impl Iterator<Item = f32> {
    let base = bf16::from_f32(x).to_bits() as i32;
    (-k..=k).map(move |d| bf16::from_bits((base + d) as u16).to_f32()).filter(|y| y.is_finite())
}

/// bf16 values (a, c) for ids lo < hi with Gumbel values g_lo, g_hi such that the sums tie,
/// fl(a + g_lo) == fl(c + g_hi) (lo must win), or, without `tie`, fl(c + g_hi) is one float32
/// ulp above fl(a + g_lo) (hi must win).
fn probe_pair(g_lo: f32, g_hi: f32, tie: bool) -> Option<(f32, f32)> {
    for c in bf16_near(g_lo - g_hi, 8) {
        let t = c + g_hi;
        let lo_sum = if tie { t } else { -next_up(-t) };
        if let Some(a) = bf16_near(lo_sum - g_lo, 8).find(|&a| a + g_lo == lo_sum) {
            return Some((a, c));
        }
    }
    None
}

/// The next float32 above a finite `x`.
fn next_up(x: f32) -> f32 {
    if x == 0.0 {
        f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

/// The definition, without the CPU's pruning: first index of max_v fl(P[v] + g_v).
fn gumbel_brute(noise: &SeededNoise, block: usize, step: usize, pos: usize, row: &[f32]) -> i32 {
    let mut best = f32::NEG_INFINITY;
    let mut best_i = usize::MAX;
    for (v, &x) in row.iter().enumerate() {
        let s = x + noise.gumbel(block, step, pos, v).unwrap();
        if s > best || (s == best && v < best_i) {
            best = s;
            best_i = v;
        }
    }
    best_i as i32
}

pub fn check_gumbel_sample(e: &dyn Exec) {
    for spec in specs(e, Family::GumbelSample) {
        let Op::GumbelSample(g) = spec.op else { unreachable!() };
        let v = g.vocab as usize;
        let rows = if v >= 65_536 { 4 } else { 16 };
        // Each id costs a Philox quarter and (unless pruned) two logarithms: ~50 "work" units.
        if rows * v * 50 > e.max_work() {
            eprintln!("{}: skipped (work limit)", spec.kernel_name());
            continue;
        }
        let mut rng = Rng::new(v as u64 + 11);
        // Valid rows of several kinds (bf16 logits): broad at three scales, peaked, all equal (the
        // Gumbel noise alone decides), huge equal values (fl(P + g) ties often without a cap: the
        // first index must win), two equal maxima, half -inf, a single finite entry.
        let mut x = vec![0.0f32; rows * v];
        for r in 0..rows {
            let row = &mut x[r * v..(r + 1) * v];
            match r % 8 {
                0 => row.iter_mut().for_each(|x| *x = rng.uniform() * 2.0),
                1 => row.iter_mut().for_each(|x| *x = rng.uniform() * 20.0),
                2 => {
                    row.iter_mut().for_each(|x| *x = rng.uniform() * 10.0);
                    row[rng.below(v)] = 60.0;
                }
                3 => row.iter_mut().for_each(|x| *x = 0.0),
                4 => row.iter_mut().for_each(|x| *x = 1_048_576.0 * (1 + rng.below(2)) as f32),
                5 => {
                    row.iter_mut().for_each(|x| *x = rng.uniform());
                    row[1] = 3.0;
                    row[v - 1] = 3.0;
                }
                6 => {
                    for (i, x) in row.iter_mut().enumerate() {
                        *x = if i % 2 == 0 { f32::NEG_INFINITY } else { rng.uniform() * 5.0 };
                    }
                }
                _ => {
                    row.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                    row[v / 3] = -7.0;
                }
            }
            row.iter_mut().for_each(|x| *x = to_bf16(*x));
        }
        for cap in [30.0f32, 0.0] {
            for (seed, block, step) in [(0x0123_4567_89ab_cdefu64, 2usize, 5usize), (7, 0, 0), (u64::MAX, 41, 47)] {
                let name = format!("{} cap={cap} seed={seed:#x} block={block} step={step}", spec.kernel_name());
                let p = sampler_params(seed, block as u32, step as u32, 0.1, 0.005, 1);
                let got = run_gumbel(e, &spec, &p, &x, cap, rows);
                let processed = device_processed(e, &x, cap, p.temperature);
                let mut noise = SeededNoise::new(seed, v);
                let mut want = vec![0u32; rows];
                noise.sample(block, step, &processed, v, &mut want).unwrap();
                for r in 0..rows {
                    assert_eq!(got[r], want[r] as i32, "{name}: row {r} (kind {})", r % 8);
                }
                // The definition (no pruning) agrees too, on the small vocabularies.
                if v <= 4096 {
                    for r in 0..rows {
                        let brute = gumbel_brute(&noise, block, step, r, &processed[r * v..(r + 1) * v]);
                        assert_eq!(brute, want[r] as i32, "{name}: row {r}: the CPU's pruning changed the draw");
                    }
                }
            }
        }

        // Probes of the Gumbel values' bits: rows with two finite entries lo < hi whose sums
        // fl(P + g) tie exactly (lo must win) or differ by one float32 ulp (hi must win), P bf16
        // (no cap, T = 1). hi is the id whose g is nearest lo's, so small bf16 values can reach
        // the target sums. A device g one ulp off in either direction flips one of the two.
        for (seed, block, step) in [(0x0123_4567_89ab_cdefu64, 2usize, 5usize), (7, 0, 0), (u64::MAX, 41, 47)] {
            let noise = SeededNoise::new(seed, v);
            let probes = if v >= 65_536 { 16 } else { 256 };
            let mut probe = vec![f32::NEG_INFINITY; probes * v];
            let mut expect = vec![-2i32; probes];
            let mut made = 0;
            for r in 0..probes {
                let g: Vec<f32> = (0..v).map(|id| noise.gumbel(block, step, r, id).unwrap()).collect();
                let a = rng.below(v);
                let nearest = (0..v)
                    .filter(|&id| id != a && g[id].is_finite())
                    .min_by(|&i, &j| (g[i] - g[a]).abs().total_cmp(&(g[j] - g[a]).abs()));
                let Some(b) = nearest.filter(|_| g[a].is_finite()) else { continue };
                let (lo, hi) = (a.min(b), a.max(b));
                let tie = r % 2 == 0;
                let Some((pa, pc)) = probe_pair(g[lo], g[hi], tie) else { continue };
                probe[r * v + lo] = pa;
                probe[r * v + hi] = pc;
                expect[r] = if tie { lo as i32 } else { hi as i32 };
                made += 1;
            }
            assert!(made >= probes / 4, "{}: only {made} of {probes} probe rows could be built", spec.kernel_name());
            // Rows without a probe: one finite entry.
            for r in 0..probes {
                if expect[r] == -2 {
                    probe[r * v + r % v] = 1.0;
                    expect[r] = (r % v) as i32;
                }
            }
            let mut p = sampler_params(seed, block as u32, step as u32, 0.1, 0.005, 1);
            p.temperature = 1.0;
            let got = run_gumbel(e, &spec, &p, &probe, 0.0, probes);
            let mut want = vec![0u32; probes];
            SeededNoise::new(seed, v).sample(block, step, &probe, v, &mut want).unwrap();
            let want: Vec<i32> = want.iter().map(|&x| x as i32).collect();
            assert_eq!(want, expect, "{}: probe construction (test bug)", spec.kernel_name());
            assert_eq!(got, want, "{} seed={seed:#x}: Gumbel probes", spec.kernel_name());
        }

        // Invalid rows (the CPU errors; no cap, which would make infinities finite): NaN, +inf,
        // all -inf give -1; a valid row next to them is unaffected.
        let rows = 4;
        let mut bad: Vec<f32> = (0..rows * v).map(|_| to_bf16(rng.uniform() * 3.0)).collect();
        bad[v / 2] = f32::NAN;
        bad[v + v - 1] = f32::INFINITY;
        bad[2 * v..3 * v].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        let mut p = sampler_params(99, 1, 3, 0.1, 0.005, 1);
        p.temperature = 1.0;
        let got = run_gumbel(e, &spec, &p, &bad, 0.0, rows);
        let noise = SeededNoise::new(99, v);
        assert_eq!(got[..3], [-1, -1, -1], "{}: invalid rows", spec.kernel_name());
        // Row 3 alone, as the CPU sees it: position 3 of block 1, step 3.
        let want = gumbel_brute(&noise, 1, 3, 3, &bad[3 * v..]);
        assert_eq!(got[3], want, "{}: the valid row next to invalid ones", spec.kernel_name());
    }
}

/// What step_core does after the row statistics and the sample, for one canvas: renoise, the
/// acceptance mask (TorchDevice::Cuda), the next canvas and the stopping rule.
struct CanvasWant {
    next: Vec<i32>,
    mask: Vec<i32>,
    accepted: u32,
    mean: f32,
    finished: bool,
}

#[allow(clippy::too_many_arguments)]
fn cpu_canvas(
    seed: u64,
    vocab: usize,
    block: usize,
    step: usize,
    bound: f32,
    entropy: &[f32],
    sampled: &[i32],
    argmax: &[i32],
    stop: &mut StableAndConfident,
) -> CanvasWant {
    let c = entropy.len();
    let mut noise = SeededNoise::new(seed, vocab);
    let mut renoise = vec![0u32; c];
    noise.renoise(block, step, &mut renoise).unwrap();
    let mut mask = vec![false; c];
    let accepted =
        accept_mask_on(TorchDevice::Cuda, entropy, bound, &mut mask, &mut AcceptScratch::default()).unwrap() as u32;
    let next = (0..c).map(|p| if mask[p] { sampled[p] } else { renoise[p] as i32 }).collect();
    if step == 0 {
        stop.reset(); // the engine resets per block; the kernel restarts its history on step 0
    }
    let am: Vec<u32> = argmax.iter().map(|&a| a as u32).collect();
    let (finished, mean) = stop.update(&am, entropy).unwrap();
    CanvasWant { next, mask: mask.iter().map(|&m| m as i32).collect(), accepted, mean, finished }
}

/// Device state of one canvas across steps: the history buffer (kernel-owned) lives here.
struct DeviceCanvas<'a> {
    spec: &'a KernelSpec,
    vocab: usize,
    history: Host,
}

struct CanvasGot {
    next: Vec<i32>,
    mask: Vec<i32>,
    status: SamplerStatus,
}

impl DeviceCanvas<'_> {
    fn step(&mut self, e: &dyn Exec, p: &SamplerParams, entropy: &[f32], sampled: &[i32], argmax: &[i32]) -> CanvasGot {
        let c = entropy.len();
        let (vocab, spec) = (self.vocab, self.spec);
        let mut bufs = [
            params_host(p),
            Host::F32(entropy.to_vec()),
            Host::I32(sampled.to_vec()),
            Host::I32(argmax.to_vec()),
            Host::I32(vec![i32::MIN; c]),
            Host::I32(vec![i32::MIN; c]),
            self.history.clone(),
            poisoned_status(),
        ];
        e.launch(&mut bufs, &|b| {
            ops::plan_sampler_canvas(spec, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], vocab, c).unwrap()
        });
        self.history = bufs[6].clone();
        CanvasGot { next: bufs[4].i32().to_vec(), mask: bufs[5].i32().to_vec(), status: status_of(&bufs[7]) }
    }
}

fn assert_canvas(name: &str, got: &CanvasGot, want: &CanvasWant) {
    assert_eq!(got.status.error, 0, "{name}: error bits");
    assert_eq!(got.mask, want.mask, "{name}: acceptance mask");
    assert_eq!(got.next, want.next, "{name}: next canvas");
    assert_eq!(got.status.accepted, want.accepted, "{name}: accepted count");
    assert_eq!(got.status.mean_entropy.to_bits(), want.mean.to_bits(), "{name}: mean entropy");
    assert_eq!(got.status.finished, want.finished, "{name}: finished");
}

pub fn check_sampler_canvas(e: &dyn Exec) {
    for spec in specs(e, Family::SamplerCanvas) {
        let Op::SamplerCanvas(sc) = spec.op else { unreachable!() };
        let max_c = sc.max_canvas as usize;

        // Single steps at several shapes, entropies broad or tied (quantised, -0.0 and 0.0 mixed),
        // several bounds (one that accepts everything, one that accepts only the first rank).
        for (case, (c, vocab)) in
            [(16usize, 512usize), (8, 320), (max_c, 262_144), (1, 512), (max_c.min(100), 320)].into_iter().enumerate()
        {
            for (kind, bound) in [(0usize, 0.1f32), (1, 1.0), (2, 1e9), (3, 1e-7), (4, 0.35)] {
                let name = format!("{} C={c} V={vocab} kind={kind} bound={bound}", spec.kernel_name());
                let mut rng = Rng::new((case * 10 + kind) as u64);
                let entropy: Vec<f32> = (0..c)
                    .map(|i| match kind {
                        0 | 2 => (rng.uniform() + 1.0) * 3.0,
                        1 | 4 => {
                            let q = rng.below(5) as f32 * 0.0625;
                            if q == 0.0 && i % 2 == 1 {
                                -0.0
                            } else {
                                q
                            }
                        }
                        _ => (rng.uniform() + 1.0) * 1e-3,
                    })
                    .collect();
                let sampled: Vec<i32> = (0..c).map(|_| rng.below(vocab) as i32).collect();
                let argmax: Vec<i32> = (0..c).map(|_| rng.below(vocab) as i32).collect();
                let seed = 0xfeed_0000 + case as u64;
                let (block, step) = (case, kind + 1);
                let p = sampler_params(seed, block as u32, step as u32, bound, 0.5, 1);
                // A fresh canvas state at step > 0: compare against a CPU history holding the same
                // previous canvas (set both up with a step 0 first).
                let mut stop = StableAndConfident::new(1, 0.5).unwrap();
                let mut dev = DeviceCanvas { spec: &spec, vocab, history: Host::I32(vec![i32::MIN; c + 1]) };
                let p0 = SamplerParams { step: 0, ..p };
                let w0 = cpu_canvas(seed, vocab, block, 0, bound, &entropy, &sampled, &argmax, &mut stop);
                let g0 = dev.step(e, &p0, &entropy, &sampled, &argmax);
                assert_canvas(&format!("{name} step 0"), &g0, &w0);
                let want = cpu_canvas(seed, vocab, block, step, bound, &entropy, &sampled, &argmax, &mut stop);
                let got = dev.step(e, &p, &entropy, &sampled, &argmax);
                assert_canvas(&name, &got, &want);
                // Low mean entropy and the same argmax twice: finished with threshold 1.
                assert_eq!(got.status.finished, want.mean < 0.5, "{name}");
            }
        }

        // Ties: every entropy equal; the mask is a prefix of the positions.
        let c = 16;
        let entropy = vec![0.04f32; c];
        let sampled: Vec<i32> = (0..c as i32).map(|i| 100 + i).collect();
        let argmax = sampled.clone();
        let mut stop = StableAndConfident::new(1, 0.005).unwrap();
        let mut dev = DeviceCanvas { spec: &spec, vocab: 512, history: Host::I32(vec![0; c + 1]) };
        let p = sampler_params(5, 0, 0, 0.1, 0.005, 1);
        let want = cpu_canvas(5, 512, 0, 0, 0.1, &entropy, &sampled, &argmax, &mut stop);
        let got = dev.step(e, &p, &entropy, &sampled, &argmax);
        assert_canvas("ties", &got, &want);
        assert_eq!(got.mask[..4], [1, 1, 1, 0], "ties: positions 0..3 accepted (cum - H <= 0.1)");

        check_sampler_canvas_history(e, &spec);
        check_sampler_canvas_errors(e, &spec);
    }
}

/// Multi-step sequences: the stability history across steps and blocks, thresholds 0..=3.
fn check_sampler_canvas_history(e: &dyn Exec, spec: &KernelSpec) {
    let (c, vocab) = (16usize, 512usize);
    let mut rng = Rng::new(77);
    let canvases: Vec<Vec<i32>> = (0..3).map(|_| (0..c).map(|_| rng.below(vocab) as i32).collect()).collect();
    let (a, b, d) = (&canvases[0], &canvases[1], &canvases[2]);
    // Argmax sequence of one block; the last step differs from A in one position only.
    let mut a1 = a.clone();
    a1[c - 1] = (a1[c - 1] + 1) % vocab as i32;
    let seq: Vec<&Vec<i32>> = vec![a, a, b, b, b, a, a, a, a, d, &a1, a, a];
    let low: Vec<f32> = (0..c).map(|i| (i % 3) as f32 * 1e-3).collect();
    let high: Vec<f32> = (0..c).map(|i| 0.5 + (i % 4) as f32 * 0.25).collect();
    for stability in 0..=3u32 {
        for confidence in [0.005f32, f32::NEG_INFINITY, 10.0] {
            let name = format!("{} history K={stability} conf={confidence}", spec.kernel_name());
            let mut stop = StableAndConfident::new(stability as usize, confidence).unwrap();
            // The history buffer starts as garbage that looks like a long run of canvas A: step 0
            // must ignore it.
            let mut poisoned: Vec<i32> = a.clone();
            poisoned.push(1000);
            let mut dev = DeviceCanvas { spec, vocab, history: Host::I32(poisoned) };
            let mut finished_steps = Vec::new();
            for block in 0..2usize {
                for (step, am) in seq.iter().enumerate() {
                    let h = if (step + block) % 5 == 4 { &high } else { &low };
                    let sampled: Vec<i32> = (0..c).map(|_| rng.below(vocab) as i32).collect();
                    let p = sampler_params(11, block as u32, step as u32, 0.1, confidence, stability);
                    let want = cpu_canvas(11, vocab, block, step, 0.1, h, &sampled, am, &mut stop);
                    let got = dev.step(e, &p, h, &sampled, am);
                    assert_canvas(&format!("{name} block {block} step {step}"), &got, &want);
                    if want.finished {
                        finished_steps.push((block, step));
                    }
                }
            }
            // The sequence exercises both outcomes where it can.
            if stability > 0 && confidence == 10.0 {
                assert!(!finished_steps.is_empty(), "{name}: never finished");
                assert!(!finished_steps.contains(&(0, 0)) && !finished_steps.contains(&(1, 0)), "{name}");
            }
        }
    }
}

/// Errors (the CPU returns Err): flagged in the status, never finished, history untouched.
fn check_sampler_canvas_errors(e: &dyn Exec, spec: &KernelSpec) {
    let (c, vocab) = (8usize, 320usize);
    let entropy: Vec<f32> = (0..c).map(|i| i as f32 * 0.01).collect();
    let sampled: Vec<i32> = (0..c as i32).collect();
    let argmax: Vec<i32> = (0..c as i32).collect();
    let ok = sampler_params(3, 1, 2, 0.1, 10.0, 1);
    let mut nan_h = entropy.clone();
    nan_h[5] = f32::NAN;
    let mut bad_sample = sampled.clone();
    bad_sample[2] = -1;
    let mut bad_argmax = argmax.clone();
    bad_argmax[7] = vocab as i32;
    type Case<'a> = (&'a str, SamplerParams, Vec<f32>, Vec<i32>, Vec<i32>, u32);
    let cases: Vec<Case> = vec![
        ("NaN entropy", ok, nan_h, sampled.clone(), argmax.clone(), ops::SAMPLER_ERR_NAN_ENTROPY),
        ("sample -1", ok, entropy.clone(), bad_sample, argmax.clone(), ops::SAMPLER_ERR_SAMPLE),
        ("argmax >= vocab", ok, entropy.clone(), sampled.clone(), bad_argmax, ops::SAMPLER_ERR_ARGMAX),
        ("bound 0", SamplerParams { entropy_bound: 0.0, ..ok }, entropy.clone(), sampled.clone(), argmax.clone(), 8),
        (
            "bound NaN",
            SamplerParams { entropy_bound: f32::NAN, ..ok },
            entropy.clone(),
            sampled.clone(),
            argmax.clone(),
            8,
        ),
        ("step 2^24", SamplerParams { step: 1 << 24, ..ok }, entropy.clone(), sampled.clone(), argmax.clone(), 8),
        (
            "confidence NaN",
            SamplerParams { confidence_threshold: f32::NAN, ..ok },
            entropy.clone(),
            sampled.clone(),
            argmax.clone(),
            ops::SAMPLER_ERR_PARAMS,
        ),
    ];
    for (what, p, h, s, a, bit) in cases {
        let name = format!("{} error: {what}", spec.kernel_name());
        // Previous step: the same argmax, so a successful step would be stable and finished.
        let mut history: Vec<i32> = argmax.clone();
        history.push(5);
        let mut dev = DeviceCanvas { spec, vocab, history: Host::I32(history.clone()) };
        let got = dev.step(e, &p, &h, &s, &a);
        assert_eq!(got.status.error, bit, "{name}: error bits");
        assert!(!got.status.finished, "{name}: finished");
        assert_eq!(got.status.accepted, 0, "{name}: accepted");
        assert_eq!(got.mask, vec![0; c], "{name}: mask");
        assert_eq!(dev.history.i32(), &history[..], "{name}: the history must not change");
        if p.step < (1 << 24) {
            let mut renoise = vec![0u32; c];
            SeededNoise::new(3, vocab).renoise(1, p.step as usize, &mut renoise).unwrap();
            let want: Vec<i32> = renoise.iter().map(|&r| r as i32).collect();
            assert_eq!(got.next, want, "{name}: next canvas = renoise");
        }
    }
    // The same inputs without an error: finished (stable, mean 0.035 < 10).
    let mut history: Vec<i32> = argmax.clone();
    history.push(5);
    let mut dev = DeviceCanvas { spec, vocab, history: Host::I32(history) };
    let got = dev.step(e, &ok, &entropy, &sampled, &argmax);
    assert_eq!(got.status.error, 0);
    assert!(got.status.finished);
    assert_eq!(dev.history.i32()[c], 6, "the run counter grows");
}

/// Whole denoising steps: dgemma-sampler's `denoise_step` (SeededNoise, TorchDevice::Cuda) on raw
/// logits, then the two kernels on its processed logits, entropies and argmax: the sample, the
/// next canvas, the mask, the count, the mean and the stop decision agree bit for bit, step
/// after step (the device history carried across), over two blocks.
pub fn check_sampler_end_to_end(e: &dyn Exec) {
    let canvas_spec = specs(e, Family::SamplerCanvas)[0];
    for gspec in specs(e, Family::GumbelSample) {
        let Op::GumbelSample(g) = gspec.op else { unreachable!() };
        let v = g.vocab as usize;
        let c = if v >= 65_536 { 2 } else { 16 };
        let steps = if v >= 65_536 { 3 } else { 8 };
        if 2 * steps * c * v * 60 > e.max_work() {
            eprintln!("{}: end-to-end skipped (work limit)", gspec.kernel_name());
            continue;
        }
        let settings = SamplerSettings { max_denoising_steps: steps, ..SamplerSettings::default() };
        let seed = 0x5eed_0000 + v as u64;
        let mut noise = SeededNoise::new(seed, v);
        let mut stop = StableAndConfident::new(settings.stability_threshold, settings.confidence_threshold).unwrap();
        let mut dev = DeviceCanvas { spec: &canvas_spec, vocab: v, history: Host::I32(vec![-7; c + 1]) };
        let mut rng = Rng::new(v as u64);
        let mut finished_any = false;
        for block in 0..2usize {
            stop.reset();
            let mut canvas = vec![0u32; c];
            noise.init_canvas(block, &mut canvas).unwrap();
            // Broad logits for most positions; from the middle on, peaked and constant ones so the
            // argmax settles and the mean entropy falls under the threshold.
            // bf16 logits (the LM head's output, no cap here: the kernels' P is raw / T exactly).
            let peaked: Vec<f32> =
                (0..c * v).map(|i| if i % v == (i / v * 37) % v { 40.0 } else { to_bf16(rng.uniform()) }).collect();
            for (step, cur_step) in (1..=steps).rev().enumerate() {
                let raw: Vec<f32> = if step >= steps / 2 {
                    peaked.clone()
                } else {
                    (0..c * v).map(|_| to_bf16(rng.uniform() * 8.0)).collect()
                };
                let mut processed = vec![0.0f32; c * v];
                let out = dgemma_sampler::denoise_step(
                    &settings,
                    &mut stop,
                    &mut noise,
                    block,
                    cur_step,
                    &canvas,
                    &raw,
                    &mut processed,
                )
                .unwrap();
                let name = format!("{} end-to-end V={v} block {block} step {step}", gspec.kernel_name());
                let mut p = sampler_params(
                    seed,
                    block as u32,
                    step as u32,
                    settings.entropy_bound,
                    settings.confidence_threshold,
                    settings.stability_threshold as u32,
                );
                p.temperature = dgemma_sampler::temperature_on(
                    settings.device,
                    cur_step,
                    steps,
                    settings.t_min,
                    settings.t_max,
                )
                .unwrap();
                let sampled = run_gumbel(e, &gspec, &p, &raw, 0.0, c);
                let want_sampled: Vec<i32> = out.sampled.iter().map(|&x| x as i32).collect();
                assert_eq!(sampled, want_sampled, "{name}: sampled");
                let argmax: Vec<i32> = out.argmax_canvas.iter().map(|&x| x as i32).collect();
                let got = dev.step(e, &p, &out.entropies, &sampled, &argmax);
                let want = CanvasWant {
                    next: out.next_canvas.iter().map(|&x| x as i32).collect(),
                    mask: out.accepted_mask.iter().map(|&m| m as i32).collect(),
                    accepted: out.accepted as u32,
                    mean: out.mean_entropy,
                    finished: out.finished,
                };
                assert_canvas(&name, &got, &want);
                canvas = out.next_canvas;
                if out.finished {
                    finished_any = true;
                    break;
                }
            }
        }
        if v < 65_536 {
            assert!(finished_any, "{}: the peaked steps should finish a block", gspec.kernel_name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HBM read-bandwidth probe

/// Runs the probe over the first `vectors` 16-byte vectors of `data` (from its first 16-byte
/// aligned word) with `out` poisoned; returns `out[0]`, the word offset used and the grid.
fn run_read_bandwidth(
    e: &dyn Exec,
    spec: &KernelSpec,
    data: &[i32],
    vectors: usize,
    sentinel: u32,
    max_blocks: usize,
    poison: i32,
) -> (u32, usize, u32) {
    let skip = std::cell::Cell::new(0usize);
    let grid = std::cell::Cell::new(0u32);
    let mut bufs = [Host::I32(data.to_vec()), Host::I32(vec![poison])];
    e.launch(&mut bufs, &|b| {
        // Host vectors are only 4-byte aligned; device buffers are 256-byte aligned (skip 0).
        let words = (16 - (b[0].ptr % 16) as usize) % 16 / 4;
        skip.set(words);
        let plan = ops::plan_read_bandwidth(spec, offset(b[0], words, 4), vectors, sentinel, b[1], max_blocks).unwrap();
        grid.set(plan.grid.0);
        plan
    });
    (bufs[1].i32()[0] as u32, skip.get(), grid.get())
}

/// The XOR of vector `i`'s four words.
fn vector_fold(words: &[i32], i: usize) -> u32 {
    words[4 * i..4 * i + 4].iter().fold(0u32, |a, &w| a ^ w as u32)
}

/// The probe reads exactly the vectors the grid-stride mapping gives each thread (checked through
/// the sentinel: the host recomputes every thread's fold for the plan's grid), none past
/// `vectors`, and writes nothing unless a fold equals the sentinel.
pub fn check_read_bandwidth(e: &dyn Exec) {
    for spec in specs(e, Family::ReadBandwidth) {
        let Op::ReadBandwidth(r) = spec.op else { unreachable!() };
        let (threads, per_block) = (r.threads as usize, (r.threads * r.unroll) as usize);
        let poison = 0x7fc0_0000i32;
        // (vectors, max_blocks): a single vector; whole unrolled iterations only; unrolled
        // iterations then the tail over a capped grid; fewer vectors than threads.
        for (case, (vectors, max_blocks)) in
            [(1usize, 8usize), (2 * per_block, 8), (5 * per_block + 37, 2), (100, 3)].into_iter().enumerate()
        {
            let name = format!("{} vectors={vectors} max_blocks={max_blocks}", spec.kernel_name());
            let mut rng = Rng::new(case as u64 + 11);
            // Four spare words for alignment, then the vectors and one more the kernel must not read.
            let data: Vec<i32> = (0..4 * (vectors + 1) + 4).map(|_| rng.next_u64() as i32).collect();
            let blocks = vectors.div_ceil(per_block).min(max_blocks);
            let stride = blocks * threads;
            let folds_at = |skip: usize| -> Vec<u32> {
                let words = &data[skip..];
                let mut f = vec![0u32; stride];
                for i in 0..vectors {
                    f[i % stride] ^= vector_fold(words, i);
                }
                f
            };
            // A sentinel no thread produces: nothing is written.
            let (out, skip, grid) = run_read_bandwidth(e, &spec, &data, vectors, 0x5EED_0001, max_blocks, poison);
            assert_eq!(grid as usize, blocks, "{name}: grid");
            let folds = folds_at(skip);
            assert!(!folds.contains(&0x5EED_0001), "{name}: test data hits the sentinel (pick another seed)");
            assert_eq!(out, poison as u32, "{name}: wrote without a sentinel hit");
            // Each checked thread's own fold as the sentinel: exactly that value is written.
            let last = (vectors - 1) % stride;
            for t in [0, last / 2, last] {
                let want = folds[t];
                if want == 0 || want == poison as u32 {
                    continue;
                }
                let (out, _, _) = run_read_bandwidth(e, &spec, &data, vectors, want, max_blocks, poison);
                assert_eq!(out, want, "{name}: thread {t} (of {stride}) did not read exactly its vectors");
            }
            // The fold a thread would have if it also read the vector past the end: never written.
            let t = vectors % stride;
            let over = folds[t] ^ vector_fold(&data[skip..], vectors);
            if over != 0 && !folds.contains(&over) {
                let (out, _, _) = run_read_bandwidth(e, &spec, &data, vectors, over, max_blocks, poison);
                assert_eq!(out, poison as u32, "{name}: thread {t} read past `vectors`");
            }
        }
    }
}
