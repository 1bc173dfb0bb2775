//! CPU emulation of the kernels (feature `emulator`).
//!
//! `build.rs` compiles every generated kernel against `emu/cuda_emu.hpp`, a fiber-based stand-in
//! for the CUDA runtime, and [`run`] executes a [`LaunchPlan`] on it with host memory: a
//! [`Buf`](crate::ops::Buf)'s address is a host pointer. The emulated arch is sm_90a. This lets
//! the kernel tests run (slowly, single-threaded) on machines without a GPU; it validates
//! indexing, masks, reductions and rounding points, not performance or GPU memory semantics.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Mutex;

use dgemma_codegen::Arch;

use crate::error::{args, Result};
use crate::ops::{Arg, LaunchPlan};

/// The arch the emulator compiles for (its `__CUDA_ARCH__`).
pub const ARCH: Arch = Arch::Sm90a;

extern "C" {
    fn dgemma_emu_launch(
        name: *const c_char,
        gx: u32,
        gy: u32,
        gz: u32,
        block: u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
    ) -> c_int;
}

/// The emulator keeps global state: one launch at a time.
static LOCK: Mutex<()> = Mutex::new(());

/// Runs `plan` on the CPU. Every pointer argument must be a valid host pointer (or 0 where the
/// kernel allows null) covering what the plan checked.
///
/// # Safety
/// The kernel dereferences the plan's pointers: they must point to live host memory of the
/// element type and length given to the plan function.
pub unsafe fn run(plan: &LaunchPlan) -> Result<()> {
    plan.check_signature()?;
    if !plan.spec.target.runs_on(ARCH) {
        return Err(args("emulator", format!("{} has no body on the emulated {ARCH:?}", plan.spec.kernel_name())));
    }
    if plan.grid.0 == 0 || plan.grid.1 == 0 || plan.grid.2 == 0 {
        return Ok(());
    }
    let mut values = plan.args.clone();
    let mut ptrs: Vec<*mut c_void> = values
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(p) => p as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::I64(v) => v as *mut i64 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        })
        .collect();
    let name = CString::new(plan.spec.kernel_name()).expect("kernel names have no NUL");
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let (gx, gy, gz) = plan.grid;
    let rc = dgemma_emu_launch(name.as_ptr(), gx, gy, gz, plan.block, plan.spec.dynamic_shared_bytes(), ptrs.as_mut_ptr());
    match rc {
        0 => Ok(()),
        1 => Err(crate::error::CudaError::MissingKernel(plan.spec.kernel_name())),
        2 => Err(args("emulator", format!("bad block size {}", plan.block))),
        _ => Err(args("emulator", format!("{}: deadlock (a barrier in divergent code)", plan.spec.kernel_name()))),
    }
}
