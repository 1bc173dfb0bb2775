#!/usr/bin/env python3
"""Times Hugging Face transformers' DiffusionGemmaForBlockDiffusion: the side-by-side figure for dgemma's bench.

Random weights of the exact 26B-A4B text shapes (reference/configs/diffusiongemma-26B-A4B/config.json; no checkpoint,
no network), bf16, attn_implementation="sdpa", experts_implementation="grouped_mm" (transformers' default MoE path
where this version has `experts_implementation`). Two figures, each the mean over --iters timed calls after --warmup
untimed ones (CUDA events around each call on a GPU, perf_counter on the CPU):

  hf_transformers.prefill.bf16.tokens<P>   the encoder's causal pass over P prompt tokens into a fresh DynamicCache:
      exactly step 1.a of DiffusionGemmaGenerationMixin.generate on its first canvas,
          ids, masks = model._prepare_encoder_inputs(input_ids=..., attention_mask=ones, encoder_position_ids=...,
                                                     past_key_values=cache, is_prefill=True, ...)
          model.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=cache, position_ids=...)
      (the mask construction is included: generate does it per canvas, before the encoder call)
  hf_transformers.step.bf16.c1.ctx<P>      one denoising forward of a canvas_length canvas (256) over the P cached
      positions with self-conditioning input: exactly the call _denoising_step makes per step (step 1.c.i),
          model(decoder_input_ids=canvas, self_conditioning_logits=sc, decoder_attention_mask=mask_mapping,
                past_key_values=cache, decoder_position_ids=arange(P, P + C))
      with mask_mapping from model.model.decoder.create_diffusion_decoder_attention_mask as _prepare_denoiser_inputs
      builds it, and sc = the bf16 logits of a previous decoder pass (as generate feeds them back). Only the forward
      is timed (not the sampler after it); the cache is not modified by the decoder.

    python3 tools/hf_bench.py [--json FILE] [--tiny] [--device cuda|cpu] [--prompt 4096] [--iters 5] [--warmup 2]
                              [--dtype bf16|f32] [--threads N]

--tiny: the shapes of reference/models/tiny-default/config.json (records named hf_transformers.tiny.*), for testing
without a GPU and for the CPU side-by-side (tools/cpu-side-by-side.sh). --dtype f32: float32 weights and activations
instead of bf16 (records named .f32. instead of .bf16.). --threads N: torch.set_num_threads(N) before anything runs
(torch's intra-op CPU threads; default: torch's own choice, the number of cores). --json records also carry the
median ms ("value" is the mean). Exit status 0 with the figures, 2 on any failure (transformers or torch missing, no
DiffusionGemma in this transformers, no GPU, out of memory, a check failed) with the reason on stderr and no figures.

Weights: built on the meta device (no memory, no init), then every distinct parameter and buffer is allocated ONCE on
the target device (the encoder's text weights are tied to the decoder's, as in the real checkpoint: ~50 GB bf16, not
twice that), filled with NaN, then transformers' own _init_weights runs on the device (normal std 0.02 for
projections / experts / embeddings, RMSNorm weights 1, router scales 1, RoPE buffers, embed scale), the router
projections are redrawn N(0, 1) (decisive, token-dependent routing), every layer_scalar is 1, and the script checks
that no NaN is left anywhere (something the init missed would show up as NaN).
"""

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG_26B = os.path.join(ROOT, "reference", "configs", "diffusiongemma-26B-A4B", "config.json")
CONFIG_TINY = os.path.join(ROOT, "reference", "models", "tiny-default", "config.json")
# Stand-in vision tower for a config that names none (the 26B reference config lists only the text model): the text
# passes never run it, and a tiny one keeps memory for the text weights (make_cases.py's tiny vision config).
TINY_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                   intermediate_size=32, patch_size=4, position_embedding_size=16, standardize=True)


class Failure(Exception):
    """A reason to exit 2 with a message (no figures)."""


def fail(msg):
    raise Failure(msg)


def log(msg):
    print(f"hf_bench: {msg}", file=sys.stderr, flush=True)


def imports():
    try:
        import torch
    except ImportError as e:
        fail(f"torch is not installed for {sys.executable}: {e}")
    try:
        import transformers
    except ImportError as e:
        fail(f"transformers is not installed for {sys.executable}: {e}")
    try:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: F401
        from transformers.cache_utils import DynamicCache  # noqa: F401
    except ImportError as e:
        fail(f"transformers {transformers.__version__} has no DiffusionGemma (need >= 5.11): {e}")
    return torch, transformers


