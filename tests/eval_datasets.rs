//! The data sets published Bayesian numbers are measured on, on small files written here in
//! their official formats (none of the real files is on the build machines): SVHN's MATLAB
//! file, CIFAR-100's binary records, a CIFAR-10-C directory; and `whvi eval` on them, with its
//! saved predictions.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use whvi::checkpoint::{Checkpoint, CheckpointMeta};
use whvi::data::{self, cifar10, cifar100, svhn, DatasetKind};
use whvi::eval::{
    evaluate, write_cifar10c, Cifar10C, Corruption, EvalConfig, EvalReport, OodSource, ShiftSource,
};
use whvi::metrics::{self, read_npy, write_npy, NpyArray};
use whvi::params::Params;
use whvi::zoo::{BuildOptions, Method, ModelSpec};

/// A fresh, empty scratch folder for one test.
/// It lives under cargo's temporary folder for tests, so what a failed run leaves is replaced
/// by the next run instead of piling up in /tmp.
fn scratch(name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("evalsets-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn error_text<T>(result: whvi::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------- SVHN (MATLAB 5 files)

/// A MAT 5 data element: tag, data, padding to 8 bytes (the small format for up to 4 bytes).
fn element(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if data.len() <= 4 && kind != 14 {
        out.extend((((data.len() as u32) << 16) | kind).to_le_bytes());
        out.extend(data);
        out.resize(8, 0);
        return out;
    }
    out.extend(kind.to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out.extend(data);
    out.resize(8 + data.len().div_ceil(8) * 8, 0);
    out
}

/// A numeric variable as a MAT 5 `miMATRIX` element of array class `class`, its real part
/// stored as MAT type `kind`.
fn matrix(name: &str, dims: &[i32], class: u8, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut body = element(6, &[class, 0, 0, 0, 0, 0, 0, 0]);
    let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    body.extend(element(5, &dims));
    body.extend(element(1, name.as_bytes()));
    body.extend(element(kind, data));
    element(14, &body)
}

/// A MAT 5 file holding `variables`, each zlib-compressed when `compressed`.
fn mat_file(variables: &[Vec<u8>], compressed: bool) -> Vec<u8> {
    let mut out = b"MATLAB 5.0 MAT-file, written by the whvi tests".to_vec();
    out.resize(116, b' ');
    out.extend([0u8; 8]);
    out.extend([0x00, 0x01, b'I', b'M']);
    for v in variables {
        if compressed {
            let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
            z.write_all(v).unwrap();
            let z = z.finish().unwrap();
            out.extend(15u32.to_le_bytes());
            out.extend((z.len() as u32).to_le_bytes());
            out.extend(z);
        } else {
            out.extend(v);
        }
    }
    out
}

/// `n` SVHN images: pixel (row h, column w, channel c) of image i is a function of all four,
/// stored column-major as MATLAB does; labels as doubles, 10 for digit 0.
fn svhn_file(labels: &[f64], compressed: bool) -> Vec<u8> {
    let n = labels.len();
    let mut x = vec![0u8; 32 * 32 * 3 * n];
    for i in 0..n {
        for c in 0..3 {
            for w in 0..32 {
                for h in 0..32 {
                    x[h + 32 * w + 1024 * c + 3072 * i] = pixel(i, c, h, w);
                }
            }
        }
    }
    let y: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    mat_file(
        &[
            matrix("X", &[32, 32, 3, n as i32], 9, 2, &x),
            matrix("y", &[n as i32, 1], 6, 9, &y),
        ],
        compressed,
    )
}

fn pixel(i: usize, c: usize, h: usize, w: usize) -> u8 {
    (i * 50 + c * 80 + h * 3 + w * 5) as u8
}

#[test]
fn svhn_reads_plain_and_compressed_files_in_image_order() {
    let dir = scratch("svhn");
    for compressed in [false, true] {
        let path = dir.join(format!("test_32x32_{compressed}.mat"));
        fs::write(&path, svhn_file(&[10.0, 1.0, 7.0], compressed)).unwrap();
        let set = svhn::load(&path).unwrap();
        assert_eq!((set.len(), set.shape()), (3, (3, 32, 32)));
        assert_eq!(set.labels(), &[0, 1, 7], "10 is digit 0");
        for i in 0..3 {
            let image = set.image(i);
            for (c, h, w) in [(0, 0, 0), (1, 4, 7), (2, 31, 0), (2, 0, 31)] {
                assert_eq!(image[c * 1024 + h * 32 + w], pixel(i, c, h, w));
            }
        }
    }
    // Other variables are skipped.
    let mut file = svhn_file(&[4.0], false);
    file.extend(matrix("extra", &[2, 2], 6, 9, &[0u8; 32]));
    assert_eq!(svhn::parse(&file).unwrap().labels(), &[4]);
    // The directory holding test_32x32.mat.
    fs::write(dir.join(svhn::TEST_FILE), svhn_file(&[3.0], true)).unwrap();
    assert_eq!(svhn::load(&dir).unwrap().labels(), &[3]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn svhn_reads_a_file_written_by_scipy() {
    // tests/data/svhn_tiny.mat: scipy.io.savemat({'X': uint8 [32, 32, 3, 3], 'y': float64
    // [[10], [1], [5]]}, do_compression=True), X drawn by numpy.random.default_rng(5).
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/svhn_tiny.mat");
    let set = svhn::load(&path).unwrap();
    assert_eq!(set.labels(), &[0, 1, 5]);
    // X[4, 7, 2, 1] = 245, X[0, 0, 0, 0] = 168, X[31, 0, 1, 2] = 1 (numpy's indices).
    assert_eq!(set.image(1)[2 * 1024 + 4 * 32 + 7], 245);
    assert_eq!(set.image(0)[0], 168);
    assert_eq!(set.image(2)[1024 + 31 * 32], 1);
}

#[test]
fn svhn_bad_files_say_what_is_wrong() {
    let dir = scratch("svhn-bad");
    let good = svhn_file(&[1.0, 2.0], true);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 40].to_vec(), "truncated"),
        (
            "header only",
            good[..100].to_vec(),
            "shorter than a MAT-file header",
        ),
        (
            "hdf5",
            {
                let mut v = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00".to_vec();
                v.resize(1024, 0);
                v
            },
            "MATLAB 7.3 (HDF5)",
        ),
        ("not a mat file", vec![b'x'; 300], "not a MATLAB 5 MAT-file"),
        (
            "wrong shape",
            mat_file(
                &[
                    matrix("X", &[28, 28, 1, 1], 9, 2, &[0; 784]),
                    matrix("y", &[1, 1], 6, 9, &1f64.to_le_bytes()),
                ],
                false,
            ),
            "[28, 28, 1, 1]",
        ),
        ("bad label", svhn_file(&[1.0, 11.0], false), "label 1 is 11"),
        (
            "no labels",
            mat_file(&[matrix("X", &[32, 32, 3, 1], 9, 2, &[0; 3072])], true),
            "no variable 'y'",
        ),
        (
            "labels of another length",
            mat_file(
                &[
                    matrix("X", &[32, 32, 3, 2], 9, 2, &[0; 6144]),
                    matrix("y", &[1, 1], 6, 9, &1f64.to_le_bytes()),
                ],
                false,
            ),
            "1 labels for 2 images",
        ),
    ];
    for (what, bytes, expected) in cases {
        let path = dir.join("test_32x32.mat");
        fs::write(&path, bytes).unwrap();
        let err = error_text(svhn::load(&path));
        assert!(err.contains(expected), "{what}: {err}");
        assert!(
            err.contains("test_32x32.mat"),
            "{what}: names the file: {err}"
        );
    }
    let err = error_text(svhn::load(&dir.join("missing.mat")));
    assert!(
        err.contains("missing.mat") && err.contains("housenumbers"),
        "{err}"
    );
    fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------- CIFAR-100

/// `n` CIFAR-100 records: coarse label, fine label, 3072 pixels.
fn cifar100_records(n: usize, seed: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let fine = (i * 37 + seed) % 100;
            [(fine / 5) as u8, fine as u8]
                .into_iter()
                .chain((0..3072).map(move |p| (p + i * 11 + seed) as u8))
        })
        .collect()
}

#[test]
fn cifar100_loads_from_the_directory_its_parent_and_the_archive() {
    let root = scratch("cifar100");
    let dir = root.join("cifar-100-binary");
    fs::create_dir_all(&dir).unwrap();
    let (train, test) = (cifar100_records(30, 1), cifar100_records(12, 2));
    fs::write(dir.join("train.bin"), &train).unwrap();
    fs::write(dir.join("test.bin"), &test).unwrap();
    let check = |sets: &data::TrainTest, names: &str| {
        assert_eq!((sets.train.len(), sets.test.len()), (30, 12));
        assert_eq!(sets.train.num_classes(), 100);
        assert_eq!(sets.test.label(3), test[3 * 3074 + 1], "the fine label");
        assert_eq!(sets.test.image(3), &test[3 * 3074 + 2..4 * 3074]);
        assert_eq!(sets.train.classes()[4], names);
        assert!(sets
            .notes
            .iter()
            .any(|n| n.contains("official file holds 50000")));
    };
    check(
        &data::load(DatasetKind::Cifar100, Some(&dir)).unwrap(),
        "beaver",
    );
    check(
        &data::load(DatasetKind::Cifar100, Some(&root)).unwrap(),
        "beaver",
    );
    // The archive, with its own class-name file.
    let names: String = (0..100).map(|i| format!("c{i}\n")).collect();
    let archive = root.join("cifar-100-binary.tar.gz");
    let mut tar = tar::Builder::new(GzEncoder::new(
        fs::File::create(&archive).unwrap(),
        Compression::fast(),
    ));
    for (name, bytes) in [
        ("train.bin", &train[..]),
        ("test.bin", &test[..]),
        ("fine_label_names.txt", names.as_bytes()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("cifar-100-binary/{name}"), bytes)
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    check(&cifar100::load(&archive).unwrap(), "c4");
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn cifar100_bad_records_name_the_file_and_the_record_size() {
    let dir = scratch("cifar100-bad");
    fs::write(dir.join("test.bin"), cifar100_records(2, 0)).unwrap();
    // A CIFAR-10 file where a CIFAR-100 one should be: 3073-byte records.
    fs::write(dir.join("train.bin"), vec![0u8; 3073 * 2]).unwrap();
    let err = error_text(cifar100::load(&dir));
    assert!(
        err.contains("train.bin") && err.contains("3074-byte records"),
        "{err}"
    );
    let mut bad = cifar100_records(2, 0);
    bad[3074 + 1] = 100;
    fs::write(dir.join("train.bin"), bad).unwrap();
    let err = error_text(cifar100::load(&dir));
    assert!(
        err.contains("record 1") && err.contains("fine label 100"),
        "{err}"
    );
    fs::write(dir.join("train.bin"), cifar100_records(2, 0)).unwrap();
    fs::write(dir.join("fine_label_names.txt"), "a\nb\n").unwrap();
    let err = error_text(cifar100::load(&dir));
    assert!(err.contains("names 2 classes"), "{err}");
    let err = error_text(data::load(DatasetKind::Cifar100, None));
    assert!(err.contains("cifar-100-binary.tar.gz"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------- CIFAR-10-C and `whvi eval`

/// An untrained lenet5 WHVI network for CIFAR-10's images, saved as a checkpoint.
fn saved_network(dir: &Path) -> PathBuf {
    saved_lenet(&dir.join("net.safetensors"), Method::Whvi, [3, 32, 32], 4)
}

/// An untrained lenet5 with a `method` head for `input` images, its weights drawn from `seed`,
/// saved at `path`.
fn saved_lenet(path: &Path, method: Method, input: [usize; 3], seed: u64) -> PathBuf {
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let options = BuildOptions {
        method,
        width: 0.5,
        input: Some(input),
        ..BuildOptions::default()
    };
    let params = Params::new(seed);
    whvi::zoo::Network::build(
        &spec,
        &options,
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let classes = cifar10::CLASSES.iter().map(|c| c.to_string()).collect();
    Checkpoint::save(
        path,
        &CheckpointMeta::new(spec, options, classes),
        &params,
        &[],
    )
    .unwrap();
    path.to_path_buf()
}

fn config(checkpoint: &Path, shift: Option<ShiftSource>) -> EvalConfig {
    EvalConfig {
        samples: 3,
        batch_size: 16,
        seed: 5,
        limit: Some(24),
        shift,
        corruption_images: 12,
        temperature_scaling: false,
        ..EvalConfig::new(vec![checkpoint.to_path_buf()])
    }
}

fn run(config: &EvalConfig) -> EvalReport {
    evaluate(config, &Device::Cpu, &mut |_| {})
        .unwrap()
        .remove(0)
}

#[test]
fn cifar10c_files_written_by_whvi_give_the_numbers_of_the_same_corruptions_on_the_fly() {
    let dir = scratch("cifar10c");
    let checkpoint = saved_network(&dir);
    let corruptions = vec![Corruption::GaussianNoise, Corruption::Pixelate];
    let test = cifar10::embedded_sample().unwrap().test.first(12).unwrap();
    let files = dir.join("CIFAR-10-C");
    write_cifar10c(&files, &test, &corruptions, 5, &mut |_| {}).unwrap();
    let opened = Cifar10C::open(&files).unwrap();
    assert_eq!(opened.corruptions(), corruptions);
    assert_eq!(opened.images_per_severity(), 12);
    let stored = read_npy(files.join("gaussian_noise.npy")).unwrap();
    assert_eq!(stored.shape(), &[60, 32, 32, 3]);

    let on_the_fly = run(&config(
        &checkpoint,
        Some(ShiftSource::OnTheFly(corruptions.clone())),
    ));
    let from_files = run(&config(
        &checkpoint,
        Some(ShiftSource::Cifar10C(files.clone())),
    ));
    assert_eq!(
        on_the_fly.corruptions.len(),
        10,
        "2 corruptions x 5 severities"
    );
    assert_eq!(on_the_fly.corruptions, from_files.corruptions);
    let mean = from_files.corruption_mean.as_ref().unwrap();
    let accuracy: f64 = from_files
        .corruptions
        .iter()
        .map(|c| c.accuracy)
        .sum::<f64>()
        / 10.0;
    assert!((mean.accuracy - accuracy).abs() < 1e-12);
    assert!(from_files.corruptions.iter().all(|c| c.images == 12));
    // A set's numbers do not depend on the other sets: one corruption alone repeats them.
    let alone = run(&config(
        &checkpoint,
        Some(ShiftSource::OnTheFly(vec![Corruption::Pixelate])),
    ));
    assert_eq!(alone.corruptions[..], on_the_fly.corruptions[5..]);
    let json = serde_json::to_value(&from_files).unwrap();
    assert!(json["corrupted_ece15"].is_number() && json["corrupted_accuracy"].is_number());
    // --corruption-images takes the first images of each severity.
    let fewer = run(&EvalConfig {
        corruption_images: 5,
        ..config(&checkpoint, Some(ShiftSource::Cifar10C(files.clone())))
    });
    assert!(fewer.corruptions.iter().all(|c| c.images == 5));
    // --limit caps the corrupted sets too, read from files or made on the fly.
    let limited = |shift| {
        run(&EvalConfig {
            limit: Some(8),
            ..config(&checkpoint, Some(shift))
        })
    };
    let (files_8, fly_8) = (
        limited(ShiftSource::Cifar10C(files.clone())),
        limited(ShiftSource::OnTheFly(corruptions.clone())),
    );
    assert!(files_8.corruptions.iter().all(|c| c.images == 8));
    assert_eq!(files_8.corruptions, fly_8.corruptions);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cifar10c_bad_files_name_the_file_and_both_shapes() {
    let dir = scratch("cifar10c-bad");
    let checkpoint = saved_network(&dir);
    let files = dir.join("c");
    fs::create_dir_all(&files).unwrap();
    let err = error_text(Cifar10C::open(&files));
    assert!(
        err.contains("labels.npy") && err.contains("zenodo"),
        "{err}"
    );
    let labels = NpyArray::new(&[10], &[1u8; 10]).unwrap();
    write_npy(files.join("labels.npy"), &labels).unwrap();
    let err = error_text(Cifar10C::open(&files));
    assert!(err.contains("no corruption file"), "{err}");
    // Wrong shape: 2x32x32x3 where the labels say 10 images.
    let wrong = NpyArray::new(&[2, 32, 32, 3], &vec![0u8; 2 * 3072]).unwrap();
    write_npy(files.join("fog.npy"), &wrong).unwrap();
    write_npy(files.join("notes.npy"), &wrong).unwrap();
    let opened = Cifar10C::open(&files).unwrap();
    assert!(
        opened.notes()[0].contains("notes.npy"),
        "{:?}",
        opened.notes()
    );
    let classes: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let err = error_text(opened.load(Corruption::Fog, 10, &classes));
    assert!(
        err.contains("fog.npy")
            && err.contains("[2, 32, 32, 3]")
            && err.contains("[10, 32, 32, 3]"),
        "{err}"
    );
    // Wrong dtype: float32 pixels.
    let floats = NpyArray::new(&[10, 32, 32, 3], &vec![0f32; 10 * 3072]).unwrap();
    write_npy(files.join("fog.npy"), &floats).unwrap();
    let err = error_text(opened.load(Corruption::Fog, 10, &classes));
    assert!(err.contains("fog.npy") && err.contains("uint8"), "{err}");
    // Labels that are not 5 x N.
    write_npy(
        files.join("labels.npy"),
        &NpyArray::new(&[7], &[0u8; 7]).unwrap(),
    )
    .unwrap();
    let err = error_text(Cifar10C::open(&files));
    assert!(err.contains("labels.npy") && err.contains("[7]"), "{err}");
    // Through `whvi eval`: a missing directory, and cifar10-c mixed with names.
    let err = error_text(evaluate(
        &config(
            &checkpoint,
            Some(ShiftSource::Cifar10C(dir.join("nowhere"))),
        ),
        &Device::Cpu,
        &mut |_| {},
    ));
    assert!(err.contains("nowhere"), "{err}");
    let err = error_text(ShiftSource::parse(&["cifar10-c:x".into(), "fog".into()]));
    assert!(err.contains("give it alone"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn saved_predictions_reproduce_the_report_and_svhn_and_cifar100_are_ood_sets() {
    let dir = scratch("save-probs");
    let checkpoint = saved_network(&dir);
    let svhn_path = dir.join("test_32x32.mat");
    fs::write(&svhn_path, svhn_file(&[1.0, 2.0, 3.0, 10.0], true)).unwrap();
    let out = dir.join("probs");
    let report = run(&EvalConfig {
        ood: Some(OodSource::parse(&format!("svhn:{}", svhn_path.display())).unwrap()),
        shift: Some(ShiftSource::OnTheFly(vec![Corruption::Contrast])),
        save_probs: Some(out.clone()),
        save_samples: true,
        ..config(&checkpoint, None)
    });
    let runs: Vec<PathBuf> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let saved = &runs[0];
    assert!(
        saved.to_string_lossy().ends_with("save-probs-net"),
        "RUN-STEM: {saved:?}"
    );
    let probs = metrics::load_predictions(saved.join("clean.probs.npy")).unwrap();
    let labels = metrics::load_labels(saved.join("clean.labels.npy")).unwrap();
    let again = metrics::compute_report(&probs, &labels, None).unwrap();
    assert_eq!((again.n, again.accuracy), (24, report.metrics.accuracy));
    assert!((again.nll - report.metrics.nll).abs() < 1e-12);
    assert!((again.ece15 - report.metrics.ece15).abs() < 1e-12);
    let samples = read_npy(saved.join("clean.samples.npy")).unwrap();
    assert_eq!(samples.shape(), &[3, 24, 10]);
    let ood = read_npy(saved.join("ood-svhn.probs.npy")).unwrap();
    assert_eq!(ood.shape(), &[4, 10], "the SVHN images, no more");
    assert!(!saved.join("ood-svhn.labels.npy").exists());
    let shifted = metrics::load_predictions(saved.join("contrast-3.probs.npy")).unwrap();
    let shifted_labels = metrics::load_labels(saved.join("contrast-3.labels.npy")).unwrap();
    let c3 = &report.corruptions[2];
    assert_eq!(c3.severity, 3);
    assert!((metrics::nll(shifted.mean(), &shifted_labels).unwrap() - c3.nll).abs() < 1e-12);
    assert!(report.metrics.ood_auroc_entropy.is_some());

    // CIFAR-100 as the OOD set of a 10-class model.
    let c100 = dir.join("cifar-100-binary");
    fs::create_dir_all(&c100).unwrap();
    fs::write(c100.join("train.bin"), cifar100_records(3, 0)).unwrap();
    fs::write(c100.join("test.bin"), cifar100_records(6, 1)).unwrap();
    let report = run(&EvalConfig {
        ood: Some(OodSource::parse(&format!("cifar100:{}", c100.display())).unwrap()),
        ..config(&checkpoint, None)
    });
    assert!(report.metrics.ood_auroc_entropy.is_some());
    // Saved predictions are not replaced unless asked.
    let again = EvalConfig {
        save_probs: Some(out.clone()),
        ..config(&checkpoint, None)
    };
    let err = error_text(evaluate(&again, &Device::Cpu, &mut |_| {}));
    assert!(
        err.contains("holds saved predictions already") && err.contains("--force"),
        "{err}"
    );
    run(&EvalConfig {
        overwrite: true,
        ..again.clone()
    });
    let twin = dir.join("twin");
    let err = error_text(evaluate(
        &EvalConfig {
            checkpoints: vec![checkpoint.clone(), checkpoint.clone()],
            save_probs: Some(twin),
            ..config(&checkpoint, None)
        },
        &Device::Cpu,
        &mut |_| {},
    ));
    assert!(err.contains("two checkpoints"), "{err}");
    let err = error_text(OodSource::parse("svhn"));
    assert!(err.contains("svhn:PATH"), "{err}");
    let err = error_text(evaluate(
        &EvalConfig {
            save_samples: true,
            ..config(&checkpoint, None)
        },
        &Device::Cpu,
        &mut |_| {},
    ));
    assert!(err.contains("--save-probs"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_ensemble_predicts_the_mean_of_its_members_and_pools_their_samples() {
    let dir = scratch("ensemble");
    let whvi = saved_lenet(&dir.join("whvi.safetensors"), Method::Whvi, [3, 32, 32], 4);
    let det_a = saved_lenet(
        &dir.join("a.safetensors"),
        Method::Deterministic,
        [3, 32, 32],
        5,
    );
    let det_b = saved_lenet(
        &dir.join("b.safetensors"),
        Method::Deterministic,
        [3, 32, 32],
        6,
    );
    let out = dir.join("probs");
    let single = |path: &Path| {
        let report = run(&EvalConfig {
            save_probs: Some(out.clone()),
            ..config(path, None)
        });
        let run = dir.file_name().unwrap().to_string_lossy();
        let name = format!("{run}-{}", path.file_stem().unwrap().to_string_lossy());
        let probs = metrics::load_predictions(out.join(name).join("clean.probs.npy")).unwrap();
        (report, probs)
    };
    let (_, whvi_probs) = single(&whvi);
    let (_, a_probs) = single(&det_a);
    let ensemble = |members: &[&PathBuf]| {
        let mut config = config(members[0], None);
        config.checkpoints = members.iter().map(|p| p.to_path_buf()).collect();
        config.ensemble = true;
        config.save_probs = Some(out.clone());
        config.save_samples = true;
        config.overwrite = true;
        run(&config)
    };

    // A WHVI member (T = 3 samples) and a deterministic one (1 pass, weighed as 3).
    let mixed = ensemble(&[&whvi, &det_a]);
    assert_eq!(mixed.members, vec![whvi.clone(), det_a.clone()]);
    let run = dir.file_name().unwrap().to_string_lossy().into_owned();
    let saved = out.join(format!("{run}-whvi-ensemble-of-2"));
    let pooled = metrics::load_predictions(saved.join("clean.probs.npy")).unwrap();
    let mean: Vec<f64> = (whvi_probs.mean().as_slice().iter())
        .zip(a_probs.mean().as_slice())
        .map(|(p, q)| (p + q) / 2.0)
        .collect();
    let worst = (pooled.mean().as_slice().iter())
        .zip(&mean)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-12,
        "pooled mean off the members' mean by {worst}"
    );
    let samples = read_npy(saved.join("clean.samples.npy")).unwrap();
    assert_eq!(samples.shape(), &[6, 24, 10]);
    let labels = metrics::load_labels(saved.join("clean.labels.npy")).unwrap();
    let nll = metrics::nll(pooled.mean(), &labels).unwrap();
    assert!((nll - mixed.metrics.nll).abs() < 1e-12);
    // The members disagree.
    assert!(mixed.metrics.mean_mutual_information.unwrap() > 1e-6);

    // Two copies of one deterministic network are that network, with no disagreement.
    let twice = ensemble(&[&det_b, &det_b]);
    let (b_alone, _) = single(&det_b);
    assert_eq!(twice.metrics.accuracy, b_alone.metrics.accuracy);
    assert!((twice.metrics.nll - b_alone.metrics.nll).abs() < 1e-12);
    assert!(twice.metrics.mean_mutual_information.unwrap().abs() < 1e-12);
    let table = whvi::eval::comparison_table(&[twice]);
    assert!(table.contains("ensemble of 2"), "{table}");

    // Members that cannot be averaged, and an ensemble of one.
    let grey = saved_lenet(
        &dir.join("grey.safetensors"),
        Method::Deterministic,
        [1, 28, 28],
        7,
    );
    let mut bad = config(&det_a, None);
    bad.checkpoints = vec![det_a.clone(), grey];
    bad.ensemble = true;
    let err = error_text(evaluate(&bad, &Device::Cpu, &mut |_| {}));
    assert!(
        err.contains("grey.safetensors") && err.contains("other images"),
        "{err}"
    );
    bad.checkpoints.truncate(1);
    let err = error_text(evaluate(&bad, &Device::Cpu, &mut |_| {}));
    assert!(err.contains("an ensemble needs at least two"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn cifar100_trains_a_zoo_network_with_a_head_of_100_classes() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use whvi::train::{train, QuietProgress, Start, TrainConfig};
    let root = scratch("cifar100-train");
    let dir = root.join("cifar-100-binary");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("train.bin"), cifar100_records(40, 3)).unwrap();
    fs::write(dir.join("test.bin"), cifar100_records(10, 4)).unwrap();
    let config = TrainConfig {
        dataset: DatasetKind::Cifar100,
        data: Some(dir.clone()),
        model: "lenet5".into(),
        epochs: 1,
        batch_size: 8,
        validation: 8,
        eval_samples: 1,
        test_samples: 1,
        out: root.join("run"),
        ..TrainConfig::default()
    };
    let outcome = train(
        &config,
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let loaded = Checkpoint::load(&outcome.best_checkpoint, &Device::Cpu).unwrap();
    assert_eq!(loaded.network.num_classes(), 100);
    assert_eq!(loaded.meta.class_names[99], "worm");
    assert_eq!(outcome.test_report.unwrap().num_classes, 100);
    // An explicit --classes that disagrees with the data is refused.
    let err = error_text(train(
        &TrainConfig {
            out: root.join("run2"),
            build: BuildOptions {
                classes: Some(10),
                ..BuildOptions::default()
            },
            ..config.clone()
        },
        Start::New,
        &Device::Cpu,
        &mut QuietProgress,
        Arc::new(AtomicBool::new(false)),
    ));
    assert!(
        err.contains("--classes 10") && err.contains("100 classes"),
        "{err}"
    );
    fs::remove_dir_all(root).unwrap();
}
