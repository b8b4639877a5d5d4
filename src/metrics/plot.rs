//! Plots of calibration and uncertainty: the reliability diagram, the OOD score histogram
//! and accuracy / ECE against corruption severity, each as PNG or SVG (chosen by the file
//! extension).
//!
//! Text is drawn with a font embedded in the binary, so plots render the same on a machine
//! without any system fonts: `fonts/DejaVuSans-subset.ttf` is DejaVu Sans (Bitstream Vera
//! license, see `fonts/LICENSE-DejaVu.txt` beside it; DejaVu changes are public domain),
//! reduced with fontTools' `pyftsubset` to Basic Latin, Latin-1 and a few symbols
//! (`– — − ≤ ≥ · σ μ Δ ≈`), about 40 kB. The font keeps its own name, as the license asks of
//! modified versions (no "Bitstream" or "Vera" in it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::calibration::ReliabilityDiagram;
use super::ood::auroc;
use crate::{Error, Result};

/// The embedded font (see the module documentation for its license).
const FONT: &[u8] = include_bytes!("fonts/DejaVuSans-subset.ttf");
/// The family name plotters looks the font up by.
const FAMILY: &str = "sans-serif";

const BAR: RGBColor = RGBColor(31, 119, 180);
const GAP: RGBColor = RGBColor(214, 39, 40);
const OUT: RGBColor = RGBColor(255, 127, 14);
const GREY: RGBColor = RGBColor(110, 110, 110);

/// One evaluation on a corrupted test set: the corruption, its severity, and the accuracy and
/// ECE measured there.
#[derive(Debug, Clone, PartialEq)]
pub struct CorruptionPoint {
    /// The corruption (e.g. "gaussian_noise").
    pub name: String,
    /// Its severity (1 to 5 for CIFAR-10-C; 0 may stand for the clean test set).
    pub severity: u32,
    /// Accuracy (fraction).
    pub accuracy: f64,
    /// Expected calibration error (fraction).
    pub ece: f64,
}

impl<S: Into<String>> From<(S, u32, f64, f64)> for CorruptionPoint {
    fn from((name, severity, accuracy, ece): (S, u32, f64, f64)) -> Self {
        CorruptionPoint {
            name: name.into(),
            severity,
            accuracy,
            ece,
        }
    }
}

/// Draws a reliability diagram to `path` (`.png` or `.svg`): per-bin accuracy bars against
/// confidence with the diagonal of perfect calibration and the gap to each bin's mean
/// confidence shaded, ECE in the title; beneath it the histogram of confidences with the
/// overall accuracy and mean confidence marked.
pub fn plot_reliability(diagram: &ReliabilityDiagram, title: &str, path: &Path) -> Result<()> {
    if diagram.n == 0 || diagram.bins.is_empty() {
        return Err(Error::invalid(
            "reliability diagram: no examples or no bins to plot",
        ));
    }
    render(path, (900, 1000), &Reliability { diagram, title })
}

/// Draws overlaid histograms of an OOD score on in-distribution and OOD examples to `path`
/// (`.png` or `.svg`), each normalised to fractions of its own set, with a legend and the
/// AUROC in the title. `score_name` labels the x axis.
pub fn plot_ood_histogram(
    in_scores: &[f64],
    out_scores: &[f64],
    score_name: &str,
    path: &Path,
) -> Result<()> {
    let auroc = auroc(in_scores, out_scores)?;
    let figure = OodHistogram {
        in_scores,
        out_scores,
        score_name,
        auroc,
    };
    render(path, (1000, 700), &figure)
}

/// Draws accuracy and ECE against corruption severity to `path` (`.png` or `.svg`): one line
/// per corruption and, in black, their mean at each severity.
pub fn plot_corruption(points: &[CorruptionPoint], path: &Path) -> Result<()> {
    check_finite(points)?;
    render(
        path,
        (1400, 650),
        &Corruption {
            points,
            mean_label: Some("mean over corruptions"),
        },
    )
}

/// Draws accuracy and ECE against severity to `path` for several methods: `points` hold one
/// series per method (its name in [`CorruptionPoint::name`]), each usually the mean over
/// the corruptions at each severity; no overall mean is drawn.
pub fn plot_methods_under_shift(points: &[CorruptionPoint], path: &Path) -> Result<()> {
    check_finite(points)?;
    // Wider than the per-corruption plot: method labels carry the run name.
    render(
        path,
        (1600, 650),
        &Corruption {
            points,
            mean_label: None,
        },
    )
}

