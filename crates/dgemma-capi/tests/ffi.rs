//! The C functions called from Rust: argument checks, errors, callbacks, cancellation,
//! results, and concurrent calls on one engine.

use dgemma_capi::*;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;

fn model_dir() -> CString {
    CString::new(dgemma_runtime::bundled_tiny_model().to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(dgemma_last_error_message()) }
        .to_str()
        .unwrap()
        .to_string()
}

struct Engine(*mut DgemmaEngine);
unsafe impl Send for Engine {}
unsafe impl Sync for Engine {}
impl Drop for Engine {
    fn drop(&mut self) {
        unsafe { dgemma_engine_free(self.0) }
    }
}

fn load(max_concurrent: u32) -> Engine {
    let mut e = ptr::null_mut();
    let st = unsafe { dgemma_engine_load(model_dir().as_ptr(), max_concurrent, &mut e) };
    assert_eq!(st, DgemmaStatus::Ok, "{}", last_error());
    assert!(!e.is_null());
    Engine(e)
}

fn params(seed: u64, max_new_tokens: u32) -> DgemmaParams {
    let mut p = std::mem::MaybeUninit::uninit();
    assert_eq!(
        unsafe { dgemma_params_init(p.as_mut_ptr()) },
        DgemmaStatus::Ok
    );
    let mut p = unsafe { p.assume_init() };
    p.seed = seed;
    p.max_new_tokens = max_new_tokens;
    p
}

/// Generates and returns (status, ids, text).
fn generate(e: &Engine, prompt: &str, p: &DgemmaParams) -> (DgemmaStatus, Vec<u32>, String) {
    let prompt = CString::new(prompt).unwrap();
    let mut r = std::mem::MaybeUninit::<DgemmaResult>::uninit();
    let st = unsafe {
        dgemma_generate(
            e.0,
            prompt.as_ptr(),
            p,
            None,
            ptr::null_mut(),
            r.as_mut_ptr(),
        )
    };
    let mut r = unsafe { r.assume_init() };
    let ids = if r.ids.is_null() {
        vec![]
    } else {
        unsafe { std::slice::from_raw_parts(r.ids, r.n_ids) }.to_vec()
    };
    let text = if r.text.is_null() {
        String::new()
    } else {
        String::from_utf8(
            unsafe { std::slice::from_raw_parts(r.text as *const u8, r.text_len) }.to_vec(),
        )
        .unwrap()
    };
    unsafe { dgemma_result_free(&mut r) };
    assert!(r.text.is_null() && r.ids.is_null());
    (st, ids, text)
}

#[test]
fn null_and_bad_arguments_are_refused() {
    unsafe {
        assert_eq!(
            dgemma_engine_load(ptr::null(), 0, ptr::null_mut()),
            DgemmaStatus::InvalidArgument
        );
        assert_eq!(last_error(), "out_engine is NULL");
        let mut e = ptr::null_mut();
        assert_eq!(
            dgemma_engine_load(ptr::null(), 0, &mut e),
            DgemmaStatus::InvalidArgument
        );
        assert_eq!(last_error(), "model_dir is NULL");
        let bad_utf8 = [0xffu8, 0xfe, 0];
        assert_eq!(
            dgemma_engine_load(bad_utf8.as_ptr() as *const c_char, 0, &mut e),
            DgemmaStatus::InvalidArgument
        );
        assert!(last_error().contains("not valid UTF-8"));
        let missing = CString::new("/nonexistent/dgemma-model").unwrap();
        assert_eq!(
            dgemma_engine_load(missing.as_ptr(), 0, &mut e),
            DgemmaStatus::Load
        );
        assert!(
            last_error().contains("/nonexistent/dgemma-model"),
            "{}",
            last_error()
        );
        assert!(e.is_null());
        assert_eq!(
            dgemma_params_init(ptr::null_mut()),
            DgemmaStatus::InvalidArgument
        );
        let mut r = std::mem::MaybeUninit::<DgemmaResult>::uninit();
        assert_eq!(
            dgemma_generate(
                ptr::null(),
                ptr::null(),
                ptr::null(),
                None,
                ptr::null_mut(),
                r.as_mut_ptr()
            ),
            DgemmaStatus::InvalidArgument
        );
        assert!(r.assume_init().text.is_null());
        dgemma_engine_free(ptr::null_mut());
        dgemma_result_free(ptr::null_mut());
        assert_eq!(
            CStr::from_ptr(dgemma_status_name(3)).to_str().unwrap(),
            "DGEMMA_ERR_INVALID_REQUEST"
        );
        assert_eq!(
            CStr::from_ptr(dgemma_status_name(99)).to_str().unwrap(),
            "DGEMMA_UNKNOWN_STATUS"
        );
        assert_eq!(dgemma_abi_version(), DGEMMA_ABI_VERSION);
    }
}

