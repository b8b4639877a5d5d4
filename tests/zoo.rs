//! The model zoo: every network builds with every posterior, counts match hand computations.

use candle_core::{DType, Device, Tensor};
use whvi::layers::{ParamRole, Pass};
use whvi::params::Params;
use whvi::rng::seeded;
use whvi::train::{named_parameters, trainable};
use whvi::zoo::{plan, BayesPolicy, BuildOptions, Method, ModelSpec, Network};

const CPU: Device = Device::Cpu;
const METHODS: [Method; 4] = [
    Method::Whvi,
    Method::MeanField,
    Method::McDropout,
    Method::Deterministic,
];

fn build(name: &str, options: &BuildOptions) -> (Network, Params) {
    let spec = ModelSpec::lookup(name).unwrap();
    let params = Params::new(0);
    let network = Network::build(&spec, options, params.var_builder(DType::F32, &CPU)).unwrap();
    (network, params)
}

#[test]
fn every_network_builds_for_every_posterior_and_predicts() {
    for spec in ModelSpec::builtin() {
        for method in METHODS {
            let options = BuildOptions {
                method,
                policy: BayesPolicy::All,
                width: 0.125,
                ..BuildOptions::default()
            };
            let (network, params) = build(&spec.name, &options);
            let [c, h, w] = network.input_shape();
            let x = Tensor::ones((2, c, h, w), DType::F32, &CPU).unwrap();
            let mut rng = seeded(1);
            let y = network
                .forward_pass(&x, &mut Pass::train(&mut rng))
                .unwrap();
            assert_eq!(y.dims(), &[2, 10], "{} {method:?}", spec.name);
            let kl = network.kl().unwrap().to_scalar::<f32>().unwrap();
            if method == Method::Whvi || method == Method::MeanField {
                assert!(kl > 0.0, "{} {method:?}: KL {kl}", spec.name);
            } else {
                assert_eq!(kl, 0.0);
            }
            // The analytic count of the plan equals what was built, and every trained
            // parameter is a variable (running BatchNorm statistics are the only extras).
            let planned: usize = network.plan().iter().map(|r| r.params()).sum();
            assert_eq!(planned, network.num_params(), "{} {method:?}", spec.name);
            let vars: usize = params
                .named_vars()
                .iter()
                .filter(|(n, _)| !n.contains("running_"))
                .map(|(_, v)| v.elem_count())
                .sum();
            assert_eq!(vars, network.num_params(), "{} {method:?}", spec.name);
        }
    }
}

/// The role the old name rules gave a variable (the names the layers choose), to show that the
/// roles the layers declare change nothing.
fn role_by_name(name: &str) -> ParamRole {
    let last = name.rsplit('.').next().unwrap();
    match last {
        "s1" | "s2" => ParamRole::Diagonal,
        "mu" | "log_sigma" => ParamRole::Variational,
        "running_mean" | "running_var" => ParamRole::RunningStatistic,
        _ if name.starts_with("bn") => ParamRole::Normalization,
        "bias" => ParamRole::Bias,
        "weight" => ParamRole::Weight,
        _ => panic!("no role for {name}"),
    }
}

#[test]
fn every_variable_has_the_role_its_layer_declares() {
    for spec in ModelSpec::builtin() {
        for method in METHODS {
            let options = BuildOptions {
                method,
                policy: BayesPolicy::All,
                width: 0.125,
                ..BuildOptions::default()
            };
            let (network, params) = build(&spec.name, &options);
            let named = named_parameters(&params, &network.parameters()).unwrap();
            assert_eq!(named.len(), params.named_vars().len());
            for p in &named {
                assert_eq!(p.role, role_by_name(&p.name), "{} {method:?}", p.name);
            }
            let trained: usize = trainable(&named).iter().map(|(_, v)| v.elem_count()).sum();
            assert_eq!(trained, network.num_params(), "{} {method:?}", spec.name);
        }
    }
}

#[test]
fn parameters_of_another_network_are_refused() {
    let options = BuildOptions::default();
    let (lenet, lenet_params) = build("lenet5", &options);
    let (_, vgg_params) = build("vgg11", &options);
    let err = named_parameters(&vgg_params, &lenet.parameters()).unwrap_err();
    assert!(err.to_string().contains("belongs to no layer"), "{err}");
    // A network built from a copy of the parameters holds other tensors.
    let copy = Params::from_tensors(
        lenet_params
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone())),
    )
    .unwrap();
    let err = named_parameters(&copy, &lenet.parameters()).unwrap_err();
    assert!(err.to_string().contains("belongs to no layer"), "{err}");
}

