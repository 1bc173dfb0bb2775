//! `include/dgemma.h` is hand-written: check it against the library. Every `#[no_mangle]`
//! function of src/lib.rs must be declared in the header with the same number of parameters
//! (and nothing else declared), and the enum constants must have the library's values. The
//! struct layouts are compared with gcc in `c_example.rs`.

use dgemma_capi::{
    DgemmaStatus, DGEMMA_ABI_VERSION, DGEMMA_BACKEND_CPU, DGEMMA_BACKEND_CUDA, DGEMMA_FINISH_EOS,
    DGEMMA_FINISH_MAX_NEW_TOKENS, DGEMMA_FINISH_NONE,
};
use std::collections::BTreeMap;

mod common;

fn read(rel: &str) -> String {
    std::fs::read_to_string(common::crate_dir().join(rel)).unwrap()
}

/// Drops `/* */` and `//` comments (enough for our own files: no comment markers in strings
/// that matter here).
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |e| &r[e + 2..]);
        } else if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |e| &r[e..]);
        } else if rest.starts_with('"') {
            // Copy string literals whole (they may hold "//").
            let end = rest[1..].find('"').map_or(rest.len(), |e| e + 2);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        } else {
            let ch = rest.chars().next().unwrap();
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

/// The text between the `(` at `open` and its matching `)`.
fn parenthesised(s: &str, open: usize) -> &str {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &s[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!(
        "unbalanced parentheses after {}",
        &s[open..open.min(s.len()).saturating_add(40).min(s.len())]
    );
}

/// Number of top-level comma-separated parameters (`void` or nothing: 0).
fn count_params(list: &str) -> usize {
    let t = list.trim().trim_end_matches(',').trim();
    if t.is_empty() || t == "void" {
        return 0;
    }
    let mut depth = 0i32;
    let mut n = 1;
    for c in t.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => n += 1,
            _ => {}
        }
    }
    n
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `name -> parameter count` of every function declared in the header.
fn header_functions(h: &str) -> BTreeMap<String, usize> {
    let h = strip_comments(h);
    let mut out = BTreeMap::new();
    let mut i = 0;
    while let Some(p) = h[i..].find("dgemma_") {
        let start = i + p;
        i = start + 1;
        if start > 0 && is_ident(h[..start].chars().last().unwrap()) {
            continue;
        }
        let name: String = h[start..].chars().take_while(|&c| is_ident(c)).collect();
        let after = start + name.len();
        let rest = &h[after..];
        let open = rest.len() - rest.trim_start().len();
        if !rest.trim_start().starts_with('(') {
            continue;
        }
        let params = count_params(parenthesised(&h, after + open));
        assert!(
            out.insert(name.clone(), params).is_none(),
            "{name} declared twice in dgemma.h"
        );
    }
    out
}

/// `name -> parameter count` of every `#[no_mangle]` function in the Rust source.
fn rust_exports(src: &str) -> BTreeMap<String, usize> {
    let src = strip_comments(src);
    let mut out = BTreeMap::new();
    for (pos, _) in src.match_indices("#[no_mangle]") {
        let after = &src[pos..];
        let f = after.find("fn ").expect("a function after #[no_mangle]") + 3;
        let name: String = after[f..].chars().take_while(|&c| is_ident(c)).collect();
        let open = f + after[f..].find('(').unwrap();
        let params = count_params(parenthesised(after, open));
        assert!(
            out.insert(name.clone(), params).is_none(),
            "{name} exported twice"
        );
    }
    out
}

#[test]
fn every_exported_function_is_declared_with_its_arity() {
    let header = header_functions(&read("include/dgemma.h"));
    let rust = rust_exports(&read("src/lib.rs"));
    assert!(rust.len() >= 9, "found only {rust:?} in src/lib.rs");
    for (name, n) in &rust {
        match header.get(name) {
            Some(m) => assert_eq!(
                m, n,
                "{name}: {n} parameters in src/lib.rs, {m} in dgemma.h"
            ),
            None => panic!("{name} is exported by src/lib.rs but not declared in include/dgemma.h"),
        }
    }
    for name in header.keys() {
        assert!(
            rust.contains_key(name),
            "{name} is declared in include/dgemma.h but not exported by src/lib.rs"
        );
    }
}

/// `NAME = value` pairs of the header's enums and `#define NAME value` lines.
fn header_constants(h: &str) -> BTreeMap<String, i64> {
    let h = strip_comments(h);
    let mut out = BTreeMap::new();
    for line in h.lines() {
        let line = line.trim().trim_end_matches(',');
        let (name, value) = if let Some(d) = line.strip_prefix("#define ") {
            match d.split_once(' ') {
                Some((n, v)) => (n.trim(), v.trim()),
                None => continue,
            }
        } else if let Some((n, v)) = line.split_once('=') {
            (n.trim(), v.trim())
        } else {
            continue;
        };
        if name.starts_with("DGEMMA_") {
            if let Ok(v) = value.parse() {
                out.insert(name.to_string(), v);
            }
        }
    }
    out
}

#[test]
fn constants_match() {
    let c = header_constants(&read("include/dgemma.h"));
    let mut want: BTreeMap<String, i64> = DgemmaStatus::ALL
        .iter()
        .map(|s| (s.c_name().to_string(), *s as i64))
        .collect();
    want.insert("DGEMMA_FINISH_NONE".into(), DGEMMA_FINISH_NONE as i64);
    want.insert("DGEMMA_FINISH_EOS".into(), DGEMMA_FINISH_EOS as i64);
    want.insert(
        "DGEMMA_FINISH_MAX_NEW_TOKENS".into(),
        DGEMMA_FINISH_MAX_NEW_TOKENS as i64,
    );
    want.insert("DGEMMA_BACKEND_CPU".into(), DGEMMA_BACKEND_CPU as i64);
    want.insert("DGEMMA_BACKEND_CUDA".into(), DGEMMA_BACKEND_CUDA as i64);
    want.insert("DGEMMA_QUANT_NONE".into(), dgemma_capi::DGEMMA_QUANT_NONE as i64);
    want.insert("DGEMMA_QUANT_FP8".into(), dgemma_capi::DGEMMA_QUANT_FP8 as i64);
    want.insert("DGEMMA_ABI_VERSION".into(), DGEMMA_ABI_VERSION as i64);
    assert_eq!(c, want);
}

#[test]
fn the_parsers_see_what_they_should() {
    let h = "/* dgemma_fake(int a); */ uint32_t dgemma_a(void);\nDgemmaStatus dgemma_b(const char *x, int (*cb)(int, int), int y);";
    let f = header_functions(h);
    assert_eq!(
        f.into_iter().collect::<Vec<_>>(),
        vec![("dgemma_a".into(), 0), ("dgemma_b".into(), 3)]
    );
    let r = "#[no_mangle]\npub unsafe extern \"C\" fn dgemma_x(a: *const u8, b: Option<fn(u8, u8)>,\n) -> i32 {}";
    assert_eq!(
        rust_exports(r).into_iter().collect::<Vec<_>>(),
        vec![("dgemma_x".into(), 2)]
    );
}
