//! Executors: where a forward pass's memory lives and its steps run.
//!
//! A forward pass is planned once, as data: a list of [`Step`]s (kernel [`LaunchPlan`]s and
//! device-to-device copies) over fixed addresses in [`Region`]s the backend allocated up front.
//! An [`Executor`] owns that memory and runs step lists. Two implement it:
//!
//! * [`GpuExecutor`]: a [`Device`]; steps go to its stream with no allocation and no host sync,
//!   and a step list can be captured once as a CUDA graph and replayed ([`Executor::record`],
//!   [`Executor::replay`]);
//! * `EmuExecutor` (feature `emulator`): host memory and the CPU kernel emulator, so the very
//!   same plans run, and are checked against the CPU backend, on machines without a GPU.
//!
//! Because a plan refers to buffers, never to their contents, a replayed graph reads whatever
//! the buffers hold at replay time (the canvas, the self-conditioning input, positions).

use cudarc::driver::{result as cu, sys, CudaGraph, CudaSlice};
use dgemma_codegen::{Arch, KernelSpec, Op};

use crate::device::{guard, Device};
use crate::error::{args, Context, CudaError, Result};
use crate::ops::{self, Buf, LaunchPlan};

/// A byte range of executor memory (a device address on a GPU, a host address on the emulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub ptr: u64,
    pub bytes: usize,
}

impl Region {
    /// The region seen as `elem_size`-byte elements (what plan functions check lengths in).
    pub fn buf(self, elem_size: usize) -> Buf {
        Buf { ptr: self.ptr, len: self.bytes / elem_size }
    }
    /// As bf16 (or any 2-byte) elements.
    pub fn b16(self) -> Buf {
        self.buf(2)
    }
    /// As f32 / i32 elements.
    pub fn b32(self) -> Buf {
        self.buf(4)
    }
    /// `bytes` bytes starting `offset` bytes in.
    pub fn sub(self, offset: usize, bytes: usize) -> Result<Region> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.bytes) {
            return Err(args("region", format!("[{offset}, +{bytes}) is outside a region of {} bytes", self.bytes)));
        }
        Ok(Region { ptr: self.ptr + offset as u64, bytes })
    }
}

/// One step of a planned pass.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Launch(LaunchPlan),
    /// `dst = src` (same size, non-overlapping).
    Copy { src: Region, dst: Region },
    /// `dst = 0` (every byte).
    Zero { dst: Region },
}

impl Step {
    /// A short label (kernel name or `copy`), for errors and profiles.
    pub fn label(&self) -> String {
        match self {
            Step::Launch(p) => p.spec.kernel_name(),
            Step::Copy { src, .. } => format!("copy {} bytes", src.bytes),
            Step::Zero { dst } => format!("zero {} bytes", dst.bytes),
        }
    }
}

/// Plain data that may be copied to and from executor memory byte for byte.
pub trait Pod: bytemuck::Pod {}
impl<T: bytemuck::Pod> Pod for T {}

