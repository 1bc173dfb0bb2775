/*
 * generate.c: stream one generation through the dgemma C API.
 *
 *   cargo build -p dgemma-capi
 *   gcc -std=c11 -Wall -Wextra -I crates/dgemma-capi/include crates/dgemma-capi/examples/generate.c \
 *       -L target/debug -ldgemma_capi -o generate
 *   LD_LIBRARY_PATH=target/debug ./generate reference/models/tiny-default "Hello!"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dgemma.h"

static int on_canvas(void *user_data, uint32_t index, const char *text, size_t text_len, const uint32_t *ids,
                     size_t n_ids) {
    (void)ids;
    int *canvases = (int *)user_data;
    *canvases += 1;
    fprintf(stderr, "[canvas %u: %zu ids]\n", index, n_ids);
    fwrite(text, 1, text_len, stdout);
    fflush(stdout);
    return 0; /* nonzero would cancel */
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR PROMPT [SEED]\n", argv[0]);
        return 2;
    }
    if (dgemma_abi_version() != DGEMMA_ABI_VERSION) {
        fprintf(stderr, "ABI mismatch: library %u, header %d\n", dgemma_abi_version(), DGEMMA_ABI_VERSION);
        return 1;
    }

    DgemmaEngine *engine = NULL;
    DgemmaStatus st = dgemma_engine_load(argv[1], 2, &engine);
    if (st != DGEMMA_OK) {
        fprintf(stderr, "load failed (%s): %s\n", dgemma_status_name(st), dgemma_last_error_message());
        return 1;
    }

    DgemmaParams params;
    dgemma_params_init(&params);
    params.max_new_tokens = 48;
    params.seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 7;

    int canvases = 0;
    DgemmaResult result;
    st = dgemma_generate(engine, argv[2], &params, on_canvas, &canvases, &result);
    if (st != DGEMMA_OK) {
        fprintf(stderr, "generate failed (%s): %s\n", dgemma_status_name(st), dgemma_last_error_message());
        dgemma_engine_free(engine);
        return 1;
    }
    printf("\n");
    printf("generated text: %s\n", result.text);
    printf("stats: %u canvases, %u decoder passes, %u tokens, finish %d, %.3f s\n", result.canvases,
           result.decoder_passes, result.new_tokens, result.finish_reason, result.seconds);
    if ((int)result.canvases != canvases || result.n_ids != 16u * result.canvases) {
        fprintf(stderr, "inconsistent result: %d callbacks, %u canvases, %zu ids\n", canvases, result.canvases,
                result.n_ids);
        return 1;
    }
    dgemma_result_free(&result);

    /* A bad request is refused with a clear message; the engine keeps working. */
    st = dgemma_generate(engine, "", NULL, NULL, NULL, NULL);
    printf("empty prompt: %s: %s\n", dgemma_status_name(st), dgemma_last_error_message());
    if (st != DGEMMA_ERR_INVALID_REQUEST) {
        return 1;
    }

    DgemmaEngineStats stats;
    dgemma_engine_stats(engine, &stats);
    printf("engine: %llu completed, %llu rejected\n", (unsigned long long)stats.completed,
           (unsigned long long)stats.rejected);
    dgemma_engine_free(engine);
    return 0;
}