def load_config(path):
    from transformers import DiffusionGemmaConfig

    with open(path) as f:
        d = json.load(f)
    vision_note = "vision tower from the config"
    if not d.get("vision_config"):
        d["vision_config"] = dict(TINY_VISION)
        vision_note = "vision tower: tiny stand-in (the config names none; the text passes never run it)"
    d.pop("dtype", None)
    d.pop("torch_dtype", None)
    d.pop("transformers_version", None)
    return DiffusionGemmaConfig.from_dict(d), vision_note


def build_model(config, device, dtype, experts, torch):
    """Random-weight model on `device`: meta build, one allocation per distinct tensor (ties kept), HF init there."""
    from transformers import DiffusionGemmaForBlockDiffusion

    kw = dict(dtype=dtype, attn_implementation="sdpa")
    experts_note = None
    if experts != "default":
        kw["experts_implementation"] = experts
    try:
        with torch.device("meta"):
            model = DiffusionGemmaForBlockDiffusion._from_config(config, **kw)
    except (ValueError, KeyError, TypeError) as e:
        if experts == "default":
            raise
        # this transformers does not offer the requested experts implementation: its default, said so in the note
        experts_note = f"experts_implementation={experts!r} refused ({str(e).splitlines()[0][:160]}); default used"
        kw.pop("experts_implementation")
        with torch.device("meta"):
            model = DiffusionGemmaForBlockDiffusion._from_config(config, **kw)

    # Materialize: one tensor per distinct meta tensor, so tied parameters stay one object (and one allocation).
    memo = {}
    nbytes = 0
    for mod in model.modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                new = memo.get(id(t))
                if new is None:
                    fill = math.nan if t.dtype.is_floating_point else 0
                    data = torch.full(tuple(t.shape), fill, dtype=t.dtype, device=device)
                    new = torch.nn.Parameter(data, requires_grad=False) if is_param else data
                    memo[id(t)] = new
                    nbytes += data.numel() * data.element_size()
                table[name] = new
    del memo

    # transformers' own init, on the device (fills weights, RoPE inv_freq, embed scale, decoder layer_scalar, ...)
    with torch.no_grad():
        if hasattr(model, "initialize_weights"):
            model.initialize_weights()
        else:
            model.init_weights()
        g = torch.Generator(device=device).manual_seed(1234)
        routers = [m for m in model.modules() if type(m).__name__ == "DiffusionGemmaTextRouter"]
        for r in {id(m.proj.weight): m for m in routers}.values():  # encoder routers share the decoder's weights
            r.proj.weight.normal_(0.0, 1.0, generator=g)
        for m in model.modules():
            if isinstance(getattr(m, "layer_scalar", None), torch.Tensor):
                m.layer_scalar.fill_(1.0)  # the encoder copy is a buffer the init does not set (checkpoints do)
        left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) +
                list(model.named_buffers(remove_duplicate=False))
                if t.dtype.is_floating_point and bool(torch.isnan(t).any())]
    if left:
        fail(f"{len(left)} tensors still NaN after init (not initialized): {left[:8]}")

    # the weight ties the real model has: encoder text weights == decoder weights == lm_head
    dec, enc = model.model.decoder, model.model.encoder.language_model
    if not (enc.embed_tokens.weight is dec.embed_tokens.weight and model.lm_head.weight is dec.embed_tokens.weight
            and enc.layers[0].experts.gate_up_proj is dec.layers[0].experts.gate_up_proj):
        fail("the encoder / decoder / lm_head weights are not tied: the model would not match the real one")
    model.eval()
    exp_impl = getattr(dec.layers[0].experts.config, "_experts_implementation", None)
    exp_impl = exp_impl or "eager (no experts_implementation)"
    attn_impl = dec.config._attn_implementation if hasattr(dec.config, "_attn_implementation") else "?"
    return model, nbytes, attn_impl, exp_impl, experts_note


def grouped_mm_kernel(torch, device):
    """Which grouped matmul transformers' grouped_mm experts path dispatches to on this device (best effort)."""
    try:
        from transformers.integrations import moe
    except ImportError:
        return "?"
    try:
        w = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=device)
        x = torch.zeros(4, 16, dtype=torch.bfloat16, device=device)
        offs = torch.tensor([2, 4], dtype=torch.int32, device=device)
        if not moe._can_use_grouped_mm(x, w, offs):
            return "transformers' per-expert fallback loop"
    except Exception:  # noqa: BLE001  (a note, never a reason to fail)
        return "?"
    return "torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "torch._grouped_mm"


