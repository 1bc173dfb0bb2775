/*
 * dgemma.h: C interface of the dgemma runtime (DiffusionGemma inference).
 *
 * Link with -ldgemma_capi (libdgemma_capi.so, built by `cargo build -p dgemma-capi`).
 * Hand-written; crates/dgemma-capi/tests/header.rs checks it against the library.
 *
 * Conventions:
 *   - Fallible functions return a DgemmaStatus; on failure dgemma_last_error_message() tells why.
 *   - Strings are UTF-8 and NUL-terminated.
 *   - Memory the library hands out is released only with the matching dgemma_*_free function.
 *   - An engine may be used from several threads at once (dgemma_generate, dgemma_engine_stats);
 *     dgemma_engine_free must not run concurrently with any other use of the same engine.
 *   - No Rust panic crosses this interface: an internal error returns DGEMMA_ERR_PANIC.
 */
#ifndef DGEMMA_H
#define DGEMMA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DGEMMA_ABI_VERSION 4

typedef enum DgemmaStatus {
    DGEMMA_OK = 0,
    DGEMMA_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, string not UTF-8, bad option */
    DGEMMA_ERR_LOAD = 2,             /* the model directory could not be loaded */
    DGEMMA_ERR_INVALID_REQUEST = 3,  /* empty or too long prompt, invalid settings */
    DGEMMA_ERR_CANCELLED = 4,        /* the callback asked to stop */
    DGEMMA_ERR_GENERATION = 5,       /* the backend, sampler or tokenizer failed */
    DGEMMA_ERR_SHUT_DOWN = 6,        /* the engine stopped before the request ended */
    DGEMMA_ERR_PANIC = 7             /* internal error */
} DgemmaStatus;

typedef enum DgemmaFinish {
    DGEMMA_FINISH_NONE = 0,
    DGEMMA_FINISH_EOS = 1,           /* an EOS / stop id appeared in a committed canvas */
    DGEMMA_FINISH_MAX_NEW_TOKENS = 2 /* max_new_tokens generated */
} DgemmaFinish;

typedef enum DgemmaBackend {
    DGEMMA_BACKEND_CPU = 0,          /* the CPU reference backend */
    DGEMMA_BACKEND_CUDA = 1          /* a CUDA GPU (bf16): weights uploaded once, a KV cache per request */
} DgemmaBackend;

typedef enum DgemmaQuant {
    DGEMMA_QUANT_NONE = 0,           /* MoE experts as the checkpoint stores them */
    DGEMMA_QUANT_FP8 = 1             /* FP8 E4M3 experts, per-output-channel scales (quantised at load) */
} DgemmaQuant;

/* How to load an engine: fill with dgemma_engine_options_init(), then change what you need. */
typedef struct DgemmaEngineOptions {
    uint32_t backend;         /* DgemmaBackend */
    uint32_t max_concurrent;  /* most requests generating at once; more wait in a queue */
    uint32_t cuda_device;     /* CUDA: GPU ordinal */
    uint32_t context;         /* CUDA: positions per request's KV cache; 0 = model context capped at 8192 */
    uint32_t max_batch;       /* CUDA: most requests whose denoising steps share one decoder pass */
    uint32_t prefill_chunk;   /* most prompt tokens a request prefills per scheduler round */
    uint64_t memory_limit;    /* CUDA: most device bytes the engine allocates; 0 = no limit. A request
                                 whose KV cache does not fit waits for a running one to finish */
    uint32_t quant;           /* DgemmaQuant: how the MoE experts are held (ABI 3) */
    uint32_t kv_page;         /* CUDA: positions per page of the shared KV page pool (ABI 4) */
    uint32_t kv_pages;        /* CUDA: pages in the pool; 0 = from max_concurrent, context, free memory (ABI 4) */
} DgemmaEngineOptions;

/* Opaque engine: a loaded model and its request scheduler. */
typedef struct DgemmaEngine DgemmaEngine;

/* Per-request parameters: fill with dgemma_params_init(), then change what you need. */
typedef struct DgemmaParams {
    uint32_t max_new_tokens;      /* rounded up to whole canvases; 0 = checkpoint default */
    uint32_t max_denoising_steps; /* per canvas; 0 = checkpoint default */
    uint64_t seed;                /* same seed, same output, whatever else runs */
    const char *system_prompt;    /* NULL = none */
    int thinking;                 /* nonzero: thinking mode in the chat template */
    int raw_prompt;               /* nonzero: <bos> + prompt text, no chat template */
    int skip_special_tokens;      /* nonzero (default): special tokens left out of the text */
    float entropy_bound;          /* sampler overrides: NaN (default) = checkpoint value */
    float confidence_threshold;
    double t_min;
    double t_max;
    int32_t stability_threshold;  /* negative (default) = checkpoint value */
    const uint32_t *stop_ids;     /* NULL (default) = checkpoint EOS ids; else n_stop_ids ids */
    size_t n_stop_ids;            /* 0 with stop_ids != NULL: never stop early */
} DgemmaParams;

