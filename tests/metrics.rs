//! Tests of `whvi::metrics`: the reference test vectors, hand-computed cases, temperature
//! scaling, `.npy` input, bad input, the report command and the plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::Deserialize;
use whvi::metrics::{
    self, accuracy, adaptive_ece, apply_temperature, aurc, auroc, average_precision, brier,
    classwise_ece, compute_report, ece, entropy, fit_temperature, fit_temperature_from_probs,
    fpr_at_tpr, load_labels, load_predictions, mce, mean_entropy, mutual_information, nll,
    ood_detection, ood_scores, plot_corruption, plot_ood_histogram, plot_reliability, read_npy,
    run_metrics, write_npy, CorruptionPoint, Logits, MetricsJob, MetricsReport, NpyArray, NpyDtype,
    OodScore, Predictions, Probs, ReliabilityDiagram, SampleProbs, DEFAULT_BINS,
};
use whvi::Error;

/// The tolerance the test vectors are to be matched to.
const TOL: f64 = 1e-6;

#[derive(Debug, PartialEq, Deserialize)]
struct Vectors {
    generator: String,
    cases: Vec<Case>,
}

#[derive(Debug, PartialEq, Deserialize)]
struct Case {
    probs: Vec<Vec<f64>>,
    labels: Vec<usize>,
    probs_ood: Vec<Vec<f64>>,
    expected: BTreeMap<String, f64>,
}

