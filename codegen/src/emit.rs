//! Emission of the instantiation files.
//!
//! Every kernel is a tiny `.cu` file: a header naming the spec, one `#include` of the
//! hand-written family template under `csrc/`, and an `extern "C"` kernel whose body calls the
//! template with the spec's compile-time parameters. The kernel's parameter list is spelled out
//! here ([`params`]) so the ABI the runtime launches against is visible in the generated file
//! (and in the golden files under `codegen/tests/golden/`).
//!
//! Output is a pure function of the spec: no timestamps, no paths, no hash-map order.

use crate::spec::{GemmEngine, GemmFuse, GroupedGemm, KernelSpec, LinearEngine, MaskKind, Op, Target, WeightFormat};
use std::fmt::Write as _;

/// One kernel parameter: C type and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub ty: &'static str,
    pub name: &'static str,
}

const fn p(ty: &'static str, name: &'static str) -> Param {
    Param { ty, name }
}

const BF16_IN: &str = "const dgemma::bf16*";
const BF16_OUT: &str = "dgemma::bf16*";

const RMSNORM: &[Param] = &[
    p(BF16_IN, "x"),
    p(BF16_IN, "x_add"),
    p(BF16_IN, "weight"),
    p(BF16_OUT, "out"),
    p("float", "eps"),
    p("float", "layer_scalar"),
    p("int", "rows"),
];
const ROPE: &[Param] = &[
    p(BF16_OUT, "x"),
    p(BF16_IN, "cos_table"),
    p(BF16_IN, "sin_table"),
    p("const int*", "positions"),
    p("int", "table_rows"),
    p("int", "tokens"),
    p("int", "heads"),
];
const EMBEDDING: &[Param] = &[
    p("const int*", "ids"),
    p(BF16_IN, "table"),
    p(BF16_OUT, "out"),
    p("float", "scale"),
    p("int", "tokens"),
    p("int", "vocab"),
];
const GEGLU: &[Param] = &[
    p(BF16_IN, "gate"),
    p(BF16_IN, "up"),
    p("int", "in_stride"),
    p(BF16_OUT, "out"),
    p("int", "width"),
    p("int", "rows"),
];
const SOFTCAP: &[Param] = &[p(BF16_IN, "logits"), p("float*", "out"), p("float", "cap"), p("long long", "n")];
const ROW_SOFTMAX_ENTROPY_ARGMAX: &[Param] = &[
    p(BF16_IN, "logits"),
    p("float", "cap"),
    p("const unsigned int*", "params"),
    p("int*", "argmax"),
    p("float*", "entropy"),
    p("float*", "sc_stats"),
    p("int", "rows"),
];
/// `scratch` (fp32) holds a split attention's partial statistics (null when `splits` is 1);
/// `page_table` / `page` map the ring's logical rows to pages of `k` / `v` (null / 0: unpaged);
/// `phase` says which of its launches this is (`csrc/attention.cuh`).
const ATTENTION: &[Param] = &[
    p(BF16_IN, "q"),
    p(BF16_IN, "k"),
    p(BF16_IN, "v"),
    p(BF16_OUT, "out"),
    p("float*", "scratch"),
    p("int", "q_len"),
    p("int", "kv_len"),
    p("int", "kv_rows"),
    p("const int*", "page_table"),
    p("int", "page"),
    p("int", "q_pos0"),
    p("int", "k_pos0"),
    p("int", "window"),
    p("int", "splits"),
    p("int", "phase"),
];
const LINEAR: &[Param] = &[p(BF16_IN, "x"), p(BF16_IN, "w"), p(BF16_OUT, "y"), p("int", "rows")];
/// Both grouped GEMMs: `x` is the input (token rows for GeGLU, pair rows for the down
/// projection), `sorted` / `offsets` the pairs grouped by expert (`MOE_SORT`'s outputs).
const GROUPED_GEMM: &[Param] = &[
    p(BF16_IN, "x"),
    p("const int*", "sorted"),
    p("const int*", "offsets"),
    p(BF16_IN, "w"),
    p(BF16_OUT, "out"),
    p("int", "tokens"),
    p("int", "top_k"),
    p("int", "num_experts"),
];
/// The grouped GEMMs on e4m3 expert weights: `w` the codes `[E, n, k]`, `w_scale [E * n]` fp32
/// (one scale per output row).
const GROUPED_GEMM_E4M3: &[Param] = &[
    p(BF16_IN, "x"),
    p("const int*", "sorted"),
    p("const int*", "offsets"),
    p("const dgemma::e4m3*", "w"),
    p("const float*", "w_scale"),
    p(BF16_OUT, "out"),
    p("int", "tokens"),
    p("int", "top_k"),
    p("int", "num_experts"),
];
const MOE_SORT: &[Param] =
    &[p("const int*", "experts"), p("int*", "offsets"), p("int*", "sorted"), p("int", "pairs")];