/// Refuses an empty set of points or one that is not finite.
fn check_finite(points: &[CorruptionPoint]) -> Result<()> {
    if points.is_empty() {
        return Err(Error::invalid("corruption plot: no points to plot"));
    }
    if let Some(p) = points
        .iter()
        .find(|p| !(p.accuracy.is_finite() && p.ece.is_finite()))
    {
        return Err(Error::invalid(format!(
            "corruption plot: {} severity {} has accuracy {} and ECE {}; both must be finite",
            p.name, p.severity, p.accuracy, p.ece
        )));
    }
    Ok(())
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A drawing that can go to any backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// Draws `figure` to `path` as PNG or SVG by the extension.
fn render(path: &Path, size: (u32, u32), figure: &impl Figure) -> Result<()> {
    ensure_font()?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let failed = |e: String| {
        Error::io(
            path,
            std::io::Error::other(format!("cannot draw plot: {e}")),
        )
    };
    match ext.as_deref() {
        Some("png") => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            figure
                .draw(&root)
                .and_then(|()| root.present())
                .map_err(|e| failed(e.to_string()))
        }
        Some("svg") => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            figure
                .draw(&root)
                .and_then(|()| root.present())
                .map_err(|e| failed(e.to_string()))
        }
        _ => Err(Error::invalid(format!(
            "{}: plots are written as .png or .svg; give a file name with one of those \
             extensions",
            path.display()
        ))),
    }
}

/// Registers the embedded font once.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("the embedded plot font could not be loaded"))
    }
}

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().into()
}

/// A legend entry drawn as a filled square.
fn swatch(color: RGBAColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x, y - 7), (x + 14, y + 7)], color.filled())
}

/// A legend entry drawn as a short line.
fn stroke(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

struct Reliability<'a> {
    diagram: &'a ReliabilityDiagram,
    title: &'a str,
}

impl Figure for Reliability<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let (upper, lower) = root.split_vertically(700);
        self.draw_bins(&upper)?;
        self.draw_confidence_histogram(&lower)
    }
}

