//! Published checkpoints: `whvi publish` (weights only, f16, a model card from an eval report),
//! the card as a model-card README, and the checkpoints shipped as `pretrained:NAME`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use whvi::checkpoint::{card, pretrained, publish, CardInput, Checkpoint, CheckpointMeta};
use whvi::eval::{evaluate, EvalConfig};
use whvi::layers::Pass;
use whvi::params::Params;
use whvi::rng::seeded;
use whvi::zoo::{BuildOptions, Method, ModelSpec, Network};

const CPU: Device = Device::Cpu;

/// A fresh, empty scratch folder for one test.
/// It lives under cargo's temporary folder for tests, so what a failed run leaves is replaced
/// by the next run instead of piling up in /tmp.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pretrained-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A WHVI LeNet-5 saved with optimiser and resume state and a recorded data path.
fn trained_lenet(dir: &Path) -> (PathBuf, Network) {
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let options = BuildOptions {
        method: Method::Whvi,
        width: 0.5,
        ..BuildOptions::default()
    };
    let params = Params::new(3);
    let network = Network::build(&spec, &options, params.var_builder(DType::F32, &CPU)).unwrap();
    let classes: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    let mut meta = CheckpointMeta::new(spec, options, classes);
    meta.seed = Some(3);
    meta.epoch = 2;
    meta.training =
        Some(serde_json::json!({"dataset": "fashion-mnist", "data": "/home/me/fmnist"}));
    meta.resume = Some(serde_json::json!({"rng": [1, 2, 3]}));
    let path = dir.join("best.safetensors");
    let state = vec![(
        "adam.m".to_string(),
        Tensor::ones(4, DType::F32, &CPU).unwrap(),
    )];
    Checkpoint::save(&path, &meta, &params, &state).unwrap();
    (path, network)
}

/// The largest absolute difference between two tensors of one shape.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn card_input(report: serde_json::Value) -> CardInput {
    CardInput {
        name: "lenet5-test".into(),
        summary: "a test network".into(),
        training_command: "whvi train --model lenet5".into(),
        evaluation: "nothing real".into(),
        report,
    }
}

fn report() -> serde_json::Value {
    serde_json::json!([{"accuracy": 0.8812, "nll": 0.33, "ece15": 0.0123, "corrupted_ece15": 0.2,
                        "ood_auroc_entropy": 0.91, "checkpoint": "x"}])
}

#[test]
fn publish_keeps_weights_only_in_f16_with_a_card_from_the_report() {
    let dir = temp_dir("publish");
    let (source, original) = trained_lenet(&dir);
    let out = dir.join("lenet5-test.safetensors");
    let made = publish(&source, &out, card_input(report()), DType::F16, false).unwrap();
    let read = Checkpoint::read(&out, &CPU).unwrap();
    assert!(read.optimizer.is_empty());
    assert!(read.meta.resume.is_none());
    assert!(read.weights.values().all(|t| t.dtype() == DType::F16));
    // The publisher's data path is dropped; the data set stays.
    let training = read.meta.training.as_ref().unwrap();
    assert!(training["data"].is_null());
    assert_eq!(training["dataset"], "fashion-mnist");
    let card = read.meta.card.clone().unwrap();
    assert_eq!(card, made);
    assert_eq!(card.metrics["accuracy"], 0.8812);
    assert_eq!(card.metrics["corrupted_ece15"], 0.2);
    assert!(!card.metrics.contains_key("brier"));
    assert_eq!(card.dataset, "fashion-mnist");
    assert_eq!(card.weights_dtype, "f16");
    let stored: usize = read.weights.values().map(Tensor::elem_count).sum();
    assert_eq!(card.parameters, stored);
    // Loaded in f32, the f16 network predicts what the f32 one does, to f16 precision.
    let loaded = Checkpoint::load(&out, &CPU).unwrap();
    let x =
        whvi::layers::standard_normal((3, 1, 28, 28), DType::F32, &CPU, &mut seeded(9)).unwrap();
    let a = original.forward_pass(&x, &mut Pass::mean()).unwrap();
    let b = loaded.network.forward_pass(&x, &mut Pass::mean()).unwrap();
    let diff: f32 = max_abs_diff(&a, &b);
    assert!(diff > 0.0 && diff < 2e-2, "f16 against f32 logits: {diff}");
    // An existing output is kept without --force.
    let again = publish(&source, &out, card_input(report()), DType::F16, false);
    assert!(again.unwrap_err().to_string().contains("--force"));
}

