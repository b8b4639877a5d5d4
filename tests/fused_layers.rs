//! The CPU ops of batch normalisation (+ ReLU, + 2x2 max pool) and max pooling against
//! candle's own ops and each other: outputs, gradients and running statistics.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{BatchNormConfig, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use whvi::layers::{BatchNorm2d, BayesianModule, MaxPool2d, Pass};
use whvi::rng::seeded;

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
    let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max)
}

/// Our layer and candle-nn's, over two variable maps holding the same random weight and bias.
fn batch_norms(
    c: usize,
    dtype: DType,
    relu: bool,
) -> (BatchNorm2d, candle_nn::BatchNorm, [VarMap; 2]) {
    let mut maps = [VarMap::new(), VarMap::new()];
    let ours = BatchNorm2d::new(c, VarBuilder::from_varmap(&maps[0], dtype, &Device::Cpu)).unwrap();
    let ours = if relu { ours.with_relu() } else { ours };
    let theirs = candle_nn::batch_norm(
        c,
        BatchNormConfig::default(),
        VarBuilder::from_varmap(&maps[1], dtype, &Device::Cpu),
    )
    .unwrap();
    for map in &mut maps {
        map.set_one("weight", random(&[c], 1, dtype)).unwrap();
        map.set_one("bias", random(&[c], 2, dtype)).unwrap();
    }
    (ours, theirs, maps)
}

fn var_of(map: &VarMap, name: &str) -> Var {
    map.data().lock().unwrap()[name].clone()
}

