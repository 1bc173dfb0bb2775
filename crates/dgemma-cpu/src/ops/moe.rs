//! Router and experts of the MoE block (model-spec 3.4; transformers' default grouped_mm path).
//!
//! Router, on the pre-norm residual `h`:
//! `r = rmsnorm_noscale(h); r = r * scale * H^-0.5` (each product rounded), `s = r W_router^T`
//! (rounded), `p = softmax(float32(s))`, top-k of `p` (in torch's CPU order, ties included: [`crate::ops::topk`]), renormalised to sum 1, times
//! `per_expert_scale[e]`; the weights stay float32.
//!
//! Experts, on `x = pre_feedforward_layernorm_2(h)`: for each (token, slot) with expert `e`,
//! `g, u = split(x W_gate_up[e]^T)` (gate first), `y = (gelu(g) * u) W_down[e]^T` (bf16 GEMMs:
//! `g`, `u`, `gelu(g)`, the product and `y` are each rounded), then
//! `out[t] = round(sum_k float32(y_k) * w_k)`: the weighting and the sum over the k slots are
//! float32 and the result is rounded once. (Checked bit for bit against transformers' default
//! `grouped_mm` path on CPU; the eager path, which accumulates in bf16, is not modelled.)

use crate::ops::activation::geglu;
use crate::ops::linear::{linear, Matrix};
use crate::ops::norm::rms_norm_row;
use crate::ops::softmax::softmax_row;
use crate::ops::topk::topk_torch_cpu;
use crate::precision::{round, Precision};

/// The router's weights.
pub struct Router<'a> {
    /// `[num_experts, hidden]`.
    pub proj: &'a dyn Matrix,
    /// `[hidden]`.
    pub scale: &'a [f32],
    /// `[num_experts]`.
    pub per_expert_scale: &'a [f32],
}

/// Top-k choice per token: `experts[t * k + j]` with weight `weights[t * k + j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// Per-expert weight matrices.
pub trait ExpertBank: Sync {
    fn num_experts(&self) -> usize;
    /// `[2 * intermediate, hidden]`, gate rows first.
    fn gate_up(&self, e: usize) -> &dyn Matrix;
    /// `[hidden, intermediate]`.
    fn down(&self, e: usize) -> &dyn Matrix;
}

/// Routes `tokens` rows of `h` (`[tokens, hidden]`).
pub fn route(h: &[f32], tokens: usize, router: &Router, top_k: usize, eps: f32, precision: Precision) -> Routing {
    let hidden = router.scale.len();
    let n_exp = router.proj.rows();
    assert_eq!(h.len(), tokens * hidden);
    assert!(top_k >= 1 && top_k <= n_exp);
    let root = (hidden as f64).powf(-0.5) as f32;
    let mut r = h.to_vec();
    for row in r.chunks_mut(hidden) {
        rms_norm_row(row, None, eps, precision);
        for (x, &s) in row.iter_mut().zip(router.scale) {
            *x = round(round(*x * s, precision) * root, precision);
        }
    }
    let mut logits = vec![0.0f32; tokens * n_exp];
    linear(&r, tokens, router.proj, &mut logits, precision);
    let mut experts = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    for p in logits.chunks_mut(n_exp) {
        softmax_row(p);
        // torch.topk's CPU order, ties included (see ops::topk).
        let chosen = topk_torch_cpu(p, top_k);
        let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
        for &e in &chosen {
            experts.push(e);
            weights.push(p[e] / sum * router.per_expert_scale[e]);
        }
    }
    Routing { top_k, experts, weights }
}

