//! Behaviour of the WHVI layers against explicit matrices and closed forms.

use candle_core::{DType, Device, Module, Tensor, Var};
use rand::Rng;
use rand_distr::StandardNormal;
use whvi::layers::{
    standard_normal, Activation, BayesianModule, ConvSampling, Flatten, MaxPool2d, MeanFieldConv2d,
    MeanFieldConv2dConfig, MeanFieldConvMode, MeanFieldLinear, Pass, PosteriorConfig, Prior,
    Sequential, WhviBlocks, WhviConv2d, WhviConv2dConfig, WhviLinear, WhviLinearConfig,
};
use whvi::params::Params;
use whvi::rng::seeded;

const CPU: Device = Device::Cpu;

fn hadamard(d: usize) -> Vec<Vec<f64>> {
    (0..d)
        .map(|i| {
            (0..d)
                .map(|j| {
                    if (i & j).count_ones() % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect()
        })
        .collect()
}

fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

fn var(params: &Params, name: &str) -> Var {
    params
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no variable {name}"))
        .1
}

/// W = S1 H diag(g) H S2 per block, stacked and truncated, computed with dense loops in f64.
fn explicit_w(blocks: &WhviBlocks, g: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (s1, s2, _, _) = blocks.parameters();
    let (s1, s2) = (to_rows(s1), to_rows(s2));
    let d = blocks.block_size();
    let h = hadamard(d);
    (0..blocks.d_out())
        .map(|r| {
            let (b, i) = (r / d, r % d);
            (0..blocks.d_in())
                .map(|j| {
                    let m: f64 = (0..d).map(|k| h[i][k] * g[b][k] * h[k][j]).sum();
                    s1[b][i] * m * s2[b][j]
                })
                .collect()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn random_tensor(shape: &[usize], seed: u64) -> Tensor {
    standard_normal(shape, DType::F64, &CPU, &mut seeded(seed)).unwrap()
}

const SHAPES: [(usize, usize); 6] = [(8, 8), (8, 20), (16, 5), (13, 7), (5, 37), (64, 64)];

#[test]
fn fwht_path_equals_explicit_matrix_forward_and_gradients() {
    for (d_in, d_out) in SHAPES {
        let params = Params::new(3);
        let vb = params.var_builder(DType::F64, &CPU);
        let blocks = WhviBlocks::new(d_in, d_out, PosteriorConfig::default(), vb).unwrap();
        // Widen sigma so that the noise path matters for the gradients.
        var(&params, "log_sigma")
            .set(&(blocks.parameters().3.ones_like().unwrap() * -1.0).unwrap())
            .unwrap();
        let (nb, d) = (blocks.num_blocks(), blocks.block_size());
        let eps = random_tensor(&[1, nb, d], 11);
        let (_, _, mu, log_sigma) = blocks.parameters();
        let g = (mu.unsqueeze(0).unwrap() + eps.broadcast_mul(&log_sigma.exp().unwrap()).unwrap())
            .unwrap();

        let x = random_tensor(&[4, d_in], 5);
        let readout = random_tensor(&[4, d_out], 6);
        let y_fast = blocks.apply(&x, &g).unwrap();
        let h_rows = blocks.hadamard_rows(&CPU).unwrap();
        let w = blocks.matrices(&g, &h_rows).unwrap().squeeze(0).unwrap();
        let y_matrix = x.matmul(&w.t().unwrap()).unwrap();

        // The explicit matrix itself, from dense loops.
        let w_loops = explicit_w(&blocks, &to_rows(&g.squeeze(0).unwrap()));
        assert!(
            max_abs_diff(&to_rows(&w), &w_loops) < 1e-10,
            "{d_in}x{d_out}: W"
        );
        assert!(
            max_abs_diff(&to_rows(&y_fast), &to_rows(&y_matrix)) < 1e-10,
            "{d_in}x{d_out}: forward"
        );

        let grads_fast = (y_fast * &readout)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads_matrix = (y_matrix * &readout)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for name in ["s1", "s2", "mu", "log_sigma"] {
            let v = var(&params, name);
            let a = to_rows(grads_fast.get(v.as_tensor()).unwrap());
            let b = to_rows(grads_matrix.get(v.as_tensor()).unwrap());
            let scale = b.iter().flatten().map(|v| v.abs()).fold(1.0, f64::max);
            assert!(
                max_abs_diff(&a, &b) < 1e-10 * scale,
                "{d_in}x{d_out}: grad {name}"
            );
        }
    }
}

#[test]
fn fused_noise_path_equals_composed_ops_forward_and_gradients() {
    for dtype in [DType::F32, DType::F64] {
        for (d_in, d_out) in SHAPES {
            let params = Params::new(4);
            let vb = params.var_builder(dtype, &CPU);
            let blocks = WhviBlocks::new(d_in, d_out, PosteriorConfig::default(), vb).unwrap();
            var(&params, "log_sigma")
                .set(&(blocks.parameters().3.ones_like().unwrap() * -1.0).unwrap())
                .unwrap();
            let (nb, d) = (blocks.num_blocks(), blocks.block_size());
            let rows = 5;
            // Per-row noise (training) and one shared row (the mean pass uses zeros).
            for eps_rows in [rows, 1] {
                let eps = random_tensor(&[eps_rows, nb, d], 21)
                    .to_dtype(dtype)
                    .unwrap();
                let (_, _, mu, log_sigma) = blocks.parameters();
                let g = eps
                    .broadcast_mul(&log_sigma.exp().unwrap())
                    .unwrap()
                    .broadcast_add(mu)
                    .unwrap();
                let x = Var::from_tensor(&random_tensor(&[rows, d_in], 7).to_dtype(dtype).unwrap())
                    .unwrap();
                let readout = random_tensor(&[rows, d_out], 8).to_dtype(dtype).unwrap();
                let bias = random_tensor(&[d_out], 9).to_dtype(dtype).unwrap();
                let bias = Var::from_tensor(&bias).unwrap();
                let y_fused = blocks
                    .apply_with_noise(x.as_tensor(), &eps, Some(bias.as_tensor()))
                    .unwrap();
                let y_ops = blocks
                    .apply(x.as_tensor(), &g)
                    .unwrap()
                    .broadcast_add(bias.as_tensor())
                    .unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                let label = format!("{dtype:?} {d_in}x{d_out} eps rows {eps_rows}");
                // Without a bias the fused op adds a zero row and gives a contiguous output.
                let no_bias = blocks.apply_with_noise(x.as_tensor(), &eps, None).unwrap();
                assert!(
                    no_bias.is_contiguous(),
                    "{label}: contiguous without a bias"
                );
                let plain = blocks.apply(x.as_tensor(), &g).unwrap();
                let scale = to_rows(&plain)
                    .iter()
                    .flatten()
                    .map(|v| v.abs())
                    .fold(1.0, f64::max);
                assert!(
                    max_abs_diff(&to_rows(&no_bias), &to_rows(&plain)) < tol * scale,
                    "{label}: forward without a bias"
                );
                let (a, b) = (to_rows(&y_fused), to_rows(&y_ops));
                let scale = b.iter().flatten().map(|v| v.abs()).fold(1.0, f64::max);
                assert!(max_abs_diff(&a, &b) < tol * scale, "{label}: forward");

                let loss = |y: Tensor| (y * &readout).unwrap().sum_all().unwrap();
                let g_fused = loss(y_fused).backward().unwrap();
                let g_ops = loss(y_ops).backward().unwrap();
                let mut vars: Vec<(&str, Var)> = ["s1", "s2", "mu", "log_sigma"]
                    .into_iter()
                    .map(|n| (n, var(&params, n)))
                    .collect();
                vars.push(("x", x.clone()));
                vars.push(("bias", bias.clone()));
                // One row holding every element, so any gradient shape compares as a matrix.
                let as_row = |grads: &candle_core::backprop::GradStore, v: &Var| {
                    let g = grads.get(v.as_tensor()).unwrap();
                    to_rows(&g.flatten_all().unwrap().unsqueeze(0).unwrap())
                };
                for (name, v) in &vars {
                    let (a, b) = (as_row(&g_fused, v), as_row(&g_ops, v));
                    let scale = b.iter().flatten().map(|v| v.abs()).fold(1.0, f64::max);
                    assert!(max_abs_diff(&a, &b) < tol * scale, "{label}: grad {name}");
                }
            }
        }
    }
}

#[test]
fn linear_output_mean_and_covariance_match_closed_form() {
    let (d_in, d_out, samples) = (6, 5, 40_000);
    let params = Params::new(9);
    let vb = params.var_builder(DType::F64, &CPU);
    let layer = WhviLinear::new(d_in, d_out, WhviLinearConfig::default(), vb).unwrap();
    let blocks = layer.blocks();
    let d = blocks.block_size();
    let log_sigma = var(&params, "log_sigma");
    let sigma_values = random_tensor(&[1, d], 2).affine(0.3, -1.5).unwrap();
    log_sigma.set(&sigma_values).unwrap();

    let x_row = random_tensor(&[1, d_in], 4);
    let x = x_row
        .broadcast_as((samples, d_in))
        .unwrap()
        .contiguous()
        .unwrap();
    let mut rng = seeded(1);
    let y = to_rows(&layer.forward_pass(&x, &mut Pass::sample(&mut rng)).unwrap());

    // Closed form: y = b + S1 H diag(u) g with u = H S2 x (one block here).
    let (s1, s2, mu, ls) = blocks.parameters();
    let (s1, s2, mu, ls) = (to_rows(s1), to_rows(s2), to_rows(mu), to_rows(ls));
    let h = hadamard(d);
    let xv = &to_rows(&x_row)[0];
    let u: Vec<f64> = (0..d)
        .map(|k| (0..d_in).map(|j| h[k][j] * s2[0][j] * xv[j]).sum())
        .collect();
    let a = |i: usize, k: usize| s1[0][i] * h[i][k] * u[k];
    let sigma2: Vec<f64> = ls[0].iter().map(|l| (2.0 * l).exp()).collect();
    for i in 0..d_out {
        let mean_i: f64 = (0..d).map(|k| a(i, k) * mu[0][k]).sum();
        let var_i: f64 = (0..d).map(|k| a(i, k).powi(2) * sigma2[k]).sum();
        let emp_mean = y.iter().map(|r| r[i]).sum::<f64>() / samples as f64;
        let se = (var_i / samples as f64).sqrt();
        assert!(
            (emp_mean - mean_i).abs() < 5.0 * se,
            "mean {i}: {emp_mean} vs {mean_i}"
        );
        for j in 0..d_out {
            let cov_ij: f64 = (0..d).map(|k| a(i, k) * a(j, k) * sigma2[k]).sum();
            let mean_j: f64 = (0..d).map(|k| a(j, k) * mu[0][k]).sum();
            let emp: f64 = y
                .iter()
                .map(|r| (r[i] - mean_i) * (r[j] - mean_j))
                .sum::<f64>()
                / samples as f64;
            let var_j: f64 = (0..d).map(|k| a(j, k).powi(2) * sigma2[k]).sum();
            // Std error of a sample covariance: sqrt((var_i var_j + cov_ij^2) / n).
            let se = ((var_i * var_j + cov_ij * cov_ij) / samples as f64).sqrt();
            assert!(
                (emp - cov_ij).abs() < 5.0 * se,
                "cov {i},{j}: {emp} vs {cov_ij}"
            );
        }
    }
}

#[test]
fn kl_matches_closed_form_and_monte_carlo() {
    let params = Params::new(4);
    let vb = params.var_builder(DType::F64, &CPU);
    let blocks = WhviBlocks::new(
        7,
        12,
        PosteriorConfig {
            prior: Prior::Variance(0.05),
            ..PosteriorConfig::default()
        },
        vb,
    )
    .unwrap();
    var(&params, "log_sigma")
        .set(&random_tensor(&[2, 8], 8).affine(0.2, -1.0).unwrap())
        .unwrap();
    var(&params, "mu")
        .set(&random_tensor(&[2, 8], 9).affine(0.2, 0.0).unwrap())
        .unwrap();
    let kl = blocks.kl().unwrap().to_scalar::<f64>().unwrap();

    let (_, _, mu, ls) = blocks.parameters();
    let (mu, ls) = (to_rows(mu), to_rows(ls));
    let lambda: f64 = 0.05;
    let closed: f64 = mu
        .iter()
        .flatten()
        .zip(ls.iter().flatten())
        .map(|(m, l)| {
            let s2 = (2.0 * l).exp();
            0.5 * (lambda.ln() - s2.ln() + (m * m + s2) / lambda - 1.0)
        })
        .sum();
    assert!(
        (kl - closed).abs() < 1e-10 * closed.abs(),
        "{kl} vs {closed}"
    );

    // Monte Carlo: E_q[log q(g) - log p(g)].
    let mut rng = seeded(5);
    let n = 20_000;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = 0.0;
        for (m, l) in mu.iter().flatten().zip(ls.iter().flatten()) {
            let sigma = l.exp();
            let e: f64 = rng.sample(StandardNormal);
            let g = m + sigma * e;
            let log_q = -0.5 * e * e - l;
            let log_p = -0.5 * g * g / lambda - 0.5 * lambda.ln();
            s += log_q - log_p;
        }
        values.push(s);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    assert!(
        (mean - kl).abs() < 5.0 * sd / (n as f64).sqrt(),
        "MC {mean} vs {kl}"
    );
}

#[test]
fn per_example_noise_and_seed_reproducibility() {
    let params = Params::new(0);
    let vb = params.var_builder(DType::F32, &CPU);
    let layer = WhviLinear::new(10, 6, WhviLinearConfig::default(), vb).unwrap();
    let x = Tensor::ones((2, 10), DType::F32, &CPU).unwrap();
    let run = |seed| {
        let mut rng = seeded(seed);
        layer
            .forward_pass(&x, &mut Pass::sample(&mut rng))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let a = run(1);
    assert_ne!(a[0], a[1], "identical inputs must get independent samples");
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    let mean_a = layer.forward_pass(&x, &mut Pass::mean()).unwrap();
    let mean_b = Module::forward(&layer, &x).unwrap();
    assert_eq!(
        mean_a.to_vec2::<f32>().unwrap(),
        mean_b.to_vec2::<f32>().unwrap()
    );
    let rows = mean_a.to_vec2::<f32>().unwrap();
    assert_eq!(rows[0], rows[1], "the mean pass is deterministic");
}

#[test]
fn initial_mean_matrix_has_he_scale() {
    for (d_in, d_out) in [(300, 256), (512, 512), (100, 1000)] {
        let params = Params::new(d_in as u64);
        let blocks = WhviBlocks::new(
            d_in,
            d_out,
            PosteriorConfig::default(),
            params.var_builder(DType::F64, &CPU),
        )
        .unwrap();
        let w = blocks.mean_matrix().unwrap();
        let values: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let target = (2.0 / d_in as f64).sqrt();
        assert!(
            (std / target - 1.0).abs() < 0.2,
            "{d_in}x{d_out}: std {std} vs {target}"
        );
    }
}

#[test]
fn deep_whvi_mlp_keeps_activation_scale_at_init() {
    let params = Params::new(1);
    let vb = params.var_builder(DType::F32, &CPU);
    let width = 256;
    let layers: Vec<WhviLinear> = (0..10)
        .map(|i| {
            WhviLinear::new(
                width,
                width,
                WhviLinearConfig::default(),
                vb.pp(format!("l{i}")),
            )
            .unwrap()
        })
        .collect();
    let x = standard_normal((64, width), DType::F32, &CPU, &mut seeded(2)).unwrap();
    let rms = |t: &Tensor| -> f32 {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let input_rms = rms(&x);
    let mut rng = seeded(3);
    let mut h = x;
    for (i, layer) in layers.iter().enumerate() {
        h = layer.forward_pass(&h, &mut Pass::sample(&mut rng)).unwrap();
        let ratio = rms(&h) / input_rms;
        assert!((0.1..10.0).contains(&ratio), "layer {i}: rms ratio {ratio}");
        h = h.relu().unwrap();
    }
}

#[test]
fn conv_filters_match_explicit_matrix_and_per_example_conv_matches_loop() {
    let params = Params::new(6);
    let vb = params.var_builder(DType::F64, &CPU);
    // C_in·k·k = 27 -> D = 32; C_out = 40 -> two blocks.
    let conv = WhviConv2d::new(
        3,
        40,
        3,
        WhviConv2dConfig {
            padding: 1,
            sampling: ConvSampling::PerExample,
            ..Default::default()
        },
        vb.pp("c"),
    )
    .unwrap();
    let blocks = conv.blocks();
    let g = random_tensor(&[1, blocks.num_blocks(), blocks.block_size()], 3);
    let filters = conv.filters(&g).unwrap();
    let w_loops = explicit_w(blocks, &to_rows(&g.squeeze(0).unwrap()));
    let w = to_rows(&filters.reshape((40, 27)).unwrap());
    assert!(max_abs_diff(&w, &w_loops) < 1e-10);

    // Per-example sampling: each example's output equals a conv with its own filters.
    let x = random_tensor(&[3, 3, 6, 5], 4);
    let mut rng = seeded(8);
    let y = conv.forward_pass(&x, &mut Pass::sample(&mut rng)).unwrap();
    let mut rng = seeded(8);
    let g_all = blocks.sample_g(3, &mut rng).unwrap();
    let bias = params
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "c.bias")
        .unwrap()
        .1;
    for b in 0..3 {
        let f = conv
            .filters(&g_all.narrow(0, b, 1).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let expected = x
            .narrow(0, b, 1)
            .unwrap()
            .conv2d(&f, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, 40, 1, 1)).unwrap())
            .unwrap();
        let got = y.narrow(0, b, 1).unwrap();
        let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-10, "example {b}");
    }
    // Independent noise per example: identical inputs differ.
    let same = x.narrow(0, 0, 1).unwrap().repeat((2, 1, 1, 1)).unwrap();
    let y = conv
        .forward_pass(&same, &mut Pass::sample(&mut rng))
        .unwrap();
    let d = (y.narrow(0, 0, 1).unwrap() - y.narrow(0, 1, 1).unwrap()).unwrap();
    assert!(
        d.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 1e-6
    );
}

#[test]
fn shared_conv_sample_uses_one_filter_bank_for_the_batch() {
    let params = Params::new(7);
    let conv = WhviConv2d::new(
        2,
        4,
        3,
        WhviConv2dConfig {
            stride: 2,
            ..Default::default()
        },
        params.var_builder(DType::F32, &CPU),
    )
    .unwrap();
    let x = standard_normal((1, 2, 7, 7), DType::F32, &CPU, &mut seeded(1))
        .unwrap()
        .repeat((3, 1, 1, 1))
        .unwrap();
    let y = conv
        .forward_pass(&x, &mut Pass::sample(&mut seeded(2)))
        .unwrap();
    assert_eq!(y.dims(), &[3, 4, 3, 3]);
    let rows = y.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(rows[0], rows[1]);
    assert_eq!(rows[1], rows[2]);
}

#[test]
fn parameter_counts() {
    let params = Params::new(0);
    let vb = params.var_builder(DType::F32, &CPU);
    let whvi = WhviLinear::new(300, 700, WhviLinearConfig::default(), vb.pp("a")).unwrap();
    // D = 512, ceil(700 / 512) = 2 blocks: 4·512·2 + 700 bias.
    assert_eq!(whvi.num_params(), 4 * 512 * 2 + 700);
    let conv = WhviConv2d::new(
        64,
        128,
        3,
        WhviConv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("b"),
    )
    .unwrap();
    // 64·9 = 576 -> D = 1024, one block.
    assert_eq!(conv.num_params(), 4 * 1024 + 128);
    let mf = MeanFieldLinear::new(300, 700, PosteriorConfig::default(), vb.pp("c")).unwrap();
    assert_eq!(mf.num_params(), 2 * 300 * 700 + 700);
    let mfc = MeanFieldConv2d::new(
        3,
        8,
        5,
        MeanFieldConv2dConfig {
            padding: 2,
            ..Default::default()
        },
        vb.pp("d"),
    )
    .unwrap();
    assert_eq!(mfc.num_params(), 2 * 8 * 3 * 25 + 8);
    let total: usize = params
        .named_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(
        total,
        whvi.num_params() + conv.num_params() + mf.num_params() + mfc.num_params()
    );
}

/// Two Gaussian blobs in 2-D, labels 0/1.
fn blobs(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = seeded(seed);
    let mut xs = Vec::with_capacity(2 * n);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let centre = if label == 0 { -1.0 } else { 1.0 };
        for _ in 0..2 {
            xs.push(centre + 0.5 * rng.sample::<f32, _>(StandardNormal));
        }
        ys.push(label);
    }
    (
        Tensor::from_vec(xs, (n, 2), &CPU).unwrap(),
        Tensor::from_vec(ys, n, &CPU).unwrap(),
    )
}

fn train(
    model: &Sequential,
    params: &Params,
    x: &Tensor,
    y: &Tensor,
    steps: usize,
    lr: f64,
) -> (f32, f32) {
    use candle_nn::Optimizer;
    let vars: Vec<Var> = params.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let n = x.dim(0).unwrap();
    let mut rng = seeded(42);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..steps {
        let logits = model.forward_pass(x, &mut Pass::train(&mut rng)).unwrap();
        let kl = model.kl().unwrap().unwrap();
        let loss = whvi::loss::elbo_loss(&logits, y, &kl, n, 1.0).unwrap();
        let nll = candle_nn::loss::cross_entropy(&logits, y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        first.get_or_insert(nll);
        last = nll;
        opt.backward_step(&loss).unwrap();
    }
    (first.unwrap(), last)
}

fn predictive_logit_variance(model: &Sequential, x: &Tensor, samples: usize) -> f32 {
    let mut rng = seeded(99);
    let outs: Vec<Tensor> = (0..samples)
        .map(|_| model.forward_pass(x, &mut Pass::sample(&mut rng)).unwrap())
        .collect();
    let stacked = Tensor::stack(&outs, 0).unwrap();
    let mean = stacked.mean_keepdim(0).unwrap();
    stacked
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn whvi_mlp_fits_blobs_and_is_less_certain_far_from_data() {
    let params = Params::new(10);
    let vb = params.var_builder(DType::F32, &CPU);
    let model = Sequential::new()
        .with(WhviLinear::new(2, 32, WhviLinearConfig::default(), vb.pp("l0")).unwrap())
        .with(Activation::Relu)
        .with(WhviLinear::new(32, 32, WhviLinearConfig::default(), vb.pp("l1")).unwrap())
        .with(Activation::Relu)
        .with(WhviLinear::new(32, 2, WhviLinearConfig::default(), vb.pp("l2")).unwrap());
    let (x, y) = blobs(256, 1);
    let (first, last) = train(&model, &params, &x, &y, 300, 1e-2);
    assert!(last < first / 4.0, "NLL {first} -> {last}");

    let far = Tensor::new(&[[8f32, -8.0], [-9.0, -7.0], [10.0, 6.0]], &CPU).unwrap();
    let near = x.narrow(0, 0, 64).unwrap();
    let v_far = predictive_logit_variance(&model, &far, 200);
    let v_near = predictive_logit_variance(&model, &near, 200);
    assert!(v_far > 2.0 * v_near, "far {v_far} vs near {v_near}");
}

#[test]
fn whvi_convnet_fits_bar_orientation() {
    // 8x8 images with one bright horizontal (class 0) or vertical (class 1) bar plus noise.
    let n = 128;
    let mut rng = seeded(3);
    let mut pixels = vec![0f32; n * 64];
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let pos = rng.random_range(0..8);
        for r in 0..8 {
            for c in 0..8 {
                let on = if label == 0 { r == pos } else { c == pos };
                let noise: f32 = rng.sample(StandardNormal);
                pixels[i * 64 + r * 8 + c] = if on { 1.0 } else { 0.0 } + 0.2 * noise;
            }
        }
        labels.push(label);
    }
    let x = Tensor::from_vec(pixels, (n, 1, 8, 8), &CPU).unwrap();
    let y = Tensor::from_vec(labels, n, &CPU).unwrap();
    let params = Params::new(11);
    let vb = params.var_builder(DType::F32, &CPU);
    let model = Sequential::new()
        .with(
            WhviConv2d::new(
                1,
                8,
                3,
                WhviConv2dConfig {
                    padding: 1,
                    sampling: ConvSampling::PerExample,
                    ..Default::default()
                },
                vb.pp("c0"),
            )
            .unwrap(),
        )
        .with(Activation::Relu)
        .with(MaxPool2d::new(2))
        .with(Flatten)
        .with(WhviLinear::new(8 * 16, 2, WhviLinearConfig::default(), vb.pp("fc")).unwrap());
    let (first, last) = train(&model, &params, &x, &y, 150, 1e-2);
    assert!(last < first / 4.0, "NLL {first} -> {last}");
}

/// The fused WHVI backward sums its per-task parameter gradients in task order, so a run repeats
/// bit for bit at a fixed thread count, here 3 (12 tasks, whose grouping under a tree
/// reduction would follow work stealing).
#[test]
fn the_fused_backward_repeats_bit_for_bit_at_three_threads() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let x = random_tensor(&[333, 512], 3).to_dtype(DType::F32).unwrap();
    let gradients = || -> Vec<Vec<u32>> {
        pool.install(|| {
            let params = Params::new(5);
            let layer = WhviLinear::new(
                512,
                512,
                WhviLinearConfig::default(),
                params.var_builder(DType::F32, &CPU),
            )
            .unwrap();
            let y = layer
                .forward_pass(&x, &mut Pass::sample(&mut seeded(2)))
                .unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            params
                .named_vars()
                .iter()
                .map(|(_, v)| {
                    let g: Vec<f32> = grads
                        .get(v)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    g.into_iter().map(f32::to_bits).collect()
                })
                .collect()
        })
    };
    let first = gradients();
    for run in 1..40 {
        assert!(gradients() == first, "run {run} gave other gradient bits");
    }
}

/// `initial_sigma` sets where `log_sigma` starts, as a fraction of the initial mean's scale
/// (WHVI: `sqrt(2 / (D · d_in))`; mean-field: `sqrt(2 / d_in)`), and a width that is not a
/// positive number is refused.
#[test]
fn the_initial_sigma_is_a_fraction_of_the_initial_means_scale() {
    let starting_sigma = |params: &Params, name: &str| -> Vec<f32> {
        let log_sigma = var(params, name).as_tensor().flatten_all().unwrap();
        log_sigma.exp().unwrap().to_vec1().unwrap()
    };
    for fraction in [1e-2, 0.3] {
        let posterior = PosteriorConfig {
            initial_sigma: fraction,
            ..PosteriorConfig::default()
        };
        let params = Params::new(1);
        WhviBlocks::new(100, 128, posterior, params.var_builder(DType::F32, &CPU)).unwrap();
        let whvi_scale = (2.0 / (128.0 * 100.0_f64)).sqrt();
        for sigma in starting_sigma(&params, "log_sigma") {
            let want = fraction * whvi_scale;
            assert!(
                (sigma as f64 - want).abs() < 1e-6 * want,
                "{sigma} vs {want}"
            );
        }
        let params = Params::new(1);
        MeanFieldLinear::new(50, 3, posterior, params.var_builder(DType::F32, &CPU)).unwrap();
        for sigma in starting_sigma(&params, "log_sigma") {
            let want = fraction * (2.0 / 50.0_f64).sqrt();
            assert!(
                (sigma as f64 - want).abs() < 1e-6 * want,
                "{sigma} vs {want}"
            );
        }
    }
    for bad in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        let posterior = PosteriorConfig {
            initial_sigma: bad,
            ..PosteriorConfig::default()
        };
        let params = Params::new(1);
        let vb = params.var_builder(DType::F32, &CPU);
        let err = WhviBlocks::new(8, 8, posterior, vb.clone()).err().unwrap();
        assert!(
            err.to_string().contains("positive fraction"),
            "{bad}: {err}"
        );
        let err = MeanFieldLinear::new(8, 8, posterior, vb).err().unwrap();
        assert!(
            err.to_string().contains("positive fraction"),
            "{bad}: {err}"
        );
    }
}

/// Sizes a layer cannot take are errors, not panics or overflowed shapes.
#[test]
fn layers_refuse_sizes_they_cannot_take() {
    let params = Params::new(0);
    let vb = || params.var_builder(DType::F32, &CPU);
    let too_wide = (1usize << 63) + 1;
    let err = WhviLinear::new(too_wide, 4, WhviLinearConfig::default(), vb())
        .err()
        .unwrap();
    assert!(err.to_string().contains("d_in <= 2^30"), "{err}");
    let err = WhviConv2d::new(1 << 40, 4, 1 << 20, WhviConv2dConfig::default(), vb())
        .err()
        .unwrap();
    assert!(err.to_string().contains("too many"), "{err}");
    // A zero fan-in made the He variance infinite and the KL NaN.
    for (d_in, d_out) in [(0, 3), (3, 0)] {
        let err = MeanFieldLinear::new(d_in, d_out, PosteriorConfig::default(), vb())
            .err()
            .unwrap();
        assert!(err.to_string().contains("sizes >= 1"), "{err}");
    }
    let err = MeanFieldConv2d::new(
        0,
        4,
        3,
        MeanFieldConv2dConfig {
            padding: 1,
            mode: MeanFieldConvMode::default(),
            ..Default::default()
        },
        vb(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("sizes >= 1"), "{err}");
    // Off the fused path (f16) a zero window reached candle's division by the stride.
    let x = Tensor::zeros((1, 1, 4, 4), DType::F16, &CPU).unwrap();
    let err = MaxPool2d::new(0)
        .forward_pass(&x, &mut Pass::mean())
        .unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    let net = Sequential::new().with(MaxPool2d::new(2));
    let err = net.forward_range(&x, 0..3, &mut Pass::mean()).unwrap_err();
    assert!(err.to_string().contains("has layers 0..1"), "{err}");
    assert!(params.named_vars().is_empty(), "nothing was allocated");
}

/// Inputs with leading dimensions go through the reshaping path, 2-D ones skip it: both give
/// contiguous outputs and the same outputs and gradients for the same rows and noise, for a
/// padded head (10 outputs of 16-wide blocks) and an exact one.
#[test]
fn whvi_linear_gives_the_same_rows_for_2d_and_3d_inputs() {
    for (d_in, d_out) in [(12, 10), (16, 16)] {
        let params = Params::new(5);
        let vb = params.var_builder(DType::F32, &CPU);
        let layer = WhviLinear::new(d_in, d_out, WhviLinearConfig::default(), vb).unwrap();
        let x = random_tensor(&[6, d_in], 3).to_dtype(DType::F32).unwrap();
        let readout = random_tensor(&[6, d_out], 4).to_dtype(DType::F32).unwrap();
        let run = |input: &Tensor| {
            let y = layer
                .forward_pass(input, &mut Pass::train(&mut seeded(11)))
                .unwrap();
            assert!(
                y.is_contiguous(),
                "{d_in}x{d_out}: output of {:?}",
                input.dims()
            );
            let y = y.reshape((6, d_out)).unwrap();
            let grads = (&y * &readout)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let bias_grad = grads
                .get(&var(&params, "bias"))
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let input_grad = grads.get(input).unwrap().reshape((6, d_in)).unwrap();
            [y, bias_grad, input_grad].map(|t| to_rows(&t))
        };
        let flat = Var::from_tensor(&x).unwrap();
        let nested = Var::from_tensor(&x.reshape((2, 3, d_in)).unwrap()).unwrap();
        let (a, b) = (run(flat.as_tensor()), run(nested.as_tensor()));
        for (i, name) in ["output", "bias grad", "x grad"].into_iter().enumerate() {
            assert_eq!(a[i], b[i], "{d_in}x{d_out}: {name}");
        }
        assert!(a[1].iter().flatten().any(|&g| g != 0.0));
    }
}
