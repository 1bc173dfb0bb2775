#!/usr/bin/env python
"""Regenerate dgemma's tiny DiffusionGemma reference checkpoints and reference dumps.

Everything under reference/models/ (except tokenizer files copied from reference/tokenizer/) and
reference/cases/ is written by this script, from scratch, deterministically (fixed seeds, one CPU thread; a rerun
rewrites every file byte for byte). Every bfloat16 case must have a bf16 sensitivity <= SENSITIVITY_MAX (README).

    /work/.venv-ref/bin/python reference/make_cases.py            # everything (about 40 s on 1 core)
    /work/.venv-ref/bin/python reference/make_cases.py --only default-f32   # one case (models are rebuilt)

See reference/README.md for the case-file contract and what each model / case covers.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

torch.set_num_threads(1)  # determinism + the build machine is shared; also keeps grouped_mm fast on CPU

import safetensors
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_ref  # noqa: E402
from safetensors.torch import load_file
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma import generation_diffusion_gemma as G
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
)

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
CASES = os.path.join(HERE, "cases")
TOKENIZER_DIR = os.path.join(HERE, "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

S, F = "sliding_attention", "full_attention"
EOS_IDS = [1, 106, 50]
PAD, EOS, BOS = 0, 1, 2

# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
#
# Weight recipe (all models). HF's random init leaves every RMSNorm weight, router.scale, router.per_expert_scale and
# layer_scalar at 1.0 and uses std 0.02 everywhere, which makes logits tiny (near-uniform softmax, ties in bf16) and
# hides (1 + w) vs w, scale and routing bugs. We overwrite everything below. The recipe is shaped by bf16
# conditioning (README "bf16 sensitivity"): the bf16 case logits must move by <= SENSITIVITY_MAX when torch's SDPA
# kernel is replaced by the exact formula, so that 1-ulp attention differences of a faithful engine stay far below
# the 0.15 bf16 tolerance. transformers rounds the lm_head output (the raw logit r) to bf16 and softcaps it in f32, so
# one bf16 ulp of r costs ulp(r) * (1 - tanh(r/30)^2) in the final logit: <= 0.031 for |r| < 8, 0.047..0.094 for
# 8 <= |r| < 43, <= 0.027 for r >= 55. The model is built so that every logit of a pass lies in the cheap ranges:
#   * embed_tokens (tied: also lm_head and the encoder embedding), an "axis" embedding. H "strong" ids (the specials
#     0, 1, 2, 3 and the eos ids 106, 50, plus random ordinary ids) are scaled coordinate axes, row = strong_norm *
#     onehot(axis). At a strong input the normalized hidden state is ~sqrt(H) on the token's axis, so its copy logit
#     is ~sqrt(H) * strong_norm ~ 67..83 (saturated by the softcap), and every other strong token's logit is
#     strong_norm times what the layers and self-conditioning put on that token's axis (|r| < ~4). The other ids are
#     small: alias_frac of them are "aliases", row = U(alias_norm) * onehot(axis of a random strong parent; the first
#     eos_aliases per eos id have an eos parent, so that EOS shows up in traces), which the decoder maps confidently
#     to their parent; the rest are "weak", dense N(0, weak_std^2) rows (zero on the eos axes), which leave the
#     decoder uncertain (partial acceptance, renoising). At a strong input, alias and weak logits stay below ~4.
#     A dense random embedding cannot do this at H = 64 or 48: its copy logit is only ~sqrt(H) times the typical
#     other logit, so a peaked distribution puts logits in the expensive range.
#   * every scaled text RMSNorm weight ~ U(0.5, 1.5), except (NORM_RANGES) post_attention_layernorm /
#     post_feedforward_layernorm ~ U(0.01, 0.02), post_feedforward_layernorm_2 ~ U(0.2, 0.4) and the final norm
#     ~ U(0.9, 1.1). The two small post-norms scale what each layer adds to the residual stream: small values keep
#     the input token dominant (a "copy" model whose argmax/entropy dynamics converge under the real sampler
#     defaults), and a 1-ulp change of an attention output reaches the residual stream only as small changes, which
#     is what keeps the sensitivity low. The layers still move the f32 logits by ~0.3..1.6 each (README). The narrow
#     final norm keeps the copy logits saturated and the other logits small.
#   * router.proj ~ N(0, router_std^2) (well separated expert choices), router.scale, per_expert_scale ~ U(0.5, 1.5)
#   * layer_scalar ~ U(0.6, 1.4), the SAME value in the encoder and the decoder copy (as the real conversion does)
#   * dense MLP / expert / attention projections ~ N(0, 1/fan_in) so GeGLU pre-activations are O(1) (exercises
#     gelu_tanh away from its linear region)
#   * self_conditioning MLP: N(0, 1/fan_in), down_proj rescaled so that RMS(sc signal) = sc_ratio * RMS(token emb)
#     for the one-hot soft input of a strong token: self-conditioning visibly changes the logits.
# Each parameter group draws from its own generator, so changing one recipe does not reshuffle the others.

# RMSNorm weight ranges by module name relative to the decoder, or its last component (first match; everything
# else U(0.5, 1.5))
NORM_RANGES = {
    "post_attention_layernorm": (0.01, 0.02),
    "post_feedforward_layernorm": (0.01, 0.02),
    "post_feedforward_layernorm_2": (0.2, 0.4),
    "norm": (0.9, 1.1),  # the final norm
}

MODEL_SPECS = {
    # The bundled default model: vocab 512 (matches reference/tokenizer), bf16 weights, real-checkpoint config schema,
    # real sampler defaults in generation_config.json. 6 layers [S,S,F,S,S,F]; 8 query heads; sliding layers
    # 4 kv heads x 16 (GQA 2), full layers 1 kv head x 32 (GQA 8, K = V, proportional RoPE on 4 of 16 pairs).
    "tiny-default": dict(
        seed=3, vocab=512, image_ids=(7, 5, 6),  # image / boi / eoi ids of reference/tokenizer
        hidden=64, inter=96, layers=(S, S, F, S, S, F), heads=8, kv=4, hd=16, gkv=1, ghd=32,
        window=16, experts=8, topk=2, moe=32, canvas=16,
        strong_norm=9.375, weak_std=0.12, alias_frac=0.7, alias_norm=(0.25, 0.45), eos_aliases=3, router_std=4.0,
        sc_ratio=0.05,
        norm_ranges=dict(NORM_RANGES),
        store_dtype=torch.bfloat16, schema="real", max_shard_size=None,
        gen=dict(max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                 stability_threshold=1, confidence_threshold=0.005),
    ),
    # f32 weights, the 5.23 `per_layer_config` schema exactly as save_pretrained writes it, 5 shards + index.
    # hidden 48: embed scale sqrt(48) = 6.928.. is not a bf16 number (bf16 -> 6.9375), like the real 2816 -> 53.0.
    # Layers [S,F,S,S,F]; 4 query heads; sliding layers MHA (4 kv x 24), full layers GQA 4 (1 kv x 64, proportional
    # RoPE on 8 of 32 pairs); 6 experts top-3; window 8, canvas 8.
    "tiny-sharded-f32": dict(
        seed=5, vocab=320, image_ids=(317, 318, 319),
        hidden=48, inter=80, layers=(S, F, S, S, F), heads=4, kv=4, hd=24, gkv=1, ghd=64,
        window=8, experts=6, topk=3, moe=24, canvas=8,
        strong_norm=10.75, weak_std=0.12, alias_frac=0.7, alias_norm=(0.25, 0.45), eos_aliases=3, router_std=4.0,
        sc_ratio=0.05,
        norm_ranges=dict(NORM_RANGES),
        store_dtype=torch.float32, schema="per_layer_config", max_shard_size="300KB",
        # non-default sampler settings (exercise generation_config parsing; stability over 2 previous steps)
        gen=dict(max_new_tokens=64, max_denoising_steps=24, entropy_bound=0.3, t_min=0.3, t_max=0.9,
                 stability_threshold=2, confidence_threshold=0.01),
    ),
}


def build_model(spec):
    seed = spec["seed"]
    torch.manual_seed(seed)  # HF init of everything we do not overwrite (vision tower)
    V, Hd = spec["vocab"], spec["hidden"]
    text_config = dict(
        vocab_size=V, hidden_size=Hd, intermediate_size=spec["inter"], num_hidden_layers=len(spec["layers"]),
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"], head_dim=spec["hd"],
        global_head_dim=spec["ghd"], num_global_key_value_heads=spec["gkv"], max_position_embeddings=4096,
        sliding_window=spec["window"], layer_types=list(spec["layers"]), num_experts=spec["experts"],
        top_k_experts=spec["topk"], moe_intermediate_size=spec["moe"], pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=BOS, use_bidirectional_attention="vision",
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
    )
    vision_config = dict(  # always instantiated; keep it tiny (position table 16 instead of 10240)
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        intermediate_size=32, patch_size=4, position_embedding_size=16, standardize=True,
    )
    image, boi, eoi = spec["image_ids"]
    config = DiffusionGemmaConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=image, boi_token_id=boi,
        eoi_token_id=eoi, canvas_length=spec["canvas"],
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval()

    # one generator per parameter group, so that changing one recipe does not reshuffle the others
    gens = {grp: torch.Generator().manual_seed(seed * 100 + j)
            for j, grp in enumerate(("emb", "norm", "proj", "router", "scalar", "sc"))}

    def U(grp, shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gens[grp])

    def N(grp, shape, std):
        return torch.randn(shape, generator=gens[grp]) * std

    dec = model.model.decoder
    enc_layers = model.model.encoder.language_model.layers
    with torch.no_grad():
        W = dec.embed_tokens.weight
        # "axis" embedding (see the recipe above): H strong ids, each a coordinate axis scaled to strong_norm; the
        # others are aliases (a small row on a strong parent's axis) or weak (a small dense random row)
        special = sorted({PAD, EOS, BOS, 3, *EOS_IDS})
        perm = torch.randperm(V, generator=gens["emb"]).tolist()
        strong = special + [i for i in perm if i not in special][:Hd - len(special)]
        axes = torch.randperm(Hd, generator=gens["emb"])
        W.copy_(N("emb", W.shape, spec["weak_std"]))
        W[:, axes[[strong.index(e) for e in EOS_IDS]]] = 0.0  # weak rows never point at an EOS axis
        rest = [i for i in perm if i not in strong]
        n_alias = round(spec["alias_frac"] * len(rest))
        alias, parents = rest[:n_alias], [i for i in strong if i not in special]
        parent = torch.tensor(parents)[torch.randint(0, len(parents), (n_alias,), generator=gens["emb"])]
        parent[:spec["eos_aliases"] * len(EOS_IDS)] = torch.tensor(EOS_IDS).repeat(spec["eos_aliases"])
        W[alias] = 0.0
        W[alias, axes[[strong.index(int(p)) for p in parent]]] = U("emb", (n_alias,), *spec["alias_norm"])
        W[strong] = 0.0
        W[strong, axes] = spec["strong_norm"]
        for name, mod in dec.named_modules():
            if type(mod).__name__ == "DiffusionGemmaRMSNorm" and mod.with_scale:
                lo, hi = next((r for key, r in spec["norm_ranges"].items() if name == key or name.endswith("." + key)),
                              (0.5, 1.5))
                mod.weight.copy_(U("norm", mod.weight.shape, lo, hi))
        for i, layer in enumerate(dec.layers):
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                if lin is not None:
                    lin.weight.copy_(N("proj", lin.weight.shape, lin.weight.shape[1] ** -0.5))
            layer.experts.gate_up_proj.copy_(N("proj", layer.experts.gate_up_proj.shape, Hd ** -0.5))
            layer.experts.down_proj.copy_(N("proj", layer.experts.down_proj.shape, spec["moe"] ** -0.5))
            layer.router.proj.weight.copy_(N("router", layer.router.proj.weight.shape, spec["router_std"]))
            layer.router.scale.copy_(U("router", layer.router.scale.shape, 0.5, 1.5))
            layer.router.per_expert_scale.copy_(U("router", layer.router.per_expert_scale.shape, 0.5, 1.5))
            scalar = U("scalar", (1,), 0.6, 1.4)
            layer.layer_scalar.copy_(scalar)
            enc_layers[i].layer_scalar.copy_(scalar)  # buffer, not tied: must be set on both sides
        sc = dec.self_conditioning
        for lin in (sc.gate_proj, sc.up_proj, sc.down_proj):
            lin.weight.copy_(N("sc", lin.weight.shape, lin.weight.shape[1] ** -0.5))
        e = dec.embed_tokens(torch.tensor(strong))  # one-hot soft inputs of the strong ids
        normed = sc.pre_norm(e)
        s = sc.down_proj(sc.act_fn(sc.gate_proj(normed)) * sc.up_proj(normed))
        sc.down_proj.weight.mul_(spec["sc_ratio"] * e.pow(2).mean().sqrt() / s.pow(2).mean().sqrt())
    # sanity: encoder text weights are tied to the decoder ones (same storage)
    assert model.model.encoder.language_model.embed_tokens.weight.data_ptr() == W.data_ptr()
    assert enc_layers[0].router.scale.data_ptr() == dec.layers[0].router.scale.data_ptr()
    assert model.lm_head.weight.data_ptr() == W.data_ptr()
    return model


def generation_config(spec):
    gs = spec["gen"]
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=gs["max_new_tokens"], max_denoising_steps=gs["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=gs["entropy_bound"]),
        t_min=gs["t_min"], t_max=gs["t_max"], stability_threshold=gs["stability_threshold"],
        confidence_threshold=gs["confidence_threshold"], eos_token_id=list(EOS_IDS), pad_token_id=PAD,
        bos_token_id=BOS,
    )


def to_real_schema(config_path):
    """Rewrite a save_pretrained config.json (5.23 per_layer_config schema) into the real checkpoint's schema."""
    with open(config_path) as f:
        cfg = json.load(f)
    tc = cfg["text_config"]
    plc = tc.pop("per_layer_config")
    overrides = {json.dumps(v, sort_keys=True) for v in plc.values()}
    assert len(overrides) == 1, plc
    ov = next(iter(plc.values()))
    full_layers = sorted(int(k) for k in plc)
    assert full_layers == [i for i, t in enumerate(tc["layer_types"]) if t == F], (plc, tc["layer_types"])
    out_tc = {}
    for k, v in tc.items():  # keep key order, insert the two fields after head_dim
        out_tc[k] = v
        if k == "head_dim":
            out_tc["global_head_dim"] = ov["head_dim"]
            out_tc["num_global_key_value_heads"] = ov["num_key_value_heads"]
    cfg["text_config"] = out_tc
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------------
# FP8 experts (issue #6)
# ---------------------------------------------------------------------------------------------------------------------
#
# models/tiny-fp8 is tiny-default with its MoE experts quantised the way dgemma's `--quant fp8` quantises them
# (crates/dgemma-model/src/fp8.rs): per output row, scale = float32(max |w|) / 448, code = e4m3(w / scale) rounded to
# nearest even and saturated at +-448, and written as a compressed-tensors FP8 checkpoint (the layout of
# RedHatAI's FP8-dynamic repositories): per-expert Linears `<layer>.experts.{e}.{gate,up,down}_proj.weight`
# (F8_E4M3 [out, in]) with `.weight_scale` (F32 [out, 1]) and a `quantization_config`. Transformers runs the case on
# the dequantised weights, bf16(float32(code) * scale), held by an otherwise identical bf16 model (a temporary
# directory): what a bf16 engine holding the FP8 checkpoint's values computes, so the case's tolerance is the bf16
# one.
FP8_MODEL, FP8_SOURCE = "tiny-fp8", "tiny-default"
E4M3_MAX = 448.0
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
    }},
    "ignore": ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*vision_tower.*", "re:.*self_conditioning.*"],
}