#[test]
fn lenet5_parameter_counts_by_hand() {
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let count = |method, policy| -> usize {
        let options = BuildOptions {
            method,
            policy,
            ..BuildOptions::default()
        };
        plan(&spec, &options)
            .unwrap()
            .iter()
            .map(|r| r.params())
            .sum()
    };
    // conv1 6·1·25+6, conv2 16·6·25+16, fc1 400·120+120, fc2 120·84+84, out 84·10+10.
    let deterministic = 156 + 2416 + 48_120 + 10_164 + 850;
    assert_eq!(count(Method::Whvi, BayesPolicy::None), deterministic);
    // WHVI head: fc1 D=512 (4·512+120), fc2 D=128 (4·128+84), out D=128 (4·128+10).
    assert_eq!(
        count(Method::Whvi, BayesPolicy::Head),
        156 + 2416 + 2168 + 596 + 522
    );
    // Mean-field head doubles the dense weights.
    assert_eq!(
        count(Method::MeanField, BayesPolicy::Head),
        156 + 2416 + 96_120 + 20_244 + 1690
    );
    // 32x32x3 input: conv1 3·25·6+6, the flattened size becomes 16·6·6 = 576.
    let options = BuildOptions {
        method: Method::Deterministic,
        input: Some([3, 32, 32]),
        ..BuildOptions::default()
    };
    let rows = plan(&spec, &options).unwrap();
    let fc1 = rows.iter().find(|r| r.name == "fc1").unwrap();
    assert_eq!(fc1.params(), 576 * 120 + 120);
    let (network, _) = build("lenet5", &options);
    let x = Tensor::zeros((3, 3, 32, 32), DType::F32, &CPU).unwrap();
    assert_eq!(
        network.forward_pass(&x, &mut Pass::mean()).unwrap().dims(),
        &[3, 10]
    );
}

#[test]
fn vgg16_parameter_counts_by_hand() {
    // The 13 convolutions of VGG-16 hold 14,714,688 weights and biases; BatchNorm adds
    // 2·(2·64 + 2·128 + 3·256 + 6·512) = 8,448; the head 2·(512·512+512) + 512·10+10.
    let convs_bn = 14_714_688 + 8_448;
    let deterministic = BuildOptions {
        method: Method::Deterministic,
        policy: BayesPolicy::None,
        ..BuildOptions::default()
    };
    let (network, _) = build("vgg16", &deterministic);
    assert_eq!(network.num_params(), convs_bn + 2 * 262_656 + 5_130);
    // WHVI head: three D = 512 blocks, 4·512 each, plus biases.
    let whvi = BuildOptions::default();
    let (network, _) = build("vgg16", &whvi);
    assert_eq!(
        network.num_params(),
        convs_bn + 2 * (2048 + 512) + 2048 + 10
    );
}

