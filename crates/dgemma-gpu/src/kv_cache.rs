//! The KV cache: each sequence's sliding-layer rings, and the full layers' pages from a pool
//! shared by every sequence.
//!
//! Every layer's cache is a ring of logical rows, `[rows, kv_heads * head_dim]` bf16, holding the
//! key (value) of absolute position p in logical row `p % rows` (attention reads it that way,
//! csrc/attention.cuh):
//!
//! * **Sliding layers** only ever read the last `window - 1` cached positions plus the pass's own
//!   tokens, so a sequence keeps one fixed ring per sliding layer of
//!   `rows = min(context, window - 1 + max_tokens)` rows: a pass of up to `max_tokens` tokens
//!   overwrites only positions older than any key it, or a later pass, reads. Logical row =
//!   physical row of the sequence's own buffer.
//! * **Full layers** read every position, so their memory grows with the sequence. It comes from
//!   a [`KvPool`] of fixed-size pages (`page` positions of every full layer's K and V) shared by
//!   all sequences, as in vLLM's paged attention: a sequence holds a page table, logical page i
//!   (positions `i * page .. (i + 1) * page`) living in physical page `pages[i]` of the pool's
//!   buffers, on the host (to plan copies) and on the device (for attention, `ops::Paging`). It
//!   takes pages as its cache grows ([`KvCache::grow`]) and gives them all back when it is
//!   emptied ([`KvCache::release`]), so short and long requests share the memory without
//!   fragmenting it, and a server admits a request when the pool has its pages
//!   ([`KvPool::free_pages`]). The logical ring of a full layer is the pages held
//!   (`rows = pages x page`), which every position of the sequence stays below, so it never wraps.
//!
//! A pass writes its new tokens' K/V at logical rows `pos0 % rows ..`; [`KvCache::placement`]
//! says where they land physically: one contiguous run (written in place), or several (the ring's
//! end, a page boundary between non-adjacent pages), which the planner fills by copies from
//! staging rows. The pool hands out its lowest free pages, so a sequence's pages are mostly
//! adjacent and most passes are written in place.

use std::collections::BTreeSet;

use dgemma_cuda::ops::{KvView, Paging};
use dgemma_cuda::{Executor, Region};
use dgemma_model::config::TextConfig;
use dgemma_model::error::Error;

use crate::error::{cuda, Result, NAME};

/// Positions per page of the full layers' pool, unless the options say otherwise: one canvas of
/// the released models (5.2 MB of K and V over the 26B model's five full layers).
pub const DEFAULT_PAGE: usize = 256;

fn is_full(cfg: &TextConfig, layer: usize) -> bool {
    cfg.layer(layer).sliding_window.is_none()
}

/// The full layers' K/V pages, shared by every sequence of a backend.
pub struct KvPool {
    /// Positions per page.
    pub page: usize,
    /// Pages in the pool.
    pub pages: usize,
    /// Per layer, the K and V buffers of its pages (`[pages * page, kv width]` bf16) on full
    /// layers; `None` on sliding layers.
    k: Vec<Option<Region>>,
    v: Vec<Option<Region>>,
    /// Pages no sequence holds, handed out lowest first.
    free: BTreeSet<u32>,
}