def quantize_experts(w):
    """[E, N, K] float weights -> (e4m3 codes [E, N, K], float32 row scales [E, N])."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1) / E4M3_MAX
    assert bool((scale > 0).all() and scale.isfinite().all()), "a zero or non-finite expert row"
    codes = (wf / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def write_fp8_models(src_dir, log):
    """models/tiny-fp8 (FP8 experts, compressed-tensors) and a temporary directory with the same model's dequantised
    bf16 experts, for transformers. Returns (fp8 dir, dequantised dir)."""
    fp8_dir, deq_dir = os.path.join(MODELS, FP8_MODEL), tempfile.mkdtemp(prefix="dgemma-fp8-deq-")
    shutil.rmtree(fp8_dir, ignore_errors=True)
    os.makedirs(fp8_dir)
    for fn in os.listdir(src_dir):
        if fn != "model.safetensors" and fn != "config.json":
            for d in (fp8_dir, deq_dir):
                shutil.copy(os.path.join(src_dir, fn), os.path.join(d, fn))
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    shutil.copy(os.path.join(src_dir, "config.json"), os.path.join(deq_dir, "config.json"))
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump(dict(config, quantization_config=FP8_QUANTIZATION_CONFIG), f, indent=2)
        f.write("\n")
    src = load_file(os.path.join(src_dir, "model.safetensors"))
    fp8, deq = {}, {}
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    for name, t in src.items():
        layer, _, fused = name.rpartition(".experts.")
        if not layer or fused not in parts:
            fp8[name] = deq[name] = t
            continue
        codes, scale = quantize_experts(t)
        deq[name] = (codes.float() * scale[..., None]).to(t.dtype)
        rows = t.shape[1] // len(parts[fused])
        for e in range(t.shape[0]):
            for i, part in enumerate(parts[fused]):
                fp8[f"{layer}.experts.{e}.{part}.weight"] = codes[e, i * rows:(i + 1) * rows].contiguous()
                fp8[f"{layer}.experts.{e}.{part}.weight_scale"] = scale[e, i * rows:(i + 1) * rows, None].contiguous()
    save_safetensors_plain(fp8, os.path.join(fp8_dir, "model.safetensors"))
    save_safetensors_plain(deq, os.path.join(deq_dir, "model.safetensors"))
    log(f"{FP8_MODEL}: {sum(1 for n in fp8 if n.endswith('.weight_scale'))} FP8 expert Linears "
        f"({os.path.getsize(os.path.join(fp8_dir, 'model.safetensors'))} bytes)")
    return fp8_dir, deq_dir


def save_safetensors_plain(tensors, path):
    safetensors.torch.save_file({k: tensors[k] for k in sorted(tensors)}, path, metadata={"format": "pt"})


def load(model_dir, dtype):
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=dtype).eval()
    return model


def write_model(name, spec, log):
    out = os.path.join(MODELS, name)
    if os.path.isdir(out):
        for fn in os.listdir(out):  # keep nothing stale (shards), but never touch anything else
            os.remove(os.path.join(out, fn))
    os.makedirs(out, exist_ok=True)
    model = build_model(spec)
    model.to(spec["store_dtype"])
    model.generation_config = generation_config(spec)
    kw = {} if spec["max_shard_size"] is None else {"max_shard_size": spec["max_shard_size"]}
    model.save_pretrained(out, **kw)
    if spec["schema"] == "real":
        # check: the per_layer_config file and the rewritten real-schema file load to identical models/logits
        with tempfile.TemporaryDirectory() as td:
            for fn in os.listdir(out):
                shutil.copy(os.path.join(out, fn), td)
            to_real_schema(os.path.join(out, "config.json"))
            a, b = load(td, torch.float32), load(out, torch.float32)
            pa = a.config.text_config.to_dict()["per_layer_config"]
            pb = b.config.text_config.to_dict()["per_layer_config"]
            assert {str(k): v for k, v in pa.items()} == {str(k): v for k, v in pb.items()}, (pa, pb)
            for la_, lb_ in zip(a.model.decoder.layers, b.model.decoder.layers):
                assert (la_.self_attn.head_dim, la_.self_attn.num_key_value_groups) == \
                    (lb_.self_attn.head_dim, lb_.self_attn.num_key_value_groups)
            prompt = torch.tensor([[BOS] + list(range(10, 10 + spec["window"] + 5))])
            canvas = torch.randint(0, spec["vocab"], (1, spec["canvas"]), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                la = a(input_ids=prompt, decoder_input_ids=canvas).logits
                lb = b(input_ids=prompt, decoder_input_ids=canvas).logits
            assert torch.equal(la, lb), "real-schema config.json does not reproduce the per_layer_config model"
            log(f"  {name}: real-schema config.json reloads to identical per_layer_config and bit-identical logits")
    # checkpoint key-set checks (what real checkpoints look like)
    keys = {}
    for fn in os.listdir(out):
        if fn.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(out, fn), "pt") as f:
                for k in f.keys():
                    keys[k] = f.get_slice(k).get_dtype()
    assert "lm_head.weight" not in keys
    assert "model.decoder.embed_tokens.weight" in keys
    enc_text = [k for k in keys if k.startswith("model.encoder.language_model.")]
    assert all(k.endswith("layer_scalar") for k in enc_text) and len(enc_text) == len(spec["layers"]), enc_text
    assert any(k.startswith("model.encoder.vision_tower.") for k in keys)
    assert any(k.startswith("model.encoder.embed_vision.") for k in keys)
    for i, t in enumerate(spec["layers"]):
        assert (f"model.decoder.layers.{i}.self_attn.v_proj.weight" in keys) == (t == S)
    want = {torch.bfloat16: "BF16", torch.float32: "F32"}[spec["store_dtype"]]
    assert set(keys.values()) == {want}, set(keys.values())
    shards = [fn for fn in os.listdir(out) if fn.endswith(".safetensors")]
    if spec["max_shard_size"] is not None:
        assert len(shards) >= 3 and os.path.exists(os.path.join(out, "model.safetensors.index.json")), shards
    # non-trivial values: no scaled text RMSNorm weight / router scale / layer_scalar left at its init value
    m = load(out, torch.float32)
    sd = m.state_dict()
    for k, v in sd.items():
        if "vision" in k or not (k.endswith("norm.weight") or "layernorm" in k or k.endswith("router.scale")
                                 or k.endswith("per_expert_scale") or k.endswith("layer_scalar")):
            continue
        assert float(v.min()) >= 0.005 and float((v == 1.0).float().mean()) < 0.2, (k, v)
    # encoder and decoder layer_scalar copies hold the same value
    for i in range(len(spec["layers"])):
        a = m.model.encoder.language_model.layers[i].layer_scalar
        b = m.model.decoder.layers[i].layer_scalar
        assert torch.equal(a, b) and abs(a.item() - 1.0) > 0.01
    # tokenizer (produced by another engineer) for the bundled default model
    copied = []
    if name == "tiny-default":
        for fn in TOKENIZER_FILES:
            src = os.path.join(TOKENIZER_DIR, fn)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out, fn))
                copied.append(fn)
        missing = [fn for fn in TOKENIZER_FILES if fn not in copied]
        if missing:
            log(f"  WARNING: {name}: tokenizer files missing from reference/tokenizer/: {missing}")
    for fn in os.listdir(out):
        os.chmod(os.path.join(out, fn), 0o644)  # save_pretrained writes the weights 0600
    size = sum(os.path.getsize(os.path.join(out, fn)) for fn in os.listdir(out))
    log(f"  wrote models/{name}: {len(keys)} tensors in {len(shards)} shard(s), {size / 1024:.0f} KiB"
        + (f", tokenizer files {copied}" if copied else ""))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tracing generate: record the RNG tape and per-step sampler state; replay the tape
# ---------------------------------------------------------------------------------------------------------------------


def entropy(logits):
    return torch.distributions.Categorical(logits=logits).entropy()


@contextlib.contextmanager
def record(model):
    """Record every torch.randint / torch.multinomial result drawn during generate (in call order) and, per decoder
    pass, the inputs, raw logits, processed logits, acceptance mask and stopping-criterion state."""
    tape, steps = [], []
    o_randint, o_multinomial = torch.randint, torch.multinomial
    o_accept = G.EntropyBoundSampler.accept_canvas
    o_stop = G.StableAndConfidentStoppingCriteria.__call__
    o_forward = model.forward

    def randint(*a, **k):
        t = o_randint(*a, **k)
        tape.append(("randint", t.clone()))
        return t

    def multinomial(*a, **k):
        t = o_multinomial(*a, **k)
        tape.append(("multinomial", t.clone()))
        return t

    def forward(*a, **k):
        out = o_forward(*a, **k)
        sc = k.get("self_conditioning_logits")
        steps.append(dict(canvas=k["decoder_input_ids"].clone(), sc=None if sc is None else sc.clone(),
                          raw=out.logits.detach().clone(), pos=k["decoder_position_ids"].clone()))
        return out

    def accept(self, current_canvas, denoiser_canvas, logits, cur_step):
        r = o_accept(self, current_canvas, denoiser_canvas, logits, cur_step)
        steps[-1].update(processed=logits.clone(), accept=self.accepted_token_mask.clone(), cur_step=int(cur_step),
                         bound=self.entropy_bound)
        return r

    def stop(self, argmax_canvas, logits, **kw):
        hist = None if self.argmax_canvas_history is None else self.argmax_canvas_history.clone()
        r = o_stop(self, argmax_canvas, logits, **kw)
        steps[-1].update(argmax=argmax_canvas.clone(), hist=hist, stop=bool(r.all()),
                         mean_H=float(entropy(logits).mean()), conf_thr=self.confidence_threshold,
                         stab_thr=self.stability_threshold)
        return r

    torch.randint, torch.multinomial = randint, multinomial
    G.EntropyBoundSampler.accept_canvas = accept
    G.StableAndConfidentStoppingCriteria.__call__ = stop
    model.forward = forward
    try:
        yield tape, steps
    finally:
        torch.randint, torch.multinomial = o_randint, o_multinomial
        G.EntropyBoundSampler.accept_canvas = o_accept
        G.StableAndConfidentStoppingCriteria.__call__ = o_stop
        del model.forward


@contextlib.contextmanager
def replay(tape):
    """Patch torch.randint / torch.multinomial to return the recorded tensors, in order."""
    it = iter(list(tape))
    o_randint, o_multinomial = torch.randint, torch.multinomial

    def randint(*a, size=None, **k):
        kind, t = next(it)
        assert kind == "randint" and tuple(size) == tuple(t.shape), (kind, size, t.shape)
        return t.clone()

    def multinomial(probs, num_samples, **k):
        kind, t = next(it)
        assert kind == "multinomial" and tuple(t.shape) == (probs.shape[0], num_samples), (kind, t.shape)
        return t.clone()

    torch.randint, torch.multinomial = randint, multinomial
    try:
        yield
    finally:
        torch.randint, torch.multinomial = o_randint, o_multinomial
    assert next(it, None) is None, "tape not fully consumed"


# ---------------------------------------------------------------------------------------------------------------------
# bf16 sensitivity: how far transformers' own bf16 logits move when SDPA is replaced by the exact formula
# ---------------------------------------------------------------------------------------------------------------------
#
# torch's CPU SDPA for bf16 (the flash-attention kernel with oneDNN brgemm) and the plain formula below (f32 scores,
# f32 softmax, P rounded to bf16 for P.V, f32 accumulation, one final rounding) differ by 1 bf16 ulp in a fraction of
# the attention outputs. An engine that is not bit-identical to torch's kernel has such 1-ulp differences too, and the
# model then amplifies them. The resulting logit difference is the noise floor of any faithful bf16 engine on that
# case; the bf16 tolerance (0.15) must sit well above it. Every bf16 case records it and must stay <= SENSITIVITY_MAX.

SENSITIVITY_MAX = 0.05
_MDG = sys.modules[DiffusionGemmaForBlockDiffusion.__module__]


def exact_sdpa(module, q, k, v, mask, scaling=1.0, is_causal=False, **kw):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    s = q.float() @ k.float().transpose(-1, -2)
    S, L = s.shape[-2], s.shape[-1]
    if mask is not None:
        s = s.masked_fill(~(mask if mask.dtype == torch.bool else mask == 0), float("-inf"))
    elif is_causal and S > 1:
        i = torch.arange(S)[:, None] + (L - S)
        j = torch.arange(L)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    e = (s - mx).exp()
    o = ((e.bfloat16().float() @ v.float()) / e.sum(-1, keepdim=True)).bfloat16()
    return o.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def exact_attention():
    """Replace transformers' "sdpa" attention function (encoder and decoder) by exact_sdpa."""
    funcs = _MDG.ALL_ATTENTION_FUNCTIONS
    orig = funcs["sdpa"]
    funcs["sdpa"] = exact_sdpa
    try:
        yield
    finally:
        funcs["sdpa"] = orig


