//! Launch plans, one per kernel family.
//!
//! Each family has a pure **plan** function (`plan_*`) that checks the buffer sizes against the
//! spec and the problem size and returns a [`LaunchPlan`]: grid, block and the argument list, in
//! the order of the kernel's generated signature (`dgemma_codegen::params`). Plans need no GPU,
//! so the argument checks are unit-tested on the CPU. A plan runs as a step of an
//! [`Executor`](crate::Executor) (a device's stream, a CUDA graph, or the CPU emulator), or
//! directly on a device with [`run`].
//!
//! Every plan takes the exact [`KernelSpec`] to run (from `dgemma_codegen::specs_for_model` or
//! [`Device::resolve`]); arch-specific specs of another arch are refused at launch.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use dgemma_codegen::{GemmEngine, GemmFuse, KernelSpec, MaskKind, Op, WeightFormat};

use crate::device::{guard, Device};
use crate::error::{args, Context, Result};

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A device pointer (0 = null).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// A device buffer as a plan sees it: its address and its length in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub ptr: u64,
    pub len: usize,
}

/// Everything a launch needs, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchPlan {
    pub spec: KernelSpec,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub args: Vec<Arg>,
}

impl LaunchPlan {
    fn new(spec: &KernelSpec, grid: (u32, u32, u32), args: Vec<Arg>) -> Result<LaunchPlan> {
        let plan = LaunchPlan { spec: *spec, grid, block: spec.block_threads(), args };
        plan.check_signature()?;
        Ok(plan)
    }

    /// Checks the argument list against the generated kernel signature (count and kinds).
    pub fn check_signature(&self) -> Result<()> {
        let params = dgemma_codegen::params(&self.spec);
        let name = self.spec.kernel_name();
        if params.len() != self.args.len() {
            return Err(args("launch", format!("{name} takes {} arguments, got {}", params.len(), self.args.len())));
        }
        for (p, a) in params.iter().zip(&self.args) {
            let ok = match a {
                Arg::Ptr(_) => p.ty.ends_with('*'),
                Arg::I32(_) => p.ty == "int",
                Arg::I64(_) => p.ty == "long long",
                Arg::F32(_) => p.ty == "float",
            };
            if !ok {
                return Err(args("launch", format!("{name}: argument `{}` is `{}`, got {a:?}", p.name, p.ty)));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| args(op, format!("{what} = {v} does not fit a 32-bit int")))
}

fn grid_dim(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).ok().filter(|&g| g < (1 << 31)).ok_or_else(|| args(op, format!("{what}: {v} blocks is too many")))
}

fn grid_yz(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).ok().filter(|&g| g <= 65_535).ok_or_else(|| args(op, format!("{what}: {v} blocks exceed 65535")))
}

fn need(op: &'static str, what: &str, buf: Buf, len: usize) -> Result<()> {
    if buf.len < len {
        return Err(args(op, format!("{what} holds {} elements, needs {len}", buf.len)));
    }
    Ok(())
}

fn expect_op<T>(op: &'static str, spec: &KernelSpec, pick: impl FnOnce(Op) -> Option<T>) -> Result<T> {
    pick(spec.op).ok_or_else(|| args(op, format!("{} is not a {op} kernel", spec.kernel_name())))
}

fn ptr(b: Option<Buf>) -> Arg {
    Arg::Ptr(b.map_or(0, |b| b.ptr))
}

