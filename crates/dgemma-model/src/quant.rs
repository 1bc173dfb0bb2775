//! Quantised expert weights: FP8 E4M3 codes with one float32 scale per output row.
//!
//! The MoE experts are ~46 GB of the 26B model's ~51 GB, and a denoising step is bound by reading
//! them, so they are what [`Quant::Fp8`] stores in 8 bits (issue #6). Two sources:
//!
//! * **Quantise at load** ([`Fp8Experts::quantize`]): a float `[E, N, K]` expert tensor, per
//!   output row (channel) `scale = max|w| / 448`, `q = e4m3(w / scale)` ([`crate::fp8`]).
//! * **Pre-quantised checkpoints** in the compressed-tensors "FP8-dynamic" format (LLM Compressor,
//!   as in `RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic`): the fused experts are split into
//!   per-expert Linears, `<layer>.experts.{e}.{gate,up,down}_proj.weight` `F8_E4M3 [out, in]` and
//!   `<layer>.experts.{e}.{gate,up,down}_proj.weight_scale` `[out, 1]` (float32 or bf16), the
//!   weight being `f32(q) * scale`. Activations are quantised dynamically by that scheme's
//!   kernels; dgemma runs weight-only FP8 (bf16 activations), so it needs no activation scales.
//!   A fused e4m3 tensor `<layer>.experts.gate_up_proj` with `<layer>.experts.gate_up_proj_scale`
//!   `[E, N]` (or `[E, N, 1]`) is read too (one block).
//!
//! Either way an [`Fp8Experts`] is the codes as blocks of whole rows (mapped from the checkpoint,
//! or owned when quantised at load) plus every row's scale as float32. The dequantised weight of
//! row `r` is `f32(q) * scale[r]`, one float32 product per element: the CPU backend reads exactly
//! that (then rounds it to bf16 in bf16 mode, as transformers' bf16 model holding the dequantised
//! weights would), and the GPU kernels dequantise the same way while staging the weights.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fp8;
use crate::tensor::{DType, TensorRef};

/// How the model holds its MoE expert weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Quant {
    /// As the checkpoint stores them: float experts stay float (bf16 on the GPU), pre-quantised
    /// FP8 experts stay FP8.
    #[default]
    None,
    /// FP8 E4M3 experts with per-output-channel float32 scales: float experts are quantised at
    /// load, pre-quantised ones are used as stored.
    Fp8,
}

impl Quant {
    /// `"none"` / `"fp8"`.
    pub fn name(self) -> &'static str {
        match self {
            Quant::None => "none",
            Quant::Fp8 => "fp8",
        }
    }

    /// Parses `"none"` / `"fp8"` (case-insensitive).
    pub fn parse(s: &str) -> Option<Quant> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "bf16" => Some(Quant::None),
            "fp8" | "e4m3" => Some(Quant::Fp8),
            _ => None,
        }
    }
}

/// Rows `row0 .. row0 + codes.shape[0]` of an [`Fp8Experts`]: `codes` is an `F8_E4M3` tensor of
/// whole rows of `K` codes (a view into the checkpoint, or owned bytes).
#[derive(Clone, Debug)]
pub struct Fp8Block {
    pub row0: usize,
    pub codes: TensorRef,
}

impl Fp8Block {
    /// Rows in the block.
    pub fn rows(&self, k: usize) -> usize {
        self.codes.numel() / k
    }
}

/// An expert tensor `[E, N, K]` as e4m3 codes with one float32 scale per output row: row `n` of
/// expert `e` is global row `e * N + n`, its value `f32(q[e, n, c]) * scales[e * N + n]`.
#[derive(Clone, Debug)]
pub struct Fp8Experts {
    /// The checkpoint name of the fused tensor (`...experts.gate_up_proj`), for messages.
    pub name: String,
    /// `[E, N, K]`.
    pub shape: [usize; 3],
    /// `E * N` scales, in row order.
    pub scales: Vec<f32>,
    /// The codes: blocks of whole rows, in row order, covering `0 .. E * N` without gaps.
    pub blocks: Vec<Fp8Block>,
}