def bf16_sensitivity(model, prompt, canvases, scs, logits):
    """Per pass: max |logits - logits with exact_sdpa|, on exactly the case's inputs (canvas, sc_logits): the engine
    under test gets the same inputs."""
    out = []
    with torch.no_grad(), exact_attention():
        for canvas, sc, ref in zip(canvases, scs, logits):
            pl = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits[0].float()
            out.append(float((pl - ref).abs().max()))
    return out


def exact_sdpa_replay(model, prompt, tape, max_new_tokens, steps_n):
    """Replay a trace's tape (`tape` = (tape, the unpatched raw logits per step)) through generate with exact_sdpa in
    place of torch's SDPA. Returns (True, max |raw logit difference| over all steps, output ids) if generate follows
    the recorded path to the end, else (False, None, None)."""
    tape, ref_raws = tape
    raws = []
    o_forward = model.forward

    def forward(*a, **k):
        out = o_forward(*a, **k)
        raws.append(out.logits.detach().float().clone())
        return out

    model.forward = forward
    try:
        with torch.no_grad(), exact_attention(), replay(tape):
            out = model.generate(prompt, max_new_tokens=max_new_tokens, max_denoising_steps=steps_n)
        seq = out.sequences[0]
    except (AssertionError, StopIteration, RuntimeError):  # the replay left the recorded path
        return False, None, None
    finally:
        del model.forward
    return True, max(float((a - b.float()).abs().max()) for a, b in zip(raws, ref_raws)), seq


