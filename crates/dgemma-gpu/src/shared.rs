//! [`SharedModel`]: one [`GpuBackend`] (the weights, the workspace, the executor) serving many
//! sequences, for servers that hold one [`Backend`] object per request (`dgemma-runtime`).
//!
//! Each [`SequenceHandle`] owns one of the backend's sequences (its KV cache, decoder inputs and
//! sampler history) and implements [`Backend`] and [`DeviceSampling`] by locking the shared
//! backend and selecting its sequence. Handles are `Send` when the executor is: a scheduler
//! thread steps them in turn, one pass at a time. A dropped handle's sequence is emptied and
//! reused by the next [`SharedModel::sequence`], so a long-running server allocates at most as
//! many sequences as it ever had requests at once.

use std::sync::{Arc, Mutex, MutexGuard};

use dgemma_cuda::Executor;
use dgemma_model::error::Result;
use dgemma_model::{Backend, DeviceCanvas, DeviceSampling, DeviceStepStatus};

use crate::backend::GpuBackend;
use crate::error::NAME;

struct Inner<X: Executor> {
    backend: GpuBackend<X>,
    /// Sequences no handle owns.
    free: Vec<usize>,
}

/// A backend shared by [`SequenceHandle`]s (cheap to clone).
pub struct SharedModel<X: Executor> {
    inner: Arc<Mutex<Inner<X>>>,
}

impl<X: Executor> Clone for SharedModel<X> {
    fn clone(&self) -> Self {
        SharedModel { inner: self.inner.clone() }
    }
}

fn lock<X: Executor>(m: &Mutex<Inner<X>>) -> MutexGuard<'_, Inner<X>> {
    // A panic while holding the lock leaves the backend's bookkeeping consistent (every
    // method updates it only after the device work succeeded), so keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<X: Executor> SharedModel<X> {
    /// Shares `backend`; its existing sequences become free for handles.
    pub fn new(backend: GpuBackend<X>) -> SharedModel<X> {
        let free = (0..backend.sequences()).rev().collect();
        SharedModel { inner: Arc::new(Mutex::new(Inner { backend, free })) }
    }

    /// A handle on a free sequence (allocating a new one when none is free; out of memory is
    /// an error naming the buffer). The sequence starts empty.
    pub fn sequence(&self) -> Result<SequenceHandle<X>> {
        let mut g = lock(&self.inner);
        let index = match g.free.pop() {
            Some(i) => i,
            None => g.backend.add_sequence()?,
        };
        g.backend.select_sequence(index)?;
        g.backend.release_pages();
        Ok(SequenceHandle { model: self.clone(), index })
    }

    /// Sequences allocated so far (owned by handles or free).
    pub fn sequences(&self) -> usize {
        lock(&self.inner).backend.sequences()
    }

    /// Runs `f` on the shared backend (statistics, benchmarks).
    pub fn with_backend<T>(&self, f: impl FnOnce(&mut GpuBackend<X>) -> T) -> T {
        f(&mut lock(&self.inner).backend)
    }
}

/// One sequence of a [`SharedModel`].
pub struct SequenceHandle<X: Executor> {
    model: SharedModel<X>,
    index: usize,
}

impl<X: Executor> SequenceHandle<X> {
    /// The backend with this handle's sequence selected.
    fn backend(&self) -> Result<MutexGuard<'_, Inner<X>>> {
        let mut g = lock(&self.model.inner);
        g.backend.select_sequence(self.index)?;
        Ok(g)
    }

    /// The sequence's index in the shared backend.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl<X: Executor> Drop for SequenceHandle<X> {
    fn drop(&mut self) {
        let mut g = lock(&self.model.inner);
        if g.backend.select_sequence(self.index).is_ok() {
            g.backend.release_pages();
            g.free.push(self.index);
        }
    }
}

impl<X: Executor> Backend for SequenceHandle<X> {
    fn name(&self) -> &str {
        NAME
    }

    fn cache_len(&self) -> usize {
        self.backend().map_or(0, |g| g.backend.cache_len())
    }

    fn reset(&mut self) {
        if let Ok(mut g) = self.backend() {
            g.backend.reset();
        }
    }

    fn encode(&mut self, ids: &[u32]) -> Result<()> {
        self.backend()?.backend.encode(ids)
    }

    fn denoise(&mut self, canvas: &[u32], sc_logits: Option<&[f32]>, logits: &mut [f32]) -> Result<()> {
        self.backend()?.backend.denoise(canvas, sc_logits, logits)
    }

    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        Some(self)
    }
}

