//! `torch.topk(largest=True, sorted=True)` as torch's CPU kernel computes it, ties included.
//!
//! The MoE router picks its experts with `torch.topk` over float32 probabilities. In a bf16
//! run the router logits are bf16, so probabilities tie often, and when a tie straddles the
//! k-th place the choice decides which expert runs. torch's CPU kernel (ATen `TopKImpl.h`)
//! breaks no ties itself: for `k * 64 > n` (every router shape: 8 of 128 experts) it calls
//! `std::nth_element(q, q + k - 1, q.end(), a > b)` on (value, index) pairs and then
//! `std::sort(q, q + k - 1, a > b)`, so the order is whatever libstdc++'s introselect and
//! insertion sort leave. This module reproduces those algorithms step for step, so the CPU
//! backend selects the same experts as transformers on the CPU. (For `k * 64 <= n` torch uses
//! `std::partial_sort`, a heap, which no router shape reaches; that case falls back to a
//! sort with lower indices first and says so in its doc.)

/// Indices of the `k` largest values, in the order torch's CPU topk returns them.
pub fn topk_torch_cpu(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    assert!(k >= 1 && k <= n, "topk: k = {k} out of 1..={n}");
    let mut q: Vec<(f32, usize)> = values.iter().copied().enumerate().map(|(i, v)| (v, i)).collect();
    // NaN sorts first ("top"), as in torch's comparator.
    let gt = |x: &(f32, usize), y: &(f32, usize)| (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0;
    if k * 64 <= n {
        q.sort_by(|a, b| if gt(a, b) { std::cmp::Ordering::Less } else if gt(b, a) { std::cmp::Ordering::Greater } else { a.1.cmp(&b.1) });
    } else {
        nth_element(&mut q, k - 1, &gt);
        insertion_sort(&mut q[..k - 1], &gt);
    }
    q[..k].iter().map(|&(_, i)| i).collect()
}

/// libstdc++ `std::__introselect` with `depth_limit = 2 * floor(log2(n))`.
fn nth_element<T: Copy>(v: &mut [T], nth: usize, comp: &impl Fn(&T, &T) -> bool) {
    let (mut first, mut last) = (0usize, v.len());
    if first == last || nth == last {
        return;
    }
    let mut depth = 2 * (usize::BITS - 1 - v.len().leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            heap_select(v, first, nth + 1, last, comp);
            v.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(v, first, last, comp);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut v[first..last], comp);
}

/// libstdc++ `std::__move_median_to_first` + `std::__unguarded_partition`.
fn unguarded_partition_pivot<T: Copy>(v: &mut [T], first: usize, last: usize, comp: &impl Fn(&T, &T) -> bool) -> usize {
    let mid = first + (last - first) / 2;
    let (a, b, c) = (first + 1, mid, last - 1);
    let median = if comp(&v[a], &v[b]) {
        if comp(&v[b], &v[c]) {
            b
        } else if comp(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if comp(&v[a], &v[c]) {
        a
    } else if comp(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(first, median);
    let pivot = first;
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while comp(&v[lo], &v[pivot]) {
            lo += 1;
        }
        hi -= 1;
        while comp(&v[pivot], &v[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        v.swap(lo, hi);
        lo += 1;
    }
}

/// libstdc++ `std::__insertion_sort` (with `__unguarded_linear_insert`).
fn insertion_sort<T: Copy>(v: &mut [T], comp: &impl Fn(&T, &T) -> bool) {
    for i in 1..v.len() {
        let val = v[i];
        if comp(&val, &v[0]) {
            v.copy_within(0..i, 1);
            v[0] = val;
        } else {
            let mut j = i;
            while comp(&val, &v[j - 1]) {
                v[j] = v[j - 1];
                j -= 1;
            }
            v[j] = val;
        }
    }
}

/// libstdc++ `std::__heap_select(first, middle, last)`: keeps the "largest" `middle - first`
/// elements (by `comp`) in a heap at the front.
fn heap_select<T: Copy>(v: &mut [T], first: usize, middle: usize, last: usize, comp: &impl Fn(&T, &T) -> bool) {
    let len = middle - first;
    // std::__make_heap
    if len >= 2 {
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[first + parent];
            adjust_heap(v, first, parent, len, value, comp);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    for i in middle..last {
        if comp(&v[i], &v[first]) {
            // std::__pop_heap(first, middle, i)
            let value = v[i];
            v[i] = v[first];
            adjust_heap(v, first, 0, len, value, comp);
        }
    }
}

/// libstdc++ `std::__adjust_heap` followed by `std::__push_heap`.
fn adjust_heap<T: Copy>(v: &mut [T], first: usize, mut hole: usize, len: usize, value: T, comp: &impl Fn(&T, &T) -> bool) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if comp(&v[first + child], &v[first + child - 1]) {
            child -= 1;
        }
        v[first + hole] = v[first + child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[first + hole] = v[first + child - 1];
        hole = child - 1;
    }
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && comp(&v[first + parent], &value) {
        v[first + hole] = v[first + parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    v[first + hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.topk(v, k).indices` from torch 2.15 on x86-64 Linux (libstdc++), tie-heavy
    /// inputs made by `torch.randint(0, levels, (n,)) / 4` with generator seed 5.
    const CASES: &[(&[f32], usize, &[usize])] = &[
        (&[0.75, 0.5, 0.75, 0.25, 0.5, 0.5, 0.0, 0.25], 2, &[0, 2]),
        (&[0.0, 0.0, 0.75, 0.5, 0.75, 0.0, 0.5, 0.0], 2, &[2, 4]),
        (&[0.75, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 0.75], 2, &[2, 0]),
        (&[0.0, 0.25, 0.75, 0.25, 0.75, 0.5, 0.0, 0.5], 2, &[2, 4]),
        (&[0.25, 0.5, 0.5, 0.25, 0.25, 0.5, 0.25, 0.25], 2, &[1, 5]),
        (&[0.5, 0.25, 0.5, 0.75, 0.0, 0.5, 0.25, 0.5], 2, &[3, 5]),
        (&[0.25, 0.25, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5], 2, &[6, 5]),
        (&[0.25, 0.5, 0.5, 0.25, 0.0, 0.0, 0.25, 0.5], 2, &[1, 7]),
        (&[0.5, 0.5, 0.25, 0.0, 0.0, 0.0, 0.25, 0.25], 2, &[1, 0]),
        (&[0.25, 0.25, 0.0, 0.5, 0.0, 0.25, 0.5, 0.0], 2, &[6, 3]),
        (&[0.5, 0.5, 0.0, 0.0, 0.25, 0.25, 0.5, 0.0], 2, &[6, 0]),
        (&[0.0, 0.25, 0.5, 0.25, 0.0, 0.25, 0.5, 0.0], 2, &[6, 2]),
        (&[0.0, 0.5, 0.5, 0.5, 0.0, 0.0], 3, &[1, 3, 2]),
        (&[0.25, 0.25, 0.5, 0.0, 0.25, 0.0], 3, &[2, 4, 0]),
        (&[0.0, 0.5, 0.5, 0.25, 0.5, 0.0], 3, &[2, 4, 1]),
        (&[0.25, 0.25, 0.5, 0.5, 0.25, 0.0], 3, &[2, 3, 1]),
        (&[0.5, 0.5, 0.5, 0.0, 0.5, 0.25], 3, &[2, 4, 0]),
        (&[0.0, 0.25, 0.0, 0.25, 0.5, 0.5], 3, &[5, 4, 3]),
        (&[0.75, 0.0, 1.0, 1.25, 0.75, 0.5, 0.5, 0.25, 1.0, 0.25, 0.5, 0.75, 1.25, 0.5, 0.25, 0.25, 1.0, 0.5, 1.0, 0.75, 0.0, 1.25, 0.25, 0.5, 1.0, 1.25, 0.0, 0.0, 1.25, 1.0, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 1.25, 1.0, 0.75, 0.0, 0.0, 1.0, 0.25, 0.75, 1.0, 1.0, 0.0, 1.25, 0.25, 0.5, 0.0, 0.0, 1.0, 1.25, 1.25, 1.0, 0.0, 1.0, 0.25, 1.25, 1.25, 0.0, 0.0, 0.75, 0.0, 0.5, 0.0, 0.0, 0.5, 0.5, 1.25, 0.5, 0.25, 1.25, 0.0, 0.75, 0.25, 0.5, 0.0, 0.0, 0.0, 0.75, 1.25, 1.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.0, 0.5, 1.25, 0.0, 0.5, 1.0, 1.25, 0.25, 0.75, 1.25, 0.5, 0.5, 0.25, 1.25, 0.75, 0.5, 0.25, 0.25, 0.75, 0.0, 0.5, 0.75, 0.75, 0.75, 1.0, 0.5, 1.0, 1.0, 0.0, 1.25, 0.75, 1.0, 0.25, 0.75, 0.25, 0.5, 0.0, 0.75, 1.0], 8, &[21, 12, 60, 59, 54, 53, 25, 36]),
        (&[1.25, 1.0, 0.5, 0.75, 0.5, 1.0, 0.5, 0.25, 0.0, 0.25, 0.25, 0.5, 0.25, 0.5, 0.0, 1.25, 1.25, 0.25, 0.0, 0.25, 0.25, 0.75, 1.0, 0.25, 1.0, 1.0, 1.0, 1.25, 0.0, 0.0, 1.25, 1.25, 0.75, 0.5, 0.75, 1.25, 0.0, 0.75, 0.25, 1.0, 0.75, 0.75, 0.75, 0.25, 0.25, 0.25, 1.0, 0.5, 0.75, 1.0, 1.0, 0.75, 0.75, 0.0, 0.75, 0.0, 1.25, 0.75, 1.25, 0.5, 0.75, 0.75, 0.25, 0.5, 1.25, 1.25, 0.25, 0.0, 0.25, 1.25, 1.25, 0.75, 0.0, 0.75, 0.0, 0.75, 0.0, 0.0, 0.5, 0.0, 1.25, 0.0, 0.5, 0.0, 1.0, 0.75, 0.5, 0.75, 0.75, 0.25, 1.25, 1.25, 0.0, 0.25, 0.0, 0.5, 0.75, 1.0, 0.75, 0.75, 1.0, 0.5, 0.0, 0.0, 0.25, 1.25, 1.0, 1.0, 1.25, 0.75, 0.25, 1.25, 1.0, 0.5, 0.0, 1.0, 0.0, 1.25, 1.25, 0.75, 0.25, 0.75, 0.25, 1.25, 0.25, 0.5, 1.25, 0.25], 8, &[80, 65, 69, 70, 16, 15, 64, 90]),
        (&[0.5, 0.75, 1.25, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0, 0.0, 1.25, 0.5, 1.0, 1.0, 0.5, 0.0, 1.25, 1.25, 1.0, 0.75, 0.0, 0.0, 0.5, 0.0, 0.25, 0.25, 0.0, 0.25, 1.25, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.25, 1.25, 0.0, 1.25, 0.75, 1.25, 0.25, 0.5, 0.5, 0.0, 1.25, 0.25, 0.75, 1.25, 0.0, 1.0, 0.25, 0.0, 0.25, 1.0, 0.25, 0.5, 1.25, 1.25, 0.0, 1.25, 1.0, 0.5, 0.25, 0.75, 0.0, 1.0, 0.0, 1.25, 0.5, 0.25, 1.0, 0.25, 0.5, 1.25, 0.5, 1.25, 0.0, 0.25, 0.0, 0.75, 0.75, 0.25, 0.5, 1.25, 1.0, 1.0, 0.0, 0.5, 0.0, 0.75, 1.0, 0.0, 0.25, 0.25, 1.25, 0.5, 0.25, 1.0, 1.25, 0.0, 1.25, 0.25, 0.0, 1.0, 1.0, 0.5, 0.5, 1.25, 0.75, 1.0, 0.75, 1.0, 1.25, 0.75, 0.25, 0.0, 0.75, 0.25, 0.0, 1.0, 1.0, 0.25, 0.25, 0.75, 1.25, 0.75, 1.25], 8, &[28, 38, 36, 84, 95, 101, 108, 40]),
        (&[1.0, 1.0, 1.0, 0.0, 1.25, 0.25, 1.0, 0.75, 0.0, 0.5, 0.0, 0.75, 0.5, 0.25, 1.0, 1.0, 0.5, 0.25, 1.25, 0.75, 0.75, 1.25, 0.25, 1.25, 0.5, 1.25, 0.75, 1.0, 0.5, 0.75, 1.0, 0.5, 1.25, 1.0, 0.25, 0.25, 0.75, 0.0, 1.0, 1.25, 1.25, 0.25, 0.75, 0.25, 1.25, 0.75, 0.75, 0.0, 0.75, 0.25, 1.25, 0.25, 0.0, 1.25, 0.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 0.75, 0.75, 1.25, 0.25, 0.75, 0.0, 1.25, 0.5, 0.0, 1.0, 1.25, 1.0, 1.0, 0.75, 1.25, 0.25, 0.25, 0.0, 0.0, 1.25, 0.0, 0.25, 1.0, 0.5, 1.25, 1.25, 1.0, 0.25, 0.0, 0.25, 0.0, 0.75, 0.25, 0.5, 1.0, 0.0, 0.25, 0.75, 1.0, 0.5, 0.5, 1.25, 0.75, 1.0, 0.5, 0.0, 0.25, 0.25, 0.5, 0.5, 0.5, 1.25, 0.0, 0.25, 0.0, 0.25, 1.25, 0.5, 0.75, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75, 0.0], 8, &[68, 76, 50, 53, 72, 18, 21, 23]),
        (&[0.5, 0.75, 1.25, 1.25, 1.0, 1.25, 0.75, 1.25, 0.75, 0.0, 0.0, 0.5, 1.0, 0.75, 0.75, 0.75, 0.0, 0.5, 1.0, 0.25, 0.25, 0.5, 1.0, 1.0, 0.75, 0.75, 1.25, 0.75, 0.25, 0.0, 0.5, 1.0, 1.25, 1.25, 0.25, 0.0, 0.25, 0.0, 0.5, 1.25, 1.0, 1.0, 1.25, 0.5, 0.5, 0.5, 1.0, 0.0, 0.5, 1.0, 0.5, 1.25, 0.75, 1.25, 1.0, 0.0, 1.25, 0.0, 0.75, 1.0, 1.25, 0.25, 1.25, 1.0, 1.0, 0.0, 0.75, 1.0, 1.25, 1.0, 0.0, 1.25, 0.5, 1.0, 0.5, 1.25, 0.5, 0.25, 0.75, 0.25, 0.25, 1.0, 0.0, 1.25, 0.5, 1.25, 0.75, 0.5, 0.0, 0.25, 0.5, 0.5, 1.25, 0.25, 1.25, 0.0, 0.0, 1.0, 0.0, 1.0, 1.25, 0.25, 0.25, 0.25, 1.0, 1.0, 0.75, 0.0, 0.25, 1.0, 0.5, 0.25, 1.25, 0.75, 1.25, 0.0, 0.5, 0.25, 1.25, 1.0, 1.25, 1.25, 1.25, 0.25, 0.25, 1.0, 1.25, 0.5], 8, &[100, 94, 71, 26, 51, 53, 92, 68]),
        (&[0.25, 1.0, 1.0, 0.0, 1.0, 1.25, 1.25, 0.75, 0.75, 0.25, 0.25, 1.25, 1.25, 0.0, 0.5, 0.5, 1.0, 0.25, 0.25, 0.0, 1.0, 0.25, 1.25, 0.5, 0.25, 0.5, 0.25, 0.75, 0.5, 1.25, 1.25, 0.5, 0.75, 0.75, 0.5, 1.0, 1.0, 0.25, 1.25, 0.5, 1.0, 0.75, 0.25, 0.75, 0.5, 1.25, 1.0, 0.75, 0.5, 1.0, 0.25, 1.0, 0.25, 1.25, 0.5, 0.25, 1.0, 1.0, 0.25, 0.0, 0.75, 0.75, 0.0, 1.25, 0.0, 1.25, 1.25, 0.25, 0.5, 0.25, 0.25, 0.25, 1.0, 0.0, 1.0, 0.25, 1.25, 0.0, 0.0, 0.5, 0.5, 0.0, 0.25, 0.0, 0.5, 0.25, 0.25, 1.0, 0.25, 0.75, 0.75, 1.0, 1.0, 1.25, 0.0, 1.0, 0.25, 0.0, 1.0, 0.75, 0.25, 0.0, 0.75, 0.75, 0.75, 0.5, 0.25, 0.75, 0.0, 1.25, 1.0, 0.0, 0.0, 0.5, 0.75, 0.5, 0.75, 1.25, 1.25, 0.75, 0.0, 0.5, 0.25, 0.0, 1.0, 0.0, 0.5, 0.5], 8, &[53, 11, 29, 118, 117, 109, 45, 22]),
        (&[0.25, 0.0, 0.0, 0.25, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.0], 4, &[8, 13, 3, 6]),
        (&[0.25, 0.25, 0.0, 0.0, 0.0, 0.0, 0.25, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0, 0.25, 0.25], 4, &[10, 7, 9, 1]),
        (&[0.0, 0.0, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0, 0.25, 0.25, 0.25, 0.0], 4, &[8, 13, 12, 5]),
        (&[0.0, 0.25, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0], 4, &[11, 6, 12, 1]),
        (&[0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 0.25, 0.25], 4, &[11, 0, 10, 8]),
        (&[0.0, 0.25, 0.25, 0.25, 0.0, 0.25, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0], 4, &[9, 5, 8, 1]),
        (&[0.25, 0.25, 0.0, 0.25, 0.0], 1, &[0]),
        (&[0.0, 0.25, 0.0, 0.25, 0.0], 1, &[1]),
        (&[0.25, 0.0, 0.0, 0.0, 0.25], 1, &[4]),
        (&[0.25, 0.25, 0.0, 0.0, 0.0], 1, &[1]),
        (&[0.25, 0.25, 0.0, 0.25, 0.25], 1, &[1]),
        (&[0.0, 0.0, 0.0, 0.0, 0.25], 1, &[4]),
    ];

    #[test]
    fn ties_resolve_as_torch_cpu_does() {
        for (values, k, want) in CASES {
            assert_eq!(topk_torch_cpu(values, *k), want.to_vec(), "topk({values:?}, {k})");
        }
    }

    #[test]
    fn distinct_values_come_out_sorted() {
        let v = [0.3f32, 0.9, 0.1, 0.7, 0.5, 0.2, 0.8, 0.6];
        assert_eq!(topk_torch_cpu(&v, 3), vec![1, 6, 3]);
        assert_eq!(topk_torch_cpu(&v, 8), vec![1, 6, 3, 7, 4, 0, 5, 2]);
    }

    #[test]
    fn nan_counts_as_largest() {
        assert_eq!(topk_torch_cpu(&[0.1, f32::NAN, 0.5], 1), vec![1]);
    }

    #[test]
    fn heap_select_keeps_the_largest() {
        // Force the depth-exhausted branch through the helper directly.
        let mut v: Vec<(f32, usize)> = [5.0f32, 1.0, 4.0, 2.0, 3.0, 0.0].iter().copied().enumerate().map(|(i, x)| (x, i)).collect();
        let gt = |x: &(f32, usize), y: &(f32, usize)| x.0 > y.0;
        heap_select(&mut v, 0, 3, 6, &gt);
        let mut top: Vec<f32> = v[..3].iter().map(|p| p.0).collect();
        top.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(top, vec![5.0, 4.0, 3.0]);
    }
}