def split_tape(tape):
    """Per block: the initial-canvas randint, then per step (multinomial sample, renoise randint)."""
    blocks, prev = [], None
    for kind, t in tape:
        if kind == "randint" and prev != "multinomial":
            blocks.append(dict(init=t.reshape(-1), steps=[]))
        elif kind == "multinomial":
            blocks[-1]["steps"].append([t.reshape(-1), None])
        else:
            blocks[-1]["steps"][-1][1] = t.reshape(-1)
        prev = kind
    for b in blocks:
        assert all(r is not None for _, r in b["steps"])
    return blocks


def top2_gap(raw):  # [C, V] -> [C]
    v = raw.topk(2, dim=-1).values
    return v[:, 0] - v[:, 1]


def trace_margins(steps, blocks_steps, output_ids, prompt_len, canvas):
    """Robustness margins of a trace (see README). blocks_steps: number of decoder passes per block.

    Absolute margins: logit units for top-2 gaps, nats for entropies. Relative margins divide the entropy margins by
    the quantity they are compared with (the bound, the larger entropy, the threshold): a logit error d changes the
    entropy of a peaked distribution by a RELATIVE amount ~ d / T, so these are what bf16 noise has to beat.
    """
    inf = math.inf
    m = dict(commit_gap=inf, stability_gap=inf, all_gap=inf, accept_margin=inf, accept_rel=inf, sort_gap=inf,
             sort_rel=inf, conf_gap=inf, conf_rel=inf, conf_gap_all=inf)
    i = 0
    new = output_ids[prompt_len:]
    for b, n in enumerate(blocks_steps):
        bsteps = steps[i:i + n]
        i += n
        for j, s in enumerate(bsteps):
            raw = s["raw"][0]
            gaps = top2_gap(raw)
            m["all_gap"] = min(m["all_gap"], float(gaps.min()))
            H = entropy(s["processed"][0])
            Hs, _ = torch.sort(H)
            lower = torch.cumsum(Hs, 0) - Hs  # sum of strictly lower-ranked entropies
            bound = s["bound"]
            acc = lower <= bound
            k = int(acc.sum())  # accepted = sorted prefix of length k
            assert bool(acc[:k].all()) and int(s["accept"].sum()) == k
            m["accept_margin"] = min(m["accept_margin"], float(bound - lower[k - 1]))
            m["accept_rel"] = min(m["accept_rel"], float(bound - lower[k - 1]) / bound)
            if k < len(Hs):
                m["accept_margin"] = min(m["accept_margin"], float(lower[k] - bound))
                m["accept_rel"] = min(m["accept_rel"], float(lower[k] - bound) / bound)
                m["sort_gap"] = min(m["sort_gap"], float(Hs[k] - Hs[k - 1]))
                m["sort_rel"] = min(m["sort_rel"], float(Hs[k] - Hs[k - 1]) / float(Hs[k]))
            cg = abs(s["mean_H"] - s["conf_thr"])
            m["conf_gap_all"] = min(m["conf_gap_all"], cg)
            stab = s["stab_thr"]
            if stab == 0:  # always "stable": every step's stop decision is the confidence test
                m["conf_gap"] = min(m["conf_gap"], cg)
                m["conf_rel"] = min(m["conf_rel"], cg / s["conf_thr"])
            elif j >= stab:  # all history entries are real argmaxes (not the initial -1)
                hist = s["hist"][:, 0]  # [stab, C]: the argmax canvases of steps j-stab .. j-1
                differ = (hist != s["argmax"][0][None]).any(0)  # positions that differ from some history entry
                n_diff = int(differ.sum())
                if n_diff == 0:  # stable: the stop decision hinges on the confidence test
                    m["conf_gap"] = min(m["conf_gap"], cg)
                    m["conf_rel"] = min(m["conf_rel"], cg / s["conf_thr"])
                confident = s["mean_H"] < s["conf_thr"]
                if confident and n_diff <= 1:  # the stop decision hinges on the argmax of this and previous steps
                    window = [gaps] + [top2_gap(bsteps[j - h]["raw"][0]) for h in range(1, stab + 1)]
                    sel = slice(None) if n_diff == 0 else int(differ.nonzero()[0, 0])
                    g = min(float(torch.as_tensor(w[sel]).min()) for w in window)
                    m["stability_gap"] = min(m["stability_gap"], g)
        # committed canvas = argmax of the block's last executed step; after the first EOS only pad matters
        last = bsteps[-1]
        committed = last["argmax"][0]
        blk = new[b * canvas:(b + 1) * canvas]
        is_eos = torch.isin(committed, torch.tensor(EOS_IDS))
        upto = canvas if not bool(is_eos.any()) else int(is_eos.nonzero()[0]) + 1
        assert torch.equal(blk[:upto], committed[:upto])
        m["commit_gap"] = min(m["commit_gap"], float(top2_gap(last["raw"][0])[:upto].min()))
    assert i == len(steps)
    return m