#[test]
fn batch_norm_with_and_without_relu_matches_candle_nn_in_training() {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
        for relu in [false, true] {
            let (b, c, h, w) = (3, 4, 5, 3);
            let (ours, theirs, maps) = batch_norms(c, dtype, relu);
            let x = Var::from_tensor(&(random(&[b, c, h, w], 3, dtype) + 0.7).unwrap()).unwrap();
            let mut rng = seeded(0);
            let y = ours.forward_pass(&x, &mut Pass::train(&mut rng)).unwrap();
            let reference = theirs.forward_t(&x, true).unwrap();
            let reference = if relu {
                reference.relu().unwrap()
            } else {
                reference
            };
            let label = format!("{dtype:?} relu={relu}");
            assert!(max_rel_err(&y, &reference) < tol, "forward, {label}");
            for name in ["running_mean", "running_var"] {
                let err = max_rel_err(
                    var_of(&maps[0], name).as_tensor(),
                    var_of(&maps[1], name).as_tensor(),
                );
                assert!(err < tol, "{name}, {label}");
            }
            let upstream = random(y.dims(), 4, dtype);
            let backward = |y: Tensor| {
                (y * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (g_ours, g_theirs) = (backward(y), backward(reference));
            let err = max_rel_err(g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
            assert!(err < tol, "input gradient, {label}: {err}");
            for name in ["weight", "bias"] {
                let (a, t) = (var_of(&maps[0], name), var_of(&maps[1], name));
                let err = max_rel_err(g_ours.get(&a).unwrap(), g_theirs.get(&t).unwrap());
                assert!(err < tol, "{name} gradient, {label}: {err}");
            }
        }
    }
}

#[test]
fn batch_norm_in_prediction_uses_the_running_statistics() {
    let (ours, theirs, mut maps) = batch_norms(3, DType::F32, true);
    for map in &mut maps {
        map.set_one("running_mean", random(&[3], 5, DType::F32))
            .unwrap();
        map.set_one(
            "running_var",
            (random(&[3], 6, DType::F32).abs().unwrap() + 0.5).unwrap(),
        )
        .unwrap();
    }
    let x = Var::from_tensor(&random(&[2, 3, 4, 4], 7, DType::F32)).unwrap();
    let y = ours.forward_pass(&x, &mut Pass::mean()).unwrap();
    let reference = theirs.forward_t(&x, false).unwrap().relu().unwrap();
    assert!(max_rel_err(&y, &reference) < 1e-5);
    let g_ours = y.sum_all().unwrap().backward().unwrap();
    let g_theirs = reference.sum_all().unwrap().backward().unwrap();
    assert!(max_rel_err(g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap()) < 1e-5);
    // Prediction leaves the running statistics alone.
    let before = var_of(&maps[0], "running_mean").to_vec1::<f32>().unwrap();
    ours.forward_pass(&x, &mut Pass::mean()).unwrap();
    assert_eq!(
        var_of(&maps[0], "running_mean").to_vec1::<f32>().unwrap(),
        before
    );
}

#[test]
fn batch_norm_errors_say_what_is_wrong() {
    let (ours, _, _) = batch_norms(3, DType::F32, false);
    let mut rng = seeded(0);
    let err = ours
        .forward_pass(
            &random(&[2, 4, 3, 3], 1, DType::F32),
            &mut Pass::train(&mut rng),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected input [batch, 3"), "{err}");
    let err = ours
        .forward_pass(
            &random(&[1, 3, 1, 1], 1, DType::F32),
            &mut Pass::train(&mut rng),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
}

/// Max pooling by the definition: each window's maximum, and its gradient routed to it.
fn naive_max_pool(x: &[f64], (h, w): (usize, usize), k: usize, dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (ho, wo) = (h / k, w / k);
    let planes = x.len() / (h * w);
    let (mut y, mut dx) = (vec![0.0; planes * ho * wo], vec![0.0; x.len()]);
    for p in 0..planes {
        for oy in 0..ho {
            for ox in 0..wo {
                let at = |i: usize, j: usize| p * h * w + (oy * k + i) * w + ox * k + j;
                let best = (0..k * k).map(|t| at(t / k, t % k)).fold(at(0, 0), |b, i| {
                    if x[i] > x[b] {
                        i
                    } else {
                        b
                    }
                });
                let o = (p * ho + oy) * wo + ox;
                y[o] = x[best];
                dx[best] += dy[o];
            }
        }
    }
    (y, dx)
}

#[test]
fn max_pool_forward_and_backward_follow_the_definition() {
    for (size, h, w) in [(2usize, 8usize, 6usize), (2, 7, 5), (3, 9, 7)] {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&random(&[2, 3, h, w], 8, dtype)).unwrap();
            let mut rng = seeded(0);
            let y = MaxPool2d::new(size)
                .forward_pass(&x, &mut Pass::train(&mut rng))
                .unwrap();
            assert_eq!(y.dims(), [2, 3, h / size, w / size]);
            let upstream = random(y.dims(), 9, dtype);
            let g = (&y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let (y_ref, dx_ref) = naive_max_pool(&flat(&x), (h, w), size, &flat(&upstream));
            let label = format!("{size} {h}x{w} {dtype:?}");
            assert_eq!(flat(&y), y_ref, "forward {label}");
            assert_eq!(flat(g.get(&x).unwrap()), dx_ref, "backward {label}");
            // The forward pass is candle's too.
            assert_eq!(
                flat(&x.max_pool2d(size).unwrap()),
                y_ref,
                "candle forward {label}"
            );
        }
    }
}

/// The gradient of `x` in `grads`, flattened.
fn f32_gradient(grads: &candle_core::backprop::GradStore, x: &Var) -> Vec<f32> {
    let grad = grads.get(x).expect("x has a gradient");
    grad.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn max_pool_routes_a_tie_to_one_input_and_rejects_a_window_too_large() {
    let x =
        Var::from_tensor(&Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut rng = seeded(0);
    let y = MaxPool2d::new(2)
        .forward_pass(&x, &mut Pass::train(&mut rng))
        .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let dx = f32_gradient(&g, &x);
    // The whole gradient goes to the first maximum, as in PyTorch.
    assert_eq!(dx, vec![1.0, 0.0, 0.0, 0.0]);
    let err = MaxPool2d::new(3)
        .forward_pass(&x, &mut Pass::train(&mut rng))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not fit a 2x2 input"), "{err}");
}

#[test]
fn max_pool_lets_the_first_nan_of_a_window_win() {
    for size in [2usize, 3] {
        // Window values in reading order; a NaN at `nan_at`, a larger finite value after it.
        for nan_at in 0..size * size {
            let mut values: Vec<f32> = (0..size * size).map(|i| i as f32).collect();
            values[nan_at] = f32::NAN;
            let x = Var::from_tensor(
                &Tensor::from_vec(values, (1, 1, size, size), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let mut rng = seeded(0);
            let y = MaxPool2d::new(size)
                .forward_pass(&x, &mut Pass::train(&mut rng))
                .unwrap();
            assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
            let g = y.sum_all().unwrap().backward().unwrap();
            let dx = f32_gradient(&g, &x);
            let expected: Vec<f32> = (0..size * size)
                .map(|i| if i == nan_at { 1.0 } else { 0.0 })
                .collect();
            assert_eq!(dx, expected, "{size}x{size}, NaN at {nan_at}");
        }
    }
}

/// The second and later posterior samples of a step see the same batch: they normalise with
/// its statistics but leave the running statistics alone (fused CPU path and candle-nn's).
#[test]
fn a_pass_without_statistics_normalises_by_the_batch_and_keeps_the_running_statistics() {
    // Rank 4 takes the fused CPU op; rank 2 goes through candle-nn's layer (as on a GPU).
    for (dtype, shape) in [(DType::F32, &[4, 3, 5, 5][..]), (DType::F32, &[6, 3][..])] {
        let (ours, _, maps) = batch_norms(3, dtype, false);
        let x = random(shape, 7, dtype);
        let stats = || -> Vec<Vec<f64>> {
            ["running_mean", "running_var"]
                .iter()
                .map(|n| {
                    let t = var_of(&maps[0], n)
                        .as_tensor()
                        .to_dtype(DType::F64)
                        .unwrap();
                    t.to_vec1::<f64>().unwrap()
                })
                .collect()
        };
        let before = stats();
        let kept = ours
            .forward_pass(&x, &mut Pass::train(&mut seeded(0)).without_statistics())
            .unwrap();
        assert_eq!(stats(), before, "{shape:?}: running statistics changed");
        let updated = ours
            .forward_pass(&x, &mut Pass::train(&mut seeded(0)))
            .unwrap();
        assert_ne!(stats(), before, "{shape:?}: a training pass updates them");
        assert!(
            max_rel_err(&kept, &updated) < 1e-6,
            "{dtype:?}: same batch statistics"
        );
    }
}

/// Ties inside windows (values on a coarse grid), so that the first-maximum rule matters; the
/// ReLU's mask zeroes whole windows in training (the batch's mean removed) and, with the shift
/// below zero, in prediction.
fn coarse(shape: &[usize], seed: u64, dtype: DType, shift: f64) -> Tensor {
    let x = random(shape, seed, DType::F64);
    let grid = (x * 2.0).unwrap().round().unwrap();
    grid.affine(0.5, shift).unwrap().to_dtype(dtype).unwrap()
}

#[test]
fn batch_norm_with_relu_and_max_pool_matches_the_layers_apart() {
    let sizes = [(4, 6), (5, 3), (7, 7), (2, 2), (4, 70), (3, 35), (2, 52)];
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
        for ((h, w), relu) in sizes.into_iter().flat_map(|s| [(s, true), (s, false)]) {
            for train in [true, false] {
                let (apart, _, maps) = batch_norms(3, dtype, relu);
                let fused =
                    BatchNorm2d::new(3, VarBuilder::from_varmap(&maps[0], dtype, &Device::Cpu))
                        .unwrap();
                let fused = if relu { fused.with_relu() } else { fused }.with_max_pool();
                let x = Var::from_tensor(&coarse(&[2, 3, h, w], 8, dtype, -0.3)).unwrap();
                let upstream = random(&[2, 3, h / 2, w / 2], 9, dtype);
                let run = |layers: &[&dyn BayesianModule]| {
                    let mut rng = seeded(0);
                    let mut y = x.as_tensor().clone();
                    for layer in layers {
                        let mut pass = if train {
                            Pass::train(&mut rng).without_statistics()
                        } else {
                            Pass::mean()
                        };
                        y = layer.forward_pass(&y, &mut pass).unwrap();
                    }
                    let grads = (&y * &upstream).unwrap().sum_all().unwrap().backward();
                    (y, grads.unwrap())
                };
                let (y_fused, g_fused) = run(&[&fused]);
                let (y_apart, g_apart) = run(&[&apart, &MaxPool2d::new(2)]);
                let label = format!("{dtype:?} {h}x{w} relu={relu} train={train}");
                assert_eq!(max_rel_err(&y_fused, &y_apart), 0.0, "forward, {label}");
                let err = max_rel_err(g_fused.get(&x).unwrap(), g_apart.get(&x).unwrap());
                assert!(err < tol, "input gradient, {label}: {err}");
                for name in ["weight", "bias"] {
                    let v = var_of(&maps[0], name);
                    let err = max_rel_err(g_fused.get(&v).unwrap(), g_apart.get(&v).unwrap());
                    assert!(err < tol, "{name} gradient, {label}: {err}");
                }
            }
        }
    }
}

#[test]
fn batch_norm_with_max_pool_rejects_an_input_smaller_than_the_window() {
    let (ours, _, _) = batch_norms(3, DType::F32, true);
    let ours = ours.with_max_pool();
    let mut rng = seeded(0);
    let err = ours
        .forward_pass(
            &random(&[2, 3, 1, 4], 1, DType::F32),
            &mut Pass::train(&mut rng),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("2x2 window does not fit a 1x4 input"), "{err}");
}

#[test]
fn batch_norm_with_max_pool_keeps_the_pooled_shape_of_an_empty_batch() {
    let (ours, _, _) = batch_norms(3, DType::F32, true);
    let ours = ours.with_max_pool();
    let y = ours
        .forward_pass(&random(&[0, 3, 4, 6], 1, DType::F32), &mut Pass::mean())
        .unwrap();
    assert_eq!(y.dims(), [0, 3, 2, 3]);
}