class Timer:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn, warmup, iters, setup=lambda: None):
        """ms of fn(setup()) per call: warmup untimed calls, then iters timed ones (setup outside the timing)."""
        torch = self.torch
        out = None
        for _ in range(warmup):
            out = fn(setup())
        if self.cuda:
            torch.cuda.synchronize()
        ms = []
        for _ in range(iters):
            arg = setup()
            if self.cuda:
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = fn(arg)
                e.record()
                e.synchronize()
                ms.append(s.elapsed_time(e))
            else:
                t = time.perf_counter()
                out = fn(arg)
                ms.append((time.perf_counter() - t) * 1e3)
        return ms, out


def routing_stats(torch, router, run, num_experts):
    """Runs `run()` once with a hook on `router`: 'experts hit h/E, busiest expert x.x times the mean load'."""
    seen = []
    hook = router.register_forward_hook(lambda m, i, o: seen.append(o[2].detach().reshape(-1)))
    try:
        run()
    finally:
        hook.remove()
    if not seen:
        return "routing not observed"
    counts = torch.bincount(seen[-1].long(), minlength=num_experts).float()
    busiest = float(counts.max() / counts.mean())
    return f"experts hit {int((counts > 0).sum())}/{num_experts}, busiest {busiest:.2f}x mean"