def run_trace(model, prompt, max_new_tokens, steps_n, seed):
    torch.manual_seed(seed)
    with torch.no_grad(), record(model) as (tape, steps):
        out = model.generate(prompt, max_new_tokens=max_new_tokens, max_denoising_steps=steps_n)
    seq = out.sequences[0]
    blocks = split_tape(tape)
    assert len(steps) == sum(len(b["steps"]) for b in blocks)
    nb = len(blocks)
    canvas = model.config.canvas_length
    assert seq.shape[0] == prompt.shape[1] + nb * canvas
    return dict(seq=seq, tape=tape, steps=steps, blocks=blocks, seed=seed)


def describe_trace(tr, model, prompt, max_new_tokens, steps_n):
    canvas = model.config.canvas_length
    new = tr["seq"][prompt.shape[1]:]
    nb = len(tr["blocks"])
    final = new[(nb - 1) * canvas:]
    eos_pos = torch.isin(final, torch.tensor(EOS_IDS)).nonzero()
    first_eos = None if len(eos_pos) == 0 else (int(final[eos_pos[0, 0]]), int(eos_pos[0, 0]))
    any_earlier_eos = bool(torch.isin(new[:(nb - 1) * canvas], torch.tensor(EOS_IDS)).any())
    assert not any_earlier_eos  # otherwise generation would have stopped earlier
    steps_per_block = [len(b["steps"]) for b in tr["blocks"]]
    stopped_early = [s["stop"] for s in _last_steps(tr["steps"], steps_per_block)]
    return dict(n_blocks=nb, max_blocks=math.ceil(max_new_tokens / canvas), first_eos=first_eos, canvas=canvas,
                steps_per_block=steps_per_block, stopped_early=stopped_early,
                n_accept=[int(s["accept"].sum()) for s in tr["steps"]])


def _last_steps(steps, steps_per_block):
    out, i = [], 0
    for n in steps_per_block:
        i += n
        out.append(steps[i - 1])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Trace selection. Candidates are generate() seeds 0..N_CANDIDATES-1. A candidate must show the wanted behaviour
# (see wants()); among those the one with the best score is kept, stopping early once the score reaches the target.
# score = min over margins of (margin / expected engine noise):
#   top-2 logit gaps (commit_gap, stability_gap) / noise_gap        [absolute, logit units]
#   relative entropy margins (accept_rel, sort_rel, conf_rel) / noise_rel
# bf16 noise: a bf16 engine differs from torch-CPU-bf16 by O(0.05..0.15) in the logits; a logit error d moves the
# entropy of a peaked distribution by a relative ~ d / T (T >= 0.4), i.e. ~10..30 %.
NOISE = {"float32": dict(gap=2e-3, rel=1e-3), "bfloat16": dict(gap=0.15, rel=0.1)}
TARGET_SCORE = {"float32": 10.0, "bfloat16": 2.0}
N_CANDIDATES = {"float32": 40, "bfloat16": 60}


def trace_score(mg, dtype_name):
    nz = NOISE[dtype_name]
    return min(mg["commit_gap"] / nz["gap"], mg["stability_gap"] / nz["gap"], mg["accept_rel"] / nz["rel"],
               mg["sort_rel"] / nz["rel"], mg["conf_rel"] / nz["rel"])


def make_prompt(spec, vocab, model_dir):
    """("random", n, seed): BOS + n-1 ordinary ids; ("chat", text): the chat template of the model dir's tokenizer
    (falls back to a random 23-token prompt, with a warning, if the tokenizer files are missing)."""
    if spec[0] == "chat":
        if all(os.path.exists(os.path.join(model_dir, fn)) for fn in TOKENIZER_FILES):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model_dir)
            enc = tok.apply_chat_template([{"role": "user", "content": spec[1]}], add_generation_prompt=True,
                                          tokenize=True)
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
            return torch.tensor([list(ids)], dtype=torch.long)
        print(f"  WARNING: no tokenizer in {model_dir}: random prompt instead of the chat prompt {spec[1]!r}")
        spec = ("random", 23, 99)
    _, n, seed = spec
    g = torch.Generator().manual_seed(seed)
    # avoid specials / control tokens (ids < 12), the eos ids and the top of the vocab
    body = torch.randint(12, vocab - 3, (n - 1,), generator=g)
    for e in EOS_IDS:
        body[body == e] = e + 7
    return torch.cat([torch.tensor([BOS]), body]).unsqueeze(0)


CHAT_TEXT = "Why is the sky blue?"


def _eos_cases(dtype, tag):
    return [dict(name=f"default-{tag}-eos{e}", model="tiny-default", dtype=dtype, prompt=("random", 20, 30 + e),
                 trace=dict(max_new_tokens=64, steps=16, want="eos", eos=e)) for e in EOS_IDS]