impl Fp8Experts {
    /// Checks the blocks (row order, no gaps, whole rows of K e4m3 codes) and the scales.
    pub fn new(name: impl Into<String>, shape: [usize; 3], scales: Vec<f32>, blocks: Vec<Fp8Block>) -> Result<Fp8Experts> {
        let name = name.into();
        let [e, n, k] = shape;
        let rows = e * n;
        let bad = |msg: String| Error::InvalidArgument(format!("FP8 expert tensor {name}: {msg}"));
        if scales.len() != rows {
            return Err(bad(format!("{} scales for {rows} rows", scales.len())));
        }
        if let Some(r) = scales.iter().position(|s| !s.is_finite()) {
            return Err(bad(format!("row {r} has scale {}, which is not finite", scales[r])));
        }
        let mut next = 0;
        for b in &blocks {
            if b.codes.dtype != DType::F8E4M3 {
                return Err(bad(format!("block {} has dtype {}, expected F8_E4M3", b.codes.name, b.codes.dtype)));
            }
            if k == 0 || b.codes.numel() % k != 0 || b.row0 != next {
                return Err(bad(format!(
                    "block {} (rows from {}, {} codes) does not continue at row {next} with whole rows of {k}",
                    b.codes.name,
                    b.row0,
                    b.codes.numel()
                )));
            }
            next += b.rows(k);
        }
        if next != rows {
            return Err(bad(format!("the blocks cover {next} rows of {rows}")));
        }
        Ok(Fp8Experts { name, shape, scales, blocks })
    }

    /// Quantises a float expert tensor `[E, N, K]` per output row (see [`crate::fp8`]), on all
    /// cores. The codes are owned (`E * N * K` bytes).
    pub fn quantize(t: &TensorRef) -> Result<Fp8Experts> {
        let shape: [usize; 3] = t
            .shape
            .as_slice()
            .try_into()
            .map_err(|_| Error::tensor(&t.name, &t.file, format!("has shape {:?}, expected [E, N, K]", t.shape)))?;
        if t.dtype.is_fp8() {
            return Err(Error::tensor(&t.name, &t.file, "is FP8 already; it needs its scales, not quantisation"));
        }
        let [e, n, k] = shape;
        let rows = e * n;
        let mut codes = vec![0u8; rows * k];
        let mut scales = vec![0.0f32; rows];
        let threads = std::thread::available_parallelism().map_or(1, |p| p.get()).clamp(1, 64);
        let per = rows.div_ceil(threads).max(1);
        let bad_rows: Vec<Option<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = codes
                .chunks_mut(per * k.max(1))
                .zip(scales.chunks_mut(per))
                .enumerate()
                .map(|(i, (c, sc))| {
                    s.spawn(move || {
                        let mut row = vec![0.0f32; k];
                        for (j, (q, s)) in c.chunks_mut(k.max(1)).zip(sc.iter_mut()).enumerate() {
                            let r = i * per + j;
                            t.read_f32(r * k, &mut row);
                            match fp8::quantize_row(&row, q) {
                                Some(scale) => *s = scale,
                                None => return Some(r),
                            }
                        }
                        None
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("quantisation thread panicked")).collect()
        });
        if let Some(r) = bad_rows.into_iter().flatten().next() {
            return Err(Error::tensor(
                &t.name,
                &t.file,
                format!("row {r} (expert {}, row {}) holds a NaN or an infinity and can not be quantised", r / n.max(1), r % n.max(1)),
            ));
        }
        let codes = TensorRef::from_bytes(format!("{} (fp8)", t.name), DType::F8E4M3, vec![rows, k], codes)?;
        Fp8Experts::new(t.name.clone(), shape, scales, vec![Fp8Block { row0: 0, codes }])
    }

    /// Global rows (`E * N`).
    pub fn rows(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Codes per row (`K`).
    pub fn cols(&self) -> usize {
        self.shape[2]
    }

    /// Bytes of codes plus float32 scales.
    pub fn bytes(&self) -> usize {
        self.rows() * self.cols() + 4 * self.rows()
    }

    /// The codes of global row `r`.
    pub fn row_codes(&self, r: usize) -> &[u8] {
        let k = self.cols();
        let i = self.blocks.partition_point(|b| b.row0 <= r) - 1;
        let b = &self.blocks[i];
        let off = (r - b.row0) * k;
        &b.codes.bytes()[off..off + k]
    }

    /// Global row `r` dequantised: `f32(q) * scale` per element.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        fp8::dequantize_row(self.row_codes(r), self.scales[r], out);
    }

    /// Every code, in row order (one contiguous `E * N * K` copy; for uploads and tests).
    pub fn codes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.rows() * self.cols());
        for b in &self.blocks {
            v.extend_from_slice(b.codes.bytes());
        }
        v
    }
}