const MOE_COMBINE: &[Param] = &[
    p(BF16_IN, "y"),
    p("const int*", "experts"),
    p("const float*", "weights"),
    p(BF16_OUT, "out"),
    p("int", "tokens"),
    p("int", "top_k"),
    p("int", "num_experts"),
];
const ROUTER: &[Param] = &[
    p(BF16_IN, "h"),
    p(BF16_IN, "scale"),
    p(BF16_IN, "proj"),
    p(BF16_IN, "per_expert_scale"),
    p("int*", "experts"),
    p("float*", "weights"),
    p("float", "eps"),
    p("float", "root"),
    p("int", "tokens"),
];
/// The soft embedding's three kernels: pr into the `probs` scratch, the split-K GEMM into the
/// fp32 `partials` scratch, and the reduction into `out`.
const SOFT_EMBEDDING_PROBS: &[Param] = &[
    p(BF16_IN, "logits"),
    p("float", "cap"),
    p("const unsigned int*", "params"),
    p("const float*", "sc_stats"),
    p(BF16_OUT, "probs"),
    p("int", "rows"),
];
const SOFT_EMBEDDING: &[Param] = &[p(BF16_IN, "probs"), p(BF16_IN, "table"), p("float*", "partials"), p("int", "rows")];
const SOFT_EMBEDDING_REDUCE: &[Param] =
    &[p("const float*", "partials"), p(BF16_OUT, "out"), p("float", "scale"), p("int", "rows")];

const GUMBEL_SAMPLE: &[Param] = &[
    p("const unsigned int*", "params"),
    p(BF16_IN, "logits"),
    p("float", "cap"),
    p("int*", "sampled"),
    p("int", "rows"),
];
const SAMPLER_CANVAS: &[Param] = &[
    p("const unsigned int*", "params"),
    p("const float*", "entropy"),
    p("const int*", "sampled"),
    p("const int*", "argmax"),
    p("int*", "next_canvas"),
    p("int*", "accepted"),
    p("int*", "history"),
    p("unsigned int*", "status"),
    p("int", "vocab"),
    p("int", "canvas"),
];
/// `src` is read as 16-byte vectors (`vectors` of them; 16-byte aligned); `out[0]` is written only
/// by a thread whose fold equals `sentinel`.
const READ_BANDWIDTH: &[Param] =
    &[p("const unsigned int*", "src"), p("long long", "vectors"), p("int", "sentinel"), p("unsigned int*", "out")];

/// The kernel's parameters, in launch order.
pub fn params(spec: &KernelSpec) -> &'static [Param] {
    match spec.op {
        Op::RmsNorm(_) => RMSNORM,
        Op::Rope(_) => ROPE,
        Op::Embedding(_) => EMBEDDING,
        Op::Geglu => GEGLU,
        Op::Softcap => SOFTCAP,
        Op::RowSoftmaxEntropyArgmax(_) => ROW_SOFTMAX_ENTROPY_ARGMAX,
        Op::Attention(_) => ATTENTION,
        Op::Linear(_) => LINEAR,
        Op::GroupedGemm(g) => match g.weights {
            WeightFormat::Bf16 => GROUPED_GEMM,
            WeightFormat::E4m3 => GROUPED_GEMM_E4M3,
        },
        Op::MoeSort(_) => MOE_SORT,
        Op::MoeCombine(_) => MOE_COMBINE,
        Op::Router(_) => ROUTER,
        Op::SoftEmbedding(_) => SOFT_EMBEDDING,
        Op::SoftEmbeddingProbs(_) => SOFT_EMBEDDING_PROBS,
        Op::SoftEmbeddingReduce(_) => SOFT_EMBEDDING_REDUCE,
        Op::GumbelSample(_) => GUMBEL_SAMPLE,
        Op::SamplerCanvas(_) => SAMPLER_CANVAS,
        Op::ReadBandwidth(_) => READ_BANDWIDTH,
    }
}

