//! Checkpoints: round trips, and every bad file gives an error that says what is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use whvi::checkpoint::{Checkpoint, CheckpointMeta, Checksum, CHECKSUM_KEY};
use whvi::layers::Pass;
use whvi::params::Params;
use whvi::rng::seeded;
use whvi::zoo::{BuildOptions, Method, ModelSpec, Network};

const CPU: Device = Device::Cpu;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whvi-ckpt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn saved_lenet(dir: &Path, method: Method) -> (PathBuf, Network) {
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let options = BuildOptions {
        method,
        width: 0.5,
        ..BuildOptions::default()
    };
    let params = Params::new(3);
    let network = Network::build(&spec, &options, params.var_builder(DType::F32, &CPU)).unwrap();
    let classes: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    let mut meta = CheckpointMeta::new(spec, options, classes);
    meta.epoch = 7;
    meta.seed = Some(3);
    let path = dir.join("model.safetensors");
    Checkpoint::save(&path, &meta, &params, &[]).unwrap();
    (path, network)
}

fn images() -> Tensor {
    whvi::layers::standard_normal((4, 1, 28, 28), DType::F32, &CPU, &mut seeded(9)).unwrap()
}

fn outputs(network: &Network, seed: Option<u64>) -> Vec<Vec<f32>> {
    let x = images();
    let y = match seed {
        Some(s) => network.forward_pass(&x, &mut Pass::sample(&mut seeded(s))),
        None => network.forward_pass(&x, &mut Pass::mean()),
    };
    y.unwrap().to_vec2().unwrap()
}

