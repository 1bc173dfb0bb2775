//! The KV cache of one sequence, with transformers' DynamicCache retention.
//!
//! Full-attention layers keep every token. Sliding layers keep only the last `window - 1`
//! tokens (`DynamicSlidingWindowLayer`): that is all a later query can see, since a query at
//! position q sees keys in `(q - window, q]`. Keys are stored after k_norm and RoPE, values
//! after v_norm, both as `[tokens, kv_heads, head_dim]`.

/// One layer's cached keys and values.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// Absolute position of the first stored token.
    pub start: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    /// Floats per token (`kv_heads * head_dim`).
    pub width: usize,
    /// Most tokens kept (`Some(window - 1)` on sliding layers).
    pub keep: Option<usize>,
}

impl LayerCache {
    pub fn new(width: usize, keep: Option<usize>) -> LayerCache {
        LayerCache { start: 0, keys: Vec::new(), values: Vec::new(), width, keep }
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.keys.len() / self.width
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Appends tokens (at the positions following the stored ones) and evicts what the
    /// window no longer needs.
    pub fn append(&mut self, keys: &[f32], values: &[f32]) {
        assert_eq!(keys.len() % self.width, 0);
        assert_eq!(keys.len(), values.len());
        self.keys.extend_from_slice(keys);
        self.values.extend_from_slice(values);
        if let Some(keep) = self.keep {
            let len = self.len();
            if len > keep {
                let drop = len - keep;
                self.keys.drain(..drop * self.width);
                self.values.drain(..drop * self.width);
                self.start += drop;
            }
        }
    }

    /// Keys and values of the cache followed by `new` ones, with the position of the first.
    pub fn with_new(&self, keys: &[f32], values: &[f32]) -> (Vec<f32>, Vec<f32>, usize) {
        let mut k = Vec::with_capacity(self.keys.len() + keys.len());
        k.extend_from_slice(&self.keys);
        k.extend_from_slice(keys);
        let mut v = Vec::with_capacity(self.values.len() + values.len());
        v.extend_from_slice(&self.values);
        v.extend_from_slice(values);
        (k, v, self.start)
    }
}

/// Every layer's cache plus the sequence length encoded so far.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Tokens encoded so far: the position of the next token.
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: Vec<LayerCache>) -> KvCache {
        KvCache { layers, len: 0 }
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = LayerCache::new(l.width, l.keep);
        }
        self.len = 0;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.keys.len() + l.values.len()) * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_layer_keeps_window_minus_one() {
        let mut c = LayerCache::new(2, Some(3));
        c.append(&[0., 0., 1., 1.], &[0., 0., 1., 1.]);
        assert_eq!((c.len(), c.start), (2, 0));
        c.append(&[2., 2., 3., 3., 4., 4.], &[2., 2., 3., 3., 4., 4.]);
        assert_eq!((c.len(), c.start), (3, 2));
        assert_eq!(c.keys, vec![2., 2., 3., 3., 4., 4.]);
        let (k, _, p0) = c.with_new(&[5., 5.], &[5., 5.]);
        assert_eq!((k.len(), p0), (8, 2));
    }

    #[test]
    fn full_layer_keeps_everything() {
        let mut c = LayerCache::new(1, None);
        for i in 0..100 {
            c.append(&[i as f32], &[i as f32]);
        }
        assert_eq!((c.len(), c.start), (100, 0));
    }
}
