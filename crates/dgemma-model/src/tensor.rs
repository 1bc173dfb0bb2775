//! Zero-copy views of tensors inside memory-mapped safetensors files.
//!
//! A [`TensorRef`] holds an `Arc` of the file's memory map plus a byte range; cloning or slicing
//! it copies no tensor data. Reads widen bfloat16 / float16 / float32 / FP8 E4M3 to float32
//! exactly (an e4m3 tensor reads as its raw codes' values: its per-row scales live in another
//! tensor, see [`crate::weights::Fp8Experts`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// Floating-point element type of a tensor (the safetensors dtypes the model uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// FP8 E4M3FN (`F8_E4M3`, [`crate::fp8`]): the quantised expert weights.
    F8E4M3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// The safetensors name (`"F32"`, `"F16"`, `"BF16"`, `"F8_E4M3"`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    /// Parses a safetensors dtype name; `None` for every type but F32, F16, BF16 and F8_E4M3.
    pub fn from_safetensors(name: &str) -> Option<DType> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F8_E4M3" => Some(DType::F8E4M3),
            _ => None,
        }
    }

    /// Rounds an f32 to this dtype and widens it back (round to nearest even; e4m3 saturates at
    /// ±448).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F8E4M3 => crate::fp8::round(x),
        }
    }

    /// True for the 8-bit quantised formats (whose values need a scale to mean a weight).
    pub fn is_fp8(self) -> bool {
        self == DType::F8E4M3
    }

    /// Appends `x` rounded to this dtype as little-endian bytes.
    pub fn push_le_bytes(self, x: f32, out: &mut Vec<u8>) {
        match self {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            DType::F8E4M3 => out.push(crate::fp8::encode(x)),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Backing bytes of tensors: a read-only memory map, or owned bytes (tests, small tensors).
pub enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Mmap(m) => write!(f, "Mmap({} bytes)", m.len()),
            Storage::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// A tensor: name, dtype, shape, source file and a byte range of a shared mapping.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The safetensors file the bytes come from.
    pub file: PathBuf,
    storage: Arc<Storage>,
    /// Absolute byte offset of element 0 in `storage`.
    offset: usize,
    /// Byte length (`numel * dtype.size()`).
    len: usize,
}

impl fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorRef")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("file", &self.file)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl TensorRef {
    /// A view of `storage[offset .. offset + numel*size]`; checks the range lies inside.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        file: impl Into<PathBuf>,
        storage: Arc<Storage>,
        offset: usize,
    ) -> Result<TensorRef> {
        let name = name.into();
        let file = file.into();
        let len = checked_numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| {
                Error::tensor(
                    &name,
                    &file,
                    format!("has a shape too large to address ({shape:?})"),
                )
            })?;
        match offset.checked_add(len) {
            Some(end) if end <= storage.len() => {}
            _ => {
                return Err(Error::tensor(
                    &name,
                    &file,
                    format!(
                        "has bytes {offset}..{} outside the file ({} bytes)",
                        offset as u128 + len as u128,
                        storage.len()
                    ),
                ))
            }
        }
        Ok(TensorRef {
            name,
            dtype,
            shape,
            file,
            storage,
            offset,
            len,
        })
    }

    /// An in-memory tensor holding `values` rounded to `dtype` (for tests and small buffers).
    pub fn from_f32(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        values: &[f32],
    ) -> Result<TensorRef> {
        let name = name.into();
        let numel = checked_numel(&shape).unwrap_or(usize::MAX);
        if numel != values.len() {
            return Err(Error::InvalidArgument(format!(
                "tensor {name}: shape {shape:?} has {numel} elements but {} values were given",
                values.len()
            )));
        }
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        for &v in values {
            dtype.push_le_bytes(v, &mut bytes);
        }
        TensorRef::new(
            name,
            dtype,
            shape,
            PathBuf::from("<memory>"),
            Arc::new(Storage::Owned(bytes)),
            0,
        )
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.len / self.dtype.size()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage.as_slice()[self.offset..self.offset + self.len]
    }

    /// Byte offset of element 0 within the backing file (or buffer).
    pub fn byte_offset(&self) -> usize {
        self.offset
    }

    /// Byte length.
    pub fn byte_len(&self) -> usize {
        self.len
    }

    /// The shared backing storage (the whole file mapping).
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Path for error messages.
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tensor(&self.name, &self.file, msg)
    }

    /// Widens elements `start_elem .. start_elem + out.len()` (flat index) to f32 into `out`.
    ///
    /// Panics, like slice indexing, if the range exceeds the tensor; use
    /// [`TensorRef::try_read_f32`] for a `Result`.
    pub fn read_f32(&self, start_elem: usize, out: &mut [f32]) {
        if let Err(e) = self.try_read_f32(start_elem, out) {
            panic!("{e}");
        }
    }

    /// [`TensorRef::read_f32`] returning an error (naming the tensor) when out of range.
    pub fn try_read_f32(&self, start_elem: usize, out: &mut [f32]) -> Result<()> {
        let numel = self.numel();
        let end = start_elem.checked_add(out.len()).filter(|&e| e <= numel).ok_or_else(|| {
            self.err(format!(
                "cannot be read at elements {start_elem}..{}: out of range (the tensor has {numel})",
                start_elem as u128 + out.len() as u128
            ))
        })?;
        let size = self.dtype.size();
        let src = &self.bytes()[start_elem * size..end * size];
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            DType::F8E4M3 => {
                for (o, &c) in out.iter_mut().zip(src) {
                    *o = crate::fp8::decode(c);
                }
            }
        }
        Ok(())
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0f32; self.numel()];
        self.read_f32(0, &mut v);
        v
    }

    /// The single value of a one-element tensor (shape `[1]` or `[]`).
    pub fn scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(self.err(format!(
                "has shape {:?}, expected a single value",
                self.shape
            )));
        }
        let mut v = [0.0f32];
        self.try_read_f32(0, &mut v)?;
        Ok(v[0])
    }

    /// Elements per index of dim 0 (`numel / shape[0]`).
    pub fn row_numel(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Rows `start..end` along dim 0, keeping the rank (`[end-start, ...]`).
    pub fn slice0(&self, start: usize, end: usize) -> Result<TensorRef> {
        let rows = *self
            .shape
            .first()
            .ok_or_else(|| self.err("cannot be sliced: it is 0-d"))?;
        if start > end || end > rows {
            return Err(self.err(format!(
                "cannot be sliced at {start}..{end} along dim 0: out of range (dim 0 is {rows})"
            )));
        }
        let row_bytes = self.row_numel() * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Ok(TensorRef {
            name: format!("{}[{start}..{end}]", self.name),
            dtype: self.dtype,
            shape,
            file: self.file.clone(),
            storage: self.storage.clone(),
            offset: self.offset + start * row_bytes,
            len: (end - start) * row_bytes,
        })
    }

    /// Index `i` of dim 0, dropping that dim (expert `e` of `[E, N, K]` is `[N, K]`).
    pub fn index0(&self, i: usize) -> Result<TensorRef> {
        let mut t = self.slice0(i, i + 1).map_err(|_| {
            self.err(format!(
                "cannot be indexed at {i} along dim 0: out of range (shape {:?})",
                self.shape
            ))
        })?;
        t.shape.remove(0);
        t.name = format!("{}[{i}]", self.name);
        Ok(t)
    }

    /// Row `i` of a matrix (same as [`TensorRef::index0`]).
    pub fn row(&self, i: usize) -> Result<TensorRef> {
        self.index0(i)
    }

    /// Widens row `i` (dim 0) into `out` (`out.len()` must be `row_numel()`).
    pub fn read_row_f32(&self, i: usize, out: &mut [f32]) -> Result<()> {
        let n = self.row_numel();
        if out.len() != n {
            return Err(self.err(format!(
                "cannot read a row into a buffer of {} elements (rows have {n})",
                out.len()
            )));
        }
        let rows = self.shape.first().copied().unwrap_or(0);
        if i >= rows {
            return Err(self.err(format!("has no row {i}: out of range (dim 0 is {rows})")));
        }
        self.try_read_f32(i * n, out)
    }

    fn typed<T>(&self, dtype: DType) -> Option<&[T]> {
        if self.dtype != dtype || cfg!(target_endian = "big") {
            return None;
        }
        let bytes = self.bytes();
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        // SAFETY: the range is in bounds (checked at construction), aligned for T (checked
        // above), T is a plain 2- or 4-byte float type valid for every bit pattern, the data is
        // little-endian like the host, and the storage is immutable and outlives `&self`.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, self.numel()) })
    }

    /// The elements as `&[bf16]` without copying; `None` unless dtype is BF16 and the data is
    /// 2-byte aligned.
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        self.typed(DType::BF16)
    }

    /// The elements as `&[f16]`; `None` unless dtype is F16 and aligned.
    pub fn as_f16(&self) -> Option<&[f16]> {
        self.typed(DType::F16)
    }

    /// The elements as `&[f32]`; `None` unless dtype is F32 and 4-byte aligned.
    pub fn as_f32(&self) -> Option<&[f32]> {
        self.typed(DType::F32)
    }

    /// The same bytes seen with another shape of the same element count (panics otherwise).
    pub fn reshaped(mut self, shape: Vec<usize>) -> TensorRef {
        assert_eq!(checked_numel(&shape), Some(self.numel()), "reshape of {} to {shape:?}", self.name);
        self.shape = shape;
        self
    }

    /// The e4m3 codes (one byte per element); `None` unless dtype is F8E4M3.
    pub fn as_e4m3(&self) -> Option<&[u8]> {
        (self.dtype == DType::F8E4M3).then(|| self.bytes())
    }

    /// An in-memory tensor holding `bytes` as they are (little-endian elements of `dtype`).
    pub fn from_bytes(name: impl Into<String>, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<TensorRef> {
        TensorRef::new(name, dtype, shape, PathBuf::from("<memory>"), Arc::new(Storage::Owned(bytes)), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact() {
        let vals = [0.0f32, -1.5, 3.140625, 1e-3, -65504.0, 1.0e-8];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let rounded: Vec<f32> = vals.iter().map(|&v| dtype.round(v)).collect();
            let t = TensorRef::from_f32("t", dtype, vec![2, 3], &vals).unwrap();
            assert_eq!(t.numel(), 6);
            assert_eq!(t.bytes().len(), 6 * dtype.size());
            let got = t.to_f32_vec();
            assert!(
                got.iter()
                    .zip(&rounded)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype}: {got:?}"
            );
            assert_eq!(t.row(1).unwrap().to_f32_vec(), rounded[3..]);
            let mut row = [0.0f32; 3];
            t.read_row_f32(0, &mut row).unwrap();
            assert_eq!(row, rounded[..3]);
            assert!(t.read_row_f32(2, &mut row).is_err());
        }
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0, "ties to even");
        let e4m3 = TensorRef::from_f32("q", DType::F8E4M3, vec![2, 2], &[1.0, -0.3, 500.0, 0.0]).unwrap();
        assert_eq!(e4m3.bytes(), &[0x38, 0xaa, 0x7e, 0x00]);
        assert_eq!(e4m3.to_f32_vec(), vec![1.0, -0.3125, 448.0, 0.0]);
        assert_eq!(e4m3.as_e4m3().unwrap().len(), 4);
        assert_eq!(e4m3.row(1).unwrap().to_f32_vec(), vec![448.0, 0.0]);
        assert_eq!(DType::from_safetensors("F8_E4M3"), Some(DType::F8E4M3));
        assert_eq!(DType::F8E4M3.size(), 1);
        assert!(TensorRef::from_f32("t", DType::F32, vec![4], &[1.0]).is_err());
    }

    #[test]
    fn typed_views_need_matching_dtype_and_alignment() {
        let mut bytes = vec![0u8; 2];
        for v in [1.0f32, 2.0, 3.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let storage = Arc::new(Storage::Owned(bytes));
        let t = TensorRef::new("x", DType::F32, vec![3], "mem", storage.clone(), 2).unwrap();
        assert_eq!(t.to_f32_vec(), vec![1.0, 2.0, 3.0]);
        if !(t.bytes().as_ptr() as usize).is_multiple_of(4) {
            assert!(t.as_f32().is_none(), "misaligned data has no typed view");
        }
        assert!(t.as_bf16().is_none(), "wrong dtype has no typed view");
        let e = TensorRef::new("x", DType::F32, vec![4], "mem", storage, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor x in mem") && e.contains("outside the file"),
            "{e}"
        );
        let aligned = TensorRef::from_f32("y", DType::BF16, vec![2], &[1.0, -2.0]).unwrap();
        let v = aligned.as_bf16().unwrap();
        assert_eq!((v[0].to_f32(), v[1].to_f32()), (1.0, -2.0));
    }
}
