//! Streams a few concurrent requests from the engine and prints their events.
//!
//! ```text
//! cargo run -p dgemma-runtime --example stream -- [MODEL_DIR] [PROMPT]
//! ```
//! Without arguments it uses the bundled tiny model (random weights: the text is gibberish).

use dgemma_runtime::{Engine, EngineOptions, Event, Request};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(Into::into)
        .unwrap_or_else(dgemma_runtime::bundled_tiny_model);
    let prompt = args
        .next()
        .unwrap_or_else(|| "Write a short poem about the sea.".into());
    let engine = Engine::load(
        &dir,
        EngineOptions {
            max_concurrent: 2,
            ..Default::default()
        },
    )?;
    eprintln!("loaded {} ({})", dir.display(), engine.precision().name());

    // Three requests at once, each with its own seed and settings; the third waits in the queue
    // until one of the first two finishes (max_concurrent = 2).
    let mut handles = [
        engine.submit(
            Request::chat(prompt.clone())
                .seed(1)
                .max_new_tokens(64)
                .stream_drafts(true),
        )?,
        engine.submit(
            Request::chat(prompt.clone())
                .seed(2)
                .max_new_tokens(32)
                .max_denoising_steps(8),
        )?,
        engine.submit(Request::text(prompt).seed(3).max_new_tokens(48))?,
    ];
    // Rejected up front, the others are not affected.
    if let Err(e) = engine.submit(Request::chat("   ")) {
        eprintln!("rejected: {e}");
    }

    // Print events as they come, polling every stream in turn.
    let mut open = handles.len();
    while open > 0 {
        for h in handles.iter_mut() {
            while let Some(event) = h.try_next_event() {
                let id = h.id();
                match event {
                    Event::Draft {
                        block,
                        step,
                        accepted,
                        ..
                    } => eprintln!("[{id}] draft block {block} step {step}: {accepted} accepted"),
                    Event::Canvas { index, text, .. } => {
                        println!("[{id}] canvas {index}: {text:?}")
                    }
                    Event::Finished(done) => {
                        let s = &done.stats;
                        println!(
                            "[{id}] finished ({:?}): {} tokens, {} canvases, steps {:?}, queued {:.1} ms, ran {:.1} ms\n[{id}] text: {:?}",
                            done.reason,
                            s.generation.new_tokens,
                            s.generation.canvases,
                            s.generation.steps_per_canvas,
                            s.queue_time.as_secs_f64() * 1e3,
                            s.run_time.as_secs_f64() * 1e3,
                            done.text
                        );
                        open -= 1;
                    }
                    Event::Cancelled => {
                        println!("[{id}] cancelled");
                        open -= 1;
                    }
                    Event::Error(e) => {
                        println!("[{id}] error: {e}");
                        open -= 1;
                    }
                }
            }
        }
        std::io::stdout().flush()?;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    eprintln!("{:?}", engine.stats());
    Ok(())
}