/// A MoE expert tensor (`experts.gate_up_proj [E, 2M, H]` or `experts.down_proj [E, H, M]`).
#[derive(Clone, Debug)]
pub enum ExpertTensor {
    /// The checkpoint's float tensor (F32, F16 or BF16).
    Float(TensorRef),
    /// FP8 codes and per-row scales.
    Fp8(Arc<Fp8Experts>),
}

impl ExpertTensor {
    /// `[E, N, K]`.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            ExpertTensor::Float(t) => [t.shape[0], t.shape[1], t.shape[2]],
            ExpertTensor::Fp8(f) => f.shape,
        }
    }

    /// The checkpoint name (of the fused tensor).
    pub fn name(&self) -> &str {
        match self {
            ExpertTensor::Float(t) => &t.name,
            ExpertTensor::Fp8(f) => &f.name,
        }
    }

    /// Elements (`E * N * K`).
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn as_float(&self) -> Option<&TensorRef> {
        match self {
            ExpertTensor::Float(t) => Some(t),
            ExpertTensor::Fp8(_) => None,
        }
    }

    pub fn as_fp8(&self) -> Option<&Fp8Experts> {
        match self {
            ExpertTensor::Float(_) => None,
            ExpertTensor::Fp8(f) => Some(f),
        }
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self, ExpertTensor::Fp8(_))
    }
}

/// The float32 scales of a scale tensor for `rows` output rows: `[rows, 1]`, `[rows]`, or a
/// shape with `rows` elements (`[E, N]`, `[E, N, 1]`), one per row; `[1]` or `[]` is one scale
/// for every row (per-tensor quantisation).
pub fn read_scales(scale: &TensorRef, rows: usize) -> Result<Vec<f32>> {
    if scale.dtype.is_fp8() {
        return Err(Error::tensor(&scale.name, &scale.file, "is a scale but has dtype F8_E4M3"));
    }
    let v = scale.to_f32_vec();
    let out = match v.len() {
        n if n == rows => v,
        1 => vec![v[0]; rows],
        _ => {
            return Err(Error::tensor(
                &scale.name,
                &scale.file,
                format!("has shape {:?}, expected one scale per output row ({rows}) or one in all", scale.shape),
            ))
        }
    };
    if let Some(r) = out.iter().position(|s| !s.is_finite()) {
        return Err(Error::tensor(&scale.name, &scale.file, format!("has scale {} at row {r}, which is not finite", out[r])));
    }
    Ok(out)
}

