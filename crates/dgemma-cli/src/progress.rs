//! A one-line progress bar on stderr (only drawn when stderr is a terminal).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    label: String,
    start: Instant,
    last_percent: Option<u64>,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &str) -> Progress {
        Progress { label: label.to_string(), start: Instant::now(), last_percent: None, enabled: std::io::stderr().is_terminal() }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || total == 0 {
            return;
        }
        let percent = done * 100 / total;
        if self.last_percent == Some(percent) {
            return;
        }
        self.last_percent = Some(percent);
        let width = 30;
        let filled = (percent as usize * width) / 100;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{} [{}{}] {:>3}% {:.1}/{:.1} GB {:.2} GB/s",
            self.label,
            "#".repeat(filled),
            " ".repeat(width - filled),
            percent,
            done as f64 / 1e9,
            total as f64 / 1e9,
            done as f64 / 1e9 / secs
        );
        if done >= total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}