#[test]
fn bad_specs_and_options_give_clear_errors() {
    let err = ModelSpec::lookup("resnet50").unwrap_err().to_string();
    assert!(
        err.contains("unknown model 'resnet50'") && err.contains("vgg16"),
        "{err}"
    );

    let err = ModelSpec::from_toml("name = \"x\"\nsummary = 3\n", "my.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("my.toml") && err.contains("line 2"), "{err}");

    let spec = ModelSpec::lookup("lenet5").unwrap();
    let tiny = BuildOptions {
        input: Some([1, 6, 6]),
        ..BuildOptions::default()
    };
    let err = plan(&spec, &tiny).unwrap_err().to_string();
    assert!(
        err.contains("too small") || err.contains("does not fit"),
        "{err}"
    );

    let bad_override = BuildOptions {
        overrides: vec![("fc9".into(), Method::Whvi)],
        ..BuildOptions::default()
    };
    let err = plan(&spec, &bad_override).unwrap_err().to_string();
    assert!(
        err.contains("'fc9'") && err.contains("conv1, conv2, fc1, fc2, out"),
        "{err}"
    );

    let zero_width = BuildOptions {
        width: 0.0,
        ..BuildOptions::default()
    };
    assert!(plan(&spec, &zero_width)
        .unwrap_err()
        .to_string()
        .contains("width"));
}

#[test]
fn policies_and_overrides_choose_layer_posteriors() {
    let spec = ModelSpec::lookup("vgg11").unwrap();
    let methods = |options: &BuildOptions| -> Vec<(String, Method)> {
        plan(&spec, options)
            .unwrap()
            .into_iter()
            .filter(|r| r.is_weight_layer())
            .map(|r| (r.name, r.method))
            .collect()
    };
    let head = methods(&BuildOptions::default());
    assert!(head
        .iter()
        .all(|(n, m)| (*m == Method::Whvi) != n.starts_with("conv")));
    let last = methods(&BuildOptions {
        policy: BayesPolicy::Last,
        ..BuildOptions::default()
    });
    assert!(last
        .iter()
        .all(|(n, m)| (*m == Method::Whvi) == (n == "out")));
    let custom = methods(&BuildOptions {
        policy: BayesPolicy::None,
        overrides: vec![
            ("conv8".into(), Method::Whvi),
            ("fc1".into(), Method::MeanField),
        ],
        ..BuildOptions::default()
    });
    for (name, method) in custom {
        let expected = match name.as_str() {
            "conv8" => Method::Whvi,
            "fc1" => Method::MeanField,
            _ => Method::Deterministic,
        };
        assert_eq!(method, expected, "{name}");
    }
    // MC dropout puts a dropout layer in front of each of its layers.
    let rows = plan(
        &spec,
        &BuildOptions {
            method: Method::McDropout,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    for layer in ["fc1", "fc2", "out"] {
        let i = names.iter().position(|n| *n == layer).unwrap();
        assert_eq!(names[i - 1], format!("dropout.{layer}"));
    }
}

#[test]
fn cached_features_give_the_same_samples_as_a_full_pass() {
    for (method, policy) in [
        (Method::Whvi, BayesPolicy::Head),
        (Method::McDropout, BayesPolicy::Head),
        (Method::MeanField, BayesPolicy::All),
        (Method::Whvi, BayesPolicy::None),
    ] {
        let options = BuildOptions {
            method,
            policy,
            ..BuildOptions::default()
        };
        let (network, _) = build("lenet5", &options);
        let rows = network.plan();
        let prefix = network.deterministic_prefix();
        let expected = match policy {
            // The first dense layer (fc1), or its dropout, starts the stochastic part.
            BayesPolicy::Head => rows
                .iter()
                .position(|r| r.name.ends_with("fc1"))
                .expect("lenet5 has fc1"),
            BayesPolicy::All => 0,
            _ => rows.len(),
        };
        assert_eq!(prefix, expected, "{method:?} {policy:?}");

        let x = Tensor::rand(0f32, 1f32, (3, 1, 28, 28), &CPU).unwrap();
        let full = network
            .forward_pass(&x, &mut Pass::sample(&mut seeded(5)))
            .unwrap();
        let features = network.prediction_features(&x).unwrap();
        let cached = network
            .forward_from_features(&features, &mut Pass::sample(&mut seeded(5)))
            .unwrap();
        let diff = (full - cached)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{method:?} {policy:?}");
    }
}

#[test]
fn priors_are_set_globally_and_per_layer() {
    use whvi::layers::Prior;
    let kl = |options: BuildOptions| -> f32 {
        let (network, _) = build("lenet5", &options);
        network.kl().unwrap().to_scalar::<f32>().unwrap()
    };
    let with = |overrides: Vec<(&str, Prior)>| BuildOptions {
        prior_overrides: overrides
            .into_iter()
            .map(|(n, p)| (n.to_string(), p))
            .collect(),
        ..BuildOptions::default()
    };
    let default = kl(BuildOptions::default());
    assert_eq!(kl(with(vec![("fc1", Prior::ScaledHeLike(1.0))])), default);
    let wider_fc1 = kl(with(vec![("fc1", Prior::ScaledHeLike(4.0))]));
    let wider_out = kl(with(vec![("out", Prior::ScaledHeLike(4.0))]));
    assert_ne!(wider_fc1, default);
    assert_ne!(wider_fc1, wider_out, "the override reaches only its layer");
    let everywhere = kl(BuildOptions {
        prior: Prior::ScaledHeLike(4.0),
        ..BuildOptions::default()
    });
    let both = kl(with(vec![
        ("fc1", Prior::ScaledHeLike(4.0)),
        ("fc2", Prior::ScaledHeLike(4.0)),
        ("out", Prior::ScaledHeLike(4.0)),
    ]));
    assert_eq!(everywhere, both);

    let spec = ModelSpec::lookup("lenet5").unwrap();
    let error = |options: BuildOptions| plan(&spec, &options).unwrap_err().to_string();
    let err = error(with(vec![("conv1", Prior::Variance(0.1))]));
    assert!(
        err.contains("'conv1'") && err.contains("fc1, fc2, out"),
        "{err}"
    );
    let err = error(BuildOptions {
        prior: Prior::Variance(-1.0),
        ..BuildOptions::default()
    });
    assert!(err.contains("positive"), "{err}");
    assert_eq!(Prior::parse("he").unwrap(), Prior::HeLike);
    assert_eq!(Prior::parse("he*2.5").unwrap(), Prior::ScaledHeLike(2.5));
    assert_eq!(Prior::parse("0.01").unwrap(), Prior::Variance(0.01));
    for bad in ["0", "-1", "nan", "inf", "he*0", "wide"] {
        assert!(Prior::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_initial_sigma_reaches_every_bayesian_layer_and_is_recorded() {
    let sigmas = |options: &BuildOptions| -> Vec<f32> {
        let (network, params) = build("lenet5", options);
        let named = named_parameters(&params, &network.parameters()).unwrap();
        named
            .iter()
            .filter(|p| p.name.ends_with("log_sigma"))
            .map(|p| {
                let values: Vec<f32> = p.var.flatten_all().unwrap().to_vec1().unwrap();
                values[0].exp()
            })
            .collect()
    };
    for (method, policy, layers) in [
        (Method::Whvi, BayesPolicy::Head, 3),
        (Method::MeanField, BayesPolicy::Head, 3),
        (Method::Whvi, BayesPolicy::All, 5),
        (Method::MeanField, BayesPolicy::All, 5),
    ] {
        let narrow = BuildOptions {
            method,
            policy,
            ..BuildOptions::default()
        };
        let wide = BuildOptions {
            initial_sigma: 0.25,
            ..narrow.clone()
        };
        let (a, b) = (sigmas(&narrow), sigmas(&wide));
        // lenet5: two convolutions, then three dense layers.
        assert_eq!(
            (a.len(), b.len()),
            (layers, layers),
            "{method:?} {policy:?}"
        );
        for (a, b) in a.iter().zip(&b) {
            assert!((b / a - 25.0).abs() < 1e-3, "{method:?}: {a} -> {b}");
        }
        let json = serde_json::to_string(&wide).unwrap();
        assert_eq!(serde_json::from_str::<BuildOptions>(&json).unwrap(), wide);
    }
    // Options saved before the setting existed start at the default width.
    let mut old = serde_json::to_value(BuildOptions::default()).unwrap();
    old.as_object_mut()
        .unwrap()
        .remove("initial_sigma")
        .unwrap();
    let old: BuildOptions = serde_json::from_value(old).unwrap();
    assert_eq!(old.initial_sigma, whvi::layers::DEFAULT_INITIAL_SIGMA);
    let spec = ModelSpec::lookup("lenet5").unwrap();
    let err = plan(
        &spec,
        &BuildOptions {
            initial_sigma: 0.0,
            ..BuildOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("initial_sigma 0"), "{err}");
}

#[test]
fn a_network_too_large_for_memory_is_refused_before_any_allocation() {
    let spec = ModelSpec::lookup("vgg11").unwrap();
    let options = BuildOptions {
        width: 1e9,
        ..BuildOptions::default()
    };
    let params = Params::new(0);
    let err = Network::build(&spec, &options, params.var_builder(DType::F32, &CPU))
        .err()
        .expect("a network of 1e9 x vgg11 widths builds")
        .to_string();
    assert!(
        err.contains("parameters") && err.contains("--width"),
        "{err}"
    );
    assert!(
        err.contains("more than 2^64 parameters") && !err.contains(&u64::MAX.to_string()),
        "a saturated count is not printed as a number: {err}"
    );
    assert!(params.named_vars().is_empty(), "nothing was allocated");
}
