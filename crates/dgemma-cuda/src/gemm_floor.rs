//! The tensor-core rate the GPU's own library reaches: cuBLASLt's GEMM `D = A^T B` at
//! `n x n x n`, bf16 or e4m3 inputs, fp32 accumulation, bf16 output, timed with CUDA events over
//! back-to-back runs after a warm-up. It is the compute floor of the benchmark figures (issue
//! #5: `floor.bf16_gemm_tflops`, `floor.fp8_gemm_tflops` at 8192^3), measured on the same device
//! in the same run as the figures it bounds.
//!
//! The "TN" layout (A transposed, B not) is the one cuBLASLt's FP8 GEMMs require on Hopper; bf16
//! uses it too so the two figures differ only in the input type. The inputs are filled with a
//! constant non-zero byte (0x3c: bf16 pairs of about 0.0115, e4m3 1.5), not zeros, so the tensor
//! cores switch as they do on real data. libcublasLt is loaded at run time: a host without it
//! gets an error naming the library (a caught panic of the bindings), not a crash.

use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{result as cu, sys as dsys, DevicePtr};

use crate::device::{guard, Device};
use crate::error::{args, Context, CudaError, Result};

/// The input type of a floor GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmInput {
    Bf16,
    /// OCP FP8 E4M3 (per-tensor scale 1).
    Fp8E4m3,
}

impl GemmInput {
    fn bytes(self) -> usize {
        match self {
            GemmInput::Bf16 => 2,
            GemmInput::Fp8E4m3 => 1,
        }
    }

    fn cuda_type(self) -> sys::cudaDataType {
        match self {
            GemmInput::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            GemmInput::Fp8E4m3 => sys::cudaDataType_t::CUDA_R_8F_E4M3,
        }
    }
}

/// Workspace cuBLASLt may use (its heuristics pick faster kernels with one).
const WORKSPACE_BYTES: usize = 32 << 20;

/// TFLOP/s (2 n^3 per GEMM) of cuBLASLt's fastest heuristic algorithm for `input` at `n^3`,
/// the mean over `iters` back-to-back runs after one warm-up. `n` must be a multiple of 16.
pub fn cublaslt_gemm_tflops(dev: &Device, n: usize, input: GemmInput, iters: usize) -> Result<f64> {
    if n == 0 || !n.is_multiple_of(16) {
        return Err(args("cublaslt_gemm", format!("n = {n} must be a positive multiple of 16")));
    }
    guard("cuBLASLt", || {
        dev.context().bind_to_thread().ctx("binding the device's context to this thread")?;
        let stream = dev.stream();
        let a = dev.alloc_zeros::<u8>(n * n * input.bytes())?;
        let b = dev.alloc_zeros::<u8>(n * n * input.bytes())?;
        let d = dev.alloc_zeros::<u8>(n * n * 2)?;
        let w = dev.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        let cs = stream.cu_stream();
        let (pa, _ra) = a.device_ptr(stream);
        let (pb, _rb) = b.device_ptr(stream);
        let (pd, _rd) = d.device_ptr(stream);
        let (pw, _rw) = w.device_ptr(stream);
        // SAFETY: the pointers cover the sizes just allocated; the stream is the device's.
        unsafe {
            cu::memset_d8_async(pa, 0x3c, n * n * input.bytes(), cs).ctx("cuMemsetD8Async")?;
            cu::memset_d8_async(pb, 0x3c, n * n * input.bytes(), cs).ctx("cuMemsetD8Async")?;
        }
        let gemm = LtGemm::new(n as u64, input)?;
        let run = || -> Result<()> {
            // SAFETY: A, B, D and the workspace are live device buffers of the sizes the layouts
            // describe; C aliases D with beta = 0.
            unsafe { gemm.run(pa, pb, pd, pw, cs as sys::cudaStream_t) }
        };
        run()?;
        let timing = Some(dsys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timing).ctx("cuEventRecord")?;
        let iters = iters.max(1);
        for _ in 0..iters {
            run()?;
        }
        let end = stream.record_event(timing).ctx("cuEventRecord")?;
        let ms = start.elapsed_ms(&end).ctx("cuEventElapsedTime")? as f64 / iters as f64;
        let flops = 2.0 * (n as f64).powi(3);
        Ok(flops / (ms * 1e-3) / 1e12)
    })
}

fn lt_err(what: &'static str) -> impl Fn(cudarc::cublaslt::result::CublasError) -> CudaError {
    move |e| args("cublaslt_gemm", format!("{what}: {e:?}"))
}

/// One cuBLASLt GEMM `D[n, n] = A^T B` (column-major, A stored k x m) with its descriptors and
/// chosen algorithm; destroyed on drop.
struct LtGemm {
    handle: sys::cublasLtHandle_t,
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl LtGemm {
    fn new(n: u64, input: GemmInput) -> Result<LtGemm> {
        let handle = lt::create_handle().map_err(lt_err("cublasLtCreate"))?;
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        let transpose: i32 = 1; // cublasOperation_t CUBLAS_OP_T (cublas_api.h), a 32-bit enum
        // SAFETY: `desc` is live; the attribute is a 32-bit cublasOperation_t.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &transpose as *const _ as *const c_void,
                std::mem::size_of_val(&transpose),
            )
            .map_err(lt_err("CUBLASLT_MATMUL_DESC_TRANSA"))?;
        }
        let layout = |t, what| lt::create_matrix_layout(t, n, n, n as i64).map_err(lt_err(what));
        let a = layout(input.cuda_type(), "A layout")?;
        let b = layout(input.cuda_type(), "B layout")?;
        let d = layout(sys::cudaDataType_t::CUDA_R_16BF, "D layout")?;
        let pref = lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: every descriptor is live; the workspace attribute is a u64.
        let algo = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .map_err(lt_err("CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"))?;
            let h = lt::get_matmul_algo_heuristic(handle, desc, a, b, d, d, pref)
                .map_err(lt_err("no cuBLASLt algorithm for this GEMM"));
            lt::destroy_matmul_pref(pref).map_err(lt_err("cublasLtMatmulPreferenceDestroy"))?;
            h?.algo
        };
        Ok(LtGemm { handle, desc, a, b, d, algo })
    }

    /// Queues D = A^T B.
    ///
    /// # Safety
    /// `a`, `b` hold n x n inputs, `d` n x n bf16, `w` WORKSPACE_BYTES, all live on `stream`'s
    /// device.
    unsafe fn run(&self, a: u64, b: u64, d: u64, w: u64, stream: sys::cudaStream_t) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        lt::matmul(
            self.handle,
            self.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            self.a,
            b as *const c_void,
            self.b,
            d as *const c_void,
            self.d,
            d as *mut c_void,
            self.d,
            &self.algo,
            w as *mut c_void,
            WORKSPACE_BYTES,
            stream,
        )
        .map_err(lt_err("cublasLtMatmul"))
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created once and is destroyed once, here. Errors while
        // tearing down are ignored (nothing to recover).
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