/// Runs the routed experts on `x` (`[tokens, hidden]`) and writes the combined output.
pub fn experts_forward(x: &[f32], tokens: usize, routing: &Routing, bank: &dyn ExpertBank, precision: Precision, out: &mut [f32]) {
    let k = routing.top_k;
    let hidden = x.len() / tokens.max(1);
    assert_eq!(out.len(), x.len());
    // float32 accumulator per (token, slot), summed over slots in slot order at the end.
    let mut slots = vec![0.0f32; tokens * k * hidden];
    for e in 0..bank.num_experts() {
        let pairs: Vec<usize> = (0..tokens * k).filter(|&i| routing.experts[i] == e).collect();
        if pairs.is_empty() {
            continue;
        }
        let n = pairs.len();
        let gu = bank.gate_up(e);
        let inter = gu.rows() / 2;
        let mut xin = Vec::with_capacity(n * hidden);
        for &i in &pairs {
            let t = i / k;
            xin.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let mut gate_up = vec![0.0f32; n * 2 * inter];
        linear(&xin, n, gu, &mut gate_up, precision);
        let mut act = vec![0.0f32; n * inter];
        for r in 0..n {
            let row = &gate_up[r * 2 * inter..(r + 1) * 2 * inter];
            geglu(&row[..inter], &row[inter..], &mut act[r * inter..(r + 1) * inter], precision);
        }
        let mut y = vec![0.0f32; n * hidden];
        linear(&act, n, bank.down(e), &mut y, precision);
        for (r, &i) in pairs.iter().enumerate() {
            let w = routing.weights[i];
            for (s, &v) in slots[i * hidden..(i + 1) * hidden].iter_mut().zip(&y[r * hidden..(r + 1) * hidden]) {
                *s = v * w;
            }
        }
    }
    for t in 0..tokens {
        let o = &mut out[t * hidden..(t + 1) * hidden];
        o.fill(0.0);
        for j in 0..k {
            let s = &slots[(t * k + j) * hidden..(t * k + j + 1) * hidden];
            for (a, &b) in o.iter_mut().zip(s) {
                *a += b;
            }
        }
        for a in o.iter_mut() {
            *a = round(*a, precision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_values::pseudo;
    use crate::ops::activation::gelu_tanh;
    use crate::ops::linear::DenseMatrix;

    struct Bank {
        gu: Vec<DenseMatrix>,
        down: Vec<DenseMatrix>,
    }
    impl ExpertBank for Bank {
        fn num_experts(&self) -> usize {
            self.gu.len()
        }
        fn gate_up(&self, e: usize) -> &dyn Matrix {
            &self.gu[e]
        }
        fn down(&self, e: usize) -> &dyn Matrix {
            &self.down[e]
        }
    }

    #[test]
    fn router_picks_top_k_and_renormalises() {
        let hidden = 4;
        // Expert e's router row is e * ones: after the norm the score grows with e for a
        // positive input, so the top-2 are experts 3 and 2.
        let proj = DenseMatrix::new(4, hidden, (0..16).map(|i| (i / 4) as f32).collect());
        let scale = [1.0f32; 4];
        let pes = [1.0f32, 1.0, 0.5, 2.0];
        let router = Router { proj: &proj, scale: &scale, per_expert_scale: &pes };
        let r = route(&[1.0, 2.0, 3.0, 4.0], 1, &router, 2, 1e-6, Precision::F32);
        assert_eq!(r.experts, vec![3, 2]);
        // Raw scores: sum(norm(h)) * 0.5 * e; p3/(p2+p3) = 1/(1+exp(-d)).
        let xs = [1.0f32, 2.0, 3.0, 4.0];
        let inv = (xs.iter().map(|x| x * x).sum::<f32>() / 4.0 + 1e-6).powf(-0.5);
        let d = xs.iter().map(|x| x * inv).sum::<f32>() * 0.5;
        let w3 = 1.0 / (1.0 + (-d).exp());
        assert!((r.weights[0] - w3 * 2.0).abs() < 1e-5);
        assert!((r.weights[1] - (1.0 - w3) * 0.5).abs() < 1e-5);
    }

    #[test]
    fn experts_match_a_direct_loop() {
        let (hidden, inter, n_exp, tokens, k) = (6, 5, 3, 4, 2);
        let bank = Bank {
            gu: (0..n_exp).map(|e| DenseMatrix::new(2 * inter, hidden, pseudo(2 * inter * hidden, 10 + e as u64))).collect(),
            down: (0..n_exp).map(|e| DenseMatrix::new(hidden, inter, pseudo(hidden * inter, 20 + e as u64))).collect(),
        };
        let x = pseudo(tokens * hidden, 3);
        let routing = Routing { top_k: k, experts: vec![0, 2, 1, 0, 2, 1, 0, 1], weights: vec![0.7, 0.3, 0.5, 0.5, 0.9, 0.1, 1.2, 0.25] };
        let mut out = vec![f32::NAN; tokens * hidden];
        experts_forward(&x, tokens, &routing, &bank, Precision::F32, &mut out);
        for t in 0..tokens {
            for o in 0..hidden {
                let mut want = 0.0f64;
                for j in 0..k {
                    let e = routing.experts[t * k + j];
                    let gu = &bank.gu[e].data;
                    let xr = &x[t * hidden..(t + 1) * hidden];
                    let mut y = 0.0f64;
                    for i in 0..inter {
                        let g: f64 = (0..hidden).map(|c| gu[i * hidden + c] as f64 * xr[c] as f64).sum();
                        let u: f64 = (0..hidden).map(|c| gu[(inter + i) * hidden + c] as f64 * xr[c] as f64).sum();
                        y += gelu_tanh(g as f32) as f64 * u * bank.down[e].data[o * inter + i] as f64;
                    }
                    want += y * routing.weights[t * k + j] as f64;
                }
                let got = out[t * hidden + o];
                assert!(got.is_finite() && (got as f64 - want).abs() < 1e-4, "[{t},{o}] {got} vs {want}");
            }
        }
    }
}