impl KvPool {
    /// A pool of `pages` pages of `page` positions (no allocation when the model has no full
    /// layer or `pages` is 0).
    pub fn new(cfg: &TextConfig, exec: &mut dyn Executor, page: usize, pages: usize) -> Result<KvPool> {
        if page == 0 || page > i32::MAX as usize || pages > i32::MAX as usize / page {
            return Err(Error::InvalidArgument(format!("a KV pool of {pages} pages of {page} positions")));
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for i in 0..cfg.num_hidden_layers {
            if is_full(cfg, i) && pages > 0 {
                let bytes = 2 * pages * page * cfg.layer(i).kv_dim();
                k.push(Some(exec.alloc(bytes, &format!("layer {i} key pages ({pages} pages)")).map_err(cuda)?));
                v.push(Some(exec.alloc(bytes, &format!("layer {i} value pages ({pages} pages)")).map_err(cuda)?));
            } else {
                k.push(None);
                v.push(None);
            }
        }
        Ok(KvPool { page, pages, k, v, free: (0..pages as u32).collect() })
    }

    /// Bytes of one page: K and V of `page` positions over every full layer.
    pub fn page_bytes(cfg: &TextConfig, page: usize) -> usize {
        (0..cfg.num_hidden_layers).filter(|&i| is_full(cfg, i)).map(|i| 2 * 2 * page * cfg.layer(i).kv_dim()).sum()
    }

    /// Pages a cache of `positions` positions holds.
    pub fn pages_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.page)
    }

    /// Pages no sequence holds.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// `n` free pages, lowest first; out of memory (and nothing taken) when the pool has fewer.
    fn take(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(Error::OutOfMemory {
                backend: NAME.into(),
                msg: format!(
                    "the KV page pool has {} free pages of {} positions, {n} more are needed (the pool holds {} pages \
                     shared by every sequence; GpuOptions::kv_pages sizes it)",
                    self.free.len(),
                    self.page,
                    self.pages
                ),
            });
        }
        Ok((0..n).map(|_| self.free.pop_first().expect("counted above")).collect())
    }

    fn give_back(&mut self, pages: &[u32]) {
        for &p in pages {
            let fresh = self.free.insert(p);
            debug_assert!(fresh, "page {p} given back twice");
        }
    }
}

/// Where `len` consecutive new rows of a pass land: pass rows `row..row + len` go to physical
/// rows `phys..phys + len` of the layer's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub row: usize,
    pub phys: usize,
    pub len: usize,
}

/// One sequence's cache: its sliding rings, and the pages it holds of the pool's full layers.
pub struct KvCache {
    /// Positions the sequence may ever reach (its sliding rings and page table are sized for it).
    pub context: usize,
    /// Positions addressable now: `context` without full layers, else the pages held x `page`
    /// (at most `context`).
    pub capacity: usize,
    /// Logical rows of each layer's ring: the sliding rings' fixed rows; on full layers the pages
    /// held x `page`.
    pub rows: Vec<usize>,
    /// Each layer's buffers: the sequence's own ring (sliding), the pool's pages (full).
    pub k: Vec<Region>,
    pub v: Vec<Region>,
    /// Positions per page, and the physical rows of the pool's buffers.
    page: usize,
    pool_rows: usize,
    /// The pages held, in position order, and their device copy (i32 `[context / page]`).
    pages: Vec<u32>,
    table: Option<Region>,
    full: Vec<bool>,
}

impl KvCache {
    /// An empty cache for up to `context` positions and passes of up to `max_tokens` tokens: the
    /// sliding rings and the page table are allocated, no page is taken yet.
    pub fn new(cfg: &TextConfig, exec: &mut dyn Executor, pool: &KvPool, context: usize, max_tokens: usize) -> Result<KvCache> {
        let full: Vec<bool> = (0..cfg.num_hidden_layers).map(|i| is_full(cfg, i)).collect();
        let (mut k, mut v, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &is_full) in full.iter().enumerate() {
            if is_full {
                let none = || Error::InvalidArgument("a KV pool without pages for a model with full layers".into());
                k.push(pool.k[i].ok_or_else(none)?);
                v.push(pool.v[i].ok_or_else(none)?);
                rows.push(0);
            } else {
                let r = Self::layer_rows(cfg, i, context, max_tokens);
                let bytes = 2 * r * cfg.layer(i).kv_dim();
                k.push(exec.alloc(bytes, &format!("layer {i} key ring")).map_err(cuda)?);
                v.push(exec.alloc(bytes, &format!("layer {i} value ring")).map_err(cuda)?);
                rows.push(r);
            }
        }
        let paged = full.iter().any(|&f| f);
        let table = match paged {
            true => Some(exec.alloc(4 * pool.pages_for(context), "KV page table").map_err(cuda)?),
            false => None,
        };
        Ok(KvCache {
            context,
            capacity: if paged { 0 } else { context },
            rows,
            k,
            v,
            page: pool.page,
            pool_rows: pool.pages * pool.page,
            pages: Vec::new(),
            table,
            full,
        })
    }