def bench(args):
    torch, transformers = imports()
    from transformers.cache_utils import DynamicCache

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device cuda: torch {torch.__version__} sees no CUDA GPU")
        device = torch.device("cuda", torch.cuda.current_device())
        dev_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        dev_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    torch.manual_seed(0)

    cfg_path = CONFIG_TINY if args.tiny else CONFIG_26B
    config, vision_note = load_config(cfg_path)
    tc = config.get_text_config()
    V, C, P = tc.vocab_size, config.canvas_length, args.prompt
    t0 = time.monotonic()
    model, nbytes, attn_impl, exp_impl, experts_note = build_model(config, device, dtype, args.experts, torch)
    log(f"model built on {dev_name} in {time.monotonic() - t0:.1f} s: {nbytes / 2**30:.2f} GiB of distinct tensors, "
        f"attention {attn_impl}, experts {exp_impl}")
    kernel = grouped_mm_kernel(torch, device) if exp_impl == "grouped_mm" else None
    timer = Timer(torch, device)
    dec, enc = model.model.decoder, model.model.encoder.language_model

    # ---- prefill: generate's step 1.a on its first canvas ----
    specials = torch.tensor([config.image_token_id, config.boi_token_id, config.eoi_token_id], device=device)
    prompt = torch.randint(0, V, (1, P), device=device)
    prompt[torch.isin(prompt, specials)] = 3  # text-only prompt (no image placeholders)
    attention_mask = torch.ones((1, P), dtype=torch.bool, device=device)
    enc_pos = torch.arange(0, P, dtype=torch.int32, device=device).unsqueeze(0)

    def new_cache():
        return DynamicCache(config=model.config.get_text_config(decoder=True))

    def prefill(cache):
        ids, masks = model._prepare_encoder_inputs(
            input_ids=prompt, attention_mask=attention_mask, encoder_position_ids=enc_pos, past_key_values=cache,
            is_prefill=True, canvas_length=C, batch_size=1)
        return model.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=cache, position_ids=enc_pos)

    with torch.no_grad():
        route_enc = routing_stats(torch, enc.layers[0].router, lambda: prefill(new_cache()), tc.num_experts)
        pre_ms, enc_out = timer(prefill, args.warmup, args.iters, setup=new_cache)
        cache = enc_out.past_key_values
        if tuple(enc_out.last_hidden_state.shape) != (1, P, tc.hidden_size):
            fail(f"encoder output shape {tuple(enc_out.last_hidden_state.shape)} != (1, {P}, {tc.hidden_size})")
        full = [i for i, t in enumerate(tc.layer_types) if t == "full_attention"]
        if cache.get_seq_length() != P or (full and cache.layers[full[0]].keys.shape[-2] != P):
            fail(f"the cache holds {cache.get_seq_length()} positions after the prefill, not {P}")
        del enc_out

        # ---- one denoising step: _denoising_step's forward call, self-conditioning on ----
        canvas = torch.randint(0, V, (1, C), device=device)  # as EntropyBoundSampler.initialize_canvas draws it
        dec_pos = torch.arange(P, P + C, dtype=torch.int32, device=device).unsqueeze(0)
        dec_mask_2d = torch.nn.functional.pad(attention_mask, (0, C), value=True)
        mask_mapping = dec.create_diffusion_decoder_attention_mask(
            config=model.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
            decoder_attention_mask=dec_mask_2d)

        def step(sc):
            return model(decoder_input_ids=canvas, self_conditioning_logits=sc, decoder_attention_mask=mask_mapping,
                         past_key_values=cache, decoder_position_ids=dec_pos)

        first = step(None)  # generate's first step has no self-conditioning; its logits feed the next one
        sc = first.logits.to(dec.embed_tokens.weight.dtype)
        del first
        route_dec = routing_stats(torch, dec.layers[0].router, lambda: step(sc), tc.num_experts)
        step_ms, out = timer(step, args.warmup, args.iters, setup=lambda: sc)
        if tuple(out.logits.shape) != (1, C, V) or out.logits.dtype != torch.float32:
            fail(f"decoder logits {tuple(out.logits.shape)} {out.logits.dtype} != (1, {C}, {V}) float32")
        if not bool(torch.isfinite(out.logits).all()):
            fail("the decoder logits are not all finite")
        if cache.get_seq_length() != P:
            fail(f"the decoder changed the cache: {cache.get_seq_length()} positions, not {P}")
        del out, sc

    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    common = (f"transformers {transformers.__version__}, torch {torch.__version__}, {dev_name}, {args.dtype} random "
              f"weights ({'tiny-default' if args.tiny else '26B-A4B'} shapes, {nbytes / 2**30:.1f} GiB), "
              f"attn_implementation={attn_impl}, experts_implementation={exp_impl}"
              + (f" ({kernel})" if kernel else "") + (f"; {experts_note}" if experts_note else "")
              + f"; eager, DynamicCache; mean of {args.iters} after {args.warmup} warm-up"
              + (f"; peak {peak:.1f} GiB" if peak is not None else "") + f"; {vision_note}")

    def fmt(ms):
        return f"min {min(ms):.3f}, median {statistics.median(ms):.3f} ms"

    prefix = "hf_transformers.tiny" if args.tiny else "hf_transformers"
    records = [
        dict(name=f"{prefix}.prefill.{args.dtype}.tokens{P}", value=statistics.fmean(pre_ms), unit="ms",
             median=statistics.median(pre_ms),
             note=f"encoder pass over {P} prompt tokens into a fresh cache, masks included "
                  f"(generate step 1.a); {fmt(pre_ms)}; layer-0 {route_enc}; {common}"),
        dict(name=f"{prefix}.step.{args.dtype}.c1.ctx{P}", value=statistics.fmean(step_ms), unit="ms",
             median=statistics.median(step_ms),
             note=f"one decoder forward, canvas {C}, {P} cached positions, self-conditioning logits in "
                  f"(generate's _denoising_step call); {fmt(step_ms)}; layer-0 {route_dec}; {common}"),
    ]
    del model, cache
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write {\"records\": [{name, value (mean), unit, median, note}]} here")
    ap.add_argument("--tiny", action="store_true", help="tiny-default shapes instead of 26B-A4B (for testing)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens = cached positions of the step (4096)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="weights and activations (bf16)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) (0: torch's default)")
    ap.add_argument("--experts", default="grouped_mm",
                    help="experts_implementation to ask for ('default': whatever this transformers picks)")
    args = ap.parse_args()
    if args.prompt < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 0:
        ap.error("--prompt and --iters must be >= 1, --warmup and --threads >= 0")
    rc = 0
    try:
        records = bench(args)
        for r in records:
            if not math.isfinite(r["value"]) or r["value"] <= 0:
                fail(f"{r['name']}: not a positive finite time: {r['value']}")
            print(f"{r['name']}: {r['value']:.3f} {r['unit']}  ({r['note']})", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"records": records}, f, indent=1)
                f.write("\n")
    except Failure as e:
        log(f"FAILED: {e}")
        rc = 2
    except Exception as e:  # noqa: BLE001  OOM, an API this transformers lacks, ...: a reason, never a number
        traceback.print_exc()
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        first = str(e).splitlines()[0][:300] if str(e) else ""
        log(f"FAILED: {'out of memory: ' if oom else ''}{type(e).__name__}: {first}")
        rc = 2
    finally:
        torch = sys.modules.get("torch")
        gc.collect()
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    if rc and args.json and os.path.exists(args.json):
        os.remove(args.json)  # no stale figures from an earlier run
    sys.exit(rc)


if __name__ == "__main__":
    main()