/* Result of dgemma_generate(): release with dgemma_result_free(). */
typedef struct DgemmaResult {
    char *text;               /* generated text, NUL-terminated */
    size_t text_len;          /* bytes before the terminating NUL */
    uint32_t *ids;            /* generated ids (whole canvases, pad after the first EOS) */
    size_t n_ids;
    uint32_t prompt_tokens;
    uint32_t canvases;
    uint32_t decoder_passes;
    uint32_t new_tokens;      /* non-pad generated tokens */
    int32_t finish_reason;    /* DgemmaFinish */
    uint32_t eos_token;       /* the EOS id when finish_reason == DGEMMA_FINISH_EOS */
    double seconds;           /* wall time of the request */
} DgemmaResult;

typedef struct DgemmaEngineStats {
    uint64_t submitted;
    uint64_t rejected;
    uint64_t completed;
    uint64_t cancelled;
    uint64_t failed;
    uint64_t queued;
    uint64_t active;
    uint64_t encoder_passes;
    uint64_t decoder_passes;
    uint64_t new_tokens;
    uint64_t peak_active;     /* the most requests that ran at once */
    uint64_t batched_passes;  /* decoder passes that served several requests' steps (GPU) */
    uint64_t largest_batch;   /* the most requests one such pass served */
    uint64_t prefill_chunks;  /* encoder passes that were prompt chunks */
    uint64_t memory_waits;    /* times admission waited for a KV cache to fit in device memory */
    uint64_t merged_encodes;  /* commits / short prompts encoded inside a batched decoder pass (ABI 4) */
    uint64_t kv_pages_free;   /* the GPU's KV page pool: pages free now (0 on the CPU; ABI 4) */
    uint64_t kv_pages;        /* pages in the pool (ABI 4) */
    uint64_t kv_page;         /* positions per page (ABI 4) */
} DgemmaEngineStats;

/*
 * Called on the thread of dgemma_generate() after every committed canvas with the text that
 * became complete (NUL-terminated, text_len bytes) and the canvas ids; the pointers are valid
 * during the call only. Return 0 to go on, nonzero to cancel the request.
 */
typedef int (*DgemmaCanvasCallback)(void *user_data, uint32_t index, const char *text, size_t text_len,
                                    const uint32_t *ids, size_t n_ids);

/* The library's ABI version (DGEMMA_ABI_VERSION). */
uint32_t dgemma_abi_version(void);

/* Why the last failing call on this thread failed; never NULL ("" if none). Valid until the
 * next failing call on the same thread. */
const char *dgemma_last_error_message(void);

/* "DGEMMA_OK", "DGEMMA_ERR_LOAD", ... ("DGEMMA_UNKNOWN_STATUS" for other values). */
const char *dgemma_status_name(int status);

/* Fills *params with the defaults. */
DgemmaStatus dgemma_params_init(DgemmaParams *params);

/* Loads a model directory (config.json, *.safetensors, tokenizer.json, chat template) on the
 * CPU backend. max_concurrent bounds the requests generating at once (0 = 4); more wait in a
 * queue. */
DgemmaStatus dgemma_engine_load(const char *model_dir, uint32_t max_concurrent, DgemmaEngine **out_engine);

/* Loads the model on CUDA GPU `device` (bf16): the weights are uploaded once and each request
 * gets its own KV cache of `context` positions on the GPU (0 = the model's context, capped at
 * 8192). max_concurrent as above. Without a GPU, or in a build without the CUDA kernels, the
 * status is an error whose message says why. */
DgemmaStatus dgemma_engine_load_cuda(const char *model_dir, uint32_t max_concurrent, uint32_t device, uint32_t context,
                                     DgemmaEngine **out_engine);

/* Fills *options with the defaults: CPU backend, 4 concurrent requests, GPU 0, context 0, batches
 * of 4, prefill chunks of 2048 tokens, no memory limit. */
DgemmaStatus dgemma_engine_options_init(DgemmaEngineOptions *options);

/* Loads a model directory with *options (NULL = the defaults). An unknown backend or a zero
 * count is DGEMMA_ERR_INVALID_ARGUMENT. */
DgemmaStatus dgemma_engine_load_with_options(const char *model_dir, const DgemmaEngineOptions *options,
                                             DgemmaEngine **out_engine);

/* Releases an engine (NULL is ignored). */
void dgemma_engine_free(DgemmaEngine *engine);

/* The engine's counters since it was loaded. */
DgemmaStatus dgemma_engine_stats(const DgemmaEngine *engine, DgemmaEngineStats *out_stats);

/*
 * Generates for one prompt and blocks until it ends. Thread-safe: concurrent calls on one
 * engine run concurrently (up to max_concurrent) and each gives what it gives alone.
 *   prompt      user message (or raw text with params->raw_prompt)
 *   params      NULL for the defaults
 *   callback    NULL, or called after every committed canvas (nonzero return cancels)
 *   out_result  NULL, or filled on DGEMMA_OK (zeroed otherwise); release with dgemma_result_free
 */
DgemmaStatus dgemma_generate(const DgemmaEngine *engine, const char *prompt, const DgemmaParams *params,
                             DgemmaCanvasCallback callback, void *user_data, DgemmaResult *out_result);

/* Releases what *result holds and zeroes it (NULL is ignored). */
void dgemma_result_free(DgemmaResult *result);

#ifdef __cplusplus
}
#endif

#endif /* DGEMMA_H */