fn load_vectors(path: &Path) -> Vectors {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks every expected value of every case against the report's JSON key of the same name
/// and against the individual metric functions.
fn check_vectors(vectors: &Vectors) {
    assert!(!vectors.cases.is_empty());
    for (c, case) in vectors.cases.iter().enumerate() {
        let probs = Probs::from_rows(&case.probs).unwrap();
        let ood = Probs::from_rows(&case.probs_ood).unwrap();
        let report = compute_report(
            &Predictions::from_mean(probs.clone()),
            &case.labels,
            Some(&Predictions::from_mean(ood.clone())),
        )
        .unwrap();
        let json = serde_json::to_value(&report).unwrap();
        for (key, &expected) in &case.expected {
            let got = json[key]
                .as_f64()
                .unwrap_or_else(|| panic!("case {c}: the report has no key '{key}'"));
            assert!(
                (got - expected).abs() <= TOL,
                "case {c}: {key} = {got}, expected {expected}"
            );
        }
        // The same numbers through the individual functions.
        let y = &case.labels;
        let ood_in = entropy(&probs);
        let ood_out = entropy(&ood);
        let direct = [
            ("accuracy", accuracy(&probs, y).unwrap()),
            ("nll", nll(&probs, y).unwrap()),
            ("brier", brier(&probs, y).unwrap()),
            ("ece15", ece(&probs, y, 15).unwrap()),
            ("mce15", mce(&probs, y, 15).unwrap()),
            ("adaptive_ece15", adaptive_ece(&probs, y, 15).unwrap()),
            ("classwise_ece15", classwise_ece(&probs, y, 15).unwrap()),
            ("mean_entropy", mean_entropy(&probs)),
            ("ood_auroc_entropy", auroc(&ood_in, &ood_out).unwrap()),
            (
                "ood_aupr_entropy",
                average_precision(&ood_in, &ood_out).unwrap(),
            ),
            ("aurc", aurc(&probs, y).unwrap()),
        ];
        for (key, got) in direct {
            let expected = case.expected[key];
            assert!(
                (got - expected).abs() <= TOL,
                "case {c}: {key}() = {got}, expected {expected}"
            );
        }
    }
}

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn reference_vectors_match() {
    let vectors = load_vectors(&manifest_path("tests/data/calibration.json"));
    assert_eq!(vectors.cases.len(), 6);
    check_vectors(&vectors);
}

#[test]
fn shared_reference_vectors_match_the_committed_copy() {
    let shared = manifest_path("../shared/testvectors/calibration.json");
    if !shared.exists() {
        eprintln!(
            "{} not present; the committed copy is tested alone",
            shared.display()
        );
        return;
    }
    let shared = load_vectors(&shared);
    check_vectors(&shared);
    assert_eq!(
        shared,
        load_vectors(&manifest_path("tests/data/calibration.json")),
        "tests/data/calibration.json is out of date: copy the shared test vectors again"
    );
}

fn probs(rows: &[&[f64]]) -> Probs {
    Probs::from_rows(rows).unwrap()
}

#[test]
fn hand_computed_scores_and_calibration() {
    let p = probs(&[&[0.9, 0.1], &[0.2, 0.8], &[0.6, 0.4], &[0.5, 0.5]]);
    let y = [0, 0, 1, 1];
    // Predictions 0, 1, 0, 0 (first maximum on the tie): one correct.
    assert_eq!(accuracy(&p, &y).unwrap(), 0.25);
    let nll_expected = -(0.9f64.ln() + 0.2f64.ln() + 0.4f64.ln() + 0.5f64.ln()) / 4.0;
    assert!((nll(&p, &y).unwrap() - nll_expected).abs() < 1e-15);
    let brier_expected = (0.02 + 1.28 + 0.72 + 0.5) / 4.0;
    assert!((brier(&p, &y).unwrap() - brier_expected).abs() < 1e-15);
    // Confidences 0.9, 0.8, 0.6, 0.5 with 2 bins: bin 1 holds all; acc 1/4, conf 0.7.
    let d = ReliabilityDiagram::new(&p, &y, 2).unwrap();
    assert_eq!(d.bins[0].count, 0);
    assert_eq!(d.bins[1].count, 4);
    assert!((d.ece() - 0.45).abs() < 1e-12);
    assert!((d.mce() - 0.45).abs() < 1e-12);
    // Adaptive with 3 bins: sorted confidences 0.5 (wrong), 0.6 (wrong) | 0.8 (wrong) | 0.9 (right).
    let expected = 0.5 * 0.55 + 0.25 * 0.8 + 0.25 * 0.1;
    assert!((adaptive_ece(&p, &y, 3).unwrap() - expected).abs() < 1e-12);
    // AURC: sorted 0.9 (right), 0.8, 0.6, 0.5 (wrong): risks 0, 1/2, 2/3, 3/4.
    let expected = (0.0 + 0.5 + 2.0 / 3.0 + 0.75) / 4.0;
    assert!((aurc(&p, &y).unwrap() - expected).abs() < 1e-12);
    // Entropy with 0·ln 0 = 0.
    let h = entropy(&probs(&[&[1.0, 0.0], &[0.5, 0.5]]));
    assert_eq!(h[0], 0.0);
    assert!((h[1] - 2f64.ln()).abs() < 1e-15);
}

#[test]
fn mutual_information_hand_cases() {
    // Two samples that disagree completely: MI = H[0.5, 0.5] = ln 2.
    let s = SampleProbs::new(vec![1.0, 0.0, 0.0, 1.0], 2, 1, 2).unwrap();
    assert!((mutual_information(&s)[0] - 2f64.ln()).abs() < 1e-15);
    // Identical samples: MI = 0.
    let s = SampleProbs::new(vec![0.3, 0.7, 0.3, 0.7], 2, 1, 2).unwrap();
    assert_eq!(mutual_information(&s)[0], 0.0);
    // [0.9, 0.1] and [0.5, 0.5]: H[0.7, 0.3] - (H[0.9, 0.1] + ln 2) / 2.
    let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
    let s = SampleProbs::new(vec![0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.2, 0.8], 2, 2, 2).unwrap();
    let mi = mutual_information(&s);
    assert!((mi[0] - (h(0.7) - (h(0.9) + 2f64.ln()) / 2.0)).abs() < 1e-15);
    assert!(mi[1].abs() < 1e-15);
    let mean = s.mean();
    assert!((mean.row(0)[0] - 0.7).abs() < 1e-15 && (mean.row(0)[1] - 0.3).abs() < 1e-15);
    let pred = Predictions::from_samples(s);
    assert_eq!(ood_scores(&pred, OodScore::MutualInformation).unwrap(), mi);
    let err = ood_scores(&Predictions::from_mean(mean), OodScore::MutualInformation);
    assert!(err.unwrap_err().to_string().contains("per-sample"));
}

#[test]
fn ood_metrics_with_ties() {
    let (inn, out) = ([0.1, 0.5], [0.5, 0.9]);
    // Pairs out > in: 0.9 beats both, 0.5 beats 0.1 and ties 0.5: (2 + 1 + 0.5) / 4.
    assert!((auroc(&inn, &out).unwrap() - 0.875).abs() < 1e-15);
    // Thresholds 0.9: R = 0.5, P = 1; 0.5: R = 1, P = 2/3.
    assert!((average_precision(&inn, &out).unwrap() - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-15);
    assert_eq!(fpr_at_tpr(&inn, &out, 0.95).unwrap(), 0.5);
    assert_eq!(fpr_at_tpr(&inn, &out, 0.5).unwrap(), 0.0);
    // Perfect separation.
    let m = ood_detection(&[0.0, 0.1, 0.2], &[0.5, 0.6]).unwrap();
    assert_eq!((m.auroc, m.aupr, m.fpr95), (1.0, 1.0, 0.0));
    // 20 OOD examples: TPR 19/20 = 0.95 exactly reaches the target.
    let out: Vec<f64> = (0..20).map(|i| f64::from(i) + 0.5).collect();
    let inn: Vec<f64> = (0..10).map(|i| 2.0 * f64::from(i)).collect();
    // The 19 highest OOD scores are >= 1.5; in-distribution scores >= 1.5: 2, 4, ..., 18.
    assert!((fpr_at_tpr(&inn, &out, 0.95).unwrap() - 0.9).abs() < 1e-15);
}

/// FPR at a TPR with tied scores, against scikit-learn 1.9.1:
/// `fpr[np.argmax(tpr >= t)]` of `roc_curve(y, scores, drop_intermediate=False)` (the values
/// below were computed so). With roc_curve's default `drop_intermediate=True` the answers are
/// the same on every case but the last: there sklearn drops the threshold 9.0, whose ROC point
/// (0.2, 0.95) lies on the line between its neighbours, and reports 0.3; the threshold exists
/// and reaches TPR 0.95 at FPR 0.2, which is what we report.
#[test]
fn fpr_at_tpr_matches_scikit_learn_on_tied_scores() {
    let repeat = |v: f64, n: usize| vec![v; n];
    let cat = |parts: &[Vec<f64>]| parts.concat();
    // (case, in-distribution scores, OOD scores, FPR at TPR 0.95, 0.5 and 1).
    type Case = (&'static str, Vec<f64>, Vec<f64>, [f64; 3]);
    let cases: Vec<Case> = vec![
        (
            "all tied",
            repeat(0.5, 10),
            repeat(0.5, 20),
            [1.0, 1.0, 1.0],
        ),
        (
            "ties across the sets at the 95% point",
            vec![0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
            cat(&[
                repeat(0.3, 2),
                [0.5, 0.9, 0.9, 0.95, 1.0, 1.0, 1.1, 1.2].repeat(4),
                repeat(0.3, 2),
            ]),
            [0.8, 0.0, 0.8],
        ),
        (
            "vertical runs",
            cat(&[repeat(0.0, 8), vec![0.35, 0.55]]),
            cat(&[repeat(0.3, 9), [0.5, 0.6].repeat(5), repeat(0.9, 10)]),
            [0.2, 0.0, 0.2],
        ),
        (
            "integers with many ties",
            vec![0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0],
            cat(&[
                vec![1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0],
                repeat(5.0, 10),
            ]),
            [0.5, 0.0, 0.8],
        ),
        (
            "collinear diagonal points",
            cat(&[vec![10.0, 9.0, 8.0], repeat(0.0, 7)]),
            cat(&[repeat(10.0, 18), vec![9.0, 8.0]]),
            [0.2, 0.1, 0.3],
        ),
    ];
    for (name, inn, out, expected) in cases {
        for (target, want) in [0.95, 0.5, 1.0].into_iter().zip(expected) {
            let got = fpr_at_tpr(&inn, &out, target).unwrap();
            assert!(
                (got - want).abs() < 1e-15,
                "{name}, TPR {target}: {got} vs {want}"
            );
        }
    }
}

/// Logits with `n` rows of `k` standard-normal entries times `scale`, and labels drawn from
/// `softmax(logits / t_true)`.
fn synthetic_logits(
    n: usize,
    k: usize,
    scale: f64,
    t_true: f64,
    seed: u64,
) -> (Logits, Vec<usize>) {
    let mut rng = whvi::rng::seeded(seed);
    let normal = Normal::new(0.0, scale).unwrap();
    let data: Vec<f64> = (0..n * k).map(|_| normal.sample(&mut rng)).collect();
    let logits = Logits::new(data, n, k).unwrap();
    let truth = apply_temperature(&logits, t_true).unwrap();
    let labels = truth
        .rows()
        .map(|row| {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            row.iter()
                .position(|&p| {
                    acc += p;
                    u < acc
                })
                .unwrap_or(k - 1)
        })
        .collect();
    (logits, labels)
}

#[test]
fn temperature_scaling_recovers_a_known_temperature() {
    for (t_true, seed) in [(2.5, 1), (0.6, 2)] {
        let (logits, labels) = synthetic_logits(20_000, 10, 3.0, t_true, seed);
        let fit = fit_temperature(&logits, &labels).unwrap();
        // The maximum-likelihood estimate from 20000 labels: within 5% of the truth.
        let rel = (fit.temperature / t_true - 1.0).abs();
        assert!(
            rel < 0.05,
            "fitted T = {} for true T = {t_true}",
            fit.temperature
        );
        assert!(fit.nll_after < fit.nll_before);
        // It is the minimum: nudging T either way does not lower the NLL.
        let nll_at = |t: f64| nll(&apply_temperature(&logits, t).unwrap(), &labels).unwrap();
        assert!((nll_at(fit.temperature) - fit.nll_after).abs() < 1e-12);
        assert!(nll_at(fit.temperature * 1.001) >= fit.nll_after);
        assert!(nll_at(fit.temperature / 1.001) >= fit.nll_after);
        // From probabilities only: ln softmax(z) shifts each row, which T scaling ignores.
        let probs = apply_temperature(&logits, 1.0).unwrap();
        let from_probs = fit_temperature_from_probs(&probs, &labels).unwrap();
        assert!((from_probs.temperature / fit.temperature - 1.0).abs() < 1e-9);
    }
}

#[test]
fn temperature_scaling_edge_cases() {
    // Every label the argmax with a wide margin: sharper is always better, T hits T_MIN.
    let logits = Logits::new(vec![5.0, 0.0, 0.0, 5.0], 2, 2).unwrap();
    let fit = fit_temperature(&logits, &[0, 1]).unwrap();
    assert_eq!(fit.temperature, metrics::temperature::T_MIN);
    // Every label the worst class: flatter is always better, T hits T_MAX.
    let fit = fit_temperature(&logits, &[1, 0]).unwrap();
    assert_eq!(fit.temperature, metrics::temperature::T_MAX);
    // Constant logits: the NLL does not depend on T.
    let flat = Logits::new(vec![1.0; 6], 2, 3).unwrap();
    assert_eq!(fit_temperature(&flat, &[0, 2]).unwrap().temperature, 1.0);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(apply_temperature(&logits, bad).is_err());
    }
    assert!(matches!(
        fit_temperature(&logits, &[0]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        fit_temperature(&logits, &[0, 2]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(Logits::new(vec![f64::NAN, 0.0], 1, 2).is_err());
    assert!(Logits::new(vec![], 0, 2).is_err());
    assert!(Logits::new(vec![1.0; 3], 2, 2).is_err());
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("metrics")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn npy_round_trips_every_dtype() {
    let dir = scratch_dir("npy_round_trip");
    let shape = [2, 3];
    macro_rules! round_trip {
        ($t:ty, $dtype:expr, $values:expr) => {{
            let values: Vec<$t> = $values;
            let array = NpyArray::new(&shape, &values).unwrap();
            let path = dir.join(format!("{:?}.npy", $dtype));
            write_npy(&path, &array).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            // Version 1.0 with the data on a 64-byte boundary.
            assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
            assert_eq!((bytes.len() - values.len() * $dtype.size()) % 64, 0);
            let back = read_npy(&path).unwrap();
            assert_eq!(back, array);
            assert_eq!(back.dtype(), $dtype);
            assert_eq!(back.shape(), &shape);
            back
        }};
    }
    let f = round_trip!(f32, NpyDtype::F32, vec![0.5, -1.25, 3.0e-8, 1.0, 0.0, 7.5]);
    assert_eq!(
        f.to_f64().unwrap(),
        vec![0.5, -1.25, f64::from(3.0e-8f32), 1.0, 0.0, 7.5]
    );
    let f = round_trip!(f64, NpyDtype::F64, vec![0.1, -2.0, 1e-300, 1.0, 0.0, 7.5]);
    assert_eq!(f.to_f64().unwrap(), vec![0.1, -2.0, 1e-300, 1.0, 0.0, 7.5]);
    let ints: Vec<i128> = vec![0, 1, 2, 3, 4, 127];
    let i = round_trip!(i8, NpyDtype::I8, vec![0, 1, 2, 3, 4, 127]);
    assert_eq!(i.to_integers().unwrap(), ints);
    let i = round_trip!(i8, NpyDtype::I8, vec![-128, -1, 0, 1, 2, 3]);
    assert_eq!(i.to_integers().unwrap(), vec![-128, -1, 0, 1, 2, 3]);
    let i = round_trip!(i16, NpyDtype::I16, vec![-300, 1, 2, 3, 4, 32767]);
    assert_eq!(i.to_integers().unwrap(), vec![-300, 1, 2, 3, 4, 32767]);
    let i = round_trip!(i32, NpyDtype::I32, vec![-70000, 1, 2, 3, 4, i32::MAX]);
    assert_eq!(i.to_integers().unwrap()[5], i128::from(i32::MAX));
    let i = round_trip!(i64, NpyDtype::I64, vec![i64::MIN, 1, 2, 3, 4, i64::MAX]);
    assert_eq!(i.to_integers().unwrap()[0], i128::from(i64::MIN));
    let i = round_trip!(u8, NpyDtype::U8, vec![0, 1, 2, 3, 4, 255]);
    assert_eq!(i.to_integers().unwrap()[5], 255);
    let i = round_trip!(u16, NpyDtype::U16, vec![0, 1, 2, 3, 4, 65535]);
    assert_eq!(i.to_integers().unwrap()[5], 65535);
    let i = round_trip!(u32, NpyDtype::U32, vec![0, 1, 2, 3, 4, u32::MAX]);
    assert_eq!(i.to_integers().unwrap()[5], i128::from(u32::MAX));
    let i = round_trip!(u64, NpyDtype::U64, vec![0, 1, 2, 3, 4, u64::MAX]);
    assert_eq!(i.to_integers().unwrap()[5], i128::from(u64::MAX));
    let b = round_trip!(
        bool,
        NpyDtype::Bool,
        vec![true, false, true, true, false, false]
    );
    assert_eq!(b.to_integers().unwrap(), vec![1, 0, 1, 1, 0, 0]);
    // Floats are not integers and integers are not floats.
    assert!(f.to_integers().is_err());
    assert!(b.to_f64().is_err());
}

/// Rewrites a version 1.0 file as version 2.0 or 3.0 (a 4-byte header length).
fn as_version(v1: &[u8], major: u8) -> Vec<u8> {
    let header_len = u16::from_le_bytes([v1[8], v1[9]]) as u32;
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[major, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&v1[10..]);
    out
}

#[test]
fn npy_versions_2_and_3_and_header_variants() {
    let array = NpyArray::new(&[4], &[1i64, 0, 2, 1]).unwrap();
    let v1 = array.to_bytes();
    for major in [2, 3] {
        assert_eq!(
            NpyArray::from_bytes(&as_version(&v1, major)).unwrap(),
            array
        );
    }
    // A header as written by other tools: other key order, double quotes, no trailing comma.
    let header = "{\"shape\": (2,), \"fortran_order\": False, \"descr\": \"<u2\"}\n";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[7, 0, 9, 0]);
    let parsed = NpyArray::from_bytes(&bytes).unwrap();
    assert_eq!(parsed.to_integers().unwrap(), vec![7, 9]);
    // A 0-d array and an empty one.
    let scalar = NpyArray::new(&[], &[2.5f64]).unwrap();
    assert_eq!(NpyArray::from_bytes(&scalar.to_bytes()).unwrap(), scalar);
    let empty = NpyArray::new(&[0, 3], &[] as &[f32]).unwrap();
    assert_eq!(NpyArray::from_bytes(&empty.to_bytes()).unwrap(), empty);
}

/// The message of an error as the user sees it.
fn message<T: std::fmt::Debug>(r: whvi::Result<T>) -> String {
    r.unwrap_err().to_string()
}

/// Bytes of a version 1.0 file with the given header dictionary and data.
fn npy_bytes(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn npy_bad_files_name_the_file() {
    let dir = scratch_dir("npy_bad");
    let good = NpyArray::new(&[2, 2], &[0.5f64, 0.5, 0.25, 0.75])
        .unwrap()
        .to_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.npy",
            good[..good.len() - 3].to_vec(),
            "truncated",
        ),
        ("trailing.npy", [good.clone(), vec![0]].concat(), "trailing"),
        (
            "short_header.npy",
            good[..40].to_vec(),
            "truncated inside the header",
        ),
        ("tiny.npy", b"\x93NUM".to_vec(), "magic"),
        ("text.npy", b"0.5,0.5\n0.25,0.75\n".to_vec(), "magic"),
        (
            "fortran.npy",
            npy_bytes(
                "{'descr': '<f8', 'fortran_order': True, 'shape': (1,), }",
                &[0; 8],
            ),
            "Fortran order",
        ),
        (
            "big_endian.npy",
            npy_bytes(
                "{'descr': '>f8', 'fortran_order': False, 'shape': (1,), }",
                &[0; 8],
            ),
            "big-endian",
        ),
        (
            "complex.npy",
            npy_bytes(
                "{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }",
                &[0; 16],
            ),
            "unsupported dtype",
        ),
        (
            "no_shape.npy",
            npy_bytes("{'descr': '<f8', 'fortran_order': False, }", &[0; 8]),
            "no 'shape'",
        ),
        (
            "garbage_header.npy",
            npy_bytes(
                "{'descr': '<f8', 'fortran_order': Maybe, 'shape': (1,), }",
                &[0; 8],
            ),
            "malformed header",
        ),
        (
            "bad_shape.npy",
            npy_bytes(
                "{'descr': '<f8', 'fortran_order': False, 'shape': (x,), }",
                &[0; 8],
            ),
            "bad shape entry",
        ),
        (
            "version9.npy",
            {
                let mut b = good.clone();
                b[6] = 9;
                b
            },
            "version 9",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = read_npy(&path).unwrap_err();
        assert!(matches!(err, Error::Data { .. }), "{name}: {err:?}");
        let text = err.to_string();
        assert!(
            text.contains(name),
            "{name}: message does not name the file: {text}"
        );
        assert!(
            text.contains(expected),
            "{name}: '{text}' lacks '{expected}'"
        );
        assert!(load_predictions(&path).is_err());
    }
    let missing = dir.join("missing.npy");
    assert!(matches!(read_npy(&missing), Err(Error::Io { .. })));
}

#[test]
fn loading_predictions_and_labels() {
    let dir = scratch_dir("load");
    // [N, K] float32.
    let p2 = dir.join("p2.npy");
    write_npy(
        &p2,
        &NpyArray::new(&[2, 2], &[0.25f32, 0.75, 1.0, 0.0]).unwrap(),
    )
    .unwrap();
    let pred = load_predictions(&p2).unwrap();
    assert_eq!(pred.mean().as_slice(), &[0.25, 0.75, 1.0, 0.0]);
    assert!(pred.samples().is_none());
    // [T, N, K] float64: averaged.
    let p3 = dir.join("p3.npy");
    let s = [1.0f64, 0.0, 0.5, 0.5, 0.0, 1.0, 0.5, 0.5];
    write_npy(&p3, &NpyArray::new(&[2, 2, 2], &s).unwrap()).unwrap();
    let pred = load_predictions(&p3).unwrap();
    assert_eq!(pred.mean().as_slice(), &[0.5, 0.5, 0.5, 0.5]);
    assert_eq!(pred.samples().unwrap().t(), 2);
    // Labels from several integer types.
    for (name, array) in [
        ("y_i64.npy", NpyArray::new(&[3], &[0i64, 2, 1]).unwrap()),
        ("y_i32.npy", NpyArray::new(&[3], &[0i32, 2, 1]).unwrap()),
        ("y_u8.npy", NpyArray::new(&[3], &[0u8, 2, 1]).unwrap()),
    ] {
        let path = dir.join(name);
        write_npy(&path, &array).unwrap();
        assert_eq!(load_labels(&path).unwrap(), vec![0, 2, 1]);
    }
    // Bad inputs, each naming the file and the problem.
    let cases = [
        (
            "neg.npy",
            NpyArray::new(&[2], &[0i64, -1]).unwrap(),
            "label 1 is -1",
        ),
        (
            "float_y.npy",
            NpyArray::new(&[2], &[0.0f64, 1.0]).unwrap(),
            "integer",
        ),
        (
            "y2d.npy",
            NpyArray::new(&[1, 2], &[0i64, 1]).unwrap(),
            "1-D",
        ),
    ];
    for (name, array, expected) in cases {
        let path = dir.join(name);
        write_npy(&path, &array).unwrap();
        let text = message(load_labels(&path));
        assert!(text.contains(name) && text.contains(expected), "{text}");
    }
    let cases = [
        (
            "p1d.npy",
            NpyArray::new(&[2], &[0.5f64, 0.5]).unwrap(),
            "[N, K] or [T, N, K]",
        ),
        (
            "pint.npy",
            NpyArray::new(&[1, 2], &[0i64, 1]).unwrap(),
            "float32 or float64",
        ),
        (
            "plogit.npy",
            NpyArray::new(&[1, 2], &[2.0f64, -1.0]).unwrap(),
            "non-negative",
        ),
        (
            "psum.npy",
            NpyArray::new(&[1, 2], &[0.2f64, 0.3]).unwrap(),
            "sums to",
        ),
        (
            "pempty.npy",
            NpyArray::new(&[0, 3], &[] as &[f64]).unwrap(),
            "N = 0",
        ),
        (
            "s_bad.npy",
            NpyArray::new(&[2, 1, 2], &[0.5f64, 0.5, 0.9, 0.9]).unwrap(),
            "sample 1",
        ),
    ];
    for (name, array, expected) in cases {
        let path = dir.join(name);
        write_npy(&path, &array).unwrap();
        let err = load_predictions(&path).unwrap_err();
        assert!(matches!(err, Error::Data { .. }), "{name}: {err:?}");
        let text = err.to_string();
        assert!(text.contains(name) && text.contains(expected), "{text}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let cases: Vec<(whvi::Result<Probs>, &str)> = vec![
        (Probs::new(vec![], 0, 3), "N = 0"),
        (Probs::new(vec![], 3, 0), "K = 0"),
        (Probs::new(vec![0.5, 0.5, 1.0], 2, 2), "do not fill"),
        (Probs::new(vec![f64::NAN, 1.0], 1, 2), "NaN"),
        (Probs::new(vec![-0.5, 1.5], 1, 2), "-0.5"),
        (Probs::new(vec![f64::INFINITY, 0.0], 1, 2), "inf"),
        (Probs::new(vec![0.5, 0.6], 1, 2), "sums to"),
        (
            Probs::from_rows(&[vec![0.5, 0.5], vec![1.0]]),
            "row 1 has 1 entries",
        ),
        (Probs::from_f32(&[0.5, 0.25], 1, 2), "sums to"),
    ];
    for (result, expected) in cases {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(
            err.to_string().contains(expected),
            "'{err}' lacks '{expected}'"
        );
    }
    let p = probs(&[&[0.5, 0.5], &[0.1, 0.9]]);
    let label_cases: [(&[usize], &str); 2] = [
        (&[0], "1 labels for 2 examples"),
        (&[0, 2], "label 2 of example 1"),
    ];
    for (labels, expected) in label_cases {
        let results = [
            accuracy(&p, labels),
            nll(&p, labels),
            brier(&p, labels),
            ece(&p, labels, 15),
            mce(&p, labels, 15),
            adaptive_ece(&p, labels, 15),
            classwise_ece(&p, labels, 15),
            aurc(&p, labels),
            fit_temperature_from_probs(&p, labels).map(|f| f.temperature),
        ];
        for r in results {
            let text = message(r);
            assert!(text.contains(expected), "'{text}' lacks '{expected}'");
        }
        let report = compute_report(&Predictions::from_mean(p.clone()), labels, None);
        assert!(message(report).contains(expected));
    }
    assert!(message(ece(&p, &[0, 1], 0)).contains("at least 1"));
    assert!(message(adaptive_ece(&p, &[0, 1], 0)).contains("at least 1"));
    assert!(message(classwise_ece(&p, &[0, 1], 0)).contains("at least 1"));
    assert!(message(auroc(&[], &[0.5])).contains("both sets"));
    assert!(message(average_precision(&[0.1], &[])).contains("both sets"));
    assert!(message(auroc(&[f64::NAN], &[0.5])).contains("finite"));
    assert!(message(fpr_at_tpr(&[0.1], &[0.5], 1.5)).contains("(0, 1]"));
    assert!(message(SampleProbs::new(vec![], 0, 1, 2)).contains("T = 0"));
    assert!(message(SampleProbs::new(vec![0.5; 3], 1, 1, 2)).contains("do not fill"));
    assert!(message(SampleProbs::new(vec![], 2, 0, 2)).contains("N = 0"));
    // OOD probabilities over a different number of classes.
    let ood = probs(&[&[0.2, 0.3, 0.5]]);
    let report = compute_report(
        &Predictions::from_mean(p.clone()),
        &[0, 1],
        Some(&Predictions::from_mean(ood)),
    );
    assert!(message(report).contains("3 classes"));
}

#[test]
fn report_keys_and_optional_parts() {
    let p = probs(&[&[0.9, 0.1], &[0.2, 0.8], &[0.6, 0.4]]);
    let y = [0, 1, 1];
    let report = compute_report(&Predictions::from_mean(p.clone()), &y, None).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "accuracy",
        "adaptive_ece15",
        "aurc",
        "brier",
        "classwise_ece15",
        "ece15",
        "mce15",
        "mean_entropy",
        "n",
        "nll",
        "num_classes",
    ];
    expected.sort_unstable();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    assert_eq!(keys_sorted, expected);
    assert_eq!(report.ece15, ece(&p, &y, DEFAULT_BINS).unwrap());
    // Round trip through JSON.
    let back: MetricsReport = serde_json::from_value(json).unwrap();
    assert_eq!(back, report);

    // Per-sample probabilities on both sets: MI keys appear.
    let s = SampleProbs::new(
        vec![1.0, 0.0, 0.0, 1.0, 0.4, 0.6, 0.8, 0.2, 0.4, 0.6, 0.4, 0.6],
        2,
        3,
        2,
    )
    .unwrap();
    let o = SampleProbs::new(vec![0.9, 0.1, 0.5, 0.5, 0.1, 0.9, 0.5, 0.5], 2, 2, 2).unwrap();
    let pred = Predictions::from_samples(s.clone());
    let report = compute_report(&pred, &y, Some(&Predictions::from_samples(o))).unwrap();
    assert_eq!(report.num_samples, Some(2));
    assert_eq!(report.n_ood, Some(2));
    let mi = mutual_information(&s);
    let mean_mi = mi.iter().sum::<f64>() / 3.0;
    assert!((report.mean_mutual_information.unwrap() - mean_mi).abs() < 1e-15);
    for key in [
        "ood_auroc_entropy",
        "ood_aupr_entropy",
        "ood_fpr95_entropy",
        "ood_auroc_max_prob",
        "ood_aupr_max_prob",
        "ood_fpr95_max_prob",
        "ood_auroc_mi",
        "ood_aupr_mi",
        "ood_fpr95_mi",
        "mean_mutual_information",
        "num_samples",
        "n_ood",
    ] {
        assert!(
            serde_json::to_value(&report).unwrap().get(key).is_some(),
            "{key}"
        );
    }
    let table = report.to_string();
    for row in [
        "ECE-15",
        "OOD AUROC (MI)",
        "mean mutual information",
        "T = 2 samples",
    ] {
        assert!(table.contains(row), "{table}");
    }
}

/// Synthetic predictions: `n` examples of `k` classes, overconfident, with labels.
fn synthetic_predictions(n: usize, k: usize, seed: u64) -> (Probs, Vec<usize>) {
    let (logits, labels) = synthetic_logits(n, k, 2.0, 1.0, seed);
    (apply_temperature(&logits, 0.5).unwrap(), labels)
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 1000,
        "{} is only {} bytes",
        path.display(),
        bytes.len()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
}

fn assert_svg(path: &Path, texts: &[&str]) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.trim_start().starts_with("<svg"),
        "{} is not an SVG",
        path.display()
    );
    assert!(text.trim_end().ends_with("</svg>"));
    for t in texts {
        assert!(text.contains(t), "{} lacks the text '{t}'", path.display());
    }
}

#[test]
fn plots_are_written_as_png_and_svg() {
    let dir = scratch_dir("plots");
    let (p, y) = synthetic_predictions(2000, 10, 7);
    let diagram = ReliabilityDiagram::new(&p, &y, 15).unwrap();
    plot_reliability(&diagram, "Synthetic", &dir.join("reliability.png")).unwrap();
    plot_reliability(&diagram, "Synthetic", &dir.join("reliability.svg")).unwrap();
    assert_png(&dir.join("reliability.png"));
    assert_svg(
        &dir.join("reliability.svg"),
        &["ECE = ", "Accuracy", "Confidence"],
    );

    let (q, _) = synthetic_predictions(500, 10, 8);
    let flat = apply_temperature(&Logits::from_probs(&q), 4.0).unwrap();
    let (e_in, e_out) = (entropy(&p), entropy(&flat));
    plot_ood_histogram(&e_in, &e_out, "entropy", &dir.join("ood.png")).unwrap();
    plot_ood_histogram(&e_in, &e_out, "entropy", &dir.join("ood.svg")).unwrap();
    assert_png(&dir.join("ood.png"));
    assert_svg(
        &dir.join("ood.svg"),
        &["In-distribution", "OOD (N = 500)", "AUROC"],
    );

    let mut points = Vec::new();
    for (c, name) in ["gaussian_noise", "fog", "contrast"].iter().enumerate() {
        for s in 1..=5u32 {
            let acc = 0.93 - 0.08 * f64::from(s) * (1.0 + c as f64 * 0.3);
            points.push(CorruptionPoint::from((
                *name,
                s,
                acc,
                0.02 + 0.03 * f64::from(s),
            )));
        }
    }
    plot_corruption(&points, &dir.join("corruption.png")).unwrap();
    plot_corruption(&points, &dir.join("corruption.svg")).unwrap();
    assert_png(&dir.join("corruption.png"));
    assert_svg(
        &dir.join("corruption.svg"),
        &["gaussian_noise", "mean over corruptions"],
    );

    // Bad requests.
    assert!(message(plot_reliability(&diagram, "x", &dir.join("r.jpg"))).contains(".png or .svg"));
    assert!(plot_corruption(&[], &dir.join("c.png")).is_err());
    let nan = vec![CorruptionPoint::from(("fog", 1, f64::NAN, 0.1))];
    assert!(message(plot_corruption(&nan, &dir.join("c.png"))).contains("finite"));
    assert!(plot_ood_histogram(&[], &e_out, "entropy", &dir.join("o.png")).is_err());
    let missing_dir = dir.join("no/such/dir/r.png");
    assert!(matches!(
        plot_reliability(&diagram, "x", &missing_dir),
        Err(Error::Io { .. })
    ));
}

#[test]
fn metrics_command_end_to_end() {
    let dir = scratch_dir("command");
    let (p, y) = synthetic_predictions(300, 4, 11);
    let (q, _) = synthetic_predictions(100, 4, 12);
    let write = |name: &str, array: NpyArray| {
        let path = dir.join(name);
        write_npy(&path, &array).unwrap();
        path
    };
    let probs_path = write("p.npy", NpyArray::new(&[300, 4], p.as_slice()).unwrap());
    let labels_path = write(
        "y.npy",
        NpyArray::new(&[300], &y.iter().map(|&v| v as i64).collect::<Vec<_>>()).unwrap(),
    );
    let ood_path = write("q.npy", NpyArray::new(&[100, 4], q.as_slice()).unwrap());
    let args = MetricsJob {
        probs: probs_path.clone(),
        labels: labels_path.clone(),
        ood_probs: Some(ood_path),
        report: Some(dir.join("report.json")),
        force: false,
        plots: Some(dir.join("plots")),
    };
    let mut out = Vec::new();
    let report = run_metrics(&args, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("accuracy") && out.contains("OOD AUROC (entropy)"),
        "{out}"
    );
    // The file holds exactly the returned report (compared as JSON values: serde_json's
    // default float parsing may differ from the printed value in the last bit).
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(json, expected);
    assert_eq!(report.accuracy, accuracy(&p, &y).unwrap());
    for name in ["reliability.png", "ood_entropy.png"] {
        assert_png(&dir.join("plots").join(name));
    }
    assert_svg(&dir.join("plots/reliability.svg"), &["ECE"]);

    // The report never replaces an input, and an existing report only with --force.
    let probs_bytes = std::fs::read(&probs_path).unwrap();
    let over_input = MetricsJob {
        report: Some(dir.join(".").join("p.npy")),
        force: true,
        ..args.clone()
    };
    let text = message(run_metrics(&over_input, &mut Vec::new()));
    assert!(text.contains("also an input"), "{text}");
    assert_eq!(std::fs::read(&probs_path).unwrap(), probs_bytes);
    let text = message(run_metrics(&args, &mut Vec::new()));
    assert!(
        text.contains("exists") && text.contains("--force"),
        "{text}"
    );
    let forced = MetricsJob {
        force: true,
        ..args.clone()
    };
    run_metrics(&forced, &mut Vec::new()).unwrap();

    // Labels that do not match the probabilities.
    let short = write("y_short.npy", NpyArray::new(&[2], &[0i64, 1]).unwrap());
    let args = MetricsJob {
        labels: short,
        ood_probs: None,
        report: None,
        force: false,
        plots: None,
        probs: probs_path,
    };
    let text = message(run_metrics(&args, &mut Vec::new()));
    assert!(
        text.contains("2 labels") && text.contains("300 examples"),
        "{text}"
    );
}