impl Reliability<'_> {
    /// Accuracy and mean confidence per bin against the diagonal of perfect calibration.
    fn draw_bins<DB: DrawingBackend>(&self, upper: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let d = self.diagram;
        let caption = format!(
            "{}: ECE = {:.4}, MCE = {:.4} ({} bins, N = {})",
            self.title,
            d.ece(),
            d.mce(),
            d.bins.len(),
            d.n
        );
        // Long run names would run off the figure: shrink the caption to fit its width
        // (DejaVu Sans averages about 0.55 em per character).
        let width = upper.dim_in_pixel().0 as f64 - 40.0;
        let size = (width / (0.55 * caption.chars().count() as f64)).clamp(12.0, 24.0) as u32;
        let mut chart = ChartBuilder::on(upper)
            .caption(caption, font(size))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_labels(11)
            .y_labels(11)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .x_desc("Confidence (top-label probability)")
            .y_desc("Accuracy")
            .label_style(font(16))
            .axis_desc_style(font(18))
            .light_line_style(WHITE)
            .draw()?;
        let filled = d.bins.iter().filter(|b| b.count > 0);
        chart
            .draw_series(filled.clone().map(|b| {
                Rectangle::new(
                    [(b.lower, 0.0), (b.upper, b.accuracy)],
                    BAR.mix(0.85).filled(),
                )
            }))?
            .label("Accuracy per bin")
            .legend(swatch(BAR.mix(0.85)));
        chart.draw_series(filled.clone().map(|b| {
            Rectangle::new(
                [(b.lower, 0.0), (b.upper, b.accuracy)],
                BLACK.stroke_width(1),
            )
        }))?;
        chart
            .draw_series(filled.clone().map(|b| {
                Rectangle::new(
                    [(b.lower, b.accuracy), (b.upper, b.confidence)],
                    GAP.mix(0.35).filled(),
                )
            }))?
            .label("Gap to mean confidence")
            .legend(swatch(GAP.mix(0.35)));
        chart
            .draw_series(filled.map(|b| {
                PathElement::new(
                    vec![(b.lower, b.confidence), (b.upper, b.confidence)],
                    GAP.stroke_width(2),
                )
            }))?
            .label("Mean confidence per bin")
            .legend(stroke(GAP.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (1.0, 1.0)],
                8,
                6,
                GREY.stroke_width(2),
            ))?
            .label("Perfect calibration")
            .legend(stroke(GREY.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(font(16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }

    /// How many examples fall in each bin, with the overall accuracy and mean confidence.
    fn draw_confidence_histogram<DB: DrawingBackend>(
        &self,
        lower: &DrawingArea<DB, Shift>,
    ) -> DrawResult<DB> {
        let d = self.diagram;
        let max_frac = d
            .bins
            .iter()
            .map(|b| b.count as f64 / d.n as f64)
            .fold(0.0, f64::max);
        let mut hist = ChartBuilder::on(lower)
            .margin(15)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..1f64, 0f64..(max_frac * 1.15).max(1e-9))?;
        hist.configure_mesh()
            .x_labels(11)
            .y_labels(5)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .x_desc("Confidence (top-label probability)")
            .y_desc("Fraction of examples")
            .label_style(font(16))
            .axis_desc_style(font(18))
            .light_line_style(WHITE)
            .draw()?;
        hist.draw_series(d.bins.iter().map(|b| {
            Rectangle::new(
                [(b.lower, 0.0), (b.upper, b.count as f64 / d.n as f64)],
                GREY.mix(0.6).filled(),
            )
        }))?;
        let n = d.n as f64;
        let acc: f64 = d
            .bins
            .iter()
            .map(|b| b.count as f64 * b.accuracy)
            .sum::<f64>()
            / n;
        let conf: f64 = d
            .bins
            .iter()
            .map(|b| b.count as f64 * b.confidence)
            .sum::<f64>()
            / n;
        let top = max_frac * 1.15;
        hist.draw_series(DashedLineSeries::new(
            vec![(acc, 0.0), (acc, top)],
            6,
            4,
            BAR.stroke_width(3),
        ))?
        .label(format!("Accuracy {acc:.3}"))
        .legend(stroke(BAR.stroke_width(3)));
        hist.draw_series(LineSeries::new(
            vec![(conf, 0.0), (conf, top)],
            GAP.stroke_width(3),
        ))?
        .label(format!("Mean confidence {conf:.3}"))
        .legend(stroke(GAP.stroke_width(3)));
        hist.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(font(16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }
}

struct OodHistogram<'a> {
    in_scores: &'a [f64],
    out_scores: &'a [f64],
    score_name: &'a str,
    auroc: f64,
}

impl Figure for OodHistogram<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        const BINS: usize = 30;
        let all = self.in_scores.iter().chain(self.out_scores);
        let lo = all.clone().fold(f64::INFINITY, |m, &v| m.min(v));
        let hi = all.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5, lo + 0.5)
        };
        let width = (hi - lo) / BINS as f64;
        let fractions = |scores: &[f64]| {
            let mut counts = vec![0.0; BINS];
            for &s in scores {
                counts[(((s - lo) / width) as usize).min(BINS - 1)] += 1.0;
            }
            counts.iter_mut().for_each(|c| *c /= scores.len() as f64);
            counts
        };
        let in_frac = fractions(self.in_scores);
        let out_frac = fractions(self.out_scores);
        let top = in_frac
            .iter()
            .chain(&out_frac)
            .fold(0.0, |m: f64, &v| m.max(v))
            * 1.1;

        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "OOD detection by {}: AUROC = {:.4}",
                    self.score_name, self.auroc
                ),
                font(24),
            )
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(lo..hi, 0.0..top)?;
        chart
            .configure_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|v| format!("{v:.2}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .x_desc(format!("Score: {}", self.score_name))
            .y_desc("Fraction of examples")
            .label_style(font(16))
            .axis_desc_style(font(18))
            .light_line_style(WHITE)
            .draw()?;
        let sets = [
            (
                &in_frac,
                BAR,
                format!("In-distribution (N = {})", self.in_scores.len()),
            ),
            (
                &out_frac,
                OUT,
                format!("OOD (N = {})", self.out_scores.len()),
            ),
        ];
        for (frac, color, label) in sets {
            chart
                .draw_series(frac.iter().enumerate().map(|(b, &f)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, f)], color.mix(0.5).filled())
                }))?
                .label(label)
                .legend(swatch(color.mix(0.5)));
            chart.draw_series(frac.iter().enumerate().filter(|(_, f)| **f > 0.0).map(
                |(b, &f)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, f)], color.stroke_width(1))
                },
            ))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }
}

