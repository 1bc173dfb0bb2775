//! Lists the kernels build.rs compiles, or writes their instantiation files to a folder.
//!
//! ```text
//! cargo run -p dgemma-codegen --example kernels             # names, one per line
//! cargo run -p dgemma-codegen --example kernels -- OUT_DIR  # OUT_DIR/<name>.cu + all_kernels.cu
//! ```
//! Compile the written files by hand with
//! `nvcc -O3 -std=c++17 -fatbin -I csrc -I OUT_DIR OUT_DIR/all_kernels.cu -gencode ...`.

use dgemma_codegen::{emit, emit_unity, file_name, supported_specs};

fn main() -> std::io::Result<()> {
    let specs = supported_specs();
    match std::env::args_os().nth(1) {
        None => {
            for spec in &specs {
                println!("{}", spec.kernel_name());
            }
        }
        Some(dir) => {
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir)?;
            for spec in &specs {
                std::fs::write(dir.join(file_name(spec)), emit(spec))?;
            }
            std::fs::write(dir.join("all_kernels.cu"), emit_unity(&specs))?;
            eprintln!("wrote {} kernels to {}", specs.len(), dir.display());
        }
    }
    Ok(())
}
