//! Row softmax in float32 and the final-logit softcap.

/// In-place softmax of one row (float32, max-subtracted). The exponentials are summed in 16
/// lanes reduced as a tree, as torch's vectorised CPU softmax does: over a 262,144-token
/// vocabulary a sequential float32 sum would be ~1e-4 off and flip bf16 roundings.
pub fn softmax_row(x: &mut [f32]) {
    const LANES: usize = 16;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0.0f32; LANES];
    let whole = x.len() / LANES * LANES;
    for chunk in x[..whole].chunks_exact_mut(LANES) {
        for (l, v) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *v = (*v - max).exp();
            *l += *v;
        }
    }
    let mut width = LANES / 2;
    while width >= 1 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    let mut sum = lanes[0];
    for v in &mut x[whole..] {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `cap * tanh(x / cap)` in float32, as DiffusionGemmaForBlockDiffusion applies to the logits.
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = (*v / cap).tanh() * cap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let mut x = vec![1.0f32, 2.0, 3.0, -50.0];
        softmax_row(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[3] < 1e-20);
        assert!((x[2] / x[1] - std::f32::consts::E).abs() < 1e-4);
    }

    #[test]
    fn large_rows_sum_to_one_accurately() {
        let mut x: Vec<f32> = (0..262_144).map(|i| ((i * 7919) % 1000) as f32 * 0.001).collect();
        softmax_row(&mut x);
        let total: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((total - 1.0).abs() < 1e-5, "sum {total}");
    }

    #[test]
    fn softcap_bounds_and_is_identity_near_zero() {
        let mut x = vec![0.0f32, 1e-3, 1e4, -1e4];
        softcap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 1e-3).abs() < 1e-9);
        assert!(x[2] <= 30.0 && x[2] > 29.99 && x[3] >= -30.0 && x[3] < -29.99);
    }
}