/// Enqueues a checked plan on the device's stream.
///
/// # Safety
/// The plan's pointers must be device allocations of this device's context, live until the
/// kernel has run, holding at least the lengths given to the plan function (the typed wrappers
/// below guarantee this; a hand-made [`LaunchPlan`] must too).
pub unsafe fn run(dev: &Device, plan: &LaunchPlan) -> Result<()> {
    plan.check_signature()?;
    if plan.grid.0 == 0 || plan.grid.1 == 0 || plan.grid.2 == 0 {
        return Ok(()); // nothing to do (empty problem)
    }
    let func = dev.function(&plan.spec)?;
    let cfg = LaunchConfig {
        grid_dim: plan.grid,
        block_dim: (plan.block, 1, 1),
        shared_mem_bytes: plan.spec.dynamic_shared_bytes(),
    };
    guard("kernel launch", || {
        let mut b = dev.stream().launch_builder(&func);
        for a in &plan.args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: the argument list matches the kernel's generated signature (checked above);
        // the caller guarantees the buffers (see the function's safety section).
        unsafe { b.launch(cfg) }.ctx("cuLaunchKernel")?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

#[allow(clippy::too_many_arguments)]
pub fn plan_rms_norm(
    spec: &KernelSpec,
    x: Option<Buf>,
    x_add: Option<Buf>,
    weight: Option<Buf>,
    out: Buf,
    rows: usize,
    eps: f32,
    layer_scalar: f32,
) -> Result<LaunchPlan> {
    const OP: &str = "rms_norm";
    let r = expect_op(OP, spec, |o| if let Op::RmsNorm(r) = o { Some(r) } else { None })?;
    let n = rows * r.width as usize;
    need(OP, "out", out, n)?;
    if let Some(x) = x {
        need(OP, "x", x, n)?;
    } else if r.fuse_residual_add {
        return Err(args(OP, "with fuse_residual_add, out holds the residual: pass x"));
    }
    match (r.fuse_input_add, x_add) {
        (true, Some(b)) => need(OP, "x_add", b, n)?,
        (false, None) => {}
        (true, None) => return Err(args(OP, "the kernel adds x_add: pass it")),
        (false, Some(_)) => return Err(args(OP, "the kernel has no input add: x_add must be None")),
    }
    match (r.has_scale, weight) {
        (true, Some(w)) => need(OP, "weight", w, r.width as usize)?,
        (false, None) => {}
        (true, None) => return Err(args(OP, "the kernel scales: pass weight")),
        (false, Some(_)) => return Err(args(OP, "the kernel has no scale: weight must be None")),
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(args(OP, format!("eps = {eps}")));
    }
    let x = x.unwrap_or(out);
    let grid = (grid_dim(OP, "rows", rows)?, 1, 1);
    LaunchPlan::new(
        spec,
        grid,
        vec![
            Arg::Ptr(x.ptr),
            ptr(x_add),
            ptr(weight),
            Arg::Ptr(out.ptr),
            Arg::F32(eps),
            Arg::F32(layer_scalar),
            Arg::I32(int(OP, "rows", rows)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// In-place rotation of `x` (`[tokens, heads, head_dim]`) with `[table_rows, rotary_pairs]`
/// cos/sin tables; `positions[t]` selects token t's table row.
#[allow(clippy::too_many_arguments)]
pub fn plan_rope(
    spec: &KernelSpec,
    x: Buf,
    cos: Buf,
    sin: Buf,
    positions: Buf,
    tokens: usize,
    heads: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "rope";
    let r = expect_op(OP, spec, |o| if let Op::Rope(r) = o { Some(r) } else { None })?;
    let pairs = r.rotary_pairs as usize;
    need(OP, "x", x, tokens * heads * r.head_dim as usize)?;
    need(OP, "positions", positions, tokens)?;
    if cos.len != sin.len || !cos.len.is_multiple_of(pairs) {
        return Err(args(OP, format!("cos/sin tables of {} / {} elements are not [rows, {pairs}]", cos.len, sin.len)));
    }
    let table_rows = cos.len / pairs;
    LaunchPlan::new(
        spec,
        (grid_dim(OP, "tokens", tokens)?, 1, 1),
        vec![
            Arg::Ptr(x.ptr),
            Arg::Ptr(cos.ptr),
            Arg::Ptr(sin.ptr),
            Arg::Ptr(positions.ptr),
            Arg::I32(int(OP, "table rows", table_rows)?),
            Arg::I32(int(OP, "tokens", tokens)?),
            Arg::I32(int(OP, "heads", heads)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Embedding

/// `out[t] = bf16(table[ids[t]] * scale)`; the vocabulary is `table.len() / hidden`.
pub fn plan_embedding(
    spec: &KernelSpec,
    ids: Buf,
    table: Buf,
    out: Buf,
    scale: f32,
    tokens: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "embedding";
    let e = expect_op(OP, spec, |o| if let Op::Embedding(e) = o { Some(e) } else { None })?;
    let h = e.hidden as usize;
    need(OP, "ids", ids, tokens)?;
    need(OP, "out", out, tokens * h)?;
    if !table.len.is_multiple_of(h) {
        return Err(args(OP, format!("table of {} elements is not [vocab, {h}]", table.len)));
    }
    LaunchPlan::new(
        spec,
        (grid_dim(OP, "tokens", tokens)?, 1, 1),
        vec![
            Arg::Ptr(ids.ptr),
            Arg::Ptr(table.ptr),
            Arg::Ptr(out.ptr),
            Arg::F32(scale),
            Arg::I32(int(OP, "tokens", tokens)?),
            Arg::I32(int(OP, "vocab", table.len / h)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Element-wise: GeGLU, softcap

/// Blocks for a grid-stride loop over `n` elements.
fn stride_grid(op: &'static str, n: usize, threads: u32) -> Result<(u32, u32, u32)> {
    let blocks = n.div_ceil(threads as usize).min(65_536);
    Ok((grid_dim(op, "elements", blocks)?, 1, 1))
}

/// `out[r, c] = bf16(bf16(gelu(gate[r*in_stride + c])) * up[r*in_stride + c])`, `out: [rows, width]`.
#[allow(clippy::too_many_arguments)]
pub fn plan_geglu(
    spec: &KernelSpec,
    gate: Buf,
    up: Buf,
    in_stride: usize,
    out: Buf,
    width: usize,
    rows: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "geglu";
    expect_op(OP, spec, |o| matches!(o, Op::Geglu).then_some(()))?;
    if in_stride < width {
        return Err(args(OP, format!("in_stride {in_stride} < width {width}")));
    }
    let span = if rows == 0 { 0 } else { (rows - 1) * in_stride + width };
    need(OP, "gate", gate, span)?;
    need(OP, "up", up, span)?;
    need(OP, "out", out, rows * width)?;
    int(OP, "rows * in_stride", rows * in_stride)?;
    LaunchPlan::new(
        spec,
        stride_grid(OP, rows * width, spec.block_threads())?,
        vec![
            Arg::Ptr(gate.ptr),
            Arg::Ptr(up.ptr),
            Arg::I32(int(OP, "in_stride", in_stride)?),
            Arg::Ptr(out.ptr),
            Arg::I32(int(OP, "width", width)?),
            Arg::I32(int(OP, "rows", rows)?),
        ],
    )
}

/// `out[i] = tanh(logits[i] / cap) * cap` for `n` elements, bf16 in, f32 out.
pub fn plan_softcap(spec: &KernelSpec, logits: Buf, out: Buf, cap: f32, n: usize) -> Result<LaunchPlan> {
    const OP: &str = "softcap";
    expect_op(OP, spec, |o| matches!(o, Op::Softcap).then_some(()))?;
    need(OP, "logits", logits, n)?;
    need(OP, "out", out, n)?;
    if !(cap.is_finite() && cap > 0.0) {
        return Err(args(OP, format!("cap = {cap}")));
    }
    LaunchPlan::new(
        spec,
        stride_grid(OP, n, spec.block_threads())?,
        vec![Arg::Ptr(logits.ptr), Arg::Ptr(out.ptr), Arg::F32(cap), Arg::I64(n as i64)],
    )
}

// ---------------------------------------------------------------------------------------------
// Row reductions

/// The bf16 LM-head output rows `[rows, vocab]` a vocabulary-wide kernel reads, and how it turns
/// them into the processed logits `P = softcap(x) / T` (`csrc/common.cuh` processed_logit):
/// `cap` 0 for no soft cap, T read on the device from word 4 of `params` (None: T = 1). The host's
/// self-conditioning logits (already bf16 P) are `cap` 0 and no params.
#[derive(Clone, Copy, Debug)]
pub struct ProcessedLogits {
    pub logits: Buf,
    pub cap: f32,
    pub params: Option<Buf>,
}

impl ProcessedLogits {
    fn check(&self, op: &'static str, rows: usize, vocab: usize) -> Result<()> {
        need(op, "logits", self.logits, rows * vocab)?;
        if let Some(p) = self.params {
            need(op, "params", p, SAMPLER_PARAMS_WORDS)?;
        }
        if !(self.cap.is_finite() && self.cap >= 0.0) {
            return Err(args(op, format!("cap = {} (0 = no soft cap)", self.cap)));
        }
        Ok(())
    }
}

/// One denoising step's statistics per row (`csrc/row_softmax.cuh`) from the bf16 logits `x`:
/// `argmax [rows]` i32 (first index of P; -1 for a row with NaN / +inf or only -inf), `entropy
/// [rows]` f32, and `sc_stats [rows, 2]` f32, the softmax statistics (max, 1 / sum) of bf16(P)
/// that [`plan_soft_embedding`] needs. Each output is optional.
pub fn plan_row_softmax_entropy_argmax(
    spec: &KernelSpec,
    x: ProcessedLogits,
    argmax: Option<Buf>,
    entropy: Option<Buf>,
    sc_stats: Option<Buf>,
    rows: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "row_softmax_entropy_argmax";
    let r = expect_op(OP, spec, |o| if let Op::RowSoftmaxEntropyArgmax(r) = o { Some(r) } else { None })?;
    x.check(OP, rows, r.vocab as usize)?;
    for (what, b, n) in [("argmax", argmax, rows), ("entropy", entropy, rows), ("sc_stats", sc_stats, 2 * rows)] {
        if let Some(b) = b {
            need(OP, what, b, n)?;
        }
    }
    LaunchPlan::new(
        spec,
        (grid_dim(OP, "rows", rows)?, 1, 1),
        vec![
            Arg::Ptr(x.logits.ptr),
            Arg::F32(x.cap),
            ptr(x.params),
            ptr(argmax),
            ptr(entropy),
            ptr(sc_stats),
            Arg::I32(int(OP, "rows", rows)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Attention

/// The `phase` argument of the attention kernel (`csrc/attention.cuh`): one launch for an unsplit
/// key range, or the partial maxima, the partial P.V and the combine of a split one.
const ATTENTION_WHOLE: i32 = 0;
const ATTENTION_SPLIT_MAX: i32 = 1;
const ATTENTION_SPLIT_PV: i32 = 2;
const ATTENTION_COMBINE: i32 = 3;

/// f32 elements of the scratch an attention with `spec` needs for any pass of up to `max_q_len`
/// queries (over any number of keys): the split launches' partial row maxima, denominators and
/// accumulators, `splits * q_len * q_heads * (head_dim + 2)` at the split count
/// [`attention_splits`](dgemma_codegen::shapes::attention_splits) picks; 0 when no such pass
/// splits.
pub fn attention_scratch_len(spec: &KernelSpec, max_q_len: usize) -> Result<usize> {
    let a = expect_op("attention", spec, |o| if let Op::Attention(a) = o { Some(a) } else { None })?;
    let per_row = a.q_heads as usize * (a.head_dim as usize + 2);
    Ok((1..=max_q_len)
        .map(|q_len| match dgemma_codegen::shapes::attention_splits(&a, q_len, usize::MAX) {
            1 => 0,
            splits => splits * q_len * per_row,
        })
        .max()
        .unwrap_or(0))
}

/// Where a layer's keys and values live, as attention reads them: a ring of `rows` logical rows
/// (position p in logical row p % rows); with `paging`, logical row r is physical row
/// `table[r / page] * page + r % page` of `k` / `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvView {
    pub k: Buf,
    pub v: Buf,
    pub rows: usize,
    pub paging: Option<Paging>,
}

/// A page table: i32 `[rows / page]` physical page numbers, each < physical_rows / page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub table: Buf,
    pub page: usize,
    pub physical_rows: usize,
}

/// Attention of `q_len` queries (positions `q_pos0..`) over the `kv_len` keys at positions
/// `k_pos0..`, read from the ring `kv` (position p in logical row p % kv.rows, through its page
/// table when paged), into `out`: the launches, in order. The key range is split across blocks
/// (flash-decoding, three launches) when
/// [`attention_splits`](dgemma_codegen::shapes::attention_splits) says so, a function of the
/// spec, `q_len` and `kv_len` only (so a sequence's result never depends on the other sequences
/// of a pass, nor on where its keys sit in memory); a split needs `scratch` (f32,
/// [`attention_scratch_len`] elements for the largest `q_len` the caller runs), which is
/// overwritten.
#[allow(clippy::too_many_arguments)]
pub fn plan_attention(
    spec: &KernelSpec,
    q: Buf,
    kv: KvView,
    out: Buf,
    scratch: Option<Buf>,
    q_len: usize,
    kv_len: usize,
    q_pos0: usize,
    k_pos0: usize,
    window: Option<usize>,
) -> Result<Vec<LaunchPlan>> {
    let a = expect_op("attention", spec, |o| if let Op::Attention(a) = o { Some(a) } else { None })?;
    let splits = dgemma_codegen::shapes::attention_splits(&a, q_len, kv_len);
    plan_attention_split(spec, q, kv, out, scratch, q_len, kv_len, q_pos0, k_pos0, window, splits)
}

/// [`plan_attention`] with the key range split into `splits` shares (1: one launch, no
/// scratch), whatever the heuristic would pick: the kernel tests run every case both ways.
#[allow(clippy::too_many_arguments)]
pub fn plan_attention_split(
    spec: &KernelSpec,
    q: Buf,
    kv: KvView,
    out: Buf,
    scratch: Option<Buf>,
    q_len: usize,
    kv_len: usize,
    q_pos0: usize,
    k_pos0: usize,
    window: Option<usize>,
    splits: usize,
) -> Result<Vec<LaunchPlan>> {
    const OP: &str = "attention";
    let a = expect_op(OP, spec, |o| if let Op::Attention(a) = o { Some(a) } else { None })?;
    let d = a.head_dim as usize;
    let KvView { k, v, rows: kv_rows, paging } = kv;
    need(OP, "q", q, q_len * a.q_heads as usize * d)?;
    need(OP, "out", out, q_len * a.q_heads as usize * d)?;
    if kv_len > kv_rows {
        return Err(args(OP, format!("{kv_len} keys do not fit a ring of {kv_rows} rows")));
    }
    if kv_rows == 0 {
        return Err(args(OP, "a ring of 0 rows"));
    }
    // k and v hold the rows the kernel may address: the ring's own, or the whole page pool (the
    // kernel trusts the table's page numbers; their range is the caller's contract).
    let physical_rows = match paging {
        None => kv_rows,
        Some(Paging { table, page, physical_rows }) => {
            if page == 0 {
                return Err(args(OP, "pages of 0 rows"));
            }
            if kv_rows % page != 0 {
                return Err(args(OP, format!("a ring of {kv_rows} rows is not whole pages of {page} rows")));
            }
            if physical_rows % page != 0 {
                return Err(args(OP, format!("a pool of {physical_rows} rows is not whole pages of {page} rows")));
            }
            need(OP, "page table", table, kv_rows / page)?;
            if table.ptr % 4 != 0 {
                return Err(args(OP, format!("page table at {:#x} is not 4-byte aligned", table.ptr)));
            }
            physical_rows
        }
    };
    need(OP, "k", k, physical_rows * a.kv_heads as usize * d)?;
    need(OP, "v", v, physical_rows * a.kv_heads as usize * d)?;
    // 16-byte chunks of q, k and v rows; bf16 pairs of out; f32 scratch.
    for (what, b, align) in [("q", q, 16), ("k", k, 16), ("v", v, 16), ("out", out, 4)] {
        if b.ptr % align != 0 {
            return Err(args(OP, format!("{what} at {:#x} is not {align}-byte aligned", b.ptr)));
        }
    }
    let window = match (a.mask, window) {
        (MaskKind::CausalSliding, Some(w)) if w >= 1 => w,
        (MaskKind::CausalSliding, _) => return Err(args(OP, "a sliding kernel needs a window >= 1")),
        (_, None) => 0,
        (_, Some(_)) => return Err(args(OP, "only sliding kernels take a window")),
    };
    int(OP, "q_pos0 + q_len", q_pos0 + q_len)?;
    int(OP, "k_pos0 + kv_len", k_pos0 + kv_len)?;
    let rows = q_len * a.group() as usize; // packed (query, head) rows per kv head
    int(OP, "q_len x query heads per kv head", rows)?;
    let scratch_ptr = match (splits, scratch) {
        (0, _) => return Err(args(OP, "0 key splits")),
        (1, _) => 0,
        (_, None) => return Err(args(OP, format!("{splits} key splits need a scratch buffer"))),
        (_, Some(b)) => {
            need(OP, "scratch", b, splits * q_len * a.q_heads as usize * (d + 2))?;
            if b.ptr % 4 != 0 {
                return Err(args(OP, format!("scratch at {:#x} is not 4-byte aligned", b.ptr)));
            }
            b.ptr
        }
    };
    let tiles = grid_dim(OP, "row tiles", rows.div_ceil(a.block_m as usize))?;
    let kv_heads = grid_yz(OP, "kv heads", a.kv_heads as usize)?;
    let plan = |phase: i32, z: usize| -> Result<LaunchPlan> {
        LaunchPlan::new(
            spec,
            (tiles, kv_heads, grid_yz(OP, "key splits", z)?),
            vec![
                Arg::Ptr(q.ptr),
                Arg::Ptr(k.ptr),
                Arg::Ptr(v.ptr),
                Arg::Ptr(out.ptr),
                Arg::Ptr(scratch_ptr),
                Arg::I32(int(OP, "q_len", q_len)?),
                Arg::I32(int(OP, "kv_len", kv_len)?),
                Arg::I32(int(OP, "kv_rows", kv_rows)?),
                Arg::Ptr(paging.map_or(0, |p| p.table.ptr)),
                Arg::I32(paging.map_or(Ok(0), |p| int(OP, "page", p.page))?),
                Arg::I32(int(OP, "q_pos0", q_pos0)?),
                Arg::I32(int(OP, "k_pos0", k_pos0)?),
                Arg::I32(int(OP, "window", window)?),
                Arg::I32(int(OP, "splits", splits)?),
                Arg::I32(phase),
            ],
        )
    };
    if splits == 1 {
        return Ok(vec![plan(ATTENTION_WHOLE, 1)?]);
    }
    Ok(vec![plan(ATTENTION_SPLIT_MAX, splits)?, plan(ATTENTION_SPLIT_PV, splits)?, plan(ATTENTION_COMBINE, 1)?])
}

// ---------------------------------------------------------------------------------------------
// GEMMs

/// `y[rows, n] = bf16(x[rows, k] @ w[n, k]^T)`, the tensor-core GEMM (`csrc/linear.cuh`).
/// Grid: (row tiles, column tiles), row tiles fastest so the blocks sharing a weight tile run
/// together. The kernel reads x and w in 16-byte chunks and stores bf16 pairs: x and w must be
/// 16-byte aligned, y 4-byte aligned.
pub fn plan_linear(spec: &KernelSpec, x: Buf, w: Buf, y: Buf, rows: usize) -> Result<LaunchPlan> {
    const OP: &str = "linear";
    let l = expect_op(OP, spec, |o| if let Op::Linear(l) = o { Some(l) } else { None })?;
    let (n, k) = (l.n as usize, l.k as usize);
    need(OP, "x", x, rows * k)?;
    need(OP, "w", w, n * k)?;
    need(OP, "y", y, rows * n)?;
    // The wgmma kernel addresses x and W with 32-bit element offsets.
    int(OP, "x elements", rows * k)?;
    int(OP, "w elements", n * k)?;
    for (what, b, align) in [("x", x, 16), ("w", w, 16), ("y", y, 4)] {
        if b.ptr % align != 0 {
            return Err(args(OP, format!("{what} at {:#x} is not {align}-byte aligned", b.ptr)));
        }
    }
    let grid = (
        grid_dim(OP, "row tiles", rows.div_ceil(l.block_m as usize))?,
        grid_yz(OP, "column tiles", n.div_ceil(l.block_n as usize))?,
        1,
    );
    LaunchPlan::new(
        spec,
        grid,
        vec![Arg::Ptr(x.ptr), Arg::Ptr(w.ptr), Arg::Ptr(y.ptr), Arg::I32(int(OP, "rows", rows)?)],
    )
}

/// Routing of the MoE block: `tokens * top_k` (token, slot) pairs, pair `t * top_k + j` being
/// token t's slot j (`experts[pair]`, `weights[pair]` from the router); `num_experts` the
/// leading dim of the expert weight tensors.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub tokens: usize,
    pub top_k: usize,
    pub num_experts: usize,
}

/// The pairs grouped by expert ([`plan_moe_sort`]'s outputs): `offsets [num_experts + 1]` i32,
/// expert e's pairs being `sorted[offsets[e] .. offsets[e + 1]]` and those with an invalid
/// expert id `sorted[offsets[num_experts] .. tokens * top_k]`; `sorted [tokens * top_k]` i32.
#[derive(Clone, Copy, Debug)]
pub struct SortedPairs {
    pub offsets: Buf,
    pub sorted: Buf,
}

/// The most (token, slot) pairs the one-block routing sort takes (`csrc/moe_sort.cuh`): each of
/// its threads walks `pairs / threads` pairs twice (1024 for the 26B model at the limit). A
/// 16-canvas batch of the 26B model routes 32768.
pub const MOE_SORT_MAX_PAIRS: usize = 65_536;

/// The routing sort (`csrc/moe_sort.cuh`, one block): from `experts [pairs]` i32 (the router's
/// output), `offsets [experts + 1]` i32 (exclusive prefix sum of the per-expert counts) and
/// `sorted [pairs]` i32 (the pair indices grouped by expert, ascending within an expert, ids
/// outside `0..experts` after the last expert). At most [`MOE_SORT_MAX_PAIRS`] pairs.
pub fn plan_moe_sort(spec: &KernelSpec, experts: Buf, offsets: Buf, sorted: Buf, pairs: usize) -> Result<LaunchPlan> {
    const OP: &str = "moe_sort";
    let m = expect_op(OP, spec, |o| if let Op::MoeSort(m) = o { Some(m) } else { None })?;
    if pairs > MOE_SORT_MAX_PAIRS {
        return Err(args(
            OP,
            format!(
                "{pairs} (token, slot) pairs: the one-block routing sort takes at most {MOE_SORT_MAX_PAIRS} \
                 (plan fewer tokens per pass)"
            ),
        ));
    }
    need(OP, "experts", experts, pairs)?;
    need(OP, "offsets", offsets, m.experts as usize + 1)?;
    need(OP, "sorted", sorted, pairs)?;
    LaunchPlan::new(
        spec,
        (1, 1, 1),
        vec![Arg::Ptr(experts.ptr), Arg::Ptr(offsets.ptr), Arg::Ptr(sorted.ptr), Arg::I32(int(OP, "pairs", pairs)?)],
    )
}

/// The checks and the launch shared by both grouped GEMMs: input `x` of `x_rows` rows of k,
/// output `out` of `pairs` rows of `out_cols`. Grid: (num_experts + 1, column tiles of `cols`),
/// block (e, tile) loops over expert e's pairs (e = num_experts: the invalid ids), so the grid
/// does not depend on the routing; the same for both engines (SIMT, `csrc/grouped_gemm.cuh`, and
/// tensor cores, `csrc/grouped_gemm_mma.cuh`, which also stores bf16 pairs: `out` 4-byte
/// aligned). `w_scale` is the e4m3 kernels' per-row scales (`None` for bf16 weights; the spec's
/// weight format decides which it must be).
#[allow(clippy::too_many_arguments)]
fn plan_grouped(
    op: &'static str,
    fuse: GemmFuse,
    spec: &KernelSpec,
    x: Buf,
    pairs_in: SortedPairs,
    w: Buf,
    w_scale: Option<Buf>,
    out: Buf,
    routing: Routing,
) -> Result<LaunchPlan> {
    let g = expect_op(op, spec, |o| match o {
        Op::GroupedGemm(g) if g.fuse == fuse => Some(g),
        _ => None,
    })?;
    let (n, k) = (g.n as usize, g.k as usize);
    let Routing { tokens, top_k, num_experts } = routing;
    let pairs = tokens * top_k;
    let (x_rows, out_cols) = match fuse {
        GemmFuse::Geglu => (tokens, n / 2),
        GemmFuse::Down => (pairs, n),
    };
    if num_experts == 0 {
        return Err(args(op, "num_experts must be positive"));
    }
    need(op, "x", x, x_rows * k)?;
    need(op, "offsets", pairs_in.offsets, num_experts + 1)?;
    need(op, "sorted", pairs_in.sorted, pairs)?;
    need(op, "w", w, num_experts * n * k)?;
    need(op, "out", out, pairs * out_cols)?;
    if !x.ptr.is_multiple_of(16) {
        return Err(args(op, format!("x at {:#x} is not 16-byte aligned (the kernel reads 8 bf16 at once)", x.ptr)));
    }
    if g.engine != GemmEngine::Simt && !out.ptr.is_multiple_of(4) {
        return Err(args(op, format!("out at {:#x} is not 4-byte aligned (the kernel stores bf16 pairs)", out.ptr)));
    }
    let mut args_list = vec![Arg::Ptr(x.ptr), Arg::Ptr(pairs_in.sorted.ptr), Arg::Ptr(pairs_in.offsets.ptr), Arg::Ptr(w.ptr)];
    match (g.weights, w_scale) {
        (WeightFormat::Bf16, None) => {
            if !w.ptr.is_multiple_of(16) {
                return Err(args(op, format!("w at {:#x} is not 16-byte aligned (the kernel reads 8 bf16 at once)", w.ptr)));
            }
        }
        (WeightFormat::E4m3, Some(scale)) => {
            // w: e4m3 codes (Buf length in bytes = elements), scale: one fp32 per expert row.
            need(op, "w_scale", scale, num_experts * n)?;
            if !w.ptr.is_multiple_of(8) {
                return Err(args(op, format!("w at {:#x} is not 8-byte aligned (the kernel reads 8 e4m3 codes at once)", w.ptr)));
            }
            if !scale.ptr.is_multiple_of(4) {
                return Err(args(op, format!("w_scale at {:#x} is not 4-byte aligned", scale.ptr)));
            }
            args_list.push(Arg::Ptr(scale.ptr));
        }
        (WeightFormat::Bf16, Some(_)) => {
            return Err(args(op, format!("{} takes bf16 weights: no scales", spec.kernel_name())));
        }
        (WeightFormat::E4m3, None) => {
            return Err(args(op, format!("{} takes e4m3 weights and needs their per-row scales", spec.kernel_name())));
        }
    }
    int(op, "tokens * top_k", pairs)?;
    // The kernels index a row of x and an expert's matrix with 32-bit element offsets.
    int(op, "x elements", x_rows * k)?;
    int(op, "expert matrix elements", n * k)?;
    let blocks = if pairs == 0 { 0 } else { num_experts + 1 };
    let grid = (grid_dim(op, "experts", blocks)?, grid_yz(op, "column tiles", out_cols.div_ceil(g.cols as usize))?, 1);
    args_list.extend([
        Arg::Ptr(out.ptr),
        Arg::I32(int(op, "tokens", tokens)?),
        Arg::I32(int(op, "top_k", top_k)?),
        Arg::I32(int(op, "num_experts", num_experts)?),
    ]);
    LaunchPlan::new(spec, grid, args_list)
}

/// An expert weight tensor `[E, n, k]` as the grouped GEMMs read it: bf16 (`scale` `None`,
/// 16-byte aligned) for a spec with [`WeightFormat::Bf16`] weights, or FP8 e4m3 codes (one byte
/// each, 8-byte aligned) with `scale` the fp32 row scales `[E * n]` (row n of expert e scaled by
/// `scale[e * n_rows + n]`) for one with [`WeightFormat::E4m3`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertWeights {
    pub w: Buf,
    pub scale: Option<Buf>,
}

impl ExpertWeights {
    pub fn bf16(w: Buf) -> ExpertWeights {
        ExpertWeights { w, scale: None }
    }

    pub fn e4m3(codes: Buf, scale: Buf) -> ExpertWeights {
        ExpertWeights { w: codes, scale: Some(scale) }
    }
}

/// gate_up + GeGLU over the pairs grouped by expert: `out[t * top_k + j, c]` for `c < n / 2`
/// (original pair order), `x: [tokens, k]` (16-byte aligned), `w` the experts' `[E, n, k]`; NaN
/// rows for pairs with an expert id outside `0..E`.
pub fn plan_grouped_gemm_geglu(
    spec: &KernelSpec,
    x: Buf,
    pairs: SortedPairs,
    w: ExpertWeights,
    out: Buf,
    routing: Routing,
) -> Result<LaunchPlan> {
    plan_grouped("grouped_gemm_geglu", GemmFuse::Geglu, spec, x, pairs, w.w, w.scale, out, routing)
}

/// down projection over the pairs grouped by expert: `y[pair, c] = bf16(act[pair] . w[e][c])`,
/// `act: [tokens * top_k, k]` (16-byte aligned), `w` the experts' `[E, n, k]`,
/// `y: [tokens * top_k, n]`; NaN rows for pairs with an expert id outside `0..E`.
pub fn plan_grouped_gemm_down(
    spec: &KernelSpec,
    act: Buf,
    pairs: SortedPairs,
    w: ExpertWeights,
    y: Buf,
    routing: Routing,
) -> Result<LaunchPlan> {
    plan_grouped("grouped_gemm_down", GemmFuse::Down, spec, act, pairs, w.w, w.scale, y, routing)
}

/// The routing-weighted sum: `out[t, c] = bf16(sum_j y[t*top_k+j, c] * weights[t*top_k+j])` in
/// slot order (fp32), NaN for a token with an expert id outside `0..num_experts`;
/// `y: [tokens * top_k, hidden]` bf16, `experts` i32 and `weights` f32 `[tokens * top_k]`,
/// `out: [tokens, hidden]`.
pub fn plan_moe_combine(
    spec: &KernelSpec,
    y: Buf,
    experts: Buf,
    weights: Buf,
    out: Buf,
    routing: Routing,
) -> Result<LaunchPlan> {
    const OP: &str = "moe_combine";
    let m = expect_op(OP, spec, |o| if let Op::MoeCombine(m) = o { Some(m) } else { None })?;
    let h = m.hidden as usize;
    let Routing { tokens, top_k, num_experts } = routing;
    let pairs = tokens * top_k;
    need(OP, "y", y, pairs * h)?;
    need(OP, "experts", experts, pairs)?;
    need(OP, "weights", weights, pairs)?;
    need(OP, "out", out, tokens * h)?;
    int(OP, "tokens * top_k", pairs)?;
    let grid =
        (grid_dim(OP, "tokens", tokens)?, grid_yz(OP, "column tiles", h.div_ceil(spec.block_threads() as usize))?, 1);
    LaunchPlan::new(
        spec,
        grid,
        vec![
            Arg::Ptr(y.ptr),
            Arg::Ptr(experts.ptr),
            Arg::Ptr(weights.ptr),
            Arg::Ptr(out.ptr),
            Arg::I32(int(OP, "tokens", tokens)?),
            Arg::I32(int(OP, "top_k", top_k)?),
            Arg::I32(int(OP, "num_experts", num_experts)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// MoE router

/// Routes `tokens` rows of `h`: `experts[t * top_k + j]` and its fp32 weight
/// `weights[t * top_k + j]`, bit for bit `dgemma_cpu::ops::moe::route` up to the GPU's expf.
#[allow(clippy::too_many_arguments)]
pub fn plan_router(
    spec: &KernelSpec,
    h: Buf,
    scale: Buf,
    proj: Buf,
    per_expert_scale: Buf,
    experts: Buf,
    weights: Buf,
    tokens: usize,
    eps: f32,
    root: f32,
) -> Result<LaunchPlan> {
    const OP: &str = "router";
    let r = expect_op(OP, spec, |o| if let Op::Router(r) = o { Some(r) } else { None })?;
    let (hid, e, k) = (r.hidden as usize, r.experts as usize, r.top_k as usize);
    need(OP, "h", h, tokens * hid)?;
    need(OP, "scale", scale, hid)?;
    need(OP, "proj", proj, e * hid)?;
    need(OP, "per_expert_scale", per_expert_scale, e)?;
    need(OP, "experts", experts, tokens * k)?;
    need(OP, "weights", weights, tokens * k)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(args(OP, format!("eps = {eps}")));
    }
    if !(root.is_finite() && root > 0.0) {
        return Err(args(OP, format!("root = {root}")));
    }
    int(OP, "tokens * top_k", tokens * k)?;
    LaunchPlan::new(
        spec,
        (grid_dim(OP, "tokens", tokens)?, 1, 1),
        vec![
            Arg::Ptr(h.ptr),
            Arg::Ptr(scale.ptr),
            Arg::Ptr(proj.ptr),
            Arg::Ptr(per_expert_scale.ptr),
            Arg::Ptr(experts.ptr),
            Arg::Ptr(weights.ptr),
            Arg::F32(eps),
            Arg::F32(root),
            Arg::I32(int(OP, "tokens", tokens)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Self-conditioning soft embedding (csrc/soft_embedding.cuh: probabilities, split-K GEMM, reduction)

/// The scratch buffers a soft embedding of `rows` rows needs (element counts in
/// [`soft_embedding_scratch`]): `probs` bf16 `[rows, vocab]` (pr) and `partials` f32
/// `[splits, rows, hidden]` (the GEMM's partial sums), both 16-byte aligned. Their contents
/// are overwritten; nothing reads them after the call.
#[derive(Clone, Copy, Debug)]
pub struct SoftEmbeddingScratch {
    pub probs: Buf,
    pub partials: Buf,
}

/// Elements of the soft embedding scratch for `rows` rows with the GEMM `spec`:
/// `(probs [rows, vocab] bf16, partials [splits, rows, hidden] f32)`.
pub fn soft_embedding_scratch(spec: &KernelSpec, rows: usize) -> Result<(usize, usize)> {
    let e = expect_op("soft_embedding", spec, |o| if let Op::SoftEmbedding(e) = o { Some(e) } else { None })?;
    Ok((rows * e.vocab as usize, e.splits as usize * rows * e.hidden as usize))
}

fn aligned(op: &'static str, what: &str, b: Buf, align: u64) -> Result<()> {
    if !b.ptr.is_multiple_of(align) {
        return Err(args(op, format!("{what} at {:#x} is not {align}-byte aligned", b.ptr)));
    }
    Ok(())
}

/// `out[c] = bf16(bf16(sum_v pr[c, v] * table[v]) * scale)` for `rows` canvas rows, with
/// `pr = bf16(exp(bf16(P) - m) * inv)` computed from the bf16 logits `x` and the row pass's
/// `sc_stats [rows, 2]` (m, inv): `table [vocab, hidden]`, `out [rows, hidden]`, `scale` the
/// embedding scale `bf16(sqrt(hidden))`. `spec` is the GEMM's (`shapes::soft_embedding_spec`);
/// the plans, in launch order, are the probabilities ([`plan_soft_embedding_probs`], into
/// `scratch.probs`), the split-K GEMM ([`plan_soft_embedding_gemm`], into `scratch.partials`)
/// and the reduction ([`plan_soft_embedding_reduce`], into `out`). Deterministic: a fixed
/// summation order and no atomics, and a row's result does not depend on the other rows.
#[allow(clippy::too_many_arguments)]
pub fn plan_soft_embedding(
    spec: &KernelSpec,
    x: ProcessedLogits,
    sc_stats: Buf,
    table: Buf,
    scratch: SoftEmbeddingScratch,
    out: Buf,
    scale: f32,
    rows: usize,
) -> Result<Vec<LaunchPlan>> {
    let e = expect_op("soft_embedding", spec, |o| if let Op::SoftEmbedding(e) = o { Some(e) } else { None })?;
    Ok(vec![
        plan_soft_embedding_probs(&e.probs_spec(), x, sc_stats, scratch.probs, rows)?,
        plan_soft_embedding_gemm(spec, scratch.probs, table, scratch.partials, rows)?,
        plan_soft_embedding_reduce(&e.reduce_spec(), scratch.partials, out, scale, rows)?,
    ])
}

/// The soft embedding's probabilities `probs [rows, vocab]` bf16 from the bf16 logits `x` and
/// `sc_stats [rows, 2]`; logits and probs 16-byte aligned (8 entries per load and store).
pub fn plan_soft_embedding_probs(
    spec: &KernelSpec,
    x: ProcessedLogits,
    sc_stats: Buf,
    probs: Buf,
    rows: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "soft_embedding_probs";
    let p = expect_op(OP, spec, |o| if let Op::SoftEmbeddingProbs(p) = o { Some(p) } else { None })?;
    let v = p.vocab as usize;
    x.check(OP, rows, v)?;
    need(OP, "sc_stats", sc_stats, 2 * rows)?;
    need(OP, "probs", probs, rows * v)?;
    aligned(OP, "logits", x.logits, 16)?;
    aligned(OP, "probs", probs, 16)?;
    LaunchPlan::new(
        spec,
        stride_grid(OP, rows * v / 8, spec.block_threads())?,
        vec![
            Arg::Ptr(x.logits.ptr),
            Arg::F32(x.cap),
            ptr(x.params),
            Arg::Ptr(sc_stats.ptr),
            Arg::Ptr(probs.ptr),
            Arg::I32(int(OP, "rows", rows)?),
        ],
    )
}

/// The soft embedding's split-K GEMM: `partials [splits, rows, hidden]` f32 from `probs
/// [rows, vocab]` and `table [vocab, hidden]` (both 16-byte aligned; partials 4-byte). Grid:
/// (column tiles, row tiles, splits), column tiles fastest, so the blocks sharing a slice of
/// probs run together.
pub fn plan_soft_embedding_gemm(spec: &KernelSpec, probs: Buf, table: Buf, partials: Buf, rows: usize) -> Result<LaunchPlan> {
    const OP: &str = "soft_embedding";
    let e = expect_op(OP, spec, |o| if let Op::SoftEmbedding(e) = o { Some(e) } else { None })?;
    let (h, v) = (e.hidden as usize, e.vocab as usize);
    need(OP, "probs", probs, rows * v)?;
    need(OP, "table", table, v * h)?;
    need(OP, "partials", partials, e.splits as usize * rows * h)?;
    aligned(OP, "probs", probs, 16)?;
    aligned(OP, "table", table, 16)?;
    aligned(OP, "partials", partials, 4)?;
    int(OP, "splits * rows * hidden", e.splits as usize * rows * h)?;
    let grid = (
        grid_dim(OP, "column tiles", h.div_ceil(e.block_n as usize))?,
        grid_yz(OP, "row tiles", rows.div_ceil(e.block_m as usize))?,
        grid_yz(OP, "splits", e.splits as usize)?,
    );
    LaunchPlan::new(
        spec,
        grid,
        vec![Arg::Ptr(probs.ptr), Arg::Ptr(table.ptr), Arg::Ptr(partials.ptr), Arg::I32(int(OP, "rows", rows)?)],
    )
}

/// The soft embedding's reduction: `out [rows, hidden]` (4-byte aligned) from the GEMM's
/// `partials [splits, rows, hidden]`, added in ascending split order, rounded, times `scale`,
/// rounded.
pub fn plan_soft_embedding_reduce(spec: &KernelSpec, partials: Buf, out: Buf, scale: f32, rows: usize) -> Result<LaunchPlan> {
    const OP: &str = "soft_embedding_reduce";
    let r = expect_op(OP, spec, |o| if let Op::SoftEmbeddingReduce(r) = o { Some(r) } else { None })?;
    let h = r.hidden as usize;
    need(OP, "partials", partials, r.splits as usize * rows * h)?;
    need(OP, "out", out, rows * h)?;
    aligned(OP, "out", out, 4)?;
    if !scale.is_finite() {
        return Err(args(OP, format!("scale = {scale}")));
    }
    int(OP, "rows * hidden", rows * h)?;
    LaunchPlan::new(
        spec,
        stride_grid(OP, rows * h / 2, spec.block_threads())?,
        vec![Arg::Ptr(partials.ptr), Arg::Ptr(out.ptr), Arg::F32(scale), Arg::I32(int(OP, "rows", rows)?)],
    )
}

// ---------------------------------------------------------------------------------------------
// Device sampler (csrc/sampler.cuh)

/// Words (u32) of the sampler params buffer the two sampler kernels read from device memory.
pub const SAMPLER_PARAMS_WORDS: usize = 8;
/// Words (u32) of the sampler status buffer `sampler_canvas` writes.
pub const SAMPLER_STATUS_WORDS: usize = 4;
/// Status error bit: an entropy is NaN (dgemma-sampler: `SamplerError::NanEntropy`).
pub const SAMPLER_ERR_NAN_ENTROPY: u32 = 1;
/// Status error bit: a sampled id is outside `0..vocab` (`gumbel_sample` wrote -1 for a logits row
/// with NaN / +inf or only -inf: the CPU's `NonFiniteLogit` / `NoFiniteLogit`).
pub const SAMPLER_ERR_SAMPLE: u32 = 2;
/// Status error bit: an argmax id is outside `0..vocab` (-1 from the row pass: an invalid row).
pub const SAMPLER_ERR_ARGMAX: u32 = 4;
/// Status error bit: bad params (step >= 2^24, entropy bound not finite and > 0, NaN confidence
/// threshold, canvas or vocab out of range).
pub const SAMPLER_ERR_PARAMS: u32 = 8;

/// The sampler params buffer (`SAMPLER_PARAMS_WORDS` u32 words in device memory, layout in
/// `csrc/sampler.cuh`): everything that changes between steps or requests, so that one captured
/// graph serves every step. `block` and `step` key the noise as in `dgemma_sampler::SeededNoise`
/// (`step` = `max_denoising_steps - cur_step`, 0 on a block's first step, which also restarts the
/// stability history). `temperature` is read by every kernel that recomputes the processed logits
/// `P = softcap(x) / T` from the bf16 LM-head output (row pass, draw, soft embedding).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerParams {
    pub seed: u64,
    pub block: u32,
    pub step: u32,
    pub temperature: f32,
    pub entropy_bound: f32,
    pub confidence_threshold: f32,
    pub stability_threshold: u32,
}

impl SamplerParams {
    /// The buffer's words: `[seed lo, seed hi, block, step, T bits, bound bits, confidence bits,
    /// stability]`.
    pub fn to_words(&self) -> [u32; SAMPLER_PARAMS_WORDS] {
        [
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.block,
            self.step,
            self.temperature.to_bits(),
            self.entropy_bound.to_bits(),
            self.confidence_threshold.to_bits(),
            self.stability_threshold,
        ]
    }
}

/// The status `sampler_canvas` writes per step (`SAMPLER_STATUS_WORDS` u32 words: finished,
/// accepted count, mean entropy bits, error bits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerStatus {
    /// Stable and confident: the block loop stops after this step (never with an error).
    pub finished: bool,
    /// Accepted positions (0 with an error).
    pub accepted: u32,
    /// float32 mean of the entropies, `StableAndConfident::mean_entropy`.
    pub mean_entropy: f32,
    /// `SAMPLER_ERR_*` bits; 0 = the step is valid.
    pub error: u32,
}

impl SamplerStatus {
    pub fn from_words(w: [u32; SAMPLER_STATUS_WORDS]) -> SamplerStatus {
        SamplerStatus { finished: w[0] != 0, accepted: w[1], mean_entropy: f32::from_bits(w[2]), error: w[3] }
    }
}

/// The Gumbel-max categorical draw, `sampled[r] = argmax_v (P[r, v] + g(seed, block, step, r, v))`
/// (first index on ties; -1 for a row with NaN / +inf or only -inf), bit for bit
/// `SeededNoise::sample`, with P recomputed from the bf16 logits `x` (whose `params`, the sampler
/// params buffer, are required: the draw reads seed, block and step from it), `sampled [rows]` i32.
pub fn plan_gumbel_sample(spec: &KernelSpec, x: ProcessedLogits, sampled: Buf, rows: usize) -> Result<LaunchPlan> {
    const OP: &str = "gumbel_sample";
    let g = expect_op(OP, spec, |o| if let Op::GumbelSample(g) = o { Some(g) } else { None })?;
    x.check(OP, rows, g.vocab as usize)?;
    let Some(params) = x.params else {
        return Err(args(OP, "the draw needs the sampler params buffer"));
    };
    need(OP, "sampled", sampled, rows)?;
    LaunchPlan::new(
        spec,
        (grid_dim(OP, "rows", rows)?, 1, 1),
        vec![
            Arg::Ptr(params.ptr),
            Arg::Ptr(x.logits.ptr),
            Arg::F32(x.cap),
            Arg::Ptr(sampled.ptr),
            Arg::I32(int(OP, "rows", rows)?),
        ],
    )
}

/// Renoise, entropy-bound acceptance (TorchDevice::Cuda), next canvas and the stable-and-confident
/// stopping rule for one canvas of `canvas <= max_canvas` positions, one block; bit for bit
/// dgemma-sampler's `step_core` with `SeededNoise` (see `csrc/sampler.cuh`). `next_canvas` may be
/// the `sampled` buffer; no other buffers may alias.
#[allow(clippy::too_many_arguments)]
pub fn plan_sampler_canvas(
    spec: &KernelSpec,
    params: Buf,
    entropy: Buf,
    sampled: Buf,
    argmax: Buf,
    next_canvas: Buf,
    accepted: Buf,
    history: Buf,
    status: Buf,
    vocab: usize,
    canvas: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "sampler_canvas";
    let c = expect_op(OP, spec, |o| if let Op::SamplerCanvas(c) = o { Some(c) } else { None })?;
    if canvas == 0 || canvas > c.max_canvas as usize {
        return Err(args(OP, format!("canvas = {canvas}, the kernel handles 1..={}", c.max_canvas)));
    }
    if vocab == 0 || vocab > u32::MAX as usize {
        return Err(args(OP, format!("vocab = {vocab}")));
    }
    need(OP, "params", params, SAMPLER_PARAMS_WORDS)?;
    for (what, b) in [
        ("entropy", entropy),
        ("sampled", sampled),
        ("argmax", argmax),
        ("next_canvas", next_canvas),
        ("accepted", accepted),
    ] {
        need(OP, what, b, canvas)?;
    }
    need(OP, "history", history, canvas + 1)?;
    need(OP, "status", status, SAMPLER_STATUS_WORDS)?;
    LaunchPlan::new(
        spec,
        (1, 1, 1),
        vec![
            Arg::Ptr(params.ptr),
            Arg::Ptr(entropy.ptr),
            Arg::Ptr(sampled.ptr),
            Arg::Ptr(argmax.ptr),
            Arg::Ptr(next_canvas.ptr),
            Arg::Ptr(accepted.ptr),
            Arg::Ptr(history.ptr),
            Arg::Ptr(status.ptr),
            Arg::I32(int(OP, "vocab", vocab)?),
            Arg::I32(int(OP, "canvas", canvas)?),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// HBM read-bandwidth probe

/// A fold no real data is expected to produce (any non-zero word works; a hit writes 4 bytes).
pub const READ_BANDWIDTH_SENTINEL: u32 = 0x8BAD_F00D;

/// The read-bandwidth probe (`csrc/bandwidth.cuh`): reads `vectors` 16-byte vectors of `src`
/// (viewed as u32 words: `4 * vectors` of them, 16-byte aligned) with a grid-stride loop over
/// `min(max_blocks, ceil(vectors / (threads * unroll)))` blocks; a thread writes `out[0]` (u32)
/// only if the XOR of every word it read equals `sentinel` (non-zero: idle threads fold to 0).
pub fn plan_read_bandwidth(
    spec: &KernelSpec,
    src: Buf,
    vectors: usize,
    sentinel: u32,
    out: Buf,
    max_blocks: usize,
) -> Result<LaunchPlan> {
    const OP: &str = "read_bandwidth";
    let r = expect_op(OP, spec, |o| if let Op::ReadBandwidth(r) = o { Some(r) } else { None })?;
    need(OP, "src", src, 4 * vectors)?;
    need(OP, "out", out, 1)?;
    if !src.ptr.is_multiple_of(16) {
        return Err(args(OP, format!("src at {:#x} is not 16-byte aligned", src.ptr)));
    }
    if sentinel == 0 {
        return Err(args(OP, "the sentinel must be non-zero (threads that read nothing fold to 0)"));
    }
    if max_blocks == 0 {
        return Err(args(OP, "max_blocks must be positive"));
    }
    let per_block = (r.threads * r.unroll) as usize;
    let blocks = vectors.div_ceil(per_block).min(max_blocks);
    LaunchPlan::new(
        spec,
        (grid_dim(OP, "blocks", blocks)?, 1, 1),
        vec![
            Arg::Ptr(src.ptr),
            Arg::I64(i64::try_from(vectors).map_err(|_| args(OP, format!("{vectors} vectors")))?),
            Arg::I32(sentinel as i32),
            Arg::Ptr(out.ptr),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dgemma_codegen::{supported_specs, Family, GroupedGemm};

    fn buf(len: usize) -> Buf {
        Buf { ptr: 0x1000, len }
    }

    /// An unpaged ring of `rows` rows in `kv` (as both keys and values).
    fn ring(kv: Buf, rows: usize) -> KvView {
        KvView { k: kv, v: kv, rows, paging: None }
    }

    /// A plan for every spec of the table, with generous buffers: the argument lists match
    /// the generated signatures for every family.
    #[test]
    fn every_family_plans_against_its_signature() {
        let big = buf(1 << 31);
        let routing = Routing { tokens: 3, top_k: 2, num_experts: 4 };
        for spec in supported_specs() {
            let plan = match spec.op {
                Op::RmsNorm(r) => plan_rms_norm(
                    &spec,
                    Some(big),
                    r.fuse_input_add.then_some(big),
                    r.has_scale.then_some(big),
                    big,
                    5,
                    1e-6,
                    1.0,
                ),
                Op::Rope(r) => plan_rope(
                    &spec,
                    big,
                    buf(r.rotary_pairs as usize * 10),
                    buf(r.rotary_pairs as usize * 10),
                    big,
                    4,
                    2,
                ),
                Op::Embedding(e) => plan_embedding(&spec, big, buf(e.hidden as usize * 100), big, 53.0, 4),
                Op::Geglu => plan_geglu(&spec, big, big, 64, big, 32, 3),
                Op::Softcap => plan_softcap(&spec, big, big, 30.0, 1000),
                Op::RowSoftmaxEntropyArgmax(_) => {
                    let x = ProcessedLogits { logits: big, cap: 30.0, params: Some(big) };
                    plan_row_softmax_entropy_argmax(&spec, x, Some(big), None, Some(big), 2)
                }
                Op::Attention(a) => {
                    let window = (a.mask == MaskKind::CausalSliding).then_some(4);
                    let split = plan_attention_split(&spec, big, ring(big, 9), big, Some(big), 3, 7, 4, 0, window, 3)
                        .unwrap_or_else(|e| panic!("{}: {e}", spec.kernel_name()));
                    assert_eq!(split.len(), 3, "{}: max, P.V, combine", spec.kernel_name());
                    for p in &split {
                        p.check_signature().unwrap();
                    }
                    assert_eq!(split[0].grid.2, 3);
                    assert_eq!(split[2].grid.2, 1);
                    plan_attention(&spec, big, ring(big, 9), big, None, 3, 7, 4, 0, window).map(|mut v| {
                        assert_eq!(v.len(), 1, "{}: 7 keys are never split", spec.kernel_name());
                        v.remove(0)
                    })
                }
                Op::Linear(_) => plan_linear(&spec, big, big, big, 5),
                Op::GroupedGemm(g) => {
                    let sorted = SortedPairs { offsets: big, sorted: big };
                    match (g.fuse, g.weights) {
                        (GemmFuse::Geglu, WeightFormat::Bf16) => {
                            plan_grouped_gemm_geglu(&spec, big, sorted, ExpertWeights::bf16(big), big, routing)
                        }
                        (GemmFuse::Down, WeightFormat::Bf16) => plan_grouped_gemm_down(&spec, big, sorted, ExpertWeights::bf16(big), big, routing),
                        (GemmFuse::Geglu, WeightFormat::E4m3) => {
                            plan_grouped_gemm_geglu(&spec, big, sorted, ExpertWeights::e4m3(big, big), big, routing)
                        }
                        (GemmFuse::Down, WeightFormat::E4m3) => {
                            plan_grouped_gemm_down(&spec, big, sorted, ExpertWeights::e4m3(big, big), big, routing)
                        }
                    }
                }
                Op::MoeSort(_) => plan_moe_sort(&spec, big, big, big, 6),
                Op::MoeCombine(_) => plan_moe_combine(&spec, big, big, big, big, routing),
                Op::Router(_) => plan_router(&spec, big, big, big, big, big, big, 3, 1e-6, 0.1),
                Op::SoftEmbedding(_) => {
                    let x = ProcessedLogits { logits: big, cap: 0.0, params: None };
                    let scratch = SoftEmbeddingScratch { probs: big, partials: big };
                    let plans = plan_soft_embedding(&spec, x, big, big, scratch, big, 53.0, 3);
                    plans.map(|p| p.into_iter().nth(1).expect("the GEMM is the second launch"))
                }
                Op::SoftEmbeddingProbs(_) => {
                    let x = ProcessedLogits { logits: big, cap: 30.0, params: Some(big) };
                    plan_soft_embedding_probs(&spec, x, big, big, 3)
                }
                Op::SoftEmbeddingReduce(_) => plan_soft_embedding_reduce(&spec, big, big, 53.0, 3),
                Op::GumbelSample(_) => {
                    plan_gumbel_sample(&spec, ProcessedLogits { logits: big, cap: 30.0, params: Some(big) }, big, 3)
                }
                Op::SamplerCanvas(_) => plan_sampler_canvas(&spec, big, big, big, big, big, big, big, big, 512, 16),
                Op::ReadBandwidth(_) => plan_read_bandwidth(&spec, big, 1000, READ_BANDWIDTH_SENTINEL, big, 65_536),
            };
            let plan = plan.unwrap_or_else(|e| panic!("{}: {e}", spec.kernel_name()));
            assert_eq!(plan.block, spec.block_threads());
            assert!(plan.grid.0 >= 1, "{}", spec.kernel_name());
        }
        // Every family was exercised.
        let families: std::collections::BTreeSet<Family> = supported_specs().iter().map(|s| s.family()).collect();
        assert_eq!(families.len(), Family::ALL.len());
    }

    #[test]
    fn short_buffers_and_wrong_families_are_refused() {
        let specs = supported_specs();
        let linear = specs.iter().find(|s| matches!(s.op, Op::Linear(_))).unwrap();
        let Op::Linear(l) = linear.op else { unreachable!() };
        let (n, k) = (l.n as usize, l.k as usize);
        assert!(plan_linear(linear, buf(2 * k), buf(n * k), buf(2 * n), 2).is_ok());
        assert!(plan_linear(linear, buf(2 * k - 1), buf(n * k), buf(2 * n), 2).is_err());
        assert!(plan_linear(linear, buf(2 * k), buf(n * k), buf(2 * n - 1), 2).is_err());
        let moved = |b: Buf, bytes: u64| Buf { ptr: b.ptr + bytes, ..b };
        assert!(plan_linear(linear, moved(buf(2 * k), 8), buf(n * k), buf(2 * n), 2).is_err());
        assert!(plan_linear(linear, buf(2 * k), moved(buf(n * k), 4), buf(2 * n), 2).is_err());
        assert!(plan_linear(linear, buf(2 * k), buf(n * k), moved(buf(2 * n), 2), 2).is_err());
        assert!(plan_linear(linear, buf(2 * k), buf(n * k), moved(buf(2 * n), 4), 2).is_ok());
        assert!(plan_softcap(linear, buf(10), buf(10), 30.0, 10).is_err());

        let norm = specs
            .iter()
            .find(|s| matches!(s.op, Op::RmsNorm(r) if r.has_scale && r.fuse_residual_add && !r.fuse_input_add))
            .unwrap();
        let b = buf(1 << 20);
        // Residual kernels need x (out is the residual); scaled kernels need the weight.
        assert!(plan_rms_norm(norm, None, None, Some(b), b, 2, 1e-6, 1.0).is_err());
        assert!(plan_rms_norm(norm, Some(b), None, None, b, 2, 1e-6, 1.0).is_err());
        assert!(plan_rms_norm(norm, Some(b), None, Some(b), b, 2, 1e-6, 1.0).is_ok());

        let sliding =
            specs.iter().find(|s| matches!(s.op, Op::Attention(a) if a.mask == MaskKind::CausalSliding)).unwrap();
        assert!(plan_attention(sliding, b, ring(b, 2), b, None, 2, 2, 0, 0, None).is_err());
        assert!(plan_attention(sliding, b, ring(b, 2), b, None, 2, 2, 0, 0, Some(4)).is_ok());
        // The ring must hold the keys read, and k/v must hold the whole ring.
        assert!(plan_attention(sliding, b, ring(b, 2), b, None, 2, 3, 0, 0, Some(4)).is_err());
        let Op::Attention(a) = sliding.op else { unreachable!() };
        let row = (a.kv_heads * a.head_dim) as usize;
        let five = buf(5 * row);
        assert!(plan_attention(sliding, b, ring(five, 5), b, None, 2, 3, 7, 6, Some(4)).is_ok());
        assert!(plan_attention(sliding, b, ring(five, 6), b, None, 2, 3, 7, 6, Some(4)).is_err());
        assert!(plan_attention(sliding, b, KvView { v: buf(5 * row - 1), ..ring(five, 5) }, b, None, 2, 3, 7, 6, Some(4))
            .is_err());
        // q, k, v move in 16-byte chunks, out in bf16 pairs.
        assert!(plan_attention(sliding, moved(b, 8), ring(b, 2), b, None, 2, 2, 0, 0, Some(4)).is_err());
        assert!(plan_attention(sliding, b, ring(moved(b, 8), 2), b, None, 2, 2, 0, 0, Some(4)).is_err());
        assert!(plan_attention(sliding, b, KvView { v: moved(b, 8), ..ring(b, 2) }, b, None, 2, 2, 0, 0, Some(4))
            .is_err());
        assert!(plan_attention(sliding, b, ring(b, 2), moved(b, 2), None, 2, 2, 0, 0, Some(4)).is_err());
        assert!(plan_attention(sliding, b, ring(b, 2), moved(b, 4), None, 2, 2, 0, 0, Some(4)).is_ok());
        // A split needs a scratch of splits x q_len x q_heads x (head_dim + 2) floats.
        let per = 2 * a.q_heads as usize * (a.head_dim as usize + 2);
        let split = |scratch| plan_attention_split(sliding, b, ring(b, 2), b, scratch, 2, 2, 0, 0, Some(4), 2);
        assert!(split(None).is_err());
        assert!(split(Some(buf(2 * per - 1))).is_err());
        assert_eq!(split(Some(buf(2 * per))).unwrap().len(), 3);
        assert!(plan_attention_split(sliding, b, ring(b, 2), b, None, 2, 2, 0, 0, Some(4), 0).is_err());
    }

    /// A paged ring: whole pages of the logical ring and of the pool, a table of one i32 per
    /// logical page, k and v sized by the pool (not the ring); the plan passes the table and the
    /// page size, and an unpaged plan null and 0.
    #[test]
    fn paged_attention_checks_its_pages() {
        let specs = supported_specs();
        let spec = specs.iter().find(|s| matches!(s.op, Op::Attention(a) if a.mask == MaskKind::Causal)).unwrap();
        let Op::Attention(a) = spec.op else { unreachable!() };
        let row = (a.kv_heads * a.head_dim) as usize;
        let (b, table) = (buf(1 << 20), Buf { ptr: 0x8000, len: 4 });
        // A ring of 64 rows = 4 pages of 16, in a pool of 10 pages.
        let pool = buf(160 * row);
        let paged = |pool: Buf, rows: usize, paging: Paging| {
            let kv = KvView { k: pool, v: pool, rows, paging: Some(paging) };
            plan_attention(spec, b, kv, b, None, 5, 40, 100, 70, None)
        };
        let good = Paging { table, page: 16, physical_rows: 160 };
        let plans = paged(pool, 64, good).unwrap();
        assert_eq!(plans[0].args[8..10], [Arg::Ptr(0x8000), Arg::I32(16)]);
        let unpaged = plan_attention(spec, b, ring(b, 64), b, None, 5, 40, 100, 70, None).unwrap();
        assert_eq!(unpaged[0].args[8..10], [Arg::Ptr(0), Arg::I32(0)]);
        // A pool is not a ring: k and v must hold the pool's rows, whatever the ring's length.
        assert!(paged(buf(160 * row - 1), 64, good).is_err());
        assert!(paged(pool, 64, Paging { physical_rows: 176, ..good }).is_err());
        assert!(paged(buf(64 * row), 64, Paging { physical_rows: 64, ..good }).is_ok());
        // Pages of 0 rows; a ring or a pool of partial pages.
        assert!(paged(pool, 64, Paging { page: 0, ..good }).is_err());
        assert!(paged(pool, 60, good).is_err());
        assert!(paged(pool, 64, Paging { physical_rows: 150, ..good }).is_err());
        // The table: one i32 per logical page, 4-byte aligned.
        assert!(paged(pool, 64, Paging { table: Buf { len: 3, ..table }, ..good }).is_err());
        assert!(paged(pool, 64, Paging { table: Buf { ptr: 0x8002, ..table }, ..good }).is_err());
        assert!(paged(pool, 48, Paging { table: Buf { len: 3, ..table }, ..good }).is_ok());
        // The ring still holds the keys read.
        assert!(paged(pool, 32, good).is_err());
    }

    /// The decoder's attention at a 4K context splits its keys in two (64 blocks per launch
    /// otherwise) and the scratch bound covers it; a 512-token prefill chunk does not split.
    #[test]
    fn attention_splits_the_canvas_passes_of_the_26b_model() {
        use dgemma_codegen::shapes::{attention_spec, ModelShape};
        let s = ModelShape::DIFFUSION_GEMMA_26B_A4B;
        let b = buf(1 << 40);
        for (l, mask, window) in [(s.full, MaskKind::Causal, None), (s.sliding, MaskKind::CausalSliding, Some(1024))] {
            let decoder = attention_spec(l.head_dim, s.heads, l.kv_heads, MaskKind::Bidirectional);
            let plans = plan_attention(&decoder, b, ring(b, 8192), b, Some(b), 256, 4096, 4096, 0, None).unwrap();
            // 256 queries x 16 / kv_heads packed rows per kv head, 64 per block.
            let tiles = 64 / l.kv_heads;
            let grids: Vec<_> = plans.iter().map(|p| p.grid).collect();
            assert_eq!(grids, [(tiles, l.kv_heads, 2), (tiles, l.kv_heads, 2), (tiles, l.kv_heads, 1)]);
            let need = 2 * 256 * 16 * (l.head_dim as usize + 2);
            assert!(attention_scratch_len(&decoder, 512).unwrap() >= need);
            assert!(plan_attention(&decoder, b, ring(b, 8192), b, None, 256, 4096, 4096, 0, None).is_err());
            let encoder = attention_spec(l.head_dim, s.heads, l.kv_heads, mask);
            let plans = plan_attention(&encoder, b, ring(b, 8192), b, None, 512, 1535, 4096, 3585, window).unwrap();
            assert_eq!(plans.len(), 1);
        }
    }

    #[test]
    fn router_plan_checks_its_buffers() {
        let spec = supported_specs().into_iter().find(|s| matches!(s.op, Op::Router(_))).unwrap();
        let Op::Router(r) = spec.op else { unreachable!() };
        let (h, e, k, t) = (r.hidden as usize, r.experts as usize, r.top_k as usize, 5usize);
        let ok = [buf(t * h), buf(h), buf(e * h), buf(e), buf(t * k), buf(t * k)];
        let plan =
            |b: [Buf; 6], eps: f32, root: f32| plan_router(&spec, b[0], b[1], b[2], b[3], b[4], b[5], t, eps, root);
        let good = plan(ok, 1e-6, 0.125).unwrap();
        assert_eq!(good.grid, (t as u32, 1, 1));
        assert_eq!(good.args[6..], [Arg::F32(1e-6), Arg::F32(0.125), Arg::I32(t as i32)]);
        // Each buffer one element short is refused.
        for i in 0..6 {
            let mut short = ok;
            short[i].len -= 1;
            assert!(plan(short, 1e-6, 0.125).is_err(), "buffer {i}");
        }
        assert!(plan(ok, f32::NAN, 0.125).is_err());
        assert!(plan(ok, -1.0, 0.125).is_err());
        assert!(plan(ok, 1e-6, 0.0).is_err());
        assert!(plan(ok, 1e-6, f32::INFINITY).is_err());
        // No tokens: an empty grid (run() then launches nothing).
        assert_eq!(plan_router(&spec, ok[0], ok[1], ok[2], ok[3], ok[4], ok[5], 0, 1e-6, 0.125).unwrap().grid.0, 0);
        let norm = supported_specs().into_iter().find(|s| matches!(s.op, Op::RmsNorm(_))).unwrap();
        assert!(plan_router(&norm, ok[0], ok[1], ok[2], ok[3], ok[4], ok[5], t, 1e-6, 0.125).is_err());
    }

    #[test]
    fn moe_plans_check_their_buffers() {
        let specs = supported_specs();
        let find = |pick: &dyn Fn(&Op) -> bool| *specs.iter().find(|s| pick(&s.op)).unwrap();
        let mma = |g: &GroupedGemm| matches!(g.engine, GemmEngine::Mma { .. });
        let up = find(&|o| {
            matches!(o, Op::GroupedGemm(g)
                if g.fuse == GemmFuse::Geglu && g.n == 1408 && g.weights == WeightFormat::Bf16 && mma(g))
        });
        let down = find(&|o| {
            matches!(o, Op::GroupedGemm(g)
                if g.fuse == GemmFuse::Down && g.n == 2816 && g.weights == WeightFormat::Bf16 && mma(g))
        });
        let down_simt = find(&|o| {
            matches!(o, Op::GroupedGemm(g)
                if g.fuse == GemmFuse::Down && g.n == 2816 && g.weights == WeightFormat::Bf16 && !mma(g))
        });
        let sort = find(&|o| matches!(o, Op::MoeSort(m) if m.experts == 128));
        let combine = find(&|o| matches!(o, Op::MoeCombine(m) if m.hidden == 2816));
        let (Op::GroupedGemm(gu), Op::GroupedGemm(gd)) = (up.op, down.op) else { unreachable!() };
        let (t, k, e, h, w) = (256usize, 8usize, 128usize, 2816usize, 704usize);
        let p = t * k;
        let routing = Routing { tokens: t, top_k: k, num_experts: e };

        // The sort: one block, up to MOE_SORT_MAX_PAIRS pairs.
        assert_eq!(plan_moe_sort(&sort, buf(p), buf(e + 1), buf(p), p).unwrap().grid, (1, 1, 1));
        assert!(plan_moe_sort(&sort, buf(p - 1), buf(e + 1), buf(p), p).is_err());
        assert!(plan_moe_sort(&sort, buf(p), buf(e), buf(p), p).is_err());
        assert!(plan_moe_sort(&sort, buf(p), buf(e + 1), buf(p - 1), p).is_err());
        let max = MOE_SORT_MAX_PAIRS;
        assert!(plan_moe_sort(&sort, buf(max), buf(e + 1), buf(max), max).is_ok());
        let err = plan_moe_sort(&sort, buf(max + 1), buf(e + 1), buf(max + 1), max + 1).unwrap_err();
        assert!(err.to_string().contains("at most 65536"), "{err}");

        // The GEMMs: grid (experts + the invalid bucket, column tiles), whatever the routing.
        let sorted = SortedPairs { offsets: buf(e + 1), sorted: buf(p) };
        let plan = plan_grouped_gemm_geglu(&up, buf(t * h), sorted, ExpertWeights::bf16(buf(e * 2 * w * h)), buf(p * w), routing).unwrap();
        assert_eq!(plan.grid, (e as u32 + 1, w.div_ceil(gu.cols as usize) as u32, 1));
        let plan = plan_grouped_gemm_down(&down, buf(p * w), sorted, ExpertWeights::bf16(buf(e * h * w)), buf(p * h), routing).unwrap();
        assert_eq!(plan.grid, (e as u32 + 1, h.div_ceil(gd.cols as usize) as u32, 1));
        let short = [
            (buf(t * h - 1), sorted, buf(e * 2 * w * h), buf(p * w)),
            (buf(t * h), SortedPairs { offsets: buf(e), ..sorted }, buf(e * 2 * w * h), buf(p * w)),
            (buf(t * h), SortedPairs { sorted: buf(p - 1), ..sorted }, buf(e * 2 * w * h), buf(p * w)),
            (buf(t * h), sorted, buf(e * 2 * w * h - 1), buf(p * w)),
            (buf(t * h), sorted, buf(e * 2 * w * h), buf(p * w - 1)),
        ];
        for (i, (x, s, wt, o)) in short.into_iter().enumerate() {
            assert!(plan_grouped_gemm_geglu(&up, x, s, ExpertWeights::bf16(wt), o, routing).is_err(), "buffer {i}");
        }
        // 16-byte loads: x and w must be aligned; the kinds must match.
        let moved = |b: Buf, bytes: u64| Buf { ptr: b.ptr + bytes, ..b };
        assert!(plan_grouped_gemm_geglu(&up, moved(buf(t * h), 8), sorted, ExpertWeights::bf16(buf(e * 2 * w * h)), buf(p * w), routing)
            .is_err());
        assert!(plan_grouped_gemm_down(&down, buf(p * w), sorted, ExpertWeights::bf16(moved(buf(e * h * w), 2)), buf(p * h), routing)
            .is_err());
        assert!(plan_grouped_gemm_down(&up, buf(p * w), sorted, ExpertWeights::bf16(buf(e * h * w)), buf(p * h), routing).is_err());
        assert!(plan_grouped_gemm_geglu(&down, buf(t * h), sorted, ExpertWeights::bf16(buf(e * 2 * w * h)), buf(p * w), routing).is_err());
        // The tensor-core kernels store bf16 pairs (out 4-byte aligned), the SIMT ones single bf16;
        // both grids are (experts + 1, column tiles of the spec's cols).
        let odd_out = moved(buf(p * h + 1), 2);
        assert!(plan_grouped_gemm_down(&down, buf(p * w), sorted, ExpertWeights::bf16(buf(e * h * w)), odd_out, routing).is_err());
        let Op::GroupedGemm(gs) = down_simt.op else { unreachable!() };
        let plan = plan_grouped_gemm_down(&down_simt, buf(p * w), sorted, ExpertWeights::bf16(buf(e * h * w)), odd_out, routing).unwrap();
        assert_eq!(plan.grid, (e as u32 + 1, h.div_ceil(gs.cols as usize) as u32, 1));
        // No pairs: nothing to launch.
        let none = Routing { tokens: 0, ..routing };
        assert_eq!(plan_grouped_gemm_down(&down, buf(1), sorted, ExpertWeights::bf16(buf(e * h * w)), buf(1), none).unwrap().grid.0, 0);

        // FP8 weights: the e4m3 kernels take codes (one byte each, 8-byte aligned) and one fp32
        // scale per expert row (4-byte aligned), and only they take scales.
        let fp8 = |s: KernelSpec| {
            let Op::GroupedGemm(g) = s.op else { unreachable!() };
            let target = GroupedGemm { weights: WeightFormat::E4m3, ..g };
            *specs.iter().find(|x| x.op == Op::GroupedGemm(target) && x.target == s.target).unwrap()
        };
        let (up8, down8) = (fp8(up), fp8(down));
        let plan = plan_grouped_gemm_geglu(&up8, buf(t * h), sorted, ExpertWeights::e4m3(buf(e * 2 * w * h), buf(e * 2 * w)), buf(p * w), routing)
            .unwrap();
        assert_eq!(plan.grid, (e as u32 + 1, w.div_ceil(gu.cols as usize) as u32, 1));
        assert_eq!(plan.args.len(), 9);
        assert_eq!(plan.args[4], Arg::Ptr(0x1000));
        let plan =
            plan_grouped_gemm_down(&down8, buf(p * w), sorted, ExpertWeights::e4m3(buf(e * h * w), buf(e * h)), buf(p * h), routing).unwrap();
        assert_eq!(plan.grid, (e as u32 + 1, h.div_ceil(gd.cols as usize) as u32, 1));
        let (codes, scales) = (buf(e * h * w), buf(e * h));
        for (i, (c, sc)) in [
            (buf(e * h * w - 1), scales),
            (codes, buf(e * h - 1)),
            (moved(codes, 4), scales),
            (codes, moved(scales, 2)),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(plan_grouped_gemm_down(&down8, buf(p * w), sorted, ExpertWeights::e4m3(c, sc), buf(p * h), routing).is_err(), "case {i}");
        }
        assert!(plan_grouped_gemm_down(&down8, buf(p * w), sorted, ExpertWeights::e4m3(moved(codes, 8), scales), buf(p * h), routing).is_ok());
        // Scales for a bf16 kernel, none for an e4m3 one: refused.
        assert!(plan_grouped_gemm_down(&down, buf(p * w), sorted, ExpertWeights::e4m3(buf(e * h * w), scales), buf(p * h), routing).is_err());
        assert!(plan_grouped_gemm_down(&down8, buf(p * w), sorted, ExpertWeights::bf16(buf(e * h * w)), buf(p * h), routing).is_err());
        assert!(plan_grouped_gemm_geglu(&down8, buf(t * h), sorted, ExpertWeights::e4m3(codes, scales), buf(p * w), routing).is_err());

        // The combine: one block per token and column tile.
        let plan = plan_moe_combine(&combine, buf(p * h), buf(p), buf(p), buf(t * h), routing).unwrap();
        assert_eq!(plan.grid, (t as u32, h.div_ceil(combine.block_threads() as usize) as u32, 1));
        assert!(plan_moe_combine(&combine, buf(p * h - 1), buf(p), buf(p), buf(t * h), routing).is_err());
        assert!(plan_moe_combine(&combine, buf(p * h), buf(p - 1), buf(p), buf(t * h), routing).is_err());
        assert!(plan_moe_combine(&combine, buf(p * h), buf(p), buf(p - 1), buf(t * h), routing).is_err());
        assert!(plan_moe_combine(&combine, buf(p * h), buf(p), buf(p), buf(t * h - 1), routing).is_err());
    }

    #[test]
    fn soft_embedding_plan_checks_its_buffers() {
        let spec =
            supported_specs().into_iter().find(|s| matches!(s.op, Op::SoftEmbedding(e) if e.hidden == 2816)).unwrap();
        let Op::SoftEmbedding(e) = spec.op else { unreachable!() };
        let (h, v, rows) = (e.hidden as usize, e.vocab as usize, 37usize);
        let x = ProcessedLogits { logits: buf(rows * v), cap: 30.0, params: Some(buf(SAMPLER_PARAMS_WORDS)) };
        let (np, nq) = soft_embedding_scratch(&spec, rows).unwrap();
        assert_eq!((np, nq), (rows * v, e.splits as usize * rows * h));
        let scratch = SoftEmbeddingScratch { probs: buf(np), partials: buf(nq) };
        let (stats, table, out) = (buf(2 * rows), buf(v * h), buf(rows * h));
        let plans = plan_soft_embedding(&spec, x, stats, table, scratch, out, 53.0, rows).unwrap();
        // Probabilities, GEMM, reduction; the GEMM's grid is (column tiles, row tiles, splits).
        let names: Vec<String> = plans.iter().map(|p| p.spec.kernel_name()).collect();
        assert_eq!(names, [e.probs_spec().kernel_name(), spec.kernel_name(), e.reduce_spec().kernel_name()]);
        assert_eq!(plans[1].grid, (h.div_ceil(e.block_n as usize) as u32, 1, e.splits));
        assert_eq!(plans[0].args[4], Arg::Ptr(scratch.probs.ptr));
        assert_eq!(plans[1].args[..3], [Arg::Ptr(scratch.probs.ptr), Arg::Ptr(table.ptr), Arg::Ptr(scratch.partials.ptr)]);
        assert_eq!(plans[2].args[..2], [Arg::Ptr(scratch.partials.ptr), Arg::Ptr(out.ptr)]);
        let plan = |x: ProcessedLogits, stats: Buf, table: Buf, scratch: SoftEmbeddingScratch, out: Buf, scale: f32| {
            plan_soft_embedding(&spec, x, stats, table, scratch, out, scale, rows)
        };
        assert!(plan(ProcessedLogits { logits: buf(rows * v - 1), ..x }, stats, table, scratch, out, 53.0).is_err());
        let short_params = ProcessedLogits { params: Some(buf(SAMPLER_PARAMS_WORDS - 1)), ..x };
        assert!(plan(short_params, stats, table, scratch, out, 53.0).is_err());
        assert!(plan(ProcessedLogits { cap: -1.0, ..x }, stats, table, scratch, out, 53.0).is_err());
        assert!(plan(x, buf(2 * rows - 1), table, scratch, out, 53.0).is_err());
        assert!(plan(x, stats, buf(v * h - 1), scratch, out, 53.0).is_err());
        assert!(plan(x, stats, table, SoftEmbeddingScratch { probs: buf(np - 1), ..scratch }, out, 53.0).is_err());
        assert!(plan(x, stats, table, SoftEmbeddingScratch { partials: buf(nq - 1), ..scratch }, out, 53.0).is_err());
        assert!(plan(x, stats, table, scratch, buf(rows * h - 1), 53.0).is_err());
        assert!(plan(x, stats, table, scratch, out, f32::NAN).is_err());
        // 16-byte loads of the logits, pr and the table; paired bf16 stores of the output.
        let moved = |b: Buf, bytes: u64| Buf { ptr: b.ptr + bytes, ..b };
        assert!(plan(ProcessedLogits { logits: moved(x.logits, 8), ..x }, stats, table, scratch, out, 53.0).is_err());
        assert!(plan(x, stats, moved(table, 8), scratch, out, 53.0).is_err());
        assert!(plan(x, stats, table, SoftEmbeddingScratch { probs: moved(scratch.probs, 8), ..scratch }, out, 53.0).is_err());
        assert!(plan(x, stats, table, scratch, moved(out, 2), 53.0).is_err());
        assert!(plan(x, stats, table, scratch, moved(out, 4), 53.0).is_ok());
        // Only the GEMM's spec plans the whole soft embedding.
        let probs = e.probs_spec();
        assert!(plan_soft_embedding(&probs, x, stats, table, scratch, out, 53.0, rows).is_err());
        assert!(soft_embedding_scratch(&probs, rows).is_err());
        assert!(plan_embedding(&spec, buf(1), table, out, 53.0, 1).is_err());
    }

    #[test]
    fn sampler_plans_check_their_buffers() {
        let g = supported_specs().into_iter().find(|s| matches!(s.op, Op::GumbelSample(g) if g.vocab == 320)).unwrap();
        let p = buf(SAMPLER_PARAMS_WORDS);
        let x = ProcessedLogits { logits: buf(5 * 320), cap: 30.0, params: Some(p) };
        let plan = plan_gumbel_sample(&g, x, buf(5), 5).unwrap();
        assert_eq!(plan.grid, (5, 1, 1));
        let short_params = ProcessedLogits { params: Some(buf(SAMPLER_PARAMS_WORDS - 1)), ..x };
        assert!(plan_gumbel_sample(&g, short_params, buf(5), 5).is_err());
        assert!(plan_gumbel_sample(&g, ProcessedLogits { params: None, ..x }, buf(5), 5).is_err());
        assert!(plan_gumbel_sample(&g, ProcessedLogits { logits: buf(5 * 320 - 1), ..x }, buf(5), 5).is_err());
        assert!(plan_gumbel_sample(&g, x, buf(4), 5).is_err());

        let c = supported_specs().into_iter().find(|s| matches!(s.op, Op::SamplerCanvas(_))).unwrap();
        let Op::SamplerCanvas(sc) = c.op else { unreachable!() };
        let n = 16usize;
        let ok = [p, buf(n), buf(n), buf(n), buf(n), buf(n), buf(n + 1), buf(SAMPLER_STATUS_WORDS)];
        let plan = |b: [Buf; 8], vocab: usize, canvas: usize| {
            plan_sampler_canvas(&c, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], vocab, canvas)
        };
        let good = plan(ok, 512, n).unwrap();
        assert_eq!(good.grid, (1, 1, 1));
        assert_eq!(good.args[8..], [Arg::I32(512), Arg::I32(n as i32)]);
        for i in 0..8 {
            let mut short = ok;
            short[i].len -= 1;
            assert!(plan(short, 512, n).is_err(), "buffer {i}");
        }
        assert!(plan(ok, 0, n).is_err());
        assert!(plan(ok, 512, 0).is_err());
        let big = [buf(1 << 20); 8];
        assert!(plan(big, 512, sc.max_canvas as usize).is_ok());
        assert!(plan(big, 512, sc.max_canvas as usize + 1).is_err());
        assert!(plan_gumbel_sample(&c, ProcessedLogits { logits: p, cap: 0.0, params: Some(p) }, p, 1).is_err());
    }

    #[test]
    fn sampler_params_words() {
        let p = SamplerParams {
            seed: 0x1234_5678_9abc_def0,
            block: 3,
            step: 7,
            temperature: 0.5,
            entropy_bound: 0.1,
            confidence_threshold: f32::NEG_INFINITY,
            stability_threshold: 1,
        };
        assert_eq!(
            p.to_words(),
            [0x9abc_def0, 0x1234_5678, 3, 7, 0.5f32.to_bits(), 0.1f32.to_bits(), f32::NEG_INFINITY.to_bits(), 1]
        );
        let s = SamplerStatus::from_words([1, 9, 0.25f32.to_bits(), 0]);
        assert_eq!(s, SamplerStatus { finished: true, accepted: 9, mean_entropy: 0.25, error: 0 });
    }

    #[test]
    fn read_bandwidth_plan_checks_its_buffers() {
        let spec = dgemma_codegen::shapes::read_bandwidth_spec();
        let Op::ReadBandwidth(r) = spec.op else { unreachable!() };
        let per_block = (r.threads * r.unroll) as usize;
        let s = READ_BANDWIDTH_SENTINEL;
        let plan = plan_read_bandwidth(&spec, buf(4 * 10 * per_block), 10 * per_block, s, buf(1), 65_536).unwrap();
        assert_eq!(plan.grid, (10, 1, 1));
        assert_eq!(plan.block, r.threads);
        assert_eq!(plan.args[1..3], [Arg::I64(10 * per_block as i64), Arg::I32(s as i32)]);
        // The grid is capped at max_blocks (the loop strides over the rest) and rounds up.
        assert_eq!(plan_read_bandwidth(&spec, buf(1 << 30), 1 << 28, s, buf(1), 528).unwrap().grid.0, 528);
        assert_eq!(plan_read_bandwidth(&spec, buf(8), 1, s, buf(1), 528).unwrap().grid.0, 1);
        // Short buffers, a misaligned source, a zero sentinel or no blocks are refused.
        assert!(plan_read_bandwidth(&spec, buf(4 * 100 - 1), 100, s, buf(1), 8).is_err());
        assert!(plan_read_bandwidth(&spec, buf(400), 100, s, buf(0), 8).is_err());
        assert!(plan_read_bandwidth(&spec, Buf { ptr: 0x1004, len: 400 }, 100, s, buf(1), 8).is_err());
        assert!(plan_read_bandwidth(&spec, buf(400), 100, 0, buf(1), 8).is_err());
        assert!(plan_read_bandwidth(&spec, buf(400), 100, s, buf(1), 0).is_err());
        let softcap = KernelSpec::portable(Op::Softcap);
        assert!(plan_read_bandwidth(&softcap, buf(400), 100, s, buf(1), 8).is_err());
    }

    #[test]
    fn signature_mismatch_is_caught() {
        let spec = KernelSpec::portable(Op::Softcap);
        let plan = LaunchPlan {
            spec,
            grid: (1, 1, 1),
            block: 256,
            args: vec![Arg::Ptr(1), Arg::Ptr(2), Arg::F32(30.0), Arg::I32(5)],
        };
        assert!(plan.check_signature().is_err());
        let plan = LaunchPlan { args: vec![Arg::Ptr(1), Arg::Ptr(2), Arg::F32(30.0)], ..plan };
        assert!(plan.check_signature().is_err());
    }
}