CASE_SPECS = [
    # tiny-default (real sampler defaults); the chat prompt (23 tokens with reference/tokenizer) > sliding window 16
    dict(name="default-f32", model="tiny-default", dtype="float32", prompt=("chat", CHAT_TEXT),
         trace=dict(max_new_tokens=64, steps=16, want="long")),
    dict(name="default-bf16", model="tiny-default", dtype="bfloat16", prompt=("chat", CHAT_TEXT),
         trace=dict(max_new_tokens=64, steps=16, want="long")),
    # prompt shorter than the window; the real N = 48 schedule
    dict(name="default-f32-short", model="tiny-default", dtype="float32", prompt=("random", 5, 12),
         trace=dict(max_new_tokens=48, steps=48, want="long")),
    *_eos_cases("float32", "f32"),
    *_eos_cases("bfloat16", "bf16"),
    # tiny-sharded-f32 (non-default sampler settings, stability_threshold 2), prompt 20 > sliding window 8
    dict(name="sharded-f32", model="tiny-sharded-f32", dtype="float32", prompt=("random", 20, 21),
         trace=dict(max_new_tokens=40, steps=24, want="long")),
    dict(name="sharded-bf16", model="tiny-sharded-f32", dtype="bfloat16", prompt=("random", 20, 21),
         trace=dict(max_new_tokens=40, steps=24, want="long")),
    # tiny-fp8: tiny-default's experts in FP8 (see write_fp8_models); transformers on the dequantised weights
    dict(name="fp8-bf16", model="tiny-fp8", dtype="bfloat16", prompt=("chat", CHAT_TEXT),
         trace=dict(max_new_tokens=64, steps=16, want="long")),
]


def wants(desc, want):
    """0: reject, 1: acceptable, 2: what we want."""
    if want == "long":  # >= 3 canvases, some early stop, some partial acceptance (renoising)
        return 2 * (desc["n_blocks"] >= 3 and any(desc["stopped_early"]) and
                    any(n < desc["canvas"] for n in desc["n_accept"]))
    if want[0] == "eos":  # the first EOS of the final canvas is want[1], and generation stopped early because of it
        if desc["first_eos"] is None or desc["first_eos"][0] != want[1] or desc["n_blocks"] >= desc["max_blocks"]:
            return 0
        return 2 if desc["n_blocks"] >= 2 else 1  # prefer an EOS after at least one committed canvas
    raise ValueError(want)


def fmt(x):
    return "inf" if x == math.inf else f"{x:.6g}"


def temperature(proc, cur_step):
    """The float32 temperature generate() divides by: cur_step is an int32 tensor there, so the schedule
    t_min + (t_max - t_min) * (cur_step / N) is evaluated in float32 tensor arithmetic, not in float64."""
    return proc.t_min + (proc.t_max - proc.t_min) * (torch.tensor(cur_step, dtype=torch.int32) / proc.max_denoising_steps)


def canvas_vocab(model):
    """Ids the teacher-forced pass canvases are drawn from: the strong ids (see build_model), found as the rows with at
    least half the largest norm. Alias and weak inputs give less peaked distributions (larger logits in the expensive
    bf16 range, and near-tied argmaxes that a bf16 engine may legitimately flip)."""
    norms = model.model.decoder.embed_tokens.weight.float().norm(dim=-1)
    return (norms >= 0.5 * norms.max()).nonzero()[:, 0]


def run_passes(model, prompt, V, C, steps_n, pass_seed):
    """pass0: random canvas, no sc; pass k+1: new random canvas, sc = dtype(pass k logits / T(N - k))."""
    ids = canvas_vocab(model)
    gcfg = model.generation_config
    proc = LinearTemperatureScheduleLogitsProcessor(gcfg.t_min, gcfg.t_max, steps_n)
    emb_dtype = model.model.decoder.embed_tokens.weight.dtype
    g = torch.Generator().manual_seed(pass_seed)
    sc, logits, canvases, scs, temps = None, [], [], [], []
    for k in range(3):
        canvas = ids[torch.randint(0, len(ids), (1, C), generator=g)]
        with torch.no_grad():  # a fresh encoder run over exactly prompt_ids for every pass
            out = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc)
        logits.append(out.logits[0].float())
        canvases.append(canvas)
        scs.append(sc)
        cur_step = torch.tensor(steps_n - k, dtype=torch.int32)
        temps.append(float(temperature(proc, steps_n - k)))
        sc = proc(None, out.logits, cur_step=cur_step).to(emb_dtype)  # exactly what generate feeds back
    return logits, canvases, scs, temps


_PASS_SEED_CACHE = {}


def choose_pass_seed(model_dir, cs, prompt, V, C, steps_n):
    """Pick the pass canvases (among a few seeds) for a (model, prompt): the f32 and bf16 cases of it use the same
    choice. Judged in bf16: no position with a top-2 gap < 0.3 (an argmax a bf16 engine may flip), then the smallest
    bf16 sensitivity (see exact_sdpa), stopping at the first seed with no near-tie and a sensitivity <= 0.035.
    Returns (seed, spec_ref max abs diff, near ties, sensitivity per pass)."""
    key = (model_dir, tuple(prompt[0].tolist()), steps_n)
    if key not in _PASS_SEED_CACHE:
        model = load(model_dir, torch.bfloat16)
        spec_m = spec_ref.SpecModel(model_dir, torch.bfloat16)
        best = None
        for j in range(PASS_SEED_CANDIDATES):
            seed = 1000 + 10 * (sum(prompt[0].tolist()) % 1000) + j
            logits, canvases, scs, _ = run_passes(model, prompt, V, C, steps_n, seed)
            sens = bf16_sensitivity(model, prompt, canvases, scs, logits)
            d = 0.0
            for k in range(3):
                cache = spec_m.encode(prompt[0])
                sl = spec_m.decode(cache, canvases[k][0], None if scs[k] is None else scs[k][0])
                d = max(d, float((sl - logits[k]).abs().max()))
            near_ties = sum(int((top2_gap(lg) < 0.3).sum()) for lg in logits)
            cand = (seed, d, near_ties, sens)
            if best is None or (near_ties, max(sens)) < (best[2], max(best[3])):
                best = cand
            if near_ties == 0 and max(sens) <= 0.035:
                break
        _PASS_SEED_CACHE[key] = best
    return _PASS_SEED_CACHE[key]


PASS_SEED_CANDIDATES = 10


