"""Independent re-implementation of the DiffusionGemma text forward pass from /work/shared/docs/model-spec.md.

It reads the checkpoint with safetensors + config.json only (no transformers modelling code) and follows the
spec's formulas and rounding points:
  * GEMMs: inputs in the activation dtype, float32 accumulation, ONE rounding of the output to the activation dtype
    (what a careful engine does; torch's bf16 GEMM does the same up to accumulation order);
  * elementwise ops: computed in float32 and rounded to the activation dtype after every op, as torch does for bf16
    tensors (so this matches HF's op-by-op rounding; a fused engine kernel may differ by 1 ulp here and there);
  * attention: float32 scores, softmax and P.V accumulation, output rounded once (like SDPA's CPU kernels);
  * RMSNorm / router softmax / expert weighting / logits in float32 exactly as the spec says.

make_cases.py uses it (a) in float32 to confirm that transformers implements the spec (tight agreement), and
(b) in bfloat16 to estimate how far a faithful bf16 engine lands from transformers' bf16 logits (reported as
`check.spec_bf16_max_abs_diff` in the case metadata and in the README).
"""

import json
import math
import os

import torch
from safetensors.torch import load_file


class SpecModel:
    def __init__(self, model_dir, dtype):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        tc = cfg["text_config"]
        self.dt = dtype
        self.C = cfg["canvas_length"]
        self.V, self.H = tc["vocab_size"], tc["hidden_size"]
        self.layer_types = tc["layer_types"]
        self.n_heads = tc["num_attention_heads"]
        self.window = tc["sliding_window"]
        self.eps = tc["rms_norm_eps"]
        self.topk = tc["top_k_experts"]
        self.softcap = 30.0  # final_logit_softcapping (class attribute, not serialised)
        if "per_layer_config" in tc:  # 5.23 schema
            plc = {int(k): v for k, v in tc["per_layer_config"].items()}
        else:  # real-checkpoint schema (spec 1.2)
            plc = {i: {"head_dim": tc.get("global_head_dim", 512),
                       "num_key_value_heads": tc["num_global_key_value_heads"]}
                   for i, t in enumerate(self.layer_types) if t == "full_attention"}
        self.head_dim = [plc.get(i, {}).get("head_dim", tc["head_dim"]) for i in range(len(self.layer_types))]
        self.n_kv = [plc.get(i, {}).get("num_key_value_heads", tc["num_key_value_heads"])
                     for i in range(len(self.layer_types))]
        self.rope = tc["rope_parameters"]
        w = {}
        for fn in sorted(os.listdir(model_dir)):
            if fn.endswith(".safetensors"):
                w.update(load_file(os.path.join(model_dir, fn)))
        # all weights cast to the run dtype (what from_pretrained(dtype=...) does)
        self.w = {k: v.to(dtype) for k, v in w.items()}

    # ---- primitives -----------------------------------------------------------------------------------------------
    def rnd(self, x):
        return x.to(self.dt)

    def rms(self, x, w=None):
        x32 = x.float()
        y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if w is not None:
            y = y * w.float()
        return self.rnd(y)

    def lin(self, x, w):
        return self.rnd(x.float() @ w.float().T)

    def gelu(self, x):
        x32 = x.float()
        return self.rnd(0.5 * x32 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * x32 ** 3))))

    def mul(self, a, b):
        return self.rnd(a.float() * b.float())

    def add(self, a, b):
        return self.rnd(a.float() + b.float())

    def geglu(self, x, gate, up, down):
        return self.lin(self.mul(self.gelu(self.lin(x, gate)), self.lin(x, up)), down)

    def embed(self, ids):
        W = self.w["model.decoder.embed_tokens.weight"]
        scale = torch.tensor(self.H ** 0.5, dtype=torch.float32).to(self.dt)  # bf16(sqrt(H)) in bf16 runs
        return self.mul(W[ids], scale)

    def inv_freq(self, layer):
        D = self.head_dim[layer]
        p = self.rope[self.layer_types[layer]]
        base = p["rope_theta"]
        if p["rope_type"] == "default":
            return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        assert p["rope_type"] == "proportional"
        angles = int(p.get("partial_rotary_factor", 1.0) * D // 2)
        rot = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / D))
        return torch.cat([rot, torch.zeros(D // 2 - angles)])

    def rope_apply(self, x, pos, layer):  # x [S, h, D]
        f = pos.float()[:, None] * self.inv_freq(layer)[None]
        emb = torch.cat([f, f], -1)
        cos, sin = self.rnd(emb.cos())[:, None], self.rnd(emb.sin())[:, None]
        D = x.shape[-1]
        rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return self.add(self.mul(x, cos), self.mul(rot, sin))

    # ---- blocks ---------------------------------------------------------------------------------------------------
    def attention(self, i, p, x, pos, cache, mode):
        D, nkv, nh = self.head_dim[i], self.n_kv[i], self.n_heads
        S = x.shape[0]
        q = self.lin(x, self.w[p + "self_attn.q_proj.weight"]).view(S, nh, D)
        q = self.rope_apply(self.rms(q, self.w[p + "self_attn.q_norm.weight"]), pos, i)
        k_raw = self.lin(x, self.w[p + "self_attn.k_proj.weight"]).view(S, nkv, D)
        vk = p + "self_attn.v_proj.weight"
        v_raw = self.lin(x, self.w[vk]).view(S, nkv, D) if vk in self.w else k_raw  # K == V on full layers
        k = self.rope_apply(self.rms(k_raw, self.w[p + "self_attn.k_norm.weight"]), pos, i)
        v = self.rms(v_raw)
        sliding = self.layer_types[i] == "sliding_attention"
        ck, cv, cpos = cache[i]
        K, Vv, kpos = torch.cat([ck, k]), torch.cat([cv, v]), torch.cat([cpos, pos])
        if mode == "encode":
            allowed = kpos[None, :] <= pos[:, None]
            if sliding:
                allowed &= kpos[None, :] > pos[:, None] - self.window
            keep = self.window - 1 if sliding else None
            cache[i] = (K, Vv, kpos) if keep is None else (K[-keep:], Vv[-keep:], kpos[-keep:])
        else:  # decode: bidirectional over (cached keys, sliding layers hold <= window-1 of them) + canvas
            allowed = torch.ones(S, K.shape[0], dtype=torch.bool)
        rep = nh // nkv
        Kf, Vf = K.float().repeat_interleave(rep, 1), Vv.float().repeat_interleave(rep, 1)  # head h -> kv h // rep
        scores = torch.einsum("qhd,khd->hqk", q.float(), Kf)  # scale 1.0, no softcap
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, -1)
        out = self.rnd(torch.einsum("hqk,khd->qhd", probs, Vf)).reshape(S, nh * D)
        return self.lin(out, self.w[p + "self_attn.o_proj.weight"])

    def moe(self, p, h):
        w = self.w
        r = self.rms(h)
        r = self.mul(self.mul(r, w[p + "router.scale"]), torch.tensor(self.H ** -0.5))
        logits = self.lin(r, w[p + "router.proj.weight"])
        probs = torch.softmax(logits.float(), -1)
        tw, ti = torch.topk(probs, self.topk, -1)
        tw = tw / tw.sum(-1, keepdim=True)
        tw = tw * w[p + "router.per_expert_scale"][ti].float()
        e_in = self.rms(h, w[p + "pre_feedforward_layernorm_2.weight"])
        gu, dn = w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"]
        I = dn.shape[-1]
        y = torch.zeros(h.shape[0], self.topk, self.H, dtype=torch.float32)
        for e in torch.unique(ti).tolist():
            t, k = (ti == e).nonzero(as_tuple=True)
            g_u = self.lin(e_in[t], gu[e])  # gate = first half, up = second half
            y[t, k] = self.lin(self.mul(self.gelu(g_u[:, :I]), g_u[:, I:]), dn[e]).float() * tw[t, k, None]
        return self.rnd(y.sum(1))  # weighting and the sum over the top-k in float32

    def layer(self, i, x, pos, cache, mode):
        prefix = "model.decoder.layers.%d." % i
        w = self.w
        a = self.attention(i, prefix, self.rms(x, w[prefix + "input_layernorm.weight"]), pos, cache, mode)
        h = self.add(x, self.rms(a, w[prefix + "post_attention_layernorm.weight"]))
        d = self.geglu(self.rms(h, w[prefix + "pre_feedforward_layernorm.weight"]), w[prefix + "mlp.gate_proj.weight"],
                       w[prefix + "mlp.up_proj.weight"], w[prefix + "mlp.down_proj.weight"])
        d = self.rms(d, w[prefix + "post_feedforward_layernorm_1.weight"])
        e = self.rms(self.moe(prefix, h), w[prefix + "post_feedforward_layernorm_2.weight"])
        f = self.rms(self.add(d, e), w[prefix + "post_feedforward_layernorm.weight"])
        out = self.add(h, f)
        side = "model.encoder.language_model" if mode == "encode" else "model.decoder"
        return self.mul(out, w["%s.layers.%d.layer_scalar" % (side, i)])

    # ---- passes ---------------------------------------------------------------------------------------------------
    def encode(self, ids, cache=None):
        """Causal encoder pass over clean tokens, appending K/V. Returns the cache (list per layer)."""
        n = len(self.layer_types)
        if cache is None:
            cache = [(torch.zeros(0, self.n_kv[i], self.head_dim[i], dtype=self.dt),) * 2
                     + (torch.zeros(0, dtype=torch.long),) for i in range(n)]
            self.seen = 0
        pos = torch.arange(self.seen, self.seen + len(ids))
        x = self.embed(ids)
        for i in range(n):
            x = self.layer(i, x, pos, cache, "encode")
        self.seen += len(ids)
        return cache

    def decode(self, cache, canvas, sc_logits=None):
        """Bidirectional denoiser pass over the canvas; the cache is read only. Returns f32 logits [C, V]."""
        W = self.w["model.decoder.embed_tokens.weight"]
        e = self.embed(canvas)
        p = "model.decoder.self_conditioning."
        if sc_logits is None:
            sc = torch.zeros_like(e)  # pre_norm(0) = 0 -> MLP(0) = 0
        else:
            pr = self.rnd(torch.softmax(sc_logits.float(), -1))
            soft = self.mul(self.lin(pr, W.T), torch.tensor(self.H ** 0.5, dtype=torch.float32).to(self.dt))
            sc = self.geglu(self.rms(soft, self.w[p + "pre_norm.weight"]), self.w[p + "gate_proj.weight"],
                            self.w[p + "up_proj.weight"], self.w[p + "down_proj.weight"])
        x = self.rms(self.add(e, sc))  # post_norm, no scale, always applied
        pos = torch.arange(self.seen, self.seen + len(canvas))
        for i in range(len(self.layer_types)):
            x = self.layer(i, x, pos, list(cache), "decode")
        x = self.rms(x, self.w["model.decoder.norm.weight"])
        logits = self.lin(x, W).float()
        return self.softcap * torch.tanh(logits / self.softcap)


def spec_logits(model_dir, dtype, prompt_ids, canvas_ids, sc_logits=None):
    m = SpecModel(model_dir, dtype)
    cache = m.encode(prompt_ids)
    return m.decode(cache, canvas_ids, None if sc_logits is None else sc_logits.to(dtype))


def entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def generate_replay(model_dir, dtype, prompt_ids, max_new_tokens, max_denoising_steps, gen, blocks):
    """The generate loop of spec sections 4-5, driven by a recorded RNG tape instead of an RNG.

    gen: dict(entropy_bound, t_min, t_max, stability_threshold, confidence_threshold, eos_token_id, pad_token_id).
    blocks: per canvas dict(init=[C], steps=[(sample [C], renoise [C]), ...]). Returns the output ids [P + n*C].
    """
    m = SpecModel(model_dir, dtype)
    C, N = m.C, max_denoising_steps
    eos = torch.tensor(gen["eos_token_id"])
    seq = prompt_ids.clone()
    cache = m.encode(prompt_ids)
    for b in range(math.ceil(max_new_tokens / C)):
        if b > 0:
            cache = m.encode(seq[-C:], cache)  # re-encode the committed canvas at the positions it was denoised at
        blk = blocks[b]
        canvas, sc = blk["init"].clone(), None
        history = [None] * gen["stability_threshold"]
        for i, cur_step in enumerate(range(N, 0, -1)):
            logits = m.decode(cache, canvas, sc)
            # float32 schedule, as generate evaluates it (cur_step is an int32 tensor there)
            T = gen["t_min"] + (gen["t_max"] - gen["t_min"]) * (torch.tensor(cur_step, dtype=torch.int32) / N)
            P = logits / T
            argmax = P.argmax(-1)
            sample, renoise = blk["steps"][i]
            H = entropy(P)
            Hs, order = torch.sort(H)
            acc_sorted = (torch.cumsum(Hs, 0) - Hs) <= gen["entropy_bound"]
            accept = torch.zeros_like(acc_sorted).scatter(0, order, acc_sorted)
            canvas = torch.where(accept, sample, renoise)
            stable = all(hh is not None and torch.equal(hh, argmax) for hh in history)
            history = history[1:] + [argmax] if history else history
            confident = float(H.mean()) < gen["confidence_threshold"]
            sc = P.to(dtype)
            if stable and confident:
                break
        new = argmax.clone()
        is_eos = torch.isin(new, eos)
        seq = torch.cat([seq, new])
        if bool(is_eos.any()):
            first = int(is_eos.nonzero()[0])
            seq[len(seq) - C + first + 1:] = gen["pad_token_id"]
            break
        if len(seq) >= len(prompt_ids) + max_new_tokens:
            break
    return seq