/// The template function and its template arguments, e.g.
/// `dgemma::rmsnorm<2816, 256, true, false, true, false>`.
fn template_call(spec: &KernelSpec) -> String {
    let t = spec.block_threads();
    match spec.op {
        Op::RmsNorm(r) => format!(
            "dgemma::rmsnorm<{}, {t}, {}, {}, {}, {}>",
            r.width, r.has_scale, r.fuse_input_add, r.fuse_residual_add, r.fuse_layer_scalar
        ),
        Op::Rope(r) => format!("dgemma::rope<{}, {}, {t}>", r.head_dim, r.rotary_pairs),
        Op::Embedding(e) => format!("dgemma::embedding<{}, {t}>", e.hidden),
        Op::Geglu => format!("dgemma::geglu<{t}>"),
        Op::Softcap => format!("dgemma::softcap<{t}>"),
        Op::RowSoftmaxEntropyArgmax(r) => format!("dgemma::row_softmax_entropy_argmax<{}, {t}>", r.vocab),
        Op::Attention(a) => {
            let mask = match a.mask {
                MaskKind::Causal => "dgemma::Mask::Causal",
                MaskKind::CausalSliding => "dgemma::Mask::CausalSliding",
                MaskKind::Bidirectional => "dgemma::Mask::Bidirectional",
            };
            let wgmma = if a.wgmma { ", true" } else { "" };
            format!(
                "dgemma::attention<{}, {}, {}, {mask}, {}, {}, {}, {}, {}{wgmma}>",
                a.head_dim, a.q_heads, a.kv_heads, a.block_m, a.block_n, a.block_k, a.warps_m, a.warps_n
            )
        }
        Op::Linear(l) => match l.engine {
            LinearEngine::Mma { warp_m, warp_n } => format!(
                "dgemma::linear<{}, {}, {}, {}, {}, {warp_m}, {warp_n}>",
                l.n, l.k, l.block_m, l.block_n, l.block_k
            ),
            LinearEngine::Wgmma { stages } => format!(
                "dgemma::linear_wgmma<{}, {}, {}, {}, {}, {stages}>",
                l.n, l.k, l.block_m, l.block_n, l.block_k
            ),
        },
        Op::GroupedGemm(g) => {
            let weights = match g.weights {
                WeightFormat::Bf16 => "",
                WeightFormat::E4m3 => ", dgemma::WeightE4m3",
            };
            let geglu = g.fuse == GemmFuse::Geglu;
            match g.engine {
                GemmEngine::Simt => {
                    format!("dgemma::grouped_gemm_sorted<{}, {}, {geglu}, {}, {}{weights}>", g.n, g.k, g.rows, g.cols)
                }
                GemmEngine::Mma { block_k, warps } => format!(
                    "dgemma::grouped_gemm_mma<{}, {}, {geglu}, {}, {}, {block_k}, {warps}{weights}>",
                    g.n, g.k, g.rows, g.cols
                ),
                GemmEngine::Wgmma { block_k, stages } => format!(
                    "dgemma::grouped_gemm_wgmma<{}, {}, {geglu}, {}, {}, {block_k}, {stages}{weights}>",
                    g.n, g.k, g.rows, g.cols
                ),
            }
        }
        Op::MoeSort(m) => format!("dgemma::moe_sort<{}, {t}>", m.experts),
        Op::MoeCombine(m) => format!("dgemma::moe_combine<{}, {t}>", m.hidden),
        Op::Router(r) => format!("dgemma::router<{}, {}, {}, {t}>", r.hidden, r.experts, r.top_k),
        Op::SoftEmbedding(e) => match e.engine {
            LinearEngine::Mma { warp_m, warp_n } => format!(
                "dgemma::soft_embedding<{}, {}, {}, {}, {}, {}, {warp_m}, {warp_n}>",
                e.hidden, e.vocab, e.splits, e.block_m, e.block_n, e.block_k
            ),
            LinearEngine::Wgmma { stages } => format!(
                "dgemma::soft_embedding_wgmma<{}, {}, {}, {}, {}, {}, {stages}>",
                e.hidden, e.vocab, e.splits, e.block_m, e.block_n, e.block_k
            ),
        },
        Op::SoftEmbeddingProbs(p) => format!("dgemma::soft_embedding_probs<{}, {t}>", p.vocab),
        Op::SoftEmbeddingReduce(r) => format!("dgemma::soft_embedding_reduce<{}, {}, {t}>", r.hidden, r.splits),
        Op::GumbelSample(g) => format!("dgemma::gumbel_sample<{}, {t}>", g.vocab),
        Op::SamplerCanvas(c) => format!("dgemma::sampler_canvas<{}, {t}>", c.max_canvas),
        Op::ReadBandwidth(r) => format!("dgemma::read_bandwidth<{t}, {}>", r.unroll),
    }
}

/// File name of the instantiation file (`<kernel name>.cu`).
pub fn file_name(spec: &KernelSpec) -> String {
    format!("{}.cu", spec.kernel_name())
}