struct Corruption<'a> {
    points: &'a [CorruptionPoint],
    /// The legend entry of the black mean line (`None`: no mean line).
    mean_label: Option<&'static str>,
}

impl Figure for Corruption<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        // One series per corruption, in order of first appearance, sorted by severity.
        let mut names: Vec<&str> = Vec::new();
        let mut series: BTreeMap<&str, Vec<&CorruptionPoint>> = BTreeMap::new();
        for p in self.points {
            if !series.contains_key(p.name.as_str()) {
                names.push(&p.name);
            }
            series.entry(&p.name).or_default().push(p);
        }
        series
            .values_mut()
            .for_each(|s| s.sort_by_key(|p| p.severity));
        let mut by_severity: BTreeMap<u32, Vec<&CorruptionPoint>> = BTreeMap::new();
        for p in self.points {
            by_severity.entry(p.severity).or_default().push(p);
        }
        let mean = |f: fn(&CorruptionPoint) -> f64| -> Vec<(f64, f64)> {
            by_severity
                .iter()
                .map(|(&s, ps)| {
                    (
                        f64::from(s),
                        ps.iter().map(|p| f(p)).sum::<f64>() / ps.len() as f64,
                    )
                })
                .collect()
        };
        let s_min = f64::from(*by_severity.keys().next().expect("points are non-empty"));
        let s_max = f64::from(*by_severity.keys().last().expect("points are non-empty"));
        let x_range = (s_min - 0.25)..(s_max + 0.25);

        root.fill(&WHITE)?;
        let (plots, legend) = root.split_horizontally(1130);
        let panels = plots.split_evenly((1, 2));
        type Metric = (&'static str, fn(&CorruptionPoint) -> f64);
        let metrics: [Metric; 2] = [("Accuracy", |p| p.accuracy), ("ECE", |p| p.ece)];
        for (panel, (metric, value)) in panels.iter().zip(metrics) {
            let top = self.points.iter().map(value).fold(0.0, f64::max).max(1e-9) * 1.08;
            let top = if metric == "Accuracy" {
                top.min(1.0)
            } else {
                top
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{metric} against corruption severity"), font(22))
                .margin(15)
                .x_label_area_size(50)
                .y_label_area_size(70)
                .build_cartesian_2d(x_range.clone(), 0.0..top)?;
            chart
                .configure_mesh()
                .x_labels(((s_max - s_min) as usize + 1).min(21))
                .y_labels(10)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.2}"))
                .x_desc("Severity")
                .y_desc(metric)
                .label_style(font(16))
                .axis_desc_style(font(18))
                .light_line_style(WHITE)
                .draw()?;
            for (i, name) in names.iter().enumerate() {
                let color = Palette99::pick(i).mix(0.8);
                let line: Vec<(f64, f64)> = series[name]
                    .iter()
                    .map(|p| (f64::from(p.severity), value(p)))
                    .collect();
                chart.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?;
                chart.draw_series(line.iter().map(|&xy| Circle::new(xy, 3, color.filled())))?;
            }
            if self.mean_label.is_some() {
                let mean_line = mean(value);
                chart.draw_series(LineSeries::new(mean_line.clone(), BLACK.stroke_width(4)))?;
                chart.draw_series(
                    mean_line
                        .iter()
                        .map(|&xy| Circle::new(xy, 5, BLACK.filled())),
                )?;
            }
        }

        // The legend, in its own column so it never covers the data.
        let mean_entry = self.mean_label.map(|label| (label, BLACK.to_rgba(), 4));
        let entries = mean_entry.into_iter().chain(
            names
                .iter()
                .enumerate()
                .map(|(i, &n)| (n, Palette99::pick(i).mix(0.8), 2)),
        );
        for (row, (label, color, width)) in entries.enumerate() {
            let y = 70 + 24 * row as i32;
            legend.draw(&PathElement::new(
                vec![(10, y), (40, y)],
                color.stroke_width(width),
            ))?;
            legend.draw(&Text::new(label.to_string(), (48, y - 8), font(16)))?;
        }
        Ok(())
    }
}
