use indicatif::{ProgressBar, ProgressStyle};

/// Receives a run's progress: a bar per epoch on a terminal, nothing when quiet.
pub trait Progress {
    /// An epoch begins: `batches` in all, `done` of them already (after a resume).
    fn start_epoch(&mut self, epoch: usize, epochs: usize, batches: usize, done: usize);
    /// A batch finished: running mean loss and accuracy of the epoch.
    fn batch(&mut self, done: usize, loss: f64, accuracy: f64);
    /// The epoch ended, with a one-line summary.
    fn finish_epoch(&mut self, summary: &str);
    /// Anything else worth saying.
    fn message(&mut self, text: &str);
    /// A file of the run was written at the end of an epoch. The order is `Best` (when the
    /// validation NLL improved), `Last`, `Log`: any prefix of it resumes to a consistent run.
    fn saved(&mut self, file: RunFile) {
        let _ = file;
    }
}

/// The files a run writes at the end of every epoch, in the order they are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunFile {
    /// `best.safetensors`, before `last`: a crash between them redoes the epoch from the
    /// previous `last`, which rewrites the same `best`.
    Best,
    /// `last.safetensors` with the resume state: the epoch is committed here.
    Last,
    /// The epoch's line of `metrics.jsonl`; on resume, a line missing after a crash is restored
    /// from `last` (which carries the epoch's metrics) and lines past it are dropped.
    Log,
}

/// Progress bars (indicatif) with loss, accuracy, images/s and ETA.
pub struct BarProgress {
    bar: Option<ProgressBar>,
    batch_size: usize,
}

impl BarProgress {
    /// Bars for a run with `batch_size` images per step.
    pub fn new(batch_size: usize) -> Self {
        BarProgress {
            bar: None,
            batch_size,
        }
    }
}

impl Progress for BarProgress {
    fn start_epoch(&mut self, epoch: usize, epochs: usize, batches: usize, done: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})",
            )
            .expect("valid progress template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        bar.set_position(done as u64);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    fn batch(&mut self, done: usize, loss: f64, accuracy: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            let rate = bar.per_sec() * self.batch_size as f64;
            bar.set_message(format!(
                "loss {loss:.4} acc {:.1}% {rate:.0} img/s",
                100.0 * accuracy
            ));
        }
    }

    fn finish_epoch(&mut self, summary: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{summary}");
    }

    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// Says nothing.
pub struct QuietProgress;

impl Progress for QuietProgress {
    fn start_epoch(&mut self, _: usize, _: usize, _: usize, _: usize) {}
    fn batch(&mut self, _: usize, _: f64, _: f64) {}
    fn finish_epoch(&mut self, _: &str) {}
    fn message(&mut self, _: &str) {}
}
