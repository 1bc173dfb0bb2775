//! The CUDA kernels, compiled at build time and embedded in the library.
//!
//! `build.rs` generates one instantiation per kernel spec of `dgemma-codegen` (for every
//! supported model shape) and compiles them with nvcc into one fatbin: sm_90a machine code
//! (H100/H200), sm_120 machine code (RTX 50xx) and compute_120 PTX. The runtime crate
//! (`dgemma-cuda`) takes [`FATBIN`] as a parameter of `Device::open` and loads kernels from it
//! by name.
//!
//! When the build had no nvcc, [`HAVE_KERNELS`] is false, [`FATBIN`] is empty and
//! [`NOT_BUILT_REASON`] says why (the build prints the same as a `cargo:warning`).

/// Forces 16-byte alignment on the embedded image (the driver reads it in place).
#[repr(C)]
struct Aligned<Bytes: ?Sized> {
    _align: [u128; 0],
    bytes: Bytes,
}

include!(concat!(env!("OUT_DIR"), "/kernel_index.rs"));

/// The fatbin (empty when [`HAVE_KERNELS`] is false).
pub static FATBIN: &[u8] = &FATBIN_ALIGNED.bytes;

/// The code target of kernel `name`: `"all"` (portable), `"sm_90a"` or `"sm_120"` (a real body
/// only on that arch). `None` if the fatbin has no such kernel.
pub fn kernel_target(name: &str) -> Option<&'static str> {
    KERNEL_NAMES.iter().position(|&n| n == name).map(|i| KERNEL_TARGETS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_consistent() {
        assert_eq!(KERNEL_NAMES.len(), KERNEL_TARGETS.len());
        assert_eq!(HAVE_KERNELS, !FATBIN.is_empty());
        assert_eq!(HAVE_KERNELS, !KERNEL_NAMES.is_empty());
        assert_eq!(HAVE_KERNELS, NOT_BUILT_REASON.is_empty());
        assert_eq!(FATBIN.as_ptr() as usize % 16, 0);
        if HAVE_KERNELS {
            assert_eq!(ARCHS, &["sm_90a", "sm_120", "compute_120"]);
            // A fatbin starts with the fatbin magic 0xBA55ED50 (little endian).
            assert_eq!(&FATBIN[..4], &[0x50, 0xed, 0x55, 0xba]);
            assert_eq!(kernel_target("rmsnorm_w2816_scale_resadd_bf16"), Some("all"));
            assert_eq!(kernel_target("linear_n262144_k2816_t64x128x32_w32x32_bf16"), Some("all"));
        } else {
            assert!(ARCHS.is_empty());
        }
    }
}
