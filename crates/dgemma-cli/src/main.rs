//! `dgemma`: run DiffusionGemma on a Hugging Face checkpoint directory.
//!
//! * `dgemma run [--model DIR] "prompt"`: generate, streaming each committed canvas.
//! * `dgemma info --model DIR`: the parsed config, tensor count and bytes.
//! * `dgemma verify --model DIR --case FILE`: check the engine against a transformers dump.
//! * `dgemma bench [--synthetic 26b | --model DIR]`: CUDA backend timings against the floor;
//!   `--serve 1,4,16,32`: the serving runtime's throughput and TTFT under concurrent requests.

mod bench;
mod info;
mod load;
mod progress;
mod run;
mod serve_bench;
mod verify;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dgemma", version, about = "DiffusionGemma inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for a prompt.
    Run(run::RunArgs),
    /// Print a checkpoint's parsed configuration and tensor statistics.
    Info(info::InfoArgs),
    /// Check the engine against a reference case file made by transformers.
    Verify(verify::VerifyArgs),
    /// Time the CUDA backend (steps per context, prefill, commit, tokens/s) against the memory floor.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Info(a) => info::info(a),
        Command::Verify(a) => verify::verify(a),
        Command::Bench(a) => bench::bench(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