impl<X: Executor> DeviceSampling for SequenceHandle<X> {
    fn begin_canvas(&mut self, canvas: &[u32], settings: DeviceCanvas) -> Result<()> {
        self.backend()?.backend.begin_canvas(canvas, settings)
    }

    fn step(&mut self, step: usize, temperature: f32) -> Result<DeviceStepStatus> {
        DeviceSampling::step(&mut self.backend()?.backend, step, temperature)
    }

    fn read_argmax(&mut self, out: &mut [u32]) -> Result<()> {
        self.backend()?.backend.read_argmax(out)
    }
}

/// A [`SharedModel`] with its executor type erased, for servers that pick the executor at run
/// time (a GPU, or the CPU emulator in tests).
pub trait SharedBackend: Send + Sync {
    /// A handle on a free sequence (see [`SharedModel::sequence`]) and its index.
    fn sequence(&self) -> Result<(Box<dyn Backend + Send>, usize)>;
    /// One batched device step ([`GpuBackend::step_batch`]): per-sequence results.
    fn step_batch(&self, steps: &[(usize, usize, f32)]) -> Result<Vec<Result<DeviceStepStatus>>>;
    /// One batched device step with other sequences' encoder work in the same pass
    /// ([`GpuBackend::step_mixed`]).
    fn step_mixed(&self, steps: &[(usize, usize, f32)], encodes: &[(usize, &[u32])]) -> Result<Vec<Result<DeviceStepStatus>>>;
    /// The backend's sizes.
    fn options(&self) -> crate::GpuOptions;
    /// Device bytes allocated so far, what one more sequence takes besides its KV pages, and
    /// the KV pool ([`GpuBackend::kv_pages`]).
    fn memory(&self) -> SharedMemory;
    /// Whether the KV pool has the free pages a sequence of `positions` positions needs now.
    fn kv_fits(&self, positions: usize) -> bool;
    /// Takes sequence `seq`'s pages for positions `0..positions` ([`GpuBackend::reserve`]).
    fn reserve(&self, seq: usize, positions: usize) -> Result<()>;
    /// Empties sequence `seq` and gives its pages back ([`GpuBackend::release_pages`]).
    fn release(&self, seq: usize) -> Result<()>;
}

/// What [`SharedBackend::memory`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedMemory {
    /// Device bytes allocated (weights, workspace, KV pool, every sequence's own buffers).
    pub allocated: usize,
    /// Bytes one more sequence allocates besides its KV pages.
    pub per_sequence: usize,
    /// KV pool pages free, and in all.
    pub free_pages: usize,
    pub pages: usize,
    /// Positions and bytes per page.
    pub page: usize,
    pub page_bytes: usize,
}

impl<X: Executor + Send + 'static> SharedBackend for SharedModel<X> {
    fn sequence(&self) -> Result<(Box<dyn Backend + Send>, usize)> {
        let h = SharedModel::sequence(self)?;
        let index = h.index();
        Ok((Box::new(h), index))
    }

    fn step_batch(&self, steps: &[(usize, usize, f32)]) -> Result<Vec<Result<DeviceStepStatus>>> {
        lock(&self.inner).backend.step_batch(steps)
    }

    fn step_mixed(&self, steps: &[(usize, usize, f32)], encodes: &[(usize, &[u32])]) -> Result<Vec<Result<DeviceStepStatus>>> {
        lock(&self.inner).backend.step_mixed(steps, encodes)
    }

    fn options(&self) -> crate::GpuOptions {
        lock(&self.inner).backend.options()
    }

    fn memory(&self) -> SharedMemory {
        let g = lock(&self.inner);
        let (free_pages, pages, page, page_bytes) = g.backend.kv_pages();
        SharedMemory {
            allocated: g.backend.allocated_bytes(),
            per_sequence: g.backend.sequence_bytes(),
            free_pages,
            pages,
            page,
            page_bytes,
        }
    }

    fn kv_fits(&self, positions: usize) -> bool {
        let (free, _, page, _) = lock(&self.inner).backend.kv_pages();
        positions.div_ceil(page) <= free
    }

    fn reserve(&self, seq: usize, positions: usize) -> Result<()> {
        let mut g = lock(&self.inner);
        g.backend.select_sequence(seq)?;
        g.backend.reserve(positions)
    }

    fn release(&self, seq: usize) -> Result<()> {
        let mut g = lock(&self.inner);
        g.backend.select_sequence(seq)?;
        g.backend.release_pages();
        Ok(())
    }
}