/// The instantiation file of one kernel.
pub fn emit(spec: &KernelSpec) -> String {
    let name = spec.kernel_name();
    let params = params(spec);
    let mut s = String::new();
    writeln!(s, "// Generated by dgemma-codegen (codegen/src/emit.rs). Do not edit.").unwrap();
    writeln!(s, "// spec:   {spec:?}").unwrap();
    let target = match spec.target {
        Target::Portable => "portable (real body on every arch of the fatbin)".to_string(),
        Target::Only(a) => format!("{} only (a trap on every other arch)", a.nvcc_name()),
    };
    writeln!(s, "// target: {target}").unwrap();
    writeln!(s, "#include \"{}\"", spec.header()).unwrap();
    writeln!(s).unwrap();
    let bounds = match spec.min_blocks_per_sm() {
        Some(blocks) => format!("{}, {blocks}", spec.block_threads()),
        None => spec.block_threads().to_string(),
    };
    writeln!(s, "extern \"C\" __global__ void __launch_bounds__({bounds}) {name}(").unwrap();
    for (i, p) in params.iter().enumerate() {
        let sep = if i + 1 == params.len() { ")" } else { "," };
        writeln!(s, "    {} {}{sep}", p.ty, p.name).unwrap();
    }
    writeln!(s, "{{").unwrap();
    let mut args: Vec<&str> = params.iter().map(|p| p.name).collect();
    // The grouped GEMM templates take the weights' row scales after `w` for both formats; the
    // bf16 kernels have no such parameter and pass none.
    if let Op::GroupedGemm(GroupedGemm { weights: WeightFormat::Bf16, .. }) = spec.op {
        let w = args.iter().position(|&a| a == "w").expect("a grouped GEMM takes w") + 1;
        args.insert(w, "nullptr");
    }
    let call = format!("{}({});", template_call(spec), args.join(", "));
    match spec.target {
        Target::Portable => writeln!(s, "    {call}").unwrap(),
        Target::Only(arch) => {
            writeln!(s, "#if {}", arch.guard_macro()).unwrap();
            writeln!(s, "    {call}").unwrap();
            writeln!(s, "#else").unwrap();
            writeln!(s, "    dgemma::trap_wrong_arch();").unwrap();
            writeln!(s, "#endif").unwrap();
        }
    }
    writeln!(s, "}}").unwrap();
    s
}

/// One translation unit that includes every instantiation file of `specs` (in order), for a
/// single nvcc invocation. The includes are resolved against the folder the files are written
/// to.
pub fn emit_unity(specs: &[KernelSpec]) -> String {
    let mut s = String::from("// Generated by dgemma-codegen: every kernel of the fatbin, one translation unit.\n");
    for spec in specs {
        writeln!(s, "#include \"{}\"", file_name(spec)).unwrap();
    }
    s
}

/// The archs the fatbin is compiled for, in nvcc `-gencode` form. The first two are machine
/// code (cubins); the last is PTX, JIT-compiled by the driver on newer consumer Blackwell parts.
pub const GENCODES: [&str; 3] =
    ["arch=compute_90a,code=sm_90a", "arch=compute_120,code=sm_120", "arch=compute_120,code=compute_120"];

/// The code images in the fatbin, as the kernel index reports them.
pub const FATBIN_ARCHS: [&str; 3] = ["sm_90a", "sm_120", "compute_120"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Arch, Linear, RmsNorm};

    #[test]
    fn portable_kernel_calls_template_directly() {
        let spec = KernelSpec::portable(Op::RmsNorm(RmsNorm {
            width: 64,
            has_scale: false,
            fuse_input_add: true,
            fuse_residual_add: false,
            fuse_layer_scalar: false,
        }));
        let src = emit(&spec);
        assert!(src.contains("#include \"rmsnorm.cuh\""));
        assert!(src.contains("__launch_bounds__(32) rmsnorm_w64_noscale_inadd_bf16("));
        assert!(src.contains(
            "dgemma::rmsnorm<64, 32, false, true, false, false>(x, x_add, weight, out, eps, layer_scalar, rows);"
        ));
        assert!(!src.contains("#if"));
    }

    #[test]
    fn arch_specific_kernel_is_guarded() {
        let engine = LinearEngine::Mma { warp_m: 32, warp_n: 32 };
        let linear = Linear { n: 8, k: 16, block_m: 64, block_n: 64, block_k: 32, engine };
        let spec = KernelSpec::for_arch(Op::Linear(linear), Arch::Sm90a);
        let src = emit(&spec);
        assert!(src.contains(
            "#if DGEMMA_ARCH_SM90A\n    dgemma::linear<8, 16, 64, 64, 32, 32, 32>(x, w, y, rows);\n#else\n    \
             dgemma::trap_wrong_arch();\n#endif"
        ));
    }

    #[test]
    fn emission_is_deterministic() {
        let spec = KernelSpec::portable(Op::Geglu);
        assert_eq!(emit(&spec), emit(&spec));
        assert_eq!(file_name(&spec), "geglu_bf16.cu");
    }
}