#[test]
fn save_load_predict_gives_identical_outputs() {
    for method in [
        Method::Whvi,
        Method::MeanField,
        Method::McDropout,
        Method::Deterministic,
    ] {
        let dir = temp_dir(method.name());
        let (path, original) = saved_lenet(&dir, method);
        let loaded = Checkpoint::load(&path, &CPU).unwrap();
        assert_eq!(loaded.meta.epoch, 7);
        assert_eq!(loaded.meta.class_names[3], "class3");
        assert_eq!(
            outputs(&loaded.network, None),
            outputs(&original, None),
            "{method:?}"
        );
        assert_eq!(
            outputs(&loaded.network, Some(5)),
            outputs(&original, Some(5)),
            "{method:?}"
        );
        let description = whvi::checkpoint::describe(&path).unwrap();
        assert!(description.contains("lenet5") && description.contains(method.name()));

        // Inference in half precision stays close to f32 (candle's CPU matmul has f16, not bf16).
        let half = Checkpoint::load_as(&path, &CPU, DType::F16).unwrap();
        let x = images().to_dtype(DType::F16).unwrap();
        let y = half.network.forward_pass(&x, &mut Pass::mean()).unwrap();
        let y: Vec<Vec<f32>> = y.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let reference = outputs(&original, None);
        for (a, b) in y.iter().flatten().zip(reference.iter().flatten()) {
            assert!(
                (a - b).abs() < 0.05 * (1.0 + b.abs()),
                "{method:?}: {a} vs {b}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Rewrites the checkpoint at `path` after `edit` changes its tensors and metadata.
fn rewrite(
    path: &Path,
    out: &Path,
    edit: impl FnOnce(&mut Vec<(String, Tensor)>, &mut HashMap<String, String>),
) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = meta.metadata().clone().unwrap();
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(path, &CPU)
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // An edited file carries no checksum, as one written before checksums were recorded.
    metadata.remove(CHECKSUM_KEY);
    edit(&mut tensors, &mut metadata);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .unwrap();
    std::fs::write(out, bytes).unwrap();
}

fn load_error(path: &Path) -> String {
    match Checkpoint::load(path, &CPU) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_give_errors_that_say_what_is_wrong() {
    let dir = temp_dir("bad");
    let (path, _) = saved_lenet(&dir, Method::Whvi);

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    assert!(load_error(&garbage).contains("not a readable safetensors file"));

    let truncated = dir.join("truncated.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&truncated);
    assert!(
        err.contains("truncated") && err.contains("truncated.safetensors"),
        "{err}"
    );

    let missing = dir.join("missing.safetensors");
    let err = load_error(&missing);
    assert!(err.contains("missing.safetensors"), "{err}");

    let version = dir.join("version.safetensors");
    rewrite(&path, &version, |_, m| {
        m.insert("format_version".into(), "99".into());
    });
    let err = load_error(&version);
    assert!(err.contains("format version 99 is not supported"), "{err}");

    let no_tensor = dir.join("no-tensor.safetensors");
    rewrite(&path, &no_tensor, |t, _| t.retain(|(n, _)| n != "fc1.mu"));
    let err = load_error(&no_tensor);
    assert!(
        err.contains("tensor fc1.mu") && err.contains("missing"),
        "{err}"
    );

    let wrong_shape = dir.join("wrong-shape.safetensors");
    rewrite(&path, &wrong_shape, |t, _| {
        for (n, v) in t.iter_mut() {
            if n == "conv1.weight" {
                *v = Tensor::zeros((2, 2), DType::F32, &CPU).unwrap();
            }
        }
    });
    let err = load_error(&wrong_shape);
    assert!(
        err.contains("conv1.weight") && err.contains("shape"),
        "{err}"
    );

    let stray = dir.join("stray.safetensors");
    rewrite(&path, &stray, |t, _| {
        t.push((
            "extra.weight".into(),
            Tensor::zeros(3, DType::F32, &CPU).unwrap(),
        ))
    });
    let err = load_error(&stray);
    assert!(err.contains("extra.weight"), "{err}");

    let bad_spec = dir.join("bad-spec.safetensors");
    rewrite(&path, &bad_spec, |_, m| {
        m.insert(
            "spec".into(),
            "{\"name\": \"lenet5\",\n \"input\": [1, 28".into(),
        );
    });
    let err = load_error(&bad_spec);
    assert!(
        err.contains("metadata 'spec' does not parse") && err.contains("at line 2"),
        "{err}"
    );

    // Metadata is not covered by the checksum: what it says is checked as a spec file would be.
    let stride = dir.join("stride.safetensors");
    rewrite(&path, &stride, |_, m| {
        let spec = m["spec"].replacen("\"stride\":1", "\"stride\":0", 1);
        assert_ne!(spec, m["spec"], "the spec has a stride to edit");
        m.insert("spec".into(), spec);
    });
    let err = load_error(&stride);
    assert!(
        err.contains("features[0]") && err.contains("stride"),
        "{err}"
    );

    let normalization = dir.join("normalization.safetensors");
    rewrite(&path, &normalization, |_, m| {
        m.insert(
            "normalization".into(),
            "{\"mean\": [0.5], \"std\": []}".into(),
        );
    });
    let err = load_error(&normalization);
    assert!(
        err.contains("normalization") && err.contains("1 means and 0 standard deviations"),
        "{err}"
    );

    let classes = dir.join("classes.safetensors");
    rewrite(&path, &classes, |_, m| {
        m.insert("class_names".into(), "[\"cat\", \"dog\"]".into());
    });
    let err = load_error(&classes);
    assert!(
        err.contains("names 2 classes") && err.contains("10 outputs"),
        "{err}"
    );

    // Flipped bytes in the tensor data: refused by the checksum, readable when skipped
    // (the flips touch the lowest mantissa byte of f32 values, so they stay finite).
    let flipped = dir.join("flipped.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for k in 0..100 {
        bytes[8 + header + 4 * k] ^= 0x5a;
    }
    std::fs::write(&flipped, &bytes).unwrap();
    let err = load_error(&flipped);
    assert!(
        err.contains("checksum") && err.contains("damaged") && err.contains("--skip-checksum"),
        "{err}"
    );
    Checkpoint::load_with(&flipped, &CPU, DType::F32, Checksum::Skip).unwrap();

    let nan = dir.join("nan.safetensors");
    rewrite(&path, &nan, |t, _| {
        for (n, v) in t.iter_mut() {
            if n == "fc1.mu" {
                let mut values = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                values[3] = f32::NAN;
                values[7] = f32::INFINITY;
                *v = Tensor::from_vec(values, v.shape(), &CPU).unwrap();
            }
        }
    });
    let err = load_error(&nan);
    assert!(
        err.contains("fc1.mu") && err.contains("2 NaN or infinite values"),
        "{err}"
    );

    // A failed save over a checkpoint leaves it as it was: its temporary file cannot be
    // created (a directory holds the name `write_atomic` uses), so the save fails midway.
    let before = std::fs::read(&path).unwrap();
    let params = Params::new(0);
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let meta = CheckpointMeta::new(spec, BuildOptions::default(), vec![]);
    let file_name = path.file_name().unwrap().to_string_lossy();
    let blocker = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(blocker.join("inside")).unwrap();
    let err = Checkpoint::save(&path, &meta, &params, &[]).unwrap_err();
    assert!(err.to_string().contains(&*file_name), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    std::fs::remove_dir_all(dir).unwrap();
}