/// A float (bf16) copy of an FP8 weight matrix `[rows, cols]`: `bf16(f32(q) * scale[row])`, what
/// a bf16 model holding the dequantised weights computes with (non-expert Linears of a
/// compressed-tensors checkpoint; they are small next to the experts).
pub fn dequantize_to_bf16(codes: &TensorRef, scale: &TensorRef) -> Result<TensorRef> {
    let cols = *codes.shape.last().unwrap_or(&1);
    let rows = codes.numel() / cols.max(1);
    let scales = read_scales(scale, rows)?;
    let q = codes.as_e4m3().ok_or_else(|| Error::tensor(&codes.name, &codes.file, "is not F8_E4M3"))?;
    let mut bytes = Vec::with_capacity(2 * q.len());
    let mut row = vec![0.0f32; cols];
    for (r, s) in scales.iter().enumerate() {
        fp8::dequantize_row(&q[r * cols..(r + 1) * cols], *s, &mut row);
        for &v in &row {
            DType::BF16.push_le_bytes(v, &mut bytes);
        }
    }
    TensorRef::from_bytes(codes.name.clone(), DType::BF16, codes.shape.clone(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantise_at_load_is_per_row() {
        let (e, n, k) = (3, 5, 24);
        let mut vals = pseudo(e * n * k, 1);
        vals[7 * k..8 * k].fill(0.0); // a zero row
        for (r, row) in vals.chunks_mut(k).enumerate() {
            for v in row {
                *v *= (r + 1) as f32; // rows of different magnitudes
            }
        }
        let t = TensorRef::from_f32("experts.gate_up_proj", DType::BF16, vec![e, n, k], &vals).unwrap();
        let q = Fp8Experts::quantize(&t).unwrap();
        assert_eq!(q.shape, [e, n, k]);
        assert_eq!(q.bytes(), e * n * k + 4 * e * n);
        let widened = t.to_f32_vec();
        let mut row = vec![0.0f32; k];
        for r in 0..e * n {
            let w = &widened[r * k..(r + 1) * k];
            let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max == 0.0 { 1.0 } else { max / 448.0 };
            assert_eq!(q.scales[r], scale, "row {r}");
            let want: Vec<u8> = w.iter().map(|&v| fp8::encode(v / scale)).collect();
            assert_eq!(q.row_codes(r), want.as_slice(), "row {r}");
            q.dequantize_row(r, &mut row);
            for (c, (&d, &v)) in row.iter().zip(w).enumerate() {
                assert_eq!(d, fp8::decode(want[c]) * scale);
                assert!((d - v).abs() <= (v.abs() / 16.0).max(scale / 1024.0) * 1.0001, "row {r}: {v} -> {d}");
            }
        }
        assert!(q.row_codes(7).iter().all(|&c| c == 0) && q.scales[7] == 1.0);
        assert_eq!(q.codes().len(), e * n * k);

        let mut bad = vals.clone();
        bad[3 * k + 2] = f32::INFINITY;
        let t = TensorRef::from_f32("x", DType::F32, vec![e, n, k], &bad).unwrap();
        let err = Fp8Experts::quantize(&t).unwrap_err().to_string();
        assert!(err.contains("row 3") && err.contains("expert 0"), "{err}");
    }

    #[test]
    fn blocks_must_tile_the_rows() {
        let block = |row0: usize, rows: usize| Fp8Block {
            row0,
            codes: TensorRef::from_bytes("b", DType::F8E4M3, vec![rows, 8], vec![0x38; rows * 8]).unwrap(),
        };
        let ok = Fp8Experts::new("t", [2, 3, 8], vec![0.5; 6], vec![block(0, 3), block(3, 2), block(5, 1)]).unwrap();
        assert_eq!(ok.row_codes(4), &[0x38; 8]);
        let mut out = [0.0f32; 8];
        ok.dequantize_row(5, &mut out);
        assert_eq!(out, [0.5; 8]);
        assert!(Fp8Experts::new("t", [2, 3, 8], vec![0.5; 6], vec![block(0, 3), block(4, 2)]).is_err());
        assert!(Fp8Experts::new("t", [2, 3, 8], vec![0.5; 6], vec![block(0, 3)]).is_err());
        assert!(Fp8Experts::new("t", [2, 3, 8], vec![0.5; 5], vec![block(0, 6)]).is_err());
        assert!(Fp8Experts::new("t", [2, 3, 8], vec![f32::NAN; 6], vec![block(0, 6)]).is_err());
    }

    #[test]
    fn scales_and_dense_dequantisation() {
        let s = TensorRef::from_f32("w.weight_scale", DType::BF16, vec![2, 1], &[0.5, 2.0]).unwrap();
        assert_eq!(read_scales(&s, 2).unwrap(), vec![0.5, 2.0]);
        assert!(read_scales(&s, 3).is_err());
        let one = TensorRef::from_f32("w.weight_scale", DType::F32, vec![], &[0.25]).unwrap();
        assert_eq!(read_scales(&one, 3).unwrap(), vec![0.25; 3]);
        let codes = TensorRef::from_bytes("w.weight", DType::F8E4M3, vec![2, 2], vec![0x38, 0xb8, 0x40, 0x00]).unwrap();
        let d = dequantize_to_bf16(&codes, &s).unwrap();
        assert_eq!(d.dtype, DType::BF16);
        assert_eq!(d.to_f32_vec(), vec![0.5, -0.5, 4.0, 0.0]);
        assert_eq!(Quant::parse("FP8"), Some(Quant::Fp8));
        assert_eq!(Quant::parse("none"), Some(Quant::None));
        assert_eq!(Quant::parse("int4"), None);
    }
}