#[test]
fn invalid_requests_are_rejected_and_the_engine_goes_on() {
    let e = load(2);
    let (st, ..) = generate(&e, "", &params(0, 16));
    assert_eq!(st, DgemmaStatus::InvalidRequest);
    assert_eq!(
        last_error(),
        "invalid request: the prompt is empty: the user message has no text"
    );
    let mut p = params(0, 16);
    p.t_min = 2.0;
    p.t_max = 1.0;
    assert_eq!(generate(&e, "hi", &p).0, DgemmaStatus::InvalidRequest);
    assert!(last_error().contains("t_max must be"), "{}", last_error());
    let (st, ids, _) = generate(&e, "hi", &params(0, 16));
    assert_eq!(st, DgemmaStatus::Ok);
    assert_eq!(ids.len(), 16);
}

#[test]
fn results_equal_the_rust_api_and_concurrent_calls_equal_solo_calls() {
    let e = load(3);
    let stop = [1u32];
    let cases: Vec<DgemmaParams> = (0..6)
        .map(|i| {
            let mut p = params(100 + i, 16 * (1 + i as u32 % 3));
            p.max_denoising_steps = 3 + i as u32;
            if i % 2 == 0 {
                p.stop_ids = stop.as_ptr();
                p.n_stop_ids = if i == 4 { 0 } else { 1 };
            }
            p.raw_prompt = (i == 5) as c_int;
            p
        })
        .collect();
    let solo: Vec<_> = cases
        .iter()
        .map(|p| generate(&e, "same prompt", p))
        .collect();
    // The params point at `stop`, which outlives the scope.
    struct Shared(DgemmaParams);
    unsafe impl Sync for Shared {}
    let shared: Vec<Shared> = cases.iter().map(|p| Shared(*p)).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = shared
            .iter()
            .map(|p| s.spawn(|| generate(&e, "same prompt", &p.0)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(solo, together);
    // Same as the Rust API.
    let engine =
        dgemma_runtime::Engine::load(dgemma_runtime::bundled_tiny_model(), Default::default())
            .unwrap();
    let want = engine
        .generate(
            dgemma_runtime::Request::chat("same prompt")
                .seed(101)
                .max_new_tokens(32)
                .max_denoising_steps(4),
        )
        .unwrap();
    assert_eq!(solo[1].1, want.ids);
    assert_eq!(solo[1].2, want.text);
    let mut stats = DgemmaEngineStats::default();
    assert_eq!(
        unsafe { dgemma_engine_stats(e.0, &mut stats) },
        DgemmaStatus::Ok
    );
    assert_eq!((stats.completed, stats.active, stats.queued), (12, 0, 0));
}

struct Seen {
    canvases: Vec<Vec<u32>>,
    text: String,
    cancel_after: usize,
}

unsafe extern "C" fn on_canvas(
    user: *mut c_void,
    index: u32,
    text: *const c_char,
    text_len: usize,
    ids: *const u32,
    n: usize,
) -> c_int {
    let seen = &mut *(user as *mut Seen);
    assert_eq!(index as usize, seen.canvases.len());
    assert_eq!(*text.add(text_len), 0);
    seen.text.push_str(
        std::str::from_utf8(std::slice::from_raw_parts(text as *const u8, text_len)).unwrap(),
    );
    seen.canvases
        .push(std::slice::from_raw_parts(ids, n).to_vec());
    (seen.canvases.len() >= seen.cancel_after) as c_int
}

#[test]
fn callback_streams_canvases_and_can_cancel() {
    let e = load(1);
    let prompt = CString::new("stream me").unwrap();
    let stop: [u32; 0] = [];
    let mut p = params(5, 16 * 4);
    p.stop_ids = stop.as_ptr();
    p.max_denoising_steps = 2;
    // Streams every canvas; their text adds up to the result's.
    let mut seen = Seen {
        canvases: vec![],
        text: String::new(),
        cancel_after: usize::MAX,
    };
    let mut r = std::mem::MaybeUninit::<DgemmaResult>::uninit();
    let st = unsafe {
        dgemma_generate(
            e.0,
            prompt.as_ptr(),
            &p,
            Some(on_canvas),
            &mut seen as *mut Seen as *mut c_void,
            r.as_mut_ptr(),
        )
    };
    assert_eq!(st, DgemmaStatus::Ok);
    let mut r = unsafe { r.assume_init() };
    assert_eq!(r.canvases, 4);
    assert_eq!(r.finish_reason, DGEMMA_FINISH_MAX_NEW_TOKENS);
    assert_eq!(seen.canvases.concat(), unsafe {
        std::slice::from_raw_parts(r.ids, r.n_ids)
    });
    assert_eq!(seen.text.as_bytes(), unsafe {
        std::slice::from_raw_parts(r.text as *const u8, r.text_len)
    });
    unsafe { dgemma_result_free(&mut r) };
    // Returning nonzero cancels: the callback is not called again.
    let mut seen = Seen {
        canvases: vec![],
        text: String::new(),
        cancel_after: 1,
    };
    let st = unsafe {
        dgemma_generate(
            e.0,
            prompt.as_ptr(),
            &p,
            Some(on_canvas),
            &mut seen as *mut Seen as *mut c_void,
            ptr::null_mut(),
        )
    };
    assert_eq!(st, DgemmaStatus::Cancelled);
    assert_eq!(seen.canvases.len(), 1);
    assert!(last_error().contains("cancelled"));
    // The engine still serves.
    assert_eq!(generate(&e, "after", &params(1, 16)).0, DgemmaStatus::Ok);
}

/// `dgemma_engine_load_cuda` loads on a GPU, and without one (or without compiled kernels)
/// fails with a load status whose message says why, leaving `*out_engine` NULL.
#[test]
fn cuda_load_works_or_says_why() {
    let mut e = ptr::null_mut();
    let st = unsafe { dgemma_engine_load_cuda(model_dir().as_ptr(), 2, 0, 512, &mut e) };
    if st == DgemmaStatus::Ok {
        assert!(!e.is_null());
        let engine = Engine(e);
        let (st, ids, _) = generate(&engine, "Hello", &params(3, 16));
        assert_eq!(st, DgemmaStatus::Ok, "{}", last_error());
        assert_eq!(ids.len(), 16);
    } else {
        assert_eq!(st, DgemmaStatus::Load, "{}", last_error());
        assert!(e.is_null());
        let msg = last_error();
        assert!(msg.contains("CUDA") || msg.contains("cuda") || msg.contains("GPU"), "{msg}");
    }
}

/// `dgemma_engine_load_with_options`: the defaults load the CPU engine, its options reach the
/// scheduler (prefill chunks, peak concurrency in the stats), and bad options are refused.
#[test]
fn options_load_an_engine_and_bad_options_are_refused() {
    let mut o = std::mem::MaybeUninit::uninit();
    assert_eq!(unsafe { dgemma_engine_options_init(o.as_mut_ptr()) }, DgemmaStatus::Ok);
    let mut o = unsafe { o.assume_init() };
    assert_eq!((o.backend, o.max_concurrent, o.max_batch, o.prefill_chunk, o.memory_limit), (DGEMMA_BACKEND_CPU, 4, 4, 2048, 0));
    o.max_concurrent = 2;
    o.prefill_chunk = 2;
    let mut e = ptr::null_mut();
    let st = unsafe { dgemma_engine_load_with_options(model_dir().as_ptr(), &o, &mut e) };
    assert_eq!(st, DgemmaStatus::Ok, "{}", last_error());
    let engine = Engine(e);
    let (st, ids, _) = generate(&engine, "Hello", &params(5, 16));
    assert_eq!(st, DgemmaStatus::Ok, "{}", last_error());
    assert_eq!(ids.len(), 16);
    let mut stats = std::mem::MaybeUninit::uninit();
    assert_eq!(unsafe { dgemma_engine_stats(engine.0, stats.as_mut_ptr()) }, DgemmaStatus::Ok);
    let stats = unsafe { stats.assume_init() };
    // The chat prompt is longer than 2 tokens, so it went in as several chunks.
    assert!(stats.prefill_chunks >= 2, "{stats:?}");
    assert_eq!((stats.completed, stats.peak_active, stats.memory_waits), (1, 1, 0));
    // The CPU backend has no KV page pool and no batched passes to merge into.
    assert_eq!((stats.merged_encodes, stats.kv_pages_free, stats.kv_pages, stats.kv_page), (0, 0, 0, 0));

    for (field, bad) in [("backend", 7u32), ("max_concurrent", 0), ("prefill_chunk", 0)] {
        let mut b = o;
        match field {
            "backend" => b.backend = bad,
            "max_concurrent" => b.max_concurrent = bad,
            _ => b.prefill_chunk = bad,
        }
        let mut e = ptr::null_mut();
        let st = unsafe { dgemma_engine_load_with_options(model_dir().as_ptr(), &b, &mut e) };
        assert_eq!(st, DgemmaStatus::InvalidArgument, "{field}");
        assert!(e.is_null());
        assert!(last_error().contains(field), "{field}: {}", last_error());
    }
    assert_eq!(unsafe { dgemma_engine_options_init(ptr::null_mut()) }, DgemmaStatus::InvalidArgument);
}