def make_case(cs, model_dirs, log):
    name, dtype_name = cs["name"], cs["dtype"]
    dtype = DTYPES[dtype_name]
    model_dir = model_dirs[cs["model"]]
    model = load(model_dir, dtype)
    cfg = model.config
    V, C = cfg.text_config.vocab_size, cfg.canvas_length
    prompt = make_prompt(cs["prompt"], V, model_dir)
    tensors = {"prompt_ids": prompt[0].clone()}
    meta = {
        "dtype": dtype_name, "model": cs["model"], "transformers": transformers.__version__,
        "torch": torch.__version__, "attn_implementation": str(cfg._attn_implementation),
        "experts_implementation": str(cfg._experts_implementation), "torch_num_threads": str(torch.get_num_threads()),
        "case": name, "device": "cpu",
    }
    gcfg = model.generation_config
    tr_spec = cs.get("trace")
    steps_n = tr_spec["steps"] if tr_spec else gcfg.max_denoising_steps
    proc = LinearTemperatureScheduleLogitsProcessor(gcfg.t_min, gcfg.t_max, steps_n)

    # --- teacher-forced decoder passes against a fresh encoder cache of exactly prompt_ids
    pass_seed = choose_pass_seed(model_dir, cs, prompt, V, C, steps_n)[0]
    pass_logits, canvases, scs, temps = run_passes(model, prompt, V, C, steps_n, pass_seed)
    for k in range(3):
        tensors[f"pass{k}.canvas_ids"] = canvases[k][0].clone()
        if scs[k] is not None:
            tensors[f"pass{k}.sc_logits"] = scs[k][0].float().clone()
        tensors[f"pass{k}.logits"] = pass_logits[k].clone()
    # independent check: the spec re-implementation (spec_ref.py) on the same inputs, in the case dtype
    spec_m = spec_ref.SpecModel(model_dir, dtype)
    spec_diff = 0.0
    for k in range(3):
        cache = spec_m.encode(prompt[0])
        sl = spec_m.decode(cache, canvases[k][0], None if scs[k] is None else scs[k][0])
        spec_diff = max(spec_diff, float((sl - pass_logits[k]).abs().max()))
    if dtype == torch.float32:
        assert spec_diff < 1e-3, f"{name}: transformers f32 logits differ from the spec re-implementation: {spec_diff}"
    meta["check.spec_max_abs_diff"] = fmt(spec_diff)
    meta["passes.seed"] = str(pass_seed)
    meta["passes"] = "3"
    meta["passes.sc_rule"] = (f"pass{{k+1}}.sc_logits = {dtype_name}(pass{{k}}.logits / T(cur_step = N - k)), "
                              f"N = {steps_n}, t_min {gcfg.t_min}, t_max {gcfg.t_max}; T(N)={temps[0]!r}, "
                              f"T(N-1)={temps[1]!r} (T computed in float32 as generate does)")
    meta["passes.min_top2_gap"] = fmt(min(float(top2_gap(tensors[f"pass{k}.logits"]).min()) for k in range(3)))
    # bf16 runs: how many positions are within the bf16 tolerance of an argmax flip
    meta["passes.positions_top2_gap_lt_0.15"] = str(
        sum(int((top2_gap(tensors[f"pass{k}.logits"]) < 0.15).sum()) for k in range(3)))

    summary = dict(name=name, model=cs["model"], dtype=dtype_name, prompt_len=prompt.shape[1], canvas=C, vocab=V,
                   window=cfg.text_config.sliding_window, spec_max_abs_diff=spec_diff, pass_seed=pass_seed)
    if dtype == torch.bfloat16:
        sens = bf16_sensitivity(model, prompt, canvases, scs, pass_logits)
        meta["bf16_sensitivity"] = fmt(max(sens))
        meta["bf16_sensitivity.per_pass"] = ",".join(fmt(x) for x in sens)
        summary.update(bf16_sensitivity=max(sens), bf16_sensitivity_per_pass=sens)
        log(f"  {name}: bf16 sensitivity (exact-formula SDPA vs torch's) per pass {[fmt(x) for x in sens]}")
        assert max(sens) <= SENSITIVITY_MAX, (
            f"{name}: bf16 sensitivity {max(sens):.4g} > {SENSITIVITY_MAX}: the bf16 tolerance would not have a 3x "
            "margin over the noise floor of an engine that is not bit-identical to torch's SDPA")
    if tr_spec:
        want = ("eos", tr_spec["eos"]) if tr_spec["want"] == "eos" else tr_spec["want"]
        cands = []
        tried = 0
        for seed in range(N_CANDIDATES[dtype_name]):
            tried += 1
            tr = run_trace(model, prompt, tr_spec["max_new_tokens"], steps_n, seed)
            desc = describe_trace(tr, model, prompt, tr_spec["max_new_tokens"], steps_n)
            ok = wants(desc, want)
            if not ok:
                continue
            mg = trace_margins(tr["steps"], desc["steps_per_block"], tr["seq"], prompt.shape[1], C)
            score = trace_score(mg, dtype_name)
            for st in tr["steps"]:  # keep memory small: only what is still needed below
                for k in ("sc", "hist", "canvas", "pos"):
                    st.pop(k, None)
            cands.append(((ok, score), tr, desc, mg))  # "strict" candidates (ok == 2) beat "acceptable" ones
            if ok == 2 and score >= TARGET_SCORE[dtype_name]:
                break
        assert cands, f"{name}: no candidate seed in 0..{N_CANDIDATES[dtype_name] - 1} shows {want}"
        cands.sort(key=lambda c: c[0], reverse=True)
        # independent check: the spec re-implementation (spec_ref.py, same dtype) replays the tape to the same ids.
        # In bf16 its logits differ from transformers' by ~0.1, so this is a direct test that the margins suffice
        # for another faithful engine; prefer the best-scoring candidate that passes it.
        gen_cfg = dict(entropy_bound=gcfg.sampler_config.entropy_bound, t_min=gcfg.t_min, t_max=gcfg.t_max,
                       stability_threshold=gcfg.stability_threshold, confidence_threshold=gcfg.confidence_threshold,
                       eos_token_id=list(gcfg.eos_token_id), pad_token_id=gcfg.pad_token_id)
        # bf16 also: the tape replayed through transformers with exact_sdpa in place of torch's SDPA (the perturbation
        # the bf16 sensitivity measures) must give the same ids. Preference: both replays exact, then spec_ref only.
        chosen, spec_exact, sdpa = None, False, (False, None)
        for cand in cands[:8]:
            blocks = [dict(init=b["init"], steps=b["steps"]) for b in cand[1]["blocks"]]
            out = spec_ref.generate_replay(model_dir, dtype, prompt[0], tr_spec["max_new_tokens"], steps_n, gen_cfg,
                                           blocks)
            if not torch.equal(out, cand[1]["seq"]):
                continue
            if dtype == torch.float32:
                chosen, spec_exact = cand, True
                break
            r = exact_sdpa_replay(model, prompt, (cand[1]["tape"], [st["raw"] for st in cand[1]["steps"]]),
                                  tr_spec["max_new_tokens"], steps_n)
            r_ok = r[0] and torch.equal(r[2], cand[1]["seq"])
            if chosen is None or r_ok:
                chosen, spec_exact, sdpa = cand, True, (r_ok, r[1] if r_ok else None)
            if r_ok:
                break
        if chosen is None:
            log(f"  WARNING: {name}: no candidate replays exactly under spec_ref.py; keeping the best-scoring one")
            chosen = cands[0]
            assert dtype != torch.float32, f"{name}: float32 trace does not replay under spec_ref.py"
        (_, score), tr, desc, mg = chosen
        meta["check.spec_replay_exact"] = str(spec_exact).lower()
        if dtype == torch.bfloat16:
            if not sdpa[0]:
                log(f"  WARNING: {name}: the chosen trace does not replay exactly with exact_sdpa")
            meta["check.exact_sdpa_replay_exact"] = str(sdpa[0]).lower()
            if sdpa[0]:
                meta["check.exact_sdpa_trace_max_logit_diff"] = fmt(sdpa[1])
        # verify: replaying the tape through an unmodified generate reproduces the output exactly
        torch.manual_seed(987654321)
        with torch.no_grad(), replay(tr["tape"]):
            out2 = model.generate(prompt, max_new_tokens=tr_spec["max_new_tokens"], max_denoising_steps=steps_n)
        assert torch.equal(out2.sequences[0], tr["seq"]), f"{name}: tape replay does not reproduce output_ids"
        # verify: the first decoder pass of generate == a plain forward on the same canvas (no sc)
        with torch.no_grad():
            ref = model(input_ids=prompt, decoder_input_ids=tr["blocks"][0]["init"][None]).logits[0]
        d0 = float((ref - tr["steps"][0]["raw"][0]).abs().max())
        assert d0 <= (1e-5 if dtype == torch.float32 else 1e-2), d0
        # verify: processed logits are raw / T with T the float32 schedule value
        for s in tr["steps"]:
            assert torch.equal(s["processed"], s["raw"] / temperature(proc, s["cur_step"]))
        tensors["gen.max_new_tokens"] = torch.tensor([tr_spec["max_new_tokens"]], dtype=torch.int64)
        tensors["gen.max_denoising_steps"] = torch.tensor([steps_n], dtype=torch.int64)
        for b, blk in enumerate(tr["blocks"]):
            tensors[f"gen.block{b}.init"] = blk["init"].clone()
            for s, (sample, renoise) in enumerate(blk["steps"]):
                tensors[f"gen.block{b}.step{s}.sample"] = sample.clone()
                tensors[f"gen.block{b}.step{s}.renoise"] = renoise.clone()
        tensors["gen.output_ids"] = tr["seq"].clone()
        meta.update({
            "gen.seed": str(tr["seed"]),
            "gen.steps_per_block": ",".join(map(str, desc["steps_per_block"])),
            "gen.stopped_early": ",".join(str(int(x)) for x in desc["stopped_early"]),
            "gen.first_eos": "none" if desc["first_eos"] is None else
            f"id {desc['first_eos'][0]} at canvas position {desc['first_eos'][1]} of block {desc['n_blocks'] - 1}",
            "gen.accepted_per_step": ",".join(map(str, desc["n_accept"])),
            "margin.commit_top2_gap": fmt(mg["commit_gap"]),
            "margin.stability_top2_gap": fmt(mg["stability_gap"]),
            "margin.all_steps_top2_gap": fmt(mg["all_gap"]),
            "margin.accept_bound": fmt(mg["accept_margin"]),
            "margin.accept_bound_rel": fmt(mg["accept_rel"]),
            "margin.accept_sort_gap": fmt(mg["sort_gap"]),
            "margin.accept_sort_gap_rel": fmt(mg["sort_rel"]),
            "margin.confidence_at_stable_steps": fmt(mg["conf_gap"]),
            "margin.confidence_at_stable_steps_rel": fmt(mg["conf_rel"]),
            "margin.confidence_all_steps": fmt(mg["conf_gap_all"]),
            "margin.score": fmt(score),
            "check.first_pass_generate_vs_forward_maxdiff": fmt(d0),
        })
        summary.update(trace=dict(seed=tr["seed"], candidates=tried, score=score, spec_replay_exact=spec_exact,
                                  exact_sdpa_replay_exact=sdpa[0] if dtype == torch.bfloat16 else None,
                                  exact_sdpa_trace_max_logit_diff=sdpa[1], max_new_tokens=tr_spec["max_new_tokens"],
                                  steps=steps_n, partial_steps=sum(n < C for n in desc["n_accept"]),
                                  passes_total=len(desc["n_accept"]),
                                  **{k: v for k, v in desc.items() if k != "n_accept"},
                                  margins={k: (None if v == math.inf else v) for k, v in mg.items()}))
        log(f"  {name}: seed {tr['seed']}  blocks {desc['n_blocks']}/{desc['max_blocks']}  steps {desc['steps_per_block']}"
            f"  early {desc['stopped_early']}  first_eos {desc['first_eos']}  tried {tried}  score {score:.3g}  margins "
            + " ".join(f"{k}={fmt(v)}" for k, v in mg.items()))
    os.makedirs(CASES, exist_ok=True)
    path = os.path.join(CASES, f"{name}.safetensors")
    save_safetensors(tensors, path, meta)
    summary["bytes"] = os.path.getsize(path)
    summary["passes_min_top2_gap"] = float(meta["passes.min_top2_gap"])
    check_case_file(path, model_dir)
    return summary


