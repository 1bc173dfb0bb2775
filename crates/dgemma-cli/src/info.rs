//! `dgemma info`: what a checkpoint holds, as dgemma parsed it.

use crate::load;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Checkpoint directory. Defaults to the bundled tiny model.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

pub fn info(a: InfoArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dir = a.model.unwrap_or_else(load::default_model_dir);
    let loaded = load::open(&dir, dgemma_model::quant::Quant::None, false)?;
    let ck = &loaded.checkpoint;
    let t = &ck.config.text;
    println!("model: {}", dir.display());
    println!(
        "text: vocab {} | hidden {} | layers {} | heads {} | experts {} top-{} (moe width {}) | dense width {} | sliding window {} | canvas {}",
        t.vocab_size,
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_experts,
        t.top_k_experts,
        t.moe_intermediate_size,
        t.intermediate_size,
        t.sliding_window,
        ck.config.canvas_length
    );
    for i in 0..t.num_hidden_layers {
        let l = t.layer(i);
        println!(
            "  layer {i:>2}: {:?} | {} q heads / {} kv heads x {} | rope {:?} theta {} partial {} | k=v {}",
            l.kind, l.num_heads, l.num_kv_heads, l.head_dim, l.rope.kind, l.rope.theta, l.rope.partial_rotary_factor, l.k_eq_v
        );
    }
    println!("generation: {:?}", ck.generation);
    println!("tensors: {} in {} file(s), {:.3} GB", ck.tensor_count(), ck.files().len(), ck.total_bytes() as f64 / 1e9);
    println!("lm_head: {}", if loaded.weights.lm_head.is_some() { "stored" } else { "tied to the embedding" });
    let k = &dgemma::kernels::KERNEL_NAMES;
    if dgemma::kernels::HAVE_KERNELS {
        println!(
            "cuda kernels: {} embedded for {} ({} bytes, nvcc {})",
            k.len(),
            dgemma::kernels::ARCHS.join(", "),
            dgemma::kernels::FATBIN.len(),
            dgemma::kernels::NVCC_VERSION
        );
    } else {
        println!("cuda kernels: none embedded ({})", dgemma::kernels::NOT_BUILT_REASON);
    }
    println!("backends: cpu (float32, bf16), cuda (bf16; --backend cuda)");
    println!("build: dgemma {} (commit {})", env!("CARGO_PKG_VERSION"), dgemma::GIT_COMMIT);
    Ok(ExitCode::SUCCESS)
}