    /// Makes positions `0..positions` addressable, taking pages from `pool` as needed (out of
    /// memory when it has too few: the cache is unchanged). True when pages were taken (plans
    /// that baked the page list must be redone).
    pub fn grow(&mut self, exec: &mut dyn Executor, pool: &mut KvPool, positions: usize) -> Result<bool> {
        if positions > self.context {
            return Err(Error::InvalidInput(format!(
                "position {positions} is past the {} positions this sequence's cache was sized for",
                self.context
            )));
        }
        let Some(table) = self.table else { return Ok(false) };
        let need = pool.pages_for(positions);
        if need <= self.pages.len() {
            return Ok(false);
        }
        let new = pool.take(need - self.pages.len())?;
        let first = self.pages.len();
        let as_i32: Vec<i32> = new.iter().map(|&p| p as i32).collect();
        let dst = table.sub(4 * first, 4 * new.len()).map_err(cuda)?;
        if let Err(e) = exec.upload_bytes(dst, bytemuck::cast_slice(&as_i32)) {
            pool.give_back(&new);
            return Err(cuda(e));
        }
        self.pages.extend(new);
        self.set_capacity();
        Ok(true)
    }

    /// Gives every page back to `pool` (the cache is empty afterwards).
    pub fn release(&mut self, pool: &mut KvPool) {
        pool.give_back(&self.pages);
        self.pages.clear();
        if self.table.is_some() {
            self.set_capacity();
        }
    }

    fn set_capacity(&mut self) {
        let held = self.pages.len() * self.page;
        self.capacity = held.min(self.context);
        for (r, &f) in self.rows.iter_mut().zip(&self.full) {
            if f {
                *r = held;
            }
        }
    }

    /// Pages held.
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Layer `layer`'s K and V as attention reads them.
    pub fn view(&self, layer: usize) -> Result<KvView> {
        let (k, v, rows) = (self.k[layer].b16(), self.v[layer].b16(), self.rows[layer]);
        let paging = match (self.full[layer], self.table) {
            (true, Some(t)) => Some(Paging {
                table: t.sub(0, 4 * self.pages.len()).map_err(cuda)?.b32(),
                page: self.page,
                physical_rows: self.pool_rows,
            }),
            _ => None,
        };
        Ok(KvView { k, v, rows, paging })
    }

    /// Where the K/V of `tokens` new tokens at positions `pos0..` land in layer `layer`'s
    /// buffers: logical rows `pos0 % rows ..` (wrapping at the ring's end), through the page
    /// table on full layers, as maximal contiguous runs in pass-row order.
    pub fn placement(&self, layer: usize, pos0: usize, tokens: usize) -> Vec<Piece> {
        let rows = self.rows[layer];
        let paged = self.full[layer] && self.table.is_some();
        let mut out: Vec<Piece> = Vec::new();
        let mut done = 0;
        while done < tokens {
            let lr = (pos0 + done) % rows;
            let mut len = (tokens - done).min(rows - lr);
            let phys = if paged {
                len = len.min(self.page - lr % self.page);
                self.pages[lr / self.page] as usize * self.page + lr % self.page
            } else {
                lr
            };
            match out.last_mut() {
                Some(p) if p.phys + p.len == phys => p.len += len,
                _ => out.push(Piece { row: done, phys, len }),
            }
            done += len;
        }
        out
    }

    /// Rows of sliding layer `layer`'s ring (`context` on full layers, where the pages decide):
    /// the `window - 1` cached positions a pass may read plus the `max_tokens` it may write.
    pub fn layer_rows(cfg: &TextConfig, layer: usize, context: usize, max_tokens: usize) -> usize {
        match cfg.layer(layer).sliding_window {
            Some(w) => context.min(w.saturating_sub(1) + max_tokens),
            None => context,
        }
    }