_ST_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32"}


def save_safetensors(tensors, path, metadata):
    """safetensors writer with a byte-deterministic header (sorted tensor names and metadata keys); the Rust
    safetensors writer serialises metadata from a hash map, so its byte order changes from run to run."""
    names = sorted(tensors)
    header = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs, offset = [], 0
    for n in names:
        t = tensors[n].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for raw in blobs:
            f.write(raw)
    loaded = load_file(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], tensors[n]) for n in names)


def check_case_file(path, model_dir):
    """Validate the written file against the contract."""
    t = load_file(path)
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["dtype"] in DTYPES and os.path.isdir(os.path.join(MODELS, meta["model"]))
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    V, C = cfg["text_config"]["vocab_size"], cfg["canvas_length"]
    assert t["prompt_ids"].dtype == torch.int64 and t["prompt_ids"].ndim == 1
    k = 0
    while f"pass{k}.canvas_ids" in t:
        assert t[f"pass{k}.canvas_ids"].shape == (C,) and t[f"pass{k}.canvas_ids"].dtype == torch.int64
        assert t[f"pass{k}.logits"].shape == (C, V) and t[f"pass{k}.logits"].dtype == torch.float32
        if f"pass{k}.sc_logits" in t:
            assert t[f"pass{k}.sc_logits"].shape == (C, V) and t[f"pass{k}.sc_logits"].dtype == torch.float32
        k += 1
    assert k >= 3
    if "gen.output_ids" in t:
        b = 0
        while f"gen.block{b}.init" in t:
            s = 0
            while f"gen.block{b}.step{s}.sample" in t:
                assert t[f"gen.block{b}.step{s}.renoise"].shape == (C,)
                s += 1
            assert s >= 1
            b += 1
        P = t["prompt_ids"].shape[0]
        assert t["gen.output_ids"].shape == (P + b * C,)
        assert torch.equal(t["gen.output_ids"][:P], t["prompt_ids"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="case names to (re)write (models are always rebuilt)")
    args = ap.parse_args()
    t0 = time.time()
    transformers.logging.set_verbosity_error()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"transformers {transformers.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    os.makedirs(MODELS, exist_ok=True)
    model_dirs = {}
    for name, spec in MODEL_SPECS.items():
        model_dirs[name] = write_model(name, spec, log)
    # The FP8 case's transformers run uses the dequantised weights; its file names models/tiny-fp8.
    _, model_dirs[FP8_MODEL] = write_fp8_models(model_dirs[FP8_SOURCE], log)
    if args.only is None and os.path.isdir(CASES):
        for fn in os.listdir(CASES):  # the cases this script owns
            if fn.endswith(".safetensors") and fn[:-12] in {c["name"] for c in CASE_SPECS}:
                os.remove(os.path.join(CASES, fn))
    summaries = []
    for cs in CASE_SPECS:
        if args.only is not None and cs["name"] not in args.only:
            continue
        t1 = time.time()
        summaries.append(make_case(cs, model_dirs, log))
        log(f"  ({time.time() - t1:.1f} s)")
    shutil.rmtree(model_dirs[FP8_MODEL], ignore_errors=True)  # the dequantised temporary copy
    total = time.time() - t0
    log(f"total {total:.1f}s")
    if args.only is None:  # no timings in the written files: a rerun rewrites them byte for byte
        with open(os.path.join(HERE, "summary.json"), "w") as f:
            json.dump(dict(transformers=transformers.__version__, torch=torch.__version__,
                           sensitivity_max=SENSITIVITY_MAX, cases=summaries), f, indent=1, sort_keys=True)
            f.write("\n")
        update_readme(summaries)


def _g(x, digits=3):
    return "inf" if x is None or x == math.inf else f"{x:.{digits}g}"


def update_readme(summaries):
    """Rewrite the generated tables between the markers in README.md."""
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return
    rows = ["| case | model | dtype | prompt | passes: bf16 sensitivity (per pass) | passes: spec_ref max abs diff | "
            "passes: min top-2 gap |", "|---|---|---|---|---|---|---|"]
    for c in summaries:
        sens = "" if "bf16_sensitivity" not in c else (
            f"**{_g(c['bf16_sensitivity'])}** ({', '.join(_g(x) for x in c['bf16_sensitivity_per_pass'])})")
        rows.append(f"| `{c['name']}` | {c['model']} | {c['dtype']} | {c['prompt_len']} | {sens} | "
                    f"{_g(c['spec_max_abs_diff'])} | {_g(c['passes_min_top2_gap'])} |")
    rows += ["", "| case | seed | canvases (max) | steps per canvas | early stop | partial-accept steps | first EOS "
             "(id, pos) | commit gap | stability gap | accept bound rel | sort gap rel (abs) | confidence rel | "
             "spec_ref replay | exact-SDPA replay (max logit diff) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in summaries:
        t = c.get("trace")
        if not t:
            continue
        mg = t["margins"]
        rows.append(
            f"| `{c['name']}` | {t['seed']} | {t['n_blocks']} ({t['max_blocks']}) | "
            f"{','.join(map(str, t['steps_per_block']))} of {t['steps']} | "
            f"{''.join('y' if x else 'n' for x in t['stopped_early'])} | {t['partial_steps']}/{t['passes_total']} | "
            f"{'none' if t['first_eos'] is None else tuple(t['first_eos'])} | {_g(mg['commit_gap'])} | "
            f"{_g(mg['stability_gap'])} | {_g(mg['accept_rel'])} | {_g(mg['sort_rel'])} ({_g(mg['sort_gap'])}) | "
            f"{_g(mg['conf_rel'])} | {'exact' if t['spec_replay_exact'] else 'DIFFERS'} | "
            + {None: "", True: f"exact ({_g(t['exact_sdpa_trace_max_logit_diff'])})", False: "DIFFERS"}[
                t["exact_sdpa_replay_exact"]] + " |")
    rows += ["", f"Generated by `make_cases.py` with transformers {transformers.__version__}, torch "
             f"{torch.__version__}, 1 CPU thread."]
    begin, end = "<!-- BEGIN GENERATED TABLES -->", "<!-- END GENERATED TABLES -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        return
    a, b = text.index(begin) + len(begin), text.index(end)
    with open(path, "w") as f:
        f.write(text[:a] + "\n" + "\n".join(rows) + "\n" + text[b:])


if __name__ == "__main__":
    main()