#[test]
fn publish_refuses_a_report_that_is_not_one_evaluation() {
    let dir = temp_dir("bad-report");
    let (source, _) = trained_lenet(&dir);
    let out = dir.join("x.safetensors");
    let two = serde_json::json!([{"accuracy": 0.5}, {"accuracy": 0.6}]);
    let err = publish(&source, &out, card_input(two), DType::F16, false).unwrap_err();
    assert!(err.to_string().contains("2 evaluations"), "{err}");
    let none = serde_json::json!({"nll": 0.5});
    let err = publish(&source, &out, card_input(none), DType::F16, false).unwrap_err();
    assert!(err.to_string().contains("accuracy"), "{err}");
    let bad_name = CardInput {
        name: "a b/c".into(),
        ..card_input(report())
    };
    let err = publish(&source, &out, bad_name, DType::F16, false).unwrap_err();
    assert!(err.to_string().contains("a b/c"), "{err}");
    assert!(!out.exists());
}

#[test]
fn card_is_written_as_a_hub_model_card_readme() {
    let dir = temp_dir("card");
    let (source, _) = trained_lenet(&dir);
    // A checkpoint without a card says how to make one.
    let err = card::write_readme(&source, None, false).unwrap_err();
    assert!(err.to_string().contains("whvi publish"), "{err}");
    let out = dir.join("lenet5-test.safetensors");
    publish(&source, &out, card_input(report()), DType::F16, false).unwrap();
    let readme = card::write_readme(&out, None, false).unwrap();
    assert_eq!(readme, dir.join("README.md"));
    let text = std::fs::read_to_string(&readme).unwrap();
    let front = text
        .strip_prefix("---\n")
        .unwrap()
        .split("\n---\n")
        .next()
        .unwrap();
    for line in [
        "library_name: whvi",
        "datasets:\n- fashion-mnist",
        "- accuracy",
        "- ece15",
        "- whvi",
    ] {
        assert!(
            front.contains(line),
            "front matter lacks {line:?}:\n{front}"
        );
    }
    assert!(text.contains("| accuracy | 0.8812 |"), "{text}");
    assert!(text.contains("whvi eval pretrained:lenet5-test"));
    assert!(!text.contains("tempered"), "{text}");
    // A run with a KL weight other than 1 says that its posterior is tempered.
    let mut meta = Checkpoint::read_meta(&out).unwrap();
    let card = meta.card.clone().unwrap();
    meta.training.as_mut().unwrap()["kl_weight"] = serde_json::json!(0.1);
    let tempered = card.to_markdown(&meta);
    assert!(
        tempered.contains("A tempered posterior: the KL term was weighted by beta = 0.1"),
        "{tempered}"
    );
    meta.training.as_mut().unwrap()["kl_weight"] = serde_json::json!(1.0);
    assert!(!card.to_markdown(&meta).contains("tempered"));
    let err = card::write_readme(&out, None, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(card::write_readme(&out, None, true).is_ok());
}

#[test]
fn every_shipped_checkpoint_loads_by_name_with_its_card() {
    let names: Vec<&str> = pretrained::names().collect();
    assert!(names.contains(&"vgg11-x0.25-whvi-cifar10"), "{names:?}");
    for name in names {
        let model = Checkpoint::pretrained(name, &CPU).unwrap();
        let card = model.meta.card.as_ref().unwrap();
        assert_eq!(card.name, name);
        assert!(card.metrics["accuracy"] > 0.5, "{name}: {:?}", card.metrics);
        assert!(model.optimizer.is_empty());
        let path = format!("{}{name}", pretrained::PREFIX);
        assert!(whvi::checkpoint::describe(&path).unwrap().contains("card "));
    }
    let listing = pretrained::listing().unwrap();
    assert!(listing.contains("vgg11-x0.25-whvi-cifar10"), "{listing}");
    let err = Checkpoint::pretrained("vgg12", &CPU).err().unwrap();
    assert!(
        err.to_string().contains("vgg11-x0.25-whvi-cifar10"),
        "{err}"
    );
}

#[test]
fn a_shipped_cifar10_checkpoint_evaluates_on_the_embedded_sample_without_data() {
    let config = EvalConfig {
        samples: 2,
        batch_size: 50,
        seed: 1,
        limit: Some(100),
        corruption_images: 1,
        temperature_scaling: false,
        ..EvalConfig::new(vec![PathBuf::from("pretrained:vgg11-x0.25-whvi-cifar10")])
    };
    let report = evaluate(&config, &CPU, &mut |_| {}).unwrap().remove(0);
    // A trained network on real CIFAR-10 images: far above the 10% of chance.
    assert_eq!(report.metrics.n, 100);
    assert!(report.metrics.accuracy > 0.5, "{}", report.metrics.accuracy);
}

/// The exported network run by plain candle ops, as PyTorch would run it from the JSON.
fn run_export(
    tensors: &std::collections::HashMap<String, Tensor>,
    arch: &serde_json::Value,
    x: &Tensor,
) -> Tensor {
    let mut x = x.clone();
    for section in ["features", "classifier"] {
        if section == "classifier" {
            x = x.flatten_from(1).unwrap();
        }
        for (i, layer) in arch[section].as_array().unwrap().iter().enumerate() {
            let t = |name: &str| tensors[&format!("{section}.{i}.{name}")].clone();
            let n = |key: &str| layer[key].as_u64().unwrap() as usize;
            x = match layer["type"].as_str().unwrap() {
                "conv2d" => x
                    .conv2d(&t("weight"), n("padding"), n("stride"), 1, 1)
                    .unwrap()
                    .broadcast_add(&t("bias").reshape((1, (), 1, 1)).unwrap())
                    .unwrap(),
                "linear" => x
                    .matmul(&t("weight").t().unwrap())
                    .unwrap()
                    .broadcast_add(&t("bias"))
                    .unwrap(),
                "batch_norm2d" => {
                    let c = |name: &str| t(name).reshape((1, (), 1, 1)).unwrap();
                    let scale = (c("running_var") + 1e-5).unwrap().sqrt().unwrap();
                    x.broadcast_sub(&c("running_mean"))
                        .unwrap()
                        .broadcast_div(&scale)
                        .unwrap()
                        .broadcast_mul(&c("weight"))
                        .unwrap()
                        .broadcast_add(&c("bias"))
                        .unwrap()
                }
                "relu" => x.relu().unwrap(),
                "max_pool2d" => x.max_pool2d(2).unwrap(),
                "dropout" => x,
                other => panic!("unknown layer type {other}"),
            };
        }
    }
    x
}

#[test]
fn export_writes_the_mean_network_with_pytorch_names() {
    let dir = temp_dir("export");
    for method in [Method::Whvi, Method::McDropout, Method::MeanField] {
        let spec = ModelSpec::lookup("vgg11").unwrap();
        let options = BuildOptions {
            method,
            width: 0.125,
            ..BuildOptions::default()
        };
        let params = Params::new(5);
        let network =
            Network::build(&spec, &options, params.var_builder(DType::F32, &CPU)).unwrap();
        let meta = CheckpointMeta::new(spec, options, (0..10).map(|i| i.to_string()).collect());
        let source = dir.join(format!("{}.safetensors", method.name()));
        Checkpoint::save(&source, &meta, &params, &[]).unwrap();
        let out = dir.join(format!("{}-mean.safetensors", method.name()));
        let sidecar = whvi::checkpoint::export::export_mean(&source, &out, false).unwrap();
        let tensors = candle_core::safetensors::load(&out, &CPU).unwrap();
        let arch: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
        assert_eq!(arch["features"][0]["type"], "conv2d");
        assert_eq!(tensors["features.0.weight"].dims(), &[8, 3, 3, 3]);
        assert!(tensors.contains_key("features.1.running_var"));
        assert!(tensors
            .keys()
            .any(|k| k.starts_with("classifier.") && k.ends_with(".weight")));
        let x = whvi::layers::standard_normal((2, 3, 32, 32), DType::F32, &CPU, &mut seeded(4))
            .unwrap();
        let want = network.forward_pass(&x, &mut Pass::mean()).unwrap();
        let got = run_export(&tensors, &arch, &x);
        let diff: f32 = max_abs_diff(&want, &got);
        let size: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(
            diff <= 1e-4 * size.max(1.0),
            "{method:?}: logits differ by {diff} (size {size})"
        );
        // The deterministic convolutions come out as they are stored.
        let stored = params.named_vars();
        let conv = &stored
            .iter()
            .find(|(n, _)| n.ends_with("weight") && n.starts_with("conv1"))
            .unwrap()
            .1;
        let exported = &tensors["features.0.weight"];
        let gap: f32 = max_abs_diff(conv.as_tensor(), exported);
        assert!(gap < 1e-6, "{method:?}: conv1 weight off by {gap}");
    }
    let again = whvi::checkpoint::export::export_mean(
        &dir.join("whvi.safetensors"),
        &dir.join("whvi-mean.safetensors"),
        false,
    );
    assert!(again.unwrap_err().to_string().contains("--force"));
}

#[test]
fn exported_whvi_weight_is_s1_h_diag_mu_h_s2() {
    let dir = temp_dir("export-formula");
    let spec = ModelSpec::lookup("vgg11").unwrap();
    let options = BuildOptions {
        method: Method::Whvi,
        width: 0.125,
        ..BuildOptions::default()
    };
    let params = Params::new(8);
    let network = Network::build(&spec, &options, params.var_builder(DType::F32, &CPU)).unwrap();
    let meta = CheckpointMeta::new(spec, options, (0..10).map(|i| i.to_string()).collect());
    let source = dir.join("whvi.safetensors");
    Checkpoint::save(&source, &meta, &params, &[]).unwrap();
    let out = dir.join("mean.safetensors");
    whvi::checkpoint::export::export_mean(&source, &out, false).unwrap();
    let exported = candle_core::safetensors::load(&out, &CPU).unwrap();
    // The head's first dense layer is classifier.0 (no dropout in a WHVI head).
    let row = network
        .plan()
        .iter()
        .find(|r| matches!(r.kind, whvi::zoo::LayerKind::Dense { .. }))
        .unwrap();
    let whvi::zoo::LayerKind::Dense { d_in, d_out } = row.kind else {
        unreachable!()
    };
    let vars: std::collections::HashMap<String, Vec<Vec<f32>>> = params
        .named_vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with(&format!("{}.", row.name)) && !n.ends_with("bias"))
        .map(|(n, v)| {
            (
                n.rsplit('.').next().unwrap().to_string(),
                v.as_tensor().to_vec2().unwrap(),
            )
        })
        .collect();
    let d = d_in.next_power_of_two();
    // Unnormalised Hadamard entries: (-1)^popcount(i & j).
    let h = |i: usize, j: usize| {
        if (i & j).count_ones().is_multiple_of(2) {
            1.0f64
        } else {
            -1.0
        }
    };
    let weight = exported["classifier.0.weight"].to_vec2::<f32>().unwrap();
    assert_eq!((weight.len(), weight[0].len()), (d_out, d_in));
    let mut worst = 0f64;
    for (r, got_row) in weight.iter().enumerate() {
        let (b, i) = (r / d, r % d);
        for (j, &got) in got_row.iter().enumerate() {
            let middle: f64 = (0..d)
                .map(|k| h(i, k) * vars["mu"][b][k] as f64 * h(k, j))
                .sum();
            let want = vars["s1"][b][i] as f64 * middle * vars["s2"][b][j] as f64;
            worst = worst.max((want - got as f64).abs() / (1e-3 + want.abs()));
        }
    }
    assert!(
        worst < 1e-4,
        "exported WHVI weight off S1 H diag(mu) H S2 by {worst} (relative)"
    );
}