/// Memory and execution of planned passes.
pub trait Executor {
    /// What runs the steps ("NVIDIA H100 80GB HBM3 (sm_90a)", "CPU emulator").
    fn describe(&self) -> String;
    /// The arch whose arch-specific kernels run here.
    fn arch(&self) -> Arch;
    /// True if the kernel image has `spec`'s kernel.
    fn has_kernel(&self, spec: &KernelSpec) -> bool;
    /// A new zero-filled region; `what` names it in the out-of-memory error.
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<Region>;
    /// Copies host bytes into a region (which must be at least as large).
    fn upload_bytes(&mut self, dst: Region, src: &[u8]) -> Result<()>;
    /// Copies a region back to the host; waits for all queued work first.
    fn download_bytes(&mut self, src: Region, dst: &mut [u8]) -> Result<()>;
    /// Queues `steps` in order.
    ///
    /// # Safety
    /// Every address in the steps must lie in live regions of this executor, holding what the
    /// plan functions were told (the backend's planner guarantees it).
    unsafe fn run(&mut self, steps: &[Step]) -> Result<()>;
    /// Records `steps` once (a CUDA graph on a GPU) and returns a handle for [`Executor::replay`].
    ///
    /// # Safety
    /// As [`Executor::run`], for every later replay too: the regions must outlive the recording.
    unsafe fn record(&mut self, steps: &[Step]) -> Result<usize>;
    /// Queues a recorded step list again.
    fn replay(&mut self, graph: usize) -> Result<()>;
    /// Drops one recording (its handle may be reused by a later [`Executor::record`]).
    fn forget(&mut self, graph: usize);
    /// Drops every recording.
    fn forget_recordings(&mut self);
    /// Recordings alive (not forgotten).
    fn recordings(&self) -> usize;
    /// Waits for queued work.
    fn synchronize(&mut self) -> Result<()>;
    /// Starts timing the work queued from now on (a CUDA event on a GPU).
    fn timer_start(&mut self) -> Result<()>;
    /// Milliseconds the work queued since [`Executor::timer_start`] took to execute (waits for
    /// it): CUDA events on a GPU, wall-clock time on the emulator.
    fn timer_stop(&mut self) -> Result<f64>;
    /// Bytes allocated through this executor.
    fn allocated_bytes(&self) -> usize;
    /// Caps [`allocated_bytes`](Executor::allocated_bytes): an allocation past `limit` fails with
    /// [`CudaError::OutOfMemory`] as if the device were full (a server sharing a GPU, or tests of
    /// running out of memory). `None` removes the cap.
    fn set_memory_limit(&mut self, limit: Option<usize>);
    /// Bytes a further allocation may take: the device's free memory, capped by the memory
    /// limit; `None` when neither bounds it (the emulator without a limit).
    fn available_bytes(&self) -> Option<usize>;
    /// A mark of the allocations made so far, for [`release_since`](Executor::release_since).
    fn allocation_mark(&self) -> usize;
    /// Frees every allocation made after `mark` (see [`Executor::allocation_mark`]) in one go:
    /// how a multi-buffer allocation that fails half way (out of memory) gives back what it got,
    /// so that retrying it later does not leak.
    ///
    /// # Safety
    /// No region allocated after `mark` may be used again (by a later step, copy or recording).
    unsafe fn release_since(&mut self, mark: usize);

    /// The spec that runs `op` here: this arch's variant if the image has it, else the portable one.
    fn resolve(&self, op: Op) -> Result<KernelSpec> {
        let specific = KernelSpec::for_arch(op, self.arch());
        if self.has_kernel(&specific) {
            return Ok(specific);
        }
        let portable = KernelSpec::portable(op);
        if self.has_kernel(&portable) {
            return Ok(portable);
        }
        Err(CudaError::MissingKernel(specific.kernel_name()))
    }

    /// Copies typed host data into a region.
    fn upload<T: Pod>(&mut self, dst: Region, src: &[T]) -> Result<()>
    where
        Self: Sized,
    {
        self.upload_bytes(dst, bytemuck::cast_slice(src))
    }

    /// A new region holding `src`.
    fn alloc_from<T: Pod>(&mut self, src: &[T], what: &str) -> Result<Region>
    where
        Self: Sized,
    {
        let r = self.alloc(std::mem::size_of_val(src), what)?;
        self.upload(r, src)?;
        Ok(r)
    }