    /// Bytes of a sequence's own sliding-layer rings (what [`KvCache::new`] allocates besides
    /// its page table).
    pub fn ring_bytes(cfg: &TextConfig, context: usize, max_tokens: usize) -> usize {
        (0..cfg.num_hidden_layers)
            .filter(|&i| !is_full(cfg, i))
            .map(|i| 2 * 2 * Self::layer_rows(cfg, i, context, max_tokens) * cfg.layer(i).kv_dim())
            .sum()
    }

    /// Bytes of the page table [`KvCache::new`] allocates (none without full layers).
    pub fn table_bytes(cfg: &TextConfig, context: usize, page: usize) -> usize {
        match (0..cfg.num_hidden_layers).any(|i| is_full(cfg, i)) {
            true => 4 * context.div_ceil(page),
            false => 0,
        }
    }

    /// Bytes of K and V of a sequence of `context` positions (all its pages taken) for passes of
    /// up to `max_tokens` tokens, over all layers (pages rounded to whole pages aside).
    pub fn bytes(cfg: &TextConfig, context: usize, max_tokens: usize) -> usize {
        (0..cfg.num_hidden_layers)
            .map(|i| 2 * 2 * Self::layer_rows(cfg, i, context, max_tokens) * cfg.layer(i).kv_dim())
            .sum()
    }

    /// Bytes of K and V this cache holds now: its sliding rings and its pages.
    pub fn held_bytes(&self) -> usize {
        let mut bytes = 0;
        for i in 0..self.rows.len() {
            bytes += match self.full[i] {
                true => 2 * self.pages.len() * self.page * (self.k[i].bytes / self.pool_rows.max(1)),
                false => self.k[i].bytes + self.v[i].bytes,
            };
        }
        bytes
    }

