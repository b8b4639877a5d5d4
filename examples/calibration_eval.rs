//! Calibration metrics and a reliability diagram of synthetic predictions, through the library.
//!
//! `cargo run --example calibration_eval [-- OUT_DIR]` writes `reliability.png` and
//! `reliability.svg` to OUT_DIR (default: the system temporary directory).

use rand_distr::{Distribution, Normal};
use whvi::metrics::{
    apply_temperature, compute_report, fit_temperature, plot_reliability, Logits, Predictions,
    ReliabilityDiagram,
};

fn main() -> whvi::Result<()> {
    let out_dir = std::env::args_os()
        .nth(1)
        .map_or_else(std::env::temp_dir, Into::into);
    // 2000 examples over 10 classes; labels drawn from softmax(z), predictions softmax(2z):
    // an overconfident model.
    let (n, k) = (2000, 10);
    let mut rng = whvi::rng::seeded(0);
    let normal = Normal::new(0.0, 2.0).expect("valid normal");
    let z = Logits::new((0..n * k).map(|_| normal.sample(&mut rng)).collect(), n, k)?;
    let truth = apply_temperature(&z, 1.0)?;
    let labels: Vec<usize> = truth
        .rows()
        .map(|row| {
            let u: f64 = rand::Rng::random(&mut rng);
            let mut acc = 0.0;
            row.iter()
                .position(|&p| {
                    acc += p;
                    u < acc
                })
                .unwrap_or(k - 1)
        })
        .collect();
    let overconfident = apply_temperature(&z, 0.5)?;

    let report = compute_report(
        &Predictions::from_mean(overconfident.clone()),
        &labels,
        None,
    )?;
    print!("{report}");
    let fit = fit_temperature(&Logits::from_probs(&overconfident), &labels)?;
    println!(
        "temperature scaling: T = {:.3}, NLL {:.4} -> {:.4}",
        fit.temperature, fit.nll_before, fit.nll_after
    );

    let diagram = ReliabilityDiagram::new(&overconfident, &labels, 15)?;
    for name in ["reliability.png", "reliability.svg"] {
        let path = out_dir.join(name);
        plot_reliability(&diagram, "Overconfident synthetic model", &path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