    /// Reads a region as `T`s.
    fn download<T: Pod>(&mut self, src: Region) -> Result<Vec<T>>
    where
        Self: Sized,
    {
        let mut out = vec![T::zeroed(); src.bytes / std::mem::size_of::<T>()];
        self.download_bytes(src, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Recordings by handle; a forgotten handle's slot is reused.
struct Recordings<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Recordings<T> {
    fn default() -> Self {
        Recordings { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Recordings<T> {
    fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(item);
                i
            }
            None => {
                self.slots.push(Some(item));
                self.slots.len() - 1
            }
        }
    }

    fn get(&self, handle: usize) -> Result<&T> {
        self.slots.get(handle).and_then(Option::as_ref).ok_or_else(|| args("replay", format!("no recording {handle}")))
    }

    fn remove(&mut self, handle: usize) {
        if let Some(slot) = self.slots.get_mut(handle) {
            if slot.take().is_some() {
                self.free.push(handle);
            }
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
    }

    /// Live recordings.
    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

fn check_host_len(op: &'static str, region: Region, host: usize) -> Result<()> {
    if host > region.bytes {
        return Err(args(op, format!("{host} bytes do not fit a region of {}", region.bytes)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GPU

/// A [`Device`] as an executor. Memory is freed when the executor is dropped.
///
/// `Send`: it may move to another thread (a server's scheduler) and be used there by one
/// thread at a time; every driver call binds the device's context first.
pub struct GpuExecutor {
    dev: Device,
    arena: Vec<CudaSlice<u8>>,
    graphs: Recordings<CudaGraph>,
    timer: Option<cudarc::driver::CudaEvent>,
    limit: Option<usize>,
}

// SAFETY: the only non-Send fields are the CUDA graph handles (raw driver pointers). The CUDA
// driver API allows using a graph from any thread once its context is current, and every call
// here binds the context first (`bind`, cudarc's own calls do the same); `&mut self` on every
// method that touches a graph keeps the use to one thread at a time.
unsafe impl Send for GpuExecutor {}

impl GpuExecutor {
    pub fn new(dev: Device) -> GpuExecutor {
        GpuExecutor { dev, arena: Vec::new(), graphs: Recordings::default(), timer: None, limit: None }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Makes the device's context current on this thread: the raw driver calls below
    /// (copies, synchronisation) act on the current context, and an executor may be used from
    /// a thread other than the one that opened the device (a server's scheduler thread).
    fn bind(&self) -> Result<()> {
        self.dev.context().bind_to_thread().ctx("binding the device's context to this thread")
    }

    unsafe fn run_steps(&self, steps: &[Step]) -> Result<()> {
        self.bind()?;
        let stream = self.dev.stream().cu_stream();
        for step in steps {
            match step {
                Step::Launch(plan) => ops::run(&self.dev, plan)?,
                Step::Copy { src, dst } => {
                    if src.bytes != dst.bytes {
                        return Err(args("copy", format!("{} bytes into {}", src.bytes, dst.bytes)));
                    }
                    guard("copy", || cu::memcpy_dtod_async(dst.ptr, src.ptr, src.bytes, stream).ctx("cuMemcpyDtoDAsync"))?;
                }
                Step::Zero { dst } => {
                    guard("zero", || cu::memset_d8_async(dst.ptr, 0, dst.bytes, stream).ctx("cuMemsetD8Async"))?;
                }
            }
        }
        Ok(())
    }
}

impl Executor for GpuExecutor {
    fn describe(&self) -> String {
        format!("{} ({})", self.dev.name(), self.dev.arch().nvcc_name())
    }

    fn arch(&self) -> Arch {
        self.dev.arch()
    }

    fn has_kernel(&self, spec: &KernelSpec) -> bool {
        self.dev.has_kernel(&spec.kernel_name())
    }

    fn alloc(&mut self, bytes: usize, what: &str) -> Result<Region> {
        check_limit(self.limit, self.allocated_bytes(), bytes, what)?;
        let dev = &self.dev;
        let slice = guard("alloc", || match dev.alloc_zeros::<u8>(bytes.max(1)) {
            Ok(s) => Ok(s),
            Err(CudaError::Driver { source, .. })
                if source.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY =>
            {
                let (free, total) = dev.context().mem_get_info().unwrap_or((0, 0));
                Err(CudaError::OutOfMemory { what: what.to_string(), bytes, free, total })
            }
            Err(e) => Err(e),
        })?;
        let (ptr, _sync) = cudarc::driver::DevicePtr::device_ptr(&slice, dev.stream());
        drop(_sync);
        self.arena.push(slice);
        Ok(Region { ptr, bytes })
    }

    fn upload_bytes(&mut self, dst: Region, src: &[u8]) -> Result<()> {
        check_host_len("upload", dst, src.len())?;
        self.bind()?;
        let stream = self.dev.stream().cu_stream();
        // Synchronous on purpose: `src` may be dropped as soon as this returns.
        guard("upload", || unsafe {
            cu::memcpy_htod_async(dst.ptr, src, stream).ctx("cuMemcpyHtoDAsync")?;
            cu::stream::synchronize(stream).ctx("synchronizing an upload")
        })
    }

    fn download_bytes(&mut self, src: Region, dst: &mut [u8]) -> Result<()> {
        check_host_len("download", src, dst.len())?;
        self.bind()?;
        let stream = self.dev.stream().cu_stream();
        guard("download", || unsafe {
            cu::memcpy_dtoh_async(dst, src.ptr, stream).ctx("cuMemcpyDtoHAsync")?;
            cu::stream::synchronize(stream).ctx("synchronizing a download")
        })
    }

    unsafe fn run(&mut self, steps: &[Step]) -> Result<()> {
        self.run_steps(steps)
    }

    unsafe fn record(&mut self, steps: &[Step]) -> Result<usize> {
        let stream = self.dev.stream().clone();
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        guard("graph capture", || stream.begin_capture(mode).ctx("cuStreamBeginCapture"))?;
        let ran = self.run_steps(steps);
        let graph = guard("graph capture", || {
            stream.end_capture(sys::CUgraphInstantiate_flags(0)).ctx("cuStreamEndCapture")
        });
        ran?;
        let graph = graph?.ok_or_else(|| args("graph capture", "the capture recorded nothing"))?;
        Ok(self.graphs.insert(graph))
    }

    fn replay(&mut self, graph: usize) -> Result<()> {
        let g = self.graphs.get(graph)?;
        guard("graph launch", || g.launch().ctx("cuGraphLaunch"))
    }

    fn forget(&mut self, graph: usize) {
        self.graphs.remove(graph);
    }

    fn forget_recordings(&mut self) {
        self.graphs.clear();
    }

    fn recordings(&self) -> usize {
        self.graphs.len()
    }

    fn synchronize(&mut self) -> Result<()> {
        self.dev.synchronize()
    }

    fn timer_start(&mut self) -> Result<()> {
        let stream = self.dev.stream().clone();
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        self.timer = Some(guard("event", || stream.record_event(timing).ctx("cuEventRecord"))?);
        Ok(())
    }

    fn timer_stop(&mut self) -> Result<f64> {
        let start = self.timer.take().ok_or_else(|| args("timer", "timer_stop without timer_start"))?;
        let stream = self.dev.stream().clone();
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let end = guard("event", || stream.record_event(timing).ctx("cuEventRecord"))?;
        let ms = guard("event", || start.elapsed_ms(&end).ctx("cuEventElapsedTime"))?;
        Ok(ms as f64)
    }

    fn allocated_bytes(&self) -> usize {
        self.arena.iter().map(|s| s.len()).sum()
    }

    fn set_memory_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    fn available_bytes(&self) -> Option<usize> {
        let free = self.dev.context().mem_get_info().map_or(0, |(free, _)| free);
        let capped = self.limit.map_or(free, |l| free.min(l.saturating_sub(self.allocated_bytes())));
        Some(capped)
    }

    fn allocation_mark(&self) -> usize {
        self.arena.len()
    }

    unsafe fn release_since(&mut self, mark: usize) {
        // Dropping an allocation frees it (cuMemFree for the GPU's).
        self.arena.truncate(mark);
    }
}

/// The error of an allocation of `bytes` that would take an executor past its memory limit.
fn check_limit(limit: Option<usize>, allocated: usize, bytes: usize, what: &str) -> Result<()> {
    match limit {
        Some(total) if allocated.saturating_add(bytes) > total => Err(CudaError::OutOfMemory {
            what: format!("{what} (over the memory limit set for this engine)"),
            bytes,
            free: total.saturating_sub(allocated),
            total,
        }),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// CPU emulator

/// Host memory and the kernel emulator ([`crate::emu`]) as an executor.
#[cfg(feature = "emulator")]
#[derive(Default)]
pub struct EmuExecutor {
    /// u64 words, so every region is 8-byte aligned.
    arena: Vec<Box<[u64]>>,
    recordings: Recordings<Vec<Step>>,
    timer: Option<std::time::Instant>,
    limit: Option<usize>,
    /// Steps run so far (launches and copies), for tests of replay.
    pub steps_run: usize,
}

#[cfg(feature = "emulator")]
impl EmuExecutor {
    pub fn new() -> EmuExecutor {
        EmuExecutor::default()
    }

    fn contains(&self, r: Region) -> bool {
        self.arena.iter().any(|a| {
            let (lo, hi) = (a.as_ptr() as u64, a.as_ptr() as u64 + 8 * a.len() as u64);
            r.ptr >= lo && r.ptr + r.bytes as u64 <= hi
        })
    }

    fn checked(&self, op: &'static str, r: Region) -> Result<()> {
        if !self.contains(r) {
            return Err(args(op, format!("{r:?} is not inside one emulator allocation")));
        }
        Ok(())
    }
}

#[cfg(feature = "emulator")]
impl Executor for EmuExecutor {
    fn describe(&self) -> String {
        "CPU emulator (sm_90a kernels)".into()
    }

    fn arch(&self) -> Arch {
        crate::emu::ARCH
    }

    fn has_kernel(&self, spec: &KernelSpec) -> bool {
        dgemma_codegen::supported_specs().contains(spec)
    }

    fn alloc(&mut self, bytes: usize, what: &str) -> Result<Region> {
        check_limit(self.limit, self.allocated_bytes(), bytes, what)?;
        let words = vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice();
        let ptr = words.as_ptr() as u64;
        self.arena.push(words);
        Ok(Region { ptr, bytes })
    }

    fn upload_bytes(&mut self, dst: Region, src: &[u8]) -> Result<()> {
        check_host_len("upload", dst, src.len())?;
        self.checked("upload", dst)?;
        // SAFETY: dst lies inside one live allocation of this executor (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr as *mut u8, src.len()) };
        Ok(())
    }

    fn download_bytes(&mut self, src: Region, dst: &mut [u8]) -> Result<()> {
        check_host_len("download", src, dst.len())?;
        self.checked("download", src)?;
        // SAFETY: src lies inside one live allocation of this executor (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src.ptr as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn run(&mut self, steps: &[Step]) -> Result<()> {
        for step in steps {
            match step {
                Step::Launch(plan) => crate::emu::run(plan)?,
                Step::Copy { src, dst } => {
                    if src.bytes != dst.bytes {
                        return Err(args("copy", format!("{} bytes into {}", src.bytes, dst.bytes)));
                    }
                    self.checked("copy", *src)?;
                    self.checked("copy", *dst)?;
                    std::ptr::copy(src.ptr as *const u8, dst.ptr as *mut u8, src.bytes);
                }
                Step::Zero { dst } => {
                    self.checked("zero", *dst)?;
                    std::ptr::write_bytes(dst.ptr as *mut u8, 0, dst.bytes);
                }
            }
            self.steps_run += 1;
        }
        Ok(())
    }

    unsafe fn record(&mut self, steps: &[Step]) -> Result<usize> {
        Ok(self.recordings.insert(steps.to_vec()))
    }

    fn replay(&mut self, graph: usize) -> Result<()> {
        let steps = self.recordings.get(graph)?.clone();
        // SAFETY: recorded under `record`'s contract.
        unsafe { self.run(&steps) }
    }

    fn forget(&mut self, graph: usize) {
        self.recordings.remove(graph);
    }

    fn forget_recordings(&mut self) {
        self.recordings.clear();
    }

    fn recordings(&self) -> usize {
        self.recordings.len()
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn timer_start(&mut self) -> Result<()> {
        self.timer = Some(std::time::Instant::now());
        Ok(())
    }

    fn timer_stop(&mut self) -> Result<f64> {
        let start = self.timer.take().ok_or_else(|| args("timer", "timer_stop without timer_start"))?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    fn allocated_bytes(&self) -> usize {
        self.arena.iter().map(|a| 8 * a.len()).sum()
    }

    fn set_memory_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    fn available_bytes(&self) -> Option<usize> {
        self.limit.map(|l| l.saturating_sub(self.allocated_bytes()))
    }

    fn allocation_mark(&self) -> usize {
        self.arena.len()
    }

    unsafe fn release_since(&mut self, mark: usize) {
        // Dropping an allocation frees it (cuMemFree for the GPU's).
        self.arena.truncate(mark);
    }
}
