//! The training loop on a tiny generated CIFAR-10-format data set: it learns, and a resumed
//! run equals an uninterrupted one bit for bit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Device;
use whvi::data::DatasetKind;
use whvi::dist::Group;
use whvi::eval::{comparison_table, evaluate, Corruption, EvalConfig, OodSource, ShiftSource};
use whvi::optim::LrSchedule;
use whvi::rng::seeded;
use whvi::train::{
    train, OptimizerKind, Progress, QuietProgress, Start, TrainConfig, CIFAR10_WHVI_INITIAL_SIGMA,
    CIFAR10_WHVI_KL_WEIGHT,
};

mod common;
use common::write_dataset;

fn tiny_spec(root: &Path) -> String {
    let path = root.join("tiny.toml");
    std::fs::write(
        &path,
        "name = \"tiny\"\nsummary = \"a test network\"\ninput = [3, 32, 32]\nclasses = 10\n\
         batch_norm = true\nfeatures = [{ conv = 8, kernel = 3, stride = 2 }, \"M\", \"M\", \"M\"]\n\
         head = [32]\n",
    )
    .unwrap();
    path.display().to_string()
}

fn config(root: &Path, out: &str) -> TrainConfig {
    TrainConfig {
        dataset: DatasetKind::Cifar10,
        data: Some(root.to_path_buf()),
        model: tiny_spec(root),
        epochs: 2,
        batch_size: 32,
        optimizer: OptimizerKind::AdamW,
        weight_decay: 0.0,
        schedule: LrSchedule::cosine(0.02, 0.0),
        validation: 64,
        eval_samples: 2,
        test_samples: 4,
        out: root.join(out),
        ..TrainConfig::default()
    }
}