    /// Bytes of cached K and V a pass reads with `len` positions in the cache (its own new
    /// tokens' K/V not counted): every position on full layers, the last `window - 1` on
    /// sliding layers.
    pub fn bytes_attended(cfg: &TextConfig, len: usize) -> usize {
        (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = cfg.layer(i);
                let read = l.sliding_window.map_or(len, |w| len.min(w.saturating_sub(1)));
                2 * 2 * read * l.kv_dim()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dgemma_model::config::ModelConfig;

    fn config_26b() -> TextConfig {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../reference/configs/diffusiongemma-26B-A4B/config.json");
        ModelConfig::from_file(path).unwrap().text
    }

    /// The 26B-A4B model's cache (25 sliding layers of window 1024 and 8 x 256 K/V, 5 full
    /// layers of 2 x 512 K = V) with the default 512-token prefill chunk: every sliding layer
    /// holds a 1535-row ring whatever the context, so 128K positions need about 3 GB, not 29.6;
    /// a page of 256 positions of the full layers is 5.2 MB.
    #[test]
    fn the_26b_cache_sizes() {
        let cfg = config_26b();
        let max_tokens = 512;
        let sliding: Vec<usize> = (0..cfg.num_hidden_layers).filter(|&i| cfg.layer(i).sliding_window.is_some()).collect();
        assert_eq!((sliding.len(), cfg.num_hidden_layers), (25, 30));
        for &i in &sliding {
            assert_eq!(KvCache::layer_rows(&cfg, i, 131_072, max_tokens), 1535);
            assert_eq!(KvCache::layer_rows(&cfg, i, 1000, max_tokens), 1000);
        }
        let sliding_layer = 2 * 2 * 1535 * 2048; // K and V, bf16, 8 heads x 256
        let full_per_position = 2 * 2 * 1024; // K and V, bf16, 2 heads x 512
        assert_eq!(sliding_layer, 12_574_720);
        for ctx in [4096, 32_768, 131_072, 131_584] {
            let want = 25 * sliding_layer + 5 * full_per_position * ctx;
            assert_eq!(KvCache::bytes(&cfg, ctx, max_tokens), want, "context {ctx}");
        }
        assert_eq!(KvCache::bytes(&cfg, 131_072, max_tokens), 2_998_722_560);
        assert_eq!(KvPool::page_bytes(&cfg, 256), 5 * full_per_position * 256);
        // A pass at 32K reads every position of the full layers, 1023 of the sliding ones.
        assert_eq!(KvCache::bytes_attended(&cfg, 32_768), 25 * 4 * 1023 * 2048 + 5 * 4 * 32_768 * 1024);
    }

    /// A host-only cache over two layers (a sliding ring of `ring` rows, a full layer paged
    /// through `pages`), for the placement arithmetic.
    fn cache(ring: usize, page: usize, pages: &[u32], pool_pages: usize) -> KvCache {
        let r = |bytes| Region { ptr: 0x1000, bytes };
        let mut c = KvCache {
            context: 1 << 20,
            capacity: 0,
            rows: vec![ring, 0],
            k: vec![r(ring), r(pool_pages * page)],
            v: vec![r(ring), r(pool_pages * page)],
            page,
            pool_rows: pool_pages * page,
            pages: pages.to_vec(),
            table: Some(r(4 * 64)),
            full: vec![false, true],
        };
        c.set_capacity();
        c
    }

    #[test]
    fn placement_follows_the_ring_and_the_pages() {
        let p = |row, phys, len| Piece { row, phys, len };
        // Pages 3, 4 adjacent, then 9, then 0: a 40-token pass at position 10 with 16-row pages
        // covers logical rows 10..50: page 0 rows 10..16 and page 1 (adjacent: one run), then
        // page 2 (page 9), then page 3 (page 0).
        let c = cache(24, 16, &[3, 4, 9, 0], 10);
        assert_eq!(c.capacity, 64);
        assert_eq!(c.rows, vec![24, 64]);
        assert_eq!(c.placement(1, 10, 40), vec![p(0, 58, 22), p(22, 144, 16), p(38, 0, 2)]);
        // Within one page: one run.
        assert_eq!(c.placement(1, 33, 5), vec![p(0, 145, 5)]);
        // The sliding ring wraps at its end: rows 20..24, then 0..6.
        assert_eq!(c.placement(0, 44, 10), vec![p(0, 20, 4), p(4, 0, 6)]);
        assert_eq!(c.placement(0, 48, 10), vec![p(0, 0, 10)]);
        // Every token lands exactly once, at its own logical row's physical row.
        for pos0 in 0..60 {
            for tokens in 1..=(64 - pos0).min(24) {
                let runs = c.placement(1, pos0, tokens);
                let mut next = 0;
                for r in &runs {
                    assert_eq!(r.row, next);
                    for t in 0..r.len {
                        let lr = pos0 + r.row + t;
                        assert_eq!(r.phys + t, c.pages[lr / 16] as usize * 16 + lr % 16);
                    }
                    next += r.len;
                }
                assert_eq!(next, tokens);
            }
        }
    }

    #[test]
    fn the_pool_hands_out_its_lowest_pages_and_takes_them_back() {
        let mut pool = KvPool { page: 16, pages: 6, k: vec![], v: vec![], free: (0..6).collect() };
        let a = pool.take(2).unwrap();
        let b = pool.take(3).unwrap();
        assert_eq!((a.as_slice(), b.as_slice(), pool.free_pages()), (&[0, 1][..], &[2, 3, 4][..], 1));
        let e = pool.take(2).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        assert!(e.to_string().contains("1 free pages"), "{e}");
        assert_eq!(pool.free_pages(), 1, "a refused request takes nothing");
        pool.give_back(&a);
        assert_eq!(pool.take(3).unwrap(), vec![0, 1, 5]);
        assert_eq!(pool.pages_for(0), 0);
        assert_eq!(pool.pages_for(17), 2);
    }
}
