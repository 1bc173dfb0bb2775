//! A CUDA device with dgemma's kernel module loaded.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use dgemma_codegen::{Arch, KernelSpec, Op};

use crate::error::{Context, CudaError, Result};

/// Device memory. The launch wrappers in [`crate::ops`] take any [`DevicePtr`] /
/// [`cudarc::driver::DevicePtrMut`], so views of sub-ranges (`slice`, `slice_mut`) work too.
pub type DeviceBuffer<T> = CudaSlice<T>;

/// A loaded kernel and the dynamic shared memory it is allowed (48 KiB until raised).
struct LoadedFunction {
    f: CudaFunction,
    dynamic_smem: u32,
}

/// One GPU: a context (the device's primary context), a stream of its own, and the kernel
/// module loaded from the fatbin handed to [`Device::open`].
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    arch: Arch,
    name: String,
    compute_capability: (i32, i32),
    /// Loaded functions by kernel name; `None` records a name the module does not have.
    functions: Mutex<HashMap<String, Option<LoadedFunction>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field("arch", &self.arch)
            .finish()
    }
}

/// Runs `f`, turning a panic inside the CUDA bindings (cudarc panics when a driver symbol is
/// missing) into an error.
pub(crate) fn guard<T>(what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::Panic { what, msg })
        }
    }
}

impl Device {
    /// True if the CUDA driver library (libcuda) can be loaded on this machine.
    pub fn driver_present() -> bool {
        // SAFETY: only tries to dlopen libcuda; nothing is called through it.
        unsafe { sys::is_culib_present() }
    }

    /// Number of CUDA devices (0 without a driver).
    pub fn count() -> usize {
        if !Self::driver_present() {
            return 0;
        }
        guard("Device::count", || CudaContext::device_count().ctx("cuDeviceGetCount"))
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }

    /// Opens device `ordinal` and loads `fatbin` (normally `dgemma::kernels::FATBIN`) as its
    /// kernel module. Never panics: no driver, no such device, an empty image, an unsupported
    /// arch or a driver failure are all errors.
    pub fn open(ordinal: usize, fatbin: &'static [u8]) -> Result<Device> {
        if !Self::driver_present() {
            return Err(CudaError::NoDriver);
        }
        if fatbin.is_empty() {
            return Err(CudaError::NoKernels);
        }
        guard("Device::open", || Self::open_inner(ordinal, fatbin))
    }

    fn open_inner(ordinal: usize, fatbin: &'static [u8]) -> Result<Device> {
        let count = CudaContext::device_count().ctx("cuDeviceGetCount")?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).ctx("creating the context")?;
        let name = ctx.name().ctx("cuDeviceGetName")?;
        let (major, minor) = ctx.compute_capability().ctx("reading the compute capability")?;
        let arch = Arch::from_compute_capability(major, minor).ok_or_else(|| CudaError::UnsupportedArch {
            name: name.clone(),
            major,
            minor,
        })?;
        let stream = ctx.new_stream().ctx("creating a stream")?;
        let module = ctx.load_module(Ptx::from_binary(fatbin.to_vec())).ctx("loading the kernel fatbin")?;
        Ok(Device {
            ctx,
            stream,
            module,
            arch,
            name,
            compute_capability: (major, minor),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The arch whose code this device runs (sm_90a for compute capability 9.0, sm_120 for 12.x).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch of this device goes to (in order).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().ctx("synchronizing the stream")
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        self.stream.clone_htod(host).ctx("copying to the device")
    }

    /// A new zero-filled device buffer.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.stream.alloc_zeros(len).ctx("allocating device memory")
    }

    /// Copies a device buffer (or view) back to the host (waits for it).
    pub fn download<T: DeviceRepr + Clone + Default>(&self, buf: &impl DevicePtr<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(buf).ctx("copying to the host")
    }

    /// True if the loaded module has a kernel called `name`.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.function_by_name(name).is_ok()
    }

    fn function_by_name(&self, name: &str) -> Result<CudaFunction> {
        self.loaded(name, 0)
    }

    /// The function `name`, loaded once, allowed at least `dynamic_smem` bytes of dynamic shared
    /// memory: above the default 48 KiB a kernel must opt in
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`), once, whichever call loaded it first
    /// (`has_kernel` / `resolve` load without a limit).
    fn loaded(&self, name: &str, dynamic_smem: u32) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache
            .entry(name.to_string())
            .or_insert_with(|| self.module.load_function(name).ok().map(|f| LoadedFunction { f, dynamic_smem: 48 * 1024 }));
        let loaded = entry.as_mut().ok_or_else(|| CudaError::MissingKernel(name.to_string()))?;
        if dynamic_smem > loaded.dynamic_smem {
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            loaded
                .f
                .set_attribute(attr, dynamic_smem as i32)
                .ctx("raising a kernel's dynamic shared memory limit (cuFuncSetAttribute)")?;
            loaded.dynamic_smem = dynamic_smem;
        }
        Ok(loaded.f.clone())
    }

    /// The spec that runs `op` here: the variant specific to this device's arch if the fatbin
    /// has one, else the portable one.
    pub fn resolve(&self, op: Op) -> Result<KernelSpec> {
        let specific = KernelSpec::for_arch(op, self.arch);
        if self.has_kernel(&specific.kernel_name()) {
            return Ok(specific);
        }
        let portable = KernelSpec::portable(op);
        if self.has_kernel(&portable.kernel_name()) {
            return Ok(portable);
        }
        Err(CudaError::MissingKernel(specific.kernel_name()))
    }

    /// The loaded function of `spec` (checked against this device's arch), allowed the dynamic
    /// shared memory its launches ask for (`KernelSpec::dynamic_shared_bytes`).
    pub fn function(&self, spec: &KernelSpec) -> Result<CudaFunction> {
        if !spec.target.runs_on(self.arch) {
            return Err(crate::error::args(
                "launch",
                format!("{} has no body on {:?} (device {})", spec.kernel_name(), self.arch, self.name),
            ));
        }
        self.loaded(&spec.kernel_name(), spec.dynamic_shared_bytes())
    }
}