/// A fresh, empty scratch folder for one test.
/// It lives under cargo's temporary folder for tests, so what a failed run leaves is replaced
/// by the next run instead of piling up in /tmp.
fn temp_root(name: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("train-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

fn never() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn two_epochs_improve_accuracy_and_write_checkpoints() {
    let root = write_dataset(&temp_root("learn"), 128);
    let config = config(&root, "run");
    let outcome = train(
        &config,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap();
    assert_eq!(outcome.epochs.len(), 2);
    let (first, second) = (&outcome.epochs[0], &outcome.epochs[1]);
    assert!(
        second.train_loss < first.train_loss,
        "{first:?} -> {second:?}"
    );
    assert!(
        second.train_accuracy > first.train_accuracy,
        "{first:?} -> {second:?}"
    );
    // Ten classes: chance is 0.1.
    assert!(second.val_accuracy.unwrap() > 0.2, "{second:?}");
    assert!(outcome.best_checkpoint.exists() && outcome.last_checkpoint.exists());
    let log = std::fs::read_to_string(config.out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    let report = outcome.test_report.unwrap();
    assert!(report.accuracy > 0.2, "test accuracy {}", report.accuracy);
    evaluation_of_the_checkpoint(&root, &outcome.best_checkpoint);
    std::fs::remove_dir_all(root).unwrap();
}

fn eval_config(checkpoint: &Path) -> EvalConfig {
    EvalConfig {
        samples: 3,
        batch_size: 50,
        shift: Some(ShiftSource::OnTheFly(vec![Corruption::GaussianNoise])),
        corruption_images: 20,
        ood: Some(OodSource::Noise),
        ..EvalConfig::new(vec![checkpoint.to_path_buf()])
    }
}

/// Writes an MNIST-format set of `n` blank 28x28 images per split.
fn write_idx(root: &Path, n: u32) -> PathBuf {
    let dir = root.join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    for (prefix, count) in [("train", n), ("t10k", n)] {
        let mut images = vec![0, 0, 8, 3];
        for v in [count, 28, 28] {
            images.extend(v.to_be_bytes());
        }
        images.resize(images.len() + (count * 28 * 28) as usize, 0);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        let mut labels = vec![0, 0, 8, 1];
        labels.extend(count.to_be_bytes());
        labels.extend((0..count).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
    dir
}

/// `whvi eval` on a trained checkpoint: the report (temperature scaling on the run's own
/// validation split, shift, OOD), and each bad input as a clear error.
fn evaluation_of_the_checkpoint(root: &Path, checkpoint: &Path) {
    let reports = evaluate(&eval_config(checkpoint), &Device::Cpu, &mut |_| {}).unwrap();
    let report = &reports[0];
    assert_eq!(report.metrics.n, 100, "the whole generated test set");
    let ts = report
        .temperature_scaling
        .as_ref()
        .expect("temperature scaling");
    assert_eq!(ts.validation_images, 64, "the run's held-out images");
    assert!(ts.temperature > 0.0 && ts.validation_nll[1] <= ts.validation_nll[0] + 1e-12);
    assert_eq!(
        report.corruptions.len(),
        5,
        "one corruption at five severities"
    );
    // The same temperature on every corrupted set: per-set metrics and their means.
    let scaled: Vec<_> = report
        .corruptions
        .iter()
        .map(|c| c.scaled.unwrap())
        .collect();
    let mean_nll = scaled.iter().map(|m| m.nll).sum::<f64>() / 5.0;
    let corrupted = ts.corrupted.expect("scaled corrupted means");
    assert!((corrupted.nll - mean_nll).abs() < 1e-12);
    if (ts.temperature - 1.0).abs() > 1e-3 {
        assert!(report
            .corruptions
            .iter()
            .any(|c| c.scaled.unwrap().nll != c.nll));
    }
    assert!(report.metrics.ood_auroc_entropy.is_some());
    assert!(comparison_table(&reports).contains("ECE(T)"));
    // Another copy of the data set, too small for the run's 64 validation images: the
    // evaluation goes on without temperature scaling and says why.
    let small = write_dataset(&root.join("small"), 12);
    let mut notes = Vec::new();
    let reports = evaluate(
        &EvalConfig {
            data: Some(small),
            ..eval_config(checkpoint)
        },
        &Device::Cpu,
        &mut |line| notes.push(line.to_string()),
    )
    .unwrap();
    assert!(reports[0].temperature_scaling.is_none());
    assert!(
        notes
            .iter()
            .any(|n| n.contains("no temperature scaling") && n.contains("--data")),
        "{notes:?}"
    );

    let error = |config: EvalConfig| {
        evaluate(&config, &Device::Cpu, &mut |_| {})
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err = error(EvalConfig {
        samples: 0,
        ..eval_config(checkpoint)
    });
    assert!(err.contains("samples must be at least 1"), "{err}");
    let err = error(EvalConfig {
        limit: Some(0),
        ..eval_config(checkpoint)
    });
    assert!(err.contains("holds no images"), "{err}");
    // A 3x32x32 network against 1x28x28 images.
    let err = error(EvalConfig {
        dataset: Some(DatasetKind::Mnist),
        data: Some(write_idx(root, 10)),
        ..eval_config(checkpoint)
    });
    assert!(
        err.contains("expects 3x32x32 images") && err.contains("1x28x28"),
        "{err}"
    );
    // An OOD set that is not there.
    let err = error(EvalConfig {
        ood: Some(OodSource::parse(&format!("mnist:{}", root.join("nowhere").display())).unwrap()),
        ..eval_config(checkpoint)
    });
    assert!(err.contains("nowhere"), "{err}");
    let err = error(EvalConfig {
        ood: Some(OodSource::parse("mnist").unwrap()),
        ..eval_config(checkpoint)
    });
    assert!(err.contains("mnist:DIR"), "{err}");
    let err = error(EvalConfig {
        batch_size: 0,
        ..eval_config(checkpoint)
    });
    assert!(err.contains("batch_size must be at least 1"), "{err}");
    let err = error(EvalConfig {
        corruption_images: 0,
        ..eval_config(checkpoint)
    });
    assert!(
        err.contains("corruption_images must be at least 1"),
        "{err}"
    );

    // The report: never over the checkpoint it evaluates, over a file only when asked, in a
    // directory created for it; and a bad second checkpoint stops the run before any report.
    let weights = std::fs::read(checkpoint).unwrap();
    let err = error(EvalConfig {
        report: Some(checkpoint.to_path_buf()),
        overwrite: true,
        ..eval_config(checkpoint)
    });
    assert!(err.contains("also an input"), "{err}");
    assert_eq!(std::fs::read(checkpoint).unwrap(), weights);
    let report = root.join("reports/eval.json");
    let err = error(EvalConfig {
        checkpoints: vec![checkpoint.to_path_buf(), root.join("missing.safetensors")],
        report: Some(report.clone()),
        ..eval_config(checkpoint)
    });
    assert!(err.contains("missing.safetensors"), "{err}");
    assert!(!report.exists());
    let written = EvalConfig {
        report: Some(report.clone()),
        ..eval_config(checkpoint)
    };
    evaluate(&written, &Device::Cpu, &mut |_| {}).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["n"], 100, "{json}");
    assert!(error(written.clone()).contains("--force"));
    evaluate(
        &EvalConfig {
            overwrite: true,
            ..written
        },
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
}

/// Raises the stop flag after a number of batches, as Ctrl-C would.
struct StopAfter {
    batches: usize,
    seen: usize,
    flag: Arc<AtomicBool>,
}

impl Progress for StopAfter {
    fn start_epoch(&mut self, _: usize, _: usize, _: usize, _: usize) {}
    fn batch(&mut self, _: usize, _: f64, _: f64) {
        self.seen += 1;
        if self.seen == self.batches {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn finish_epoch(&mut self, _: &str) {}
    fn message(&mut self, _: &str) {}
}

fn weights(path: &Path) -> Vec<(String, Vec<u64>)> {
    let mut all: Vec<(String, Vec<u64>)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            // f32 weights and the optimiser's i64 step counter are both exact in f64.
            let values: Vec<f64> = t
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (n, values.into_iter().map(f64::to_bits).collect())
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn settings_out_of_range_are_refused_with_the_setting_named() {
    for limit in [f64::NAN, -1.0, 0.0, f64::INFINITY] {
        let config = TrainConfig {
            time_limit_minutes: Some(limit),
            ..TrainConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("time_limit_minutes must be a positive"),
            "{limit}: {err}"
        );
    }
    for weight in [f64::NAN, -1.0, 0.0, f64::INFINITY] {
        let config = TrainConfig {
            kl_weight: weight,
            ..TrainConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("kl_weight must be a positive number"),
            "{weight}: {err}"
        );
    }
    // The model's posterior settings are checked with the rest, before any data are read.
    let mut config = TrainConfig::default();
    config.build.initial_sigma = -0.1;
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("initial_sigma -0.1 (--initial-sigma)"),
        "{err}"
    );
    let mut config = TrainConfig::default();
    config.build.prior_overrides = vec![("fc2".into(), whvi::layers::Prior::Variance(-1.0))];
    assert!(
        config.validate().is_err(),
        "a negative prior variance on one layer"
    );
    let mut config = TrainConfig {
        time_limit_minutes: Some(0.5),
        kl_weight: 0.1,
        ..TrainConfig::default()
    };
    config.build.initial_sigma = 0.3;
    config.validate().unwrap();
}

/// The command line's `--kl-weight` and `--initial-sigma` reach the run, and the checkpoint
/// records both; values that are not positive numbers are refused with the setting named.
#[test]
fn the_posterior_flags_of_the_command_line_are_recorded_or_refused() {
    let root = write_dataset(&temp_root("posterior-flags"), 128);
    let (data, spec) = (root.display().to_string(), tiny_spec(&root));
    let out = root.join("run").display().to_string();
    let train = |flags: &[&str]| {
        let common = [
            "train",
            "--model",
            &spec,
            "--data",
            &data,
            "--epochs",
            "1",
            "--validation",
            "64",
            "--test-samples",
            "0",
            "--threads",
            "1",
            "--quiet",
            "--overwrite",
            "--out",
            &out,
        ];
        std::process::Command::new(env!("CARGO_BIN_EXE_whvi"))
            .args(common)
            .args(flags)
            .output()
            .unwrap()
    };
    let recorded = |flags: &[&str]| {
        let run = train(flags);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{flags:?}: {stderr}");
        let meta =
            whvi::checkpoint::Checkpoint::read_meta(root.join("run/last.safetensors")).unwrap();
        let kl_weight = meta.training.unwrap()["kl_weight"].as_f64().unwrap();
        (meta.options.initial_sigma, kl_weight)
    };
    // Without the flags, CIFAR-10 data and a WHVI head get the study's tempered recipe, and any
    // other method the ELBO.
    assert_eq!(
        recorded(&[]),
        (CIFAR10_WHVI_INITIAL_SIGMA, CIFAR10_WHVI_KL_WEIGHT)
    );
    assert_eq!(
        recorded(&["--method", "mean-field"]),
        (whvi::layers::DEFAULT_INITIAL_SIGMA, 1.0)
    );
    assert_eq!(
        recorded(&["--layer", "fc1=deterministic"]),
        (whvi::layers::DEFAULT_INITIAL_SIGMA, 1.0)
    );
    // One flag given changes that setting alone: the other keeps the recipe's value.
    assert_eq!(
        recorded(&["--initial-sigma", "0.05"]),
        (0.05, CIFAR10_WHVI_KL_WEIGHT)
    );
    assert_eq!(
        recorded(&["--kl-weight", "1"]),
        (CIFAR10_WHVI_INITIAL_SIGMA, 1.0)
    );
    let run = train(&["--kl-weight", "0.5", "--initial-sigma", "0.2"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let meta = whvi::checkpoint::Checkpoint::read_meta(root.join("run/last.safetensors")).unwrap();
    assert_eq!(meta.options.initial_sigma, 0.2);
    assert_eq!(meta.training.unwrap()["kl_weight"], 0.5);
    for (flag, value, message) in [
        ("--kl-weight", "0", "kl_weight must be a positive number"),
        ("--initial-sigma", "0", "initial_sigma 0 (--initial-sigma)"),
    ] {
        let refused = train(&[flag, value]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(stderr.contains(message), "{flag} {value}: {stderr}");
        // A refused run replaces nothing, even with --overwrite.
        let kept = whvi::checkpoint::Checkpoint::read_meta(root.join("run/last.safetensors"));
        assert_eq!(kept.unwrap().options.initial_sigma, 0.2, "{flag} {value}");
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn the_kl_weight_scales_the_warm_up_and_old_records_read_as_the_elbo() {
    let root = write_dataset(&temp_root("tempered"), 128);
    let config = TrainConfig {
        kl_weight: 0.25,
        kl_warmup: whvi::optim::KlWarmup { epochs: 2 },
        ..config(&root, "run")
    };
    assert_eq!(config.beta(0.0), 0.0);
    assert_eq!(config.beta(1.0), 0.125);
    assert_eq!(config.beta(5.0), 0.25);
    let outcome = train(
        &config,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap();
    let betas: Vec<f64> = outcome.epochs.iter().map(|e| e.beta).collect();
    assert_eq!(betas, [0.125, 0.25]);
    // The weight reaches the loss: the KL part of the training loss (loss - NLL) shrinks with it.
    let kl_part = |kl_weight: f64, out: &str| {
        let config = TrainConfig {
            kl_weight,
            epochs: 1,
            ..crate::config(&root, out)
        };
        let outcome = train(
            &config,
            Start::New,
            &Device::Cpu,
            &mut QuietProgress,
            never(),
        );
        let epoch = &outcome.unwrap().epochs[0];
        epoch.train_loss - epoch.train_nll
    };
    let (elbo, cold) = (kl_part(1.0, "elbo"), kl_part(1e-6, "cold"));
    assert!(
        elbo > 0.0 && cold < 1e-4 * elbo,
        "KL part {elbo} at 1, {cold} at 1e-6"
    );
    // A record written before the setting existed is a plain ELBO run.
    let mut record = serde_json::to_value(&config).unwrap();
    record.as_object_mut().unwrap().remove("kl_weight").unwrap();
    let old: TrainConfig = serde_json::from_value(record).unwrap();
    assert_eq!(old.kl_weight, 1.0);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn resume_after_the_data_shrank_is_refused_not_a_panic() {
    let root = write_dataset(&temp_root("shrunk"), 64);
    let run = config(&root, "run");
    let flag = Arc::new(AtomicBool::new(false));
    let mut stopper = StopAfter {
        batches: 7, // batch 7 of 8 in the first epoch
        seen: 0,
        flag: flag.clone(),
    };
    let err = train(&run, Start::New, &Device::Cpu, &mut stopper, flag).unwrap_err();
    assert!(matches!(err, whvi::Error::Interrupted(_)), "{err}");
    // 5 x 40 images, 64 of them held out: 4 batches of 32 an epoch, fewer than the run had done.
    write_dataset(&root, 40);
    let err = train(
        &run,
        Start::Resume,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("after batch 7") && err.contains("now has 4 batches"),
        "{err}"
    );
}

/// Run at 3 threads, not a power of two, so that a reduction grouped by work stealing would show.
#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    pool.install(resume_at_the_current_thread_count);
}

fn resume_at_the_current_thread_count() {
    let root = write_dataset(&temp_root("resume"), 64);
    let straight = config(&root, "straight");
    train(
        &straight,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap();

    // A new run into the directory of another is refused, and nothing there is touched.
    let log_before = std::fs::read(straight.out.join("metrics.jsonl")).unwrap();
    let err = train(
        &straight,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("already holds a training run")
            && err.to_string().contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(straight.out.join("metrics.jsonl")).unwrap(),
        log_before
    );
    // Data that cannot be read leave no empty --out directory behind.
    let mut no_data = config(&root, "no-data");
    no_data.data = Some(root.join("nowhere"));
    train(
        &no_data,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err();
    assert!(!no_data.out.exists());
    // Shapes the data contradict are refused, not replaced.
    let mut classes = config(&root, "classes");
    classes.build.classes = Some(5);
    let err = train(
        &classes,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("--classes 5") && err.to_string().contains("has 10 classes"),
        "{err}"
    );
    let mut input = config(&root, "input");
    input.build.input = Some([1, 28, 28]);
    let err = train(
        &input,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--input 1,28,28"), "{err}");

    let resumed = config(&root, "resumed");
    let flag = Arc::new(AtomicBool::new(false));
    let mut stopper = StopAfter {
        batches: 11, // mid-way through the second epoch (8 batches per epoch)
        seen: 0,
        flag: flag.clone(),
    };
    let err = train(&resumed, Start::New, &Device::Cpu, &mut stopper, flag).unwrap_err();
    assert!(matches!(err, whvi::Error::Interrupted(_)), "{err}");
    assert!(err.to_string().contains("--resume"), "{err}");
    train(
        &resumed,
        Start::Resume,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap();

    let a = weights(&straight.out.join("last.safetensors"));
    let b = weights(&resumed.out.join("last.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "tensor {na} differs after resume");
    }
    let log = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v.as_object_mut().unwrap().remove("images_per_s");
                v
            })
            .collect()
    };
    assert_eq!(log(&straight.out), log(&resumed.out));

    // Resuming with other settings is refused, naming what differs.
    let mut other = config(&root, "resumed");
    other.batch_size = 16;
    let err = train(
        &other,
        Start::Resume,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("another configuration"), "{err}");
    assert!(err.to_string().contains("batch_size: 32 -> 16"), "{err}");
    assert!(!err.to_string().contains("out:"), "{err}");

    // A run moved to another directory resumes there (one more epoch).
    let moved = root.join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    for file in ["last.safetensors", "best.safetensors", "metrics.jsonl"] {
        std::fs::copy(resumed.out.join(file), moved.join(file)).unwrap();
    }
    let mut longer = config(&root, "moved");
    longer.epochs = 3;
    let err = train(
        &longer,
        Start::Resume,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("epochs: 2 -> 3"), "{err}");
    let same = config(&root, "moved");
    train(
        &same,
        Start::Resume,
        &Device::Cpu,
        &mut QuietProgress,
        never(),
    )
    .unwrap();
    assert_eq!(log(&moved), log(&straight.out));
    std::fs::remove_dir_all(root).unwrap();
}

/// LeNet-5 for 3x32x32 images with a WHVI head, its parameters and an AdamW optimiser.
fn lenet5_whvi_head_with_adamw() -> (
    whvi::params::Params,
    whvi::zoo::Network,
    whvi::optim::AnyOptimizer,
) {
    use candle_core::DType;
    use whvi::optim::{AdamWConfig, AnyOptimizer, NamedOptimizer, OptimizerConfig};
    use whvi::params::Params;
    use whvi::train::{named_parameters, trainable};
    use whvi::zoo::{BayesPolicy, BuildOptions, Method, ModelSpec, Network};

    let spec = ModelSpec::lookup("lenet5").unwrap();
    let options = BuildOptions {
        method: Method::Whvi,
        policy: BayesPolicy::Head,
        classes: Some(10),
        input: Some([3, 32, 32]),
        ..BuildOptions::default()
    };
    let params = Params::new(0);
    let network = Network::build(
        &spec,
        &options,
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let parameters = named_parameters(&params, &network.parameters()).unwrap();
    let optimizer = AnyOptimizer::from_named(
        trainable(&parameters),
        OptimizerConfig::AdamW(AdamWConfig::default()),
    )
    .unwrap();
    (params, network, optimizer)
}

/// Every parameter's bit patterns, so that NaN parameters compare equal to themselves.
fn parameter_bits(params: &whvi::params::Params) -> Vec<Vec<u32>> {
    params
        .named_vars()
        .iter()
        .map(|(_, v)| {
            let values: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            values.into_iter().map(f32::to_bits).collect()
        })
        .collect()
}

#[test]
fn a_step_on_a_non_finite_batch_is_an_error_and_changes_no_parameter() {
    use candle_core::{DType, Tensor};
    use whvi::train::{train_step, StepSettings};
    use whvi::Error;

    let device = Device::Cpu;
    let (params, network, mut optimizer) = lenet5_whvi_head_with_adamw();
    let settings = StepSettings {
        n_train: 100,
        beta: 1.0,
        mc_samples: 2,
        clip_grad: None,
    };
    let labels = Tensor::new(&[0u32, 1, 2, 3], &device).unwrap();
    let snapshot = || parameter_bits(&params);
    let mut rng = seeded(0);

    let finite = Tensor::zeros((4, 3, 32, 32), DType::F32, &device).unwrap();
    let mut step = || {
        train_step(
            &network,
            &mut optimizer,
            (&finite, &labels),
            settings,
            &mut rng,
            &Group::solo(),
        )
    };
    let outcome = step().unwrap();
    assert!(outcome.loss.is_finite() && outcome.nll > 0.0, "{outcome:?}");
    assert!((0.0..=4.0).contains(&outcome.correct), "{outcome:?}");

    // NaN output-layer means make the logits and the loss NaN (ReLU would swallow a NaN input).
    let mut poisoned = 0;
    for (name, var) in params.named_vars() {
        if name.starts_with("out.") && name.ends_with("mu") {
            var.set(&(var.as_tensor().ones_like().unwrap() * f64::NAN).unwrap())
                .unwrap();
            poisoned += 1;
        }
    }
    assert_eq!(poisoned, 1, "the output layer's means");
    let before = snapshot();
    let err = step().unwrap_err();
    assert!(matches!(err, Error::Diverged(_)), "{err:?}");
    assert!(
        before == snapshot(),
        "a diverged step must not update the parameters"
    );
}

/// A finite loss whose gradient holds NaN or infinity is divergence whether or not the step
/// clips, and leaves every parameter (and so the optimiser's moments) as it was; a finite
/// gradient is applied.
#[test]
fn a_non_finite_gradient_behind_a_finite_loss_is_divergence_with_or_without_clipping() {
    use candle_core::{DType, Tensor};
    use whvi::loss::elbo_loss;
    use whvi::optim::NamedOptimizer;
    use whvi::train::apply_gradients;
    use whvi::Error;

    let device = Device::Cpu;
    let (params, network, mut optimizer) = lenet5_whvi_head_with_adamw();
    let snapshot = || parameter_bits(&params);
    let images = Tensor::ones((4, 3, 32, 32), DType::F32, &device).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 3], &device).unwrap();
    let gradients = || {
        let mut rng = seeded(1);
        let logits = network
            .forward_pass(&images, &mut whvi::layers::Pass::train(&mut rng))
            .unwrap();
        let kl = network.kl().unwrap();
        let loss = elbo_loss(&logits, &labels, &kl, 100, 1.0).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        loss.backward().unwrap()
    };
    let vars = optimizer.vars().to_vec();
    for bad in [f64::NAN, f64::INFINITY] {
        for clip in [None, Some(1.0)] {
            let mut grads = gradients();
            let target = vars.iter().find(|v| grads.get(v).is_some()).unwrap();
            let grad = grads.get(target).unwrap();
            // One bad element among finite ones.
            let mut values: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let last = values.len() - 1;
            values[last] = bad as f32;
            let poisoned = Tensor::from_vec(values, grad.shape(), &device).unwrap();
            grads.insert(target, poisoned);
            let before = snapshot();
            let err = apply_gradients(&mut optimizer, &mut grads, clip).unwrap_err();
            assert!(
                matches!(err, Error::Diverged(_)),
                "{bad}, clip {clip:?}: {err:?}"
            );
            assert!(
                before == snapshot(),
                "{bad}, clip {clip:?}: parameters changed"
            );
        }
    }
    let before = snapshot();
    apply_gradients(&mut optimizer, &mut gradients(), None).unwrap();
    assert!(before != snapshot(), "a finite gradient must be applied");
}

/// Panics right after the `crash_at`-th file a run writes at the end of an epoch, as a crash of
/// the process would leave the files; counts them all when `crash_at` is 0.
struct CrashAfter {
    crash_at: usize,
    saved: Vec<whvi::train::RunFile>,
}

impl Progress for CrashAfter {
    fn start_epoch(&mut self, _: usize, _: usize, _: usize, _: usize) {}
    fn batch(&mut self, _: usize, _: f64, _: f64) {}
    fn finish_epoch(&mut self, _: &str) {}
    fn message(&mut self, _: &str) {}
    fn saved(&mut self, file: whvi::train::RunFile) {
        self.saved.push(file);
        if self.saved.len() == self.crash_at {
            panic!("injected crash after writing {file:?}");
        }
    }
}

/// Whatever write a crash follows, resuming gives the log, `last` and `best` of a run that never
/// crashed (a crash before the first `last` leaves nothing to resume: the run starts afresh).
#[test]
fn a_crash_after_any_write_resumes_to_the_files_of_an_uninterrupted_run() {
    use whvi::train::RunFile;
    let root = write_dataset(&temp_root("crash"), 64);
    let mut straight = config(&root, "straight");
    straight.test_samples = 0;
    let mut counter = CrashAfter {
        crash_at: 0,
        saved: Vec::new(),
    };
    train(&straight, Start::New, &Device::Cpu, &mut counter, never()).unwrap();
    let order = counter.saved;
    let first_last = order.iter().position(|f| *f == RunFile::Last).unwrap();
    assert_eq!(
        order[..first_last],
        [RunFile::Best],
        "best is written before last"
    );
    assert_eq!(order.last(), Some(&RunFile::Log), "the log line comes last");
    let log = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for crash_at in 1..=order.len() {
        let mut crashed = straight.clone();
        crashed.out = root.join(format!("crash-{crash_at}"));
        let mut progress = CrashAfter {
            crash_at,
            saved: Vec::new(),
        };
        let run = std::panic::AssertUnwindSafe(|| {
            train(&crashed, Start::New, &Device::Cpu, &mut progress, never())
        });
        assert!(
            std::panic::catch_unwind(run).is_err(),
            "no crash at write {crash_at}"
        );
        // Before the first `last` there is nothing to resume: the run starts again over what
        // it wrote.
        let start = if crash_at > first_last {
            Start::Resume
        } else {
            Start::Replace
        };
        train(&crashed, start, &Device::Cpu, &mut QuietProgress, never()).unwrap();
        for file in ["last.safetensors", "best.safetensors"] {
            let (a, b) = (
                weights(&straight.out.join(file)),
                weights(&crashed.out.join(file)),
            );
            assert!(
                a == b,
                "crash after write {crash_at} ({:?}): {file} differs",
                order[crash_at - 1]
            );
        }
        // The restored line is the one `last` stored, timings included.
        assert_eq!(
            log(&straight.out).len(),
            log(&crashed.out).len(),
            "crash after write {crash_at}: metrics.jsonl has other epochs"
        );
        let strip = |mut lines: Vec<serde_json::Value>| {
            for v in &mut lines {
                v.as_object_mut().unwrap().remove("seconds");
                v.as_object_mut().unwrap().remove("images_per_s");
            }
            lines
        };
        assert_eq!(
            strip(log(&straight.out)),
            strip(log(&crashed.out)),
            "crash after write {crash_at}"
        );
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn presets_give_the_defaults_of_each_data_set_and_optimizer() {
    use whvi::zoo::BayesPolicy;
    let quick = TrainConfig::for_dataset(DatasetKind::Cifar10, None);
    assert_eq!(quick, TrainConfig::quick_start());
    assert!(quick.uses_embedded_sample());
    assert_eq!(
        (quick.model.as_str(), quick.build.width, quick.epochs),
        ("vgg11", 0.25, 6)
    );
    assert_eq!((quick.batch_size, quick.validation), (64, 200));
    let full = TrainConfig::for_dataset(DatasetKind::Cifar10, Some("cifar".into()));
    assert!(!full.uses_embedded_sample());
    assert_eq!((full.model.as_str(), full.batch_size), ("vgg16", 128));
    assert_eq!(full.build.policy, BayesPolicy::Head);
    let recipe = |c: &TrainConfig| (c.build.initial_sigma, c.kl_weight);
    let elbo = (whvi::layers::DEFAULT_INITIAL_SIGMA, 1.0);
    assert_eq!(
        recipe(&full),
        (CIFAR10_WHVI_INITIAL_SIGMA, CIFAR10_WHVI_KL_WEIGHT)
    );
    assert_eq!(recipe(&quick), elbo);
    // The tempered recipe is WHVI's on the head only: another method, every layer Bayesian or
    // a per-layer override falls back to the ELBO, and back again.
    let mut other = full.clone();
    other.build.method = whvi::zoo::Method::MeanField;
    assert_eq!(recipe(&other.with_posterior_recipe()), elbo);
    let mut all = full.clone();
    all.build.policy = BayesPolicy::All;
    let all = all.with_posterior_recipe();
    assert_eq!(recipe(&all), elbo);
    let mut head = all;
    head.build.policy = BayesPolicy::Head;
    assert_eq!(recipe(&head.with_posterior_recipe()), recipe(&full));
    let mut overridden = full.clone();
    overridden
        .build
        .overrides
        .push(("conv8".into(), whvi::zoo::Method::Whvi));
    assert_eq!(recipe(&overridden.with_posterior_recipe()), elbo);
    let cifar100 = TrainConfig::for_dataset(DatasetKind::Cifar100, Some("cifar".into()));
    assert_eq!(recipe(&cifar100), elbo);
    for grey in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
        let config = TrainConfig::for_dataset(grey, None);
        assert_eq!((config.model.as_str(), config.batch_size), ("lenet5", 32));
        assert_eq!(config.build.policy, BayesPolicy::Last);
        assert_eq!(config.dataset, grey);
    }
    let sgd = full.clone().with_optimizer(OptimizerKind::Sgd);
    assert_eq!(
        (sgd.optimizer, sgd.schedule.base_lr),
        (OptimizerKind::Sgd, 0.05)
    );
    assert_eq!(sgd.schedule.decay, full.schedule.decay);
    let adamw = sgd.with_optimizer(OptimizerKind::AdamW);
    assert_eq!(adamw.schedule.base_lr, 1e-3);
    assert_eq!(TrainConfig::default().schedule.warmup_steps, 0);
}
