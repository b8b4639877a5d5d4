//! Tests of `whvi::optim`: update rules against independent f64 references of PyTorch's
//! documented algorithms, convergence, state round trips, schedules, KL warm-up and clipping.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use whvi::optim::{
    clip_grad_norm, AdamW, AdamWConfig, AnyOptimizer, KlWarmup, LrDecay, LrScale, LrSchedule,
    NameMatch, NamedOptimizer, OptimizerConfig, Sgd, SgdConfig, STEP_KEY,
};
use whvi::Error;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------------------
// A tiny quadratic, loss = Σ_v Σ_i ½ a_i (x_i − c_i)², and f64 references of PyTorch's rules.

const X0: [f64; 3] = [1.0, -2.0, 0.5];
const A: [f64; 3] = [1.0, 2.5, 0.4];
const C: [f64; 3] = [0.3, 0.7, -1.2];
const STEPS: usize = 6;

fn grad_ref(x: f64, i: usize) -> f64 {
    A[i] * (x - C[i])
}

/// PyTorch's SGD (torch.optim.SGD documentation), one element at a time.
fn sgd_reference(c: &SgdConfig, decayed: bool) -> Vec<[f64; 3]> {
    let wd = if decayed { c.weight_decay } else { 0.0 };
    let mut x = X0;
    let mut buf: [Option<f64>; 3] = [None; 3];
    let mut out = Vec::new();
    for _ in 0..STEPS {
        for i in 0..3 {
            let mut g = grad_ref(x[i], i);
            if wd != 0.0 {
                g += wd * x[i];
            }
            if c.momentum != 0.0 {
                let b = match buf[i] {
                    None => g,
                    Some(b) => c.momentum * b + (1.0 - c.dampening) * g,
                };
                buf[i] = Some(b);
                g = if c.nesterov { g + c.momentum * b } else { b };
            }
            x[i] -= c.lr * g;
        }
        out.push(x);
    }
    out
}

/// PyTorch's Adam / AdamW (torch.optim.Adam and AdamW documentation), one element at a time.
fn adam_reference(c: &AdamWConfig, decayed: bool) -> Vec<[f64; 3]> {
    let wd = if decayed { c.weight_decay } else { 0.0 };
    let mut x = X0;
    let (mut m, mut v) = ([0.0; 3], [0.0; 3]);
    let mut out = Vec::new();
    for t in 1..=STEPS {
        for i in 0..3 {
            let mut g = grad_ref(x[i], i);
            if c.decoupled_weight_decay {
                x[i] -= c.lr * wd * x[i];
            } else {
                g += wd * x[i];
            }
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g * g;
            let m_hat = m[i] / (1.0 - c.beta1.powi(t as i32));
            let v_hat = v[i] / (1.0 - c.beta2.powi(t as i32));
            x[i] -= c.lr * m_hat / (v_hat.sqrt() + c.eps);
        }
        out.push(x);
    }
    out
}

fn quadratic_loss(vars: &[&Var]) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    let a = Tensor::new(&A, &dev)?;
    let c = Tensor::new(&C, &dev)?;
    let mut total: Option<Tensor> = None;
    for v in vars {
        let l = (v.as_tensor().broadcast_sub(&c)?.sqr()? * &a)?.sum_all()? * 0.5;
        total = Some(match total {
            None => l?,
            Some(t) => (t + l?)?,
        });
    }
    Ok(total.expect("at least one variable"))
}

/// Runs an optimiser over two variables, `layer.weight` and `layer.bias`, both starting at X0,
/// and returns their trajectories.
fn run_quadratic<O: NamedOptimizer>(config: O::Config) -> whvi::Result<Vec<[Vec<f64>; 2]>> {
    let w = Var::new(&X0, &Device::Cpu)?;
    let b = Var::new(&X0, &Device::Cpu)?;
    let mut opt = O::from_named(
        vec![
            ("layer.weight".into(), w.clone()),
            ("layer.bias".into(), b.clone()),
        ],
        config,
    )?;
    let mut out = Vec::new();
    for _ in 0..STEPS {
        let loss = quadratic_loss(&[&w, &b])?;
        opt.backward_step(&loss)?;
        out.push([w.to_vec1::<f64>()?, b.to_vec1::<f64>()?]);
    }
    Ok(out)
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs() + 1e-12,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

fn check_trajectory(got: &[[Vec<f64>; 2]], weight: &[[f64; 3]], bias: &[[f64; 3]], what: &str) {
    assert_eq!(got.len(), STEPS);
    for t in 0..STEPS {
        assert_close(&got[t][0], &weight[t], &format!("{what}, weight, step {t}"));
        assert_close(&got[t][1], &bias[t], &format!("{what}, bias, step {t}"));
    }
}

fn bias_no_decay() -> Vec<NameMatch> {
    vec![NameMatch::Suffix(".bias".into())]
}

/// The bias at `factor` times the learning rate, the weight at 1.
fn bias_lr_scale(factor: f64) -> Vec<LrScale> {
    vec![LrScale {
        rule: NameMatch::Suffix(".bias".into()),
        factor,
    }]
}

/// The learning-rate factor `scales` give `layer.bias` (the references run it as a plain lr).
fn bias_factor(scales: &[LrScale]) -> f64 {
    scales
        .iter()
        .find(|s| s.rule.matches("layer.bias"))
        .map_or(1.0, |s| s.factor)
}

#[test]
fn sgd_matches_pytorch_reference() -> TestResult {
    let cases = [
        (
            "plain",
            SgdConfig {
                lr: 0.1,
                momentum: 0.0,
                ..SgdConfig::default()
            },
        ),
        (
            "momentum",
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..SgdConfig::default()
            },
        ),
        (
            "nesterov",
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                ..SgdConfig::default()
            },
        ),
        (
            "dampening + weight decay",
            SgdConfig {
                lr: 0.05,
                momentum: 0.8,
                dampening: 0.3,
                weight_decay: 0.1,
                ..SgdConfig::default()
            },
        ),
        (
            "nesterov + weight decay, bias excluded",
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.2,
                no_decay: bias_no_decay(),
                ..SgdConfig::default()
            },
        ),
        (
            "momentum and decay, bias at 3x the learning rate",
            SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 0.2,
                lr_scale: bias_lr_scale(3.0),
                ..SgdConfig::default()
            },
        ),
    ];
    for (what, config) in cases {
        let weight = sgd_reference(&config, true);
        let bias_config = SgdConfig {
            lr: config.lr * bias_factor(&config.lr_scale),
            ..config.clone()
        };
        let bias = sgd_reference(&bias_config, config.no_decay.is_empty());
        let got = run_quadratic::<Sgd>(config)?;
        check_trajectory(&got, &weight, &bias, what);
    }
    Ok(())
}

#[test]
fn adamw_matches_pytorch_reference() -> TestResult {
    let cases = [
        (
            "adamw defaults, lr 0.1",
            AdamWConfig {
                lr: 0.1,
                ..AdamWConfig::default()
            },
        ),
        (
            "adamw strong decay, bias excluded",
            AdamWConfig {
                lr: 0.05,
                beta1: 0.8,
                beta2: 0.99,
                eps: 1e-3,
                weight_decay: 0.5,
                no_decay: bias_no_decay(),
                ..AdamWConfig::default()
            },
        ),
        (
            "adam coupled decay",
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.3,
                ..AdamWConfig::adam()
            },
        ),
        (
            "adamw with decay, bias at 10x the learning rate",
            AdamWConfig {
                lr: 0.01,
                weight_decay: 0.5,
                lr_scale: bias_lr_scale(10.0),
                ..AdamWConfig::default()
            },
        ),
    ];
    for (what, config) in cases {
        let weight = adam_reference(&config, true);
        let bias_config = AdamWConfig {
            lr: config.lr * bias_factor(&config.lr_scale),
            ..config.clone()
        };
        let bias = adam_reference(&bias_config, config.no_decay.is_empty());
        let got = run_quadratic::<AdamW>(config)?;
        check_trajectory(&got, &weight, &bias, what);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Convergence on least squares.

/// `mean((X w − y)²)` for a fixed, well-conditioned 32 × 4 problem with an exact solution.
struct LeastSquares {
    x: Tensor,
    y: Tensor,
}

impl LeastSquares {
    fn new() -> candle_core::Result<Self> {
        let rows = 32;
        let data: Vec<f32> = (0..rows * 4)
            .map(|k| ((k as f32) * 0.7 + 0.3).sin() + if k % 5 == k / 4 % 4 { 0.5 } else { 0.0 })
            .collect();
        let x = Tensor::from_vec(data, (rows, 4), &Device::Cpu)?;
        let truth = Tensor::new(&[[1.5f32], [-2.0], [0.25], [3.0]], &Device::Cpu)?;
        let y = x.matmul(&truth)?;
        Ok(LeastSquares { x, y })
    }

    fn loss(&self, w: &Var) -> candle_core::Result<Tensor> {
        (self.x.matmul(w.as_tensor())? - &self.y)?.sqr()?.mean_all()
    }
}

fn minimise<O: NamedOptimizer>(config: O::Config, steps: usize) -> TestResult<(f32, f32)> {
    let problem = LeastSquares::new()?;
    let w = Var::zeros((4, 1), DType::F32, &Device::Cpu)?;
    let mut opt = O::from_named(vec![("w".into(), w.clone())], config)?;
    let initial = problem.loss(&w)?.to_scalar::<f32>()?;
    for _ in 0..steps {
        opt.backward_step(&problem.loss(&w)?)?;
    }
    let last = problem.loss(&w)?.to_scalar::<f32>()?;
    Ok((initial, last))
}

#[test]
fn each_optimiser_minimises_least_squares() -> TestResult {
    let runs = [
        (
            "sgd momentum",
            minimise::<Sgd>(
                SgdConfig {
                    lr: 0.02,
                    ..SgdConfig::default()
                },
                300,
            )?,
        ),
        (
            "sgd nesterov",
            minimise::<Sgd>(
                SgdConfig {
                    lr: 0.02,
                    nesterov: true,
                    ..SgdConfig::default()
                },
                300,
            )?,
        ),
        (
            "adamw",
            minimise::<AdamW>(
                AdamWConfig {
                    lr: 0.05,
                    weight_decay: 1e-4,
                    ..AdamWConfig::default()
                },
                300,
            )?,
        ),
        (
            "adam",
            minimise::<AdamW>(
                AdamWConfig {
                    lr: 0.05,
                    ..AdamWConfig::adam()
                },
                300,
            )?,
        ),
    ];
    for (what, (initial, last)) in runs {
        assert!(
            last < initial / 1000.0,
            "{what}: loss went from {initial} to {last}, not down by a factor of 1000"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// State save / restore.

const VAR_NAMES: [&str; 3] = ["net.w", "net.b", "bn.running_mean"];

/// Three variables: `net.w` (2 × 3), `net.b` (3) and `bn.running_mean` (3), which never gets a
/// gradient.
fn make_vars(values: &[Tensor]) -> candle_core::Result<Vec<Var>> {
    values.iter().map(Var::from_tensor).collect()
}

fn initial_values() -> candle_core::Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    Ok(vec![
        Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.2, -0.3]], &dev)?,
        Tensor::new(&[1.0f32, -0.5, 0.25], &dev)?,
        Tensor::new(&[0.0f32, 0.0, 0.0], &dev)?,
    ])
}

/// A loss whose gradients change from step to step, like minibatches do.
fn varying_loss(t: usize, vars: &[Var]) -> candle_core::Result<Tensor> {
    let target: Vec<f32> = (0..6).map(|k| ((t * 6 + k) as f32 * 0.37).sin()).collect();
    let target = Tensor::from_vec(target, (2, 3), &Device::Cpu)?;
    let lw = (vars[0].as_tensor() - &target)?.sqr()?.sum_all()?;
    let lb = (vars[1].as_tensor().sqr()? * target.get(0)?.exp()?)?.sum_all()?;
    lw + lb
}

fn named(vars: &[Var]) -> Vec<(String, Var)> {
    VAR_NAMES
        .iter()
        .map(|n| n.to_string())
        .zip(vars.iter().cloned())
        .collect()
}

fn bits(vars: &[Var]) -> candle_core::Result<Vec<Vec<u32>>> {
    vars.iter()
        .map(|v| {
            Ok(v.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        })
        .collect()
}

fn state_file(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "whvi-optim-test-{}-{tag}.safetensors",
        std::process::id()
    ))
}

/// Runs `first + second` steps without interruption, and `first` steps, a save through a
/// safetensors file, a fresh optimiser and `second` more steps; both must end bit for bit equal.
fn check_resume<O>(config: O::Config, tag: &str) -> TestResult
where
    O: NamedOptimizer,
    O::Config: Clone,
{
    let (first, second) = (3, 4);
    let reference = make_vars(&initial_values()?)?;
    let mut opt = O::from_named(named(&reference), config.clone())?;
    for t in 0..first + second {
        opt.backward_step(&varying_loss(t, &reference)?)?;
    }

    let vars = make_vars(&initial_values()?)?;
    let mut opt = O::from_named(named(&vars), config.clone())?;
    for t in 0..first {
        opt.backward_step(&varying_loss(t, &vars)?)?;
    }
    let path = state_file(tag);
    let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
    candle_core::safetensors::save(&state, &path)?;
    let saved_params: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    drop(opt);
    drop(vars);

    let loaded = candle_core::safetensors::load(&path, &Device::Cpu)?;
    std::fs::remove_file(&path)?;
    let vars = make_vars(&saved_params)?;
    let mut opt = O::from_named(named(&vars), config)?;
    opt.load_state(loaded)?;
    assert_eq!(opt.step_count(), first as u64);
    for t in first..first + second {
        opt.backward_step(&varying_loss(t, &vars)?)?;
    }
    assert_eq!(opt.step_count(), (first + second) as u64);
    assert_eq!(
        bits(&vars)?,
        bits(&reference)?,
        "{tag}: resumed run differs"
    );
    Ok(())
}

#[test]
fn sgd_resumes_bit_for_bit() -> TestResult {
    check_resume::<Sgd>(
        SgdConfig {
            lr: 0.05,
            nesterov: true,
            weight_decay: 1e-2,
            no_decay: bias_no_decay(),
            ..SgdConfig::default()
        },
        "sgd",
    )
}

#[test]
fn adamw_resumes_bit_for_bit() -> TestResult {
    check_resume::<AdamW>(
        AdamWConfig {
            lr: 0.05,
            ..AdamWConfig::default()
        },
        "adamw",
    )
}

#[test]
fn state_names_entries_by_variable() -> TestResult {
    let vars = make_vars(&initial_values()?)?;
    let mut sgd = Sgd::from_named(named(&vars), SgdConfig::default())?;
    let mut adam = AdamW::from_named(named(&vars), AdamWConfig::default())?;
    let sgd_before: Vec<String> = sgd.state().into_iter().map(|(k, _)| k).collect();
    assert_eq!(sgd_before, [STEP_KEY]);
    sgd.backward_step(&varying_loss(0, &vars)?)?;
    adam.backward_step(&varying_loss(0, &vars)?)?;
    let keys = |state: Vec<(String, Tensor)>| -> Vec<String> {
        let mut k: Vec<String> = state.into_iter().map(|(k, _)| k).collect();
        k.sort();
        k
    };
    // `bn.running_mean` has no gradient, hence no buffers.
    assert_eq!(
        keys(sgd.state()),
        ["momentum.net.b", "momentum.net.w", "step"]
    );
    assert_eq!(
        keys(adam.state()),
        [
            "adam_m.net.b",
            "adam_m.net.w",
            "adam_step.net.b",
            "adam_step.net.w",
            "adam_v.net.b",
            "adam_v.net.w",
            "step"
        ]
    );
    let state: HashMap<String, Tensor> = adam.state().into_iter().collect();
    assert_eq!(state["step"].to_scalar::<i64>()?, 1);
    assert_eq!(state["adam_step.net.w"].to_scalar::<i64>()?, 1);
    assert_eq!(state["adam_m.net.w"].dims(), [2, 3]);
    Ok(())
}

/// One SGD step's state, for the mismatch tests.
/// Parameters and the optimiser state saved after one step.
type VarsAndState = (Vec<Var>, Vec<(String, Tensor)>);

fn sgd_state_after_one_step() -> TestResult<VarsAndState> {
    let vars = make_vars(&initial_values()?)?;
    let mut opt = Sgd::from_named(named(&vars), SgdConfig::default())?;
    opt.backward_step(&varying_loss(0, &vars)?)?;
    Ok((vars, opt.state()))
}

fn load_error<O: NamedOptimizer>(opt: &mut O, state: Vec<(String, Tensor)>) -> String {
    let steps = opt.step_count();
    match opt.load_state(state) {
        Ok(()) => panic!("loading a mismatched state succeeded"),
        Err(e) => {
            assert!(
                matches!(e, Error::InvalidArgument(_)),
                "unexpected error kind: {e:?}"
            );
            assert_eq!(
                opt.step_count(),
                steps,
                "a failed load changed the optimiser"
            );
            e.to_string()
        }
    }
}

#[test]
fn mismatched_state_is_rejected_clearly() -> TestResult {
    let (vars, state) = sgd_state_after_one_step()?;
    let fresh = || Sgd::from_named(named(&vars), SgdConfig::default());

    // Wrong shape: a model whose `net.b` has 4 elements.
    let other = vec![
        (
            "net.b".to_string(),
            Var::zeros(4, DType::F32, &Device::Cpu)?,
        ),
        ("net.w".to_string(), vars[0].clone()),
    ];
    let mut opt = Sgd::from_named(other, SgdConfig::default())?;
    let msg = load_error(&mut opt, state.clone());
    assert!(
        msg.contains("momentum.net.b") && msg.contains("shape"),
        "{msg}"
    );

    // A variable this optimiser does not hold.
    let mut opt = Sgd::from_named(named(&vars)[..1].to_vec(), SgdConfig::default())?;
    let msg = load_error(&mut opt, state.clone());
    assert!(
        msg.contains("net.b") && msg.contains("does not hold"),
        "{msg}"
    );

    // Wrong dtype.
    let mut wrong = state.clone();
    for (k, t) in wrong.iter_mut() {
        if k == "momentum.net.w" {
            *t = t.to_dtype(DType::F64)?;
        }
    }
    let msg = load_error(&mut fresh()?, wrong);
    assert!(
        msg.contains("momentum.net.w") && msg.contains("dtype"),
        "{msg}"
    );

    // No step count.
    let no_step: Vec<_> = state
        .iter()
        .filter(|(k, _)| k != STEP_KEY)
        .cloned()
        .collect();
    let msg = load_error(&mut fresh()?, no_step);
    assert!(msg.contains("`step`"), "{msg}");

    // A step count that is not an integer scalar.
    let mut bad_step = state.clone();
    bad_step[0].1 = Tensor::new(&[1.0f32], &Device::Cpu)?;
    let msg = load_error(&mut fresh()?, bad_step);
    assert!(msg.contains("integer scalar"), "{msg}");

    // Another optimiser's state.
    let mut adam = AdamW::from_named(named(&vars), AdamWConfig::default())?;
    adam.backward_step(&varying_loss(0, &vars)?)?;
    let msg = load_error(&mut fresh()?, adam.state());
    assert!(
        msg.contains("unexpected") && msg.contains("adam_m.net.b"),
        "{msg}"
    );
    let mut opt = AdamW::from_named(named(&vars), AdamWConfig::default())?;
    let msg = load_error(&mut opt, state.clone());
    assert!(msg.contains("momentum.net.b"), "{msg}");

    // Incomplete Adam state.
    let partial: Vec<_> = adam
        .state()
        .into_iter()
        .filter(|(k, _)| k != "adam_v.net.w")
        .collect();
    let msg = load_error(&mut opt, partial);
    assert!(
        msg.contains("`net.w`")
            && msg.contains("incomplete")
            && msg.contains("lacks `adam_v.net.w`"),
        "{msg}"
    );

    // A repeated entry.
    let mut twice = state.clone();
    twice.push(state[1].clone());
    let msg = load_error(&mut fresh()?, twice);
    assert!(msg.contains("twice"), "{msg}");

    // And the state itself loads.
    fresh()?.load_state(state)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Construction, candle conventions, configuration.

#[test]
fn variables_are_sorted_and_filtered_and_decay_is_per_variable() -> TestResult {
    let dev = Device::Cpu;
    let vars = vec![
        (
            "layer2.weight".to_string(),
            Var::zeros(2, DType::F32, &dev)?,
        ),
        ("layer1.bias".to_string(), Var::zeros(2, DType::F32, &dev)?),
        ("counter".to_string(), Var::zeros(1, DType::U32, &dev)?),
        ("bn1.weight".to_string(), Var::zeros(2, DType::F32, &dev)?),
        (
            "layer1.g_log_sigma".to_string(),
            Var::zeros(2, DType::F32, &dev)?,
        ),
    ];
    let config = AdamWConfig {
        weight_decay: 0.05,
        no_decay: vec![
            NameMatch::Suffix(".bias".into()),
            NameMatch::Prefix("bn".into()),
            NameMatch::Contains("sigma".into()),
            NameMatch::Exact("nothing".into()),
        ],
        ..AdamWConfig::default()
    };
    let opt = AdamW::from_named(vars, config)?;
    assert_eq!(
        opt.names(),
        [
            "bn1.weight",
            "layer1.bias",
            "layer1.g_log_sigma",
            "layer2.weight"
        ]
    );
    assert_eq!(opt.vars().len(), 4);
    assert_eq!(opt.weight_decay_of("layer2.weight"), Some(0.05));
    assert_eq!(opt.weight_decay_of("layer1.bias"), Some(0.0));
    assert_eq!(opt.weight_decay_of("bn1.weight"), Some(0.0));
    assert_eq!(opt.weight_decay_of("layer1.g_log_sigma"), Some(0.0));
    assert_eq!(opt.weight_decay_of("counter"), None);
    assert!(NameMatch::Exact("a.b".into()).matches("a.b"));
    assert!(!NameMatch::Exact("a.b".into()).matches("a.bc"));

    let dup = vec![
        ("w".to_string(), Var::zeros(1, DType::F32, &dev)?),
        ("w".to_string(), Var::zeros(1, DType::F32, &dev)?),
    ];
    let err = Sgd::from_named(dup, SgdConfig::default()).unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
    Ok(())
}

#[test]
fn candle_optimizer_trait_conventions() -> TestResult {
    let dev = Device::Cpu;
    let vars: Vec<Var> = (0..12)
        .map(|_| Var::new(&[1.0f32, -1.0], &dev))
        .collect::<candle_core::Result<_>>()?;
    let mut opt = Sgd::new(vars.clone(), SgdConfig::default())?;
    assert_eq!(opt.names()[0], "00");
    assert_eq!(opt.names()[11], "11");
    assert_eq!(opt.vars()[11].id(), vars[11].id());
    assert_eq!(opt.learning_rate(), 1e-3);
    opt.set_learning_rate(0.1);
    assert_eq!(opt.learning_rate(), 0.1);
    assert_eq!(opt.config().lr, 0.1);
    // loss = Σ x² on the first variable: one plain step gives x − 0.1 · 2x.
    let loss = vars[0].as_tensor().sqr()?.sum_all()?;
    opt.backward_step(&loss)?;
    assert_eq!(vars[0].to_vec1::<f32>()?, [0.8, -0.8]);
    assert_eq!(vars[1].to_vec1::<f32>()?, [1.0, -1.0]);
    assert_eq!(opt.step_count(), 1);

    let mut adam = AdamW::new(vars[..1].to_vec(), AdamWConfig::default())?;
    adam.set_learning_rate(0.01);
    assert_eq!(adam.config().lr, 0.01);
    let err = AdamW::new(
        vec![],
        AdamWConfig {
            beta1: 1.0,
            ..AdamWConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("beta1"), "{err}");
    Ok(())
}

#[test]
fn invalid_configs_are_rejected() {
    let sgd = |c: SgdConfig| {
        Sgd::from_named(vec![], c)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let msg = sgd(SgdConfig {
        momentum: 0.0,
        nesterov: true,
        ..SgdConfig::default()
    });
    assert!(msg.contains("Nesterov"), "{msg}");
    let msg = sgd(SgdConfig {
        dampening: 0.1,
        nesterov: true,
        ..SgdConfig::default()
    });
    assert!(msg.contains("Nesterov"), "{msg}");
    let msg = sgd(SgdConfig {
        lr: -1.0,
        ..SgdConfig::default()
    });
    assert!(msg.contains("lr"), "{msg}");
    let msg = sgd(SgdConfig {
        weight_decay: f64::NAN,
        ..SgdConfig::default()
    });
    assert!(msg.contains("weight_decay"), "{msg}");
    let adam = |c: AdamWConfig| {
        AdamW::from_named(vec![], c)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let msg = adam(AdamWConfig {
        beta2: -0.1,
        ..AdamWConfig::default()
    });
    assert!(msg.contains("beta2"), "{msg}");
    let msg = adam(AdamWConfig {
        eps: -1.0,
        ..AdamWConfig::default()
    });
    assert!(msg.contains("eps"), "{msg}");
}

#[test]
fn config_defaults_and_serde() -> TestResult {
    let sgd = SgdConfig::default();
    assert_eq!(
        (
            sgd.lr,
            sgd.momentum,
            sgd.dampening,
            sgd.nesterov,
            sgd.weight_decay
        ),
        (1e-3, 0.9, 0.0, false, 0.0)
    );
    assert!(sgd.no_decay.is_empty());
    let adamw = AdamWConfig::default();
    assert_eq!(
        (
            adamw.lr,
            adamw.beta1,
            adamw.beta2,
            adamw.eps,
            adamw.weight_decay
        ),
        (1e-3, 0.9, 0.999, 1e-8, 1e-2)
    );
    assert!(adamw.decoupled_weight_decay);
    let adam = AdamWConfig::adam();
    assert_eq!(
        (adam.weight_decay, adam.decoupled_weight_decay),
        (0.0, false)
    );

    let config = OptimizerConfig::AdamW(AdamWConfig {
        no_decay: bias_no_decay(),
        ..AdamWConfig::default()
    });
    let json = serde_json::to_string(&config)?;
    assert!(
        json.contains(r#""kind":"adam_w""#) && json.contains(r#"{"suffix":".bias"}"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<OptimizerConfig>(&json)?, config);
    // Missing fields take their defaults.
    let partial: OptimizerConfig = serde_json::from_str(r#"{"kind": "sgd", "lr": 0.1}"#)?;
    assert_eq!(
        partial,
        OptimizerConfig::Sgd(SgdConfig {
            lr: 0.1,
            ..SgdConfig::default()
        })
    );
    assert_eq!(
        OptimizerConfig::default(),
        OptimizerConfig::Sgd(SgdConfig::default())
    );
    Ok(())
}

#[test]
fn any_optimizer_delegates() -> TestResult {
    let config = AdamWConfig {
        lr: 0.05,
        no_decay: bias_no_decay(),
        ..AdamWConfig::default()
    };
    let direct = run_quadratic::<AdamW>(config.clone())?;
    let any = run_quadratic::<AnyOptimizer>(OptimizerConfig::AdamW(config))?;
    assert_eq!(direct, any);

    let vars = make_vars(&initial_values()?)?;
    let mut opt = AnyOptimizer::from_named(named(&vars), OptimizerConfig::default())?;
    assert!(matches!(opt, AnyOptimizer::Sgd(_)));
    assert_eq!(opt.names(), ["bn.running_mean", "net.b", "net.w"]);
    assert_eq!(opt.vars().len(), 3);
    assert_eq!(opt.weight_decay_of("net.w"), Some(0.0));
    opt.set_learning_rate(0.5);
    assert_eq!(opt.learning_rate(), 0.5);
    opt.backward_step(&varying_loss(0, &vars)?)?;
    assert_eq!(opt.step_count(), 1);
    let state = opt.state();
    let mut fresh = AnyOptimizer::new(vec![], OptimizerConfig::default())?;
    assert!(fresh.load_state(state.clone()).is_err());
    let mut fresh = AnyOptimizer::from_named(named(&vars), OptimizerConfig::default())?;
    fresh.load_state(state)?;
    assert_eq!(fresh.step_count(), 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Schedules and KL warm-up.

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[test]
fn constant_and_step_schedules() {
    let s = LrSchedule::constant(0.1);
    assert!([0, 1, 500, 10_000].iter().all(|&t| s.lr_at(t, 1000) == 0.1));

    let s = LrSchedule::step(0.1, 30, 0.1);
    assert!(close(s.lr_at(0, 100), 0.1));
    assert!(close(s.lr_at(29, 100), 0.1));
    assert!(close(s.lr_at(30, 100), 0.01));
    assert!(close(s.lr_at(59, 100), 0.01));
    assert!(close(s.lr_at(60, 100), 0.001));
    assert!((0..200).all(|t| s.lr_at(t + 1, 200) <= s.lr_at(t, 200)));
}

#[test]
fn cosine_schedule() {
    let s = LrSchedule::cosine(0.1, 0.001);
    assert!(close(s.lr_at(0, 100), 0.1));
    assert!(close(s.lr_at(50, 100), (0.1 + 0.001) / 2.0));
    assert!(close(
        s.lr_at(25, 100),
        0.001 + 0.099 * (1.0 + 0.5f64.sqrt()) / 2.0
    ));
    assert!(close(s.lr_at(100, 100), 0.001));
    assert!(close(s.lr_at(150, 100), 0.001));
    assert!((0..120).all(|t| s.lr_at(t + 1, 100) <= s.lr_at(t, 100)));
}

#[test]
fn whvi_paper_schedule() {
    let s = LrSchedule::whvi_paper(0.01);
    assert!(close(s.lr_at(0, 0), 0.01));
    // t = 2000: 1 + 5e-4 · 2000 = 2.
    assert!(close(s.lr_at(2000, 0), 0.01 * 2f64.powf(-0.3)));
    assert!(close(s.lr_at(10_000, 0), 0.01 * 6f64.powf(-0.3)));
    assert!((0..5000)
        .step_by(100)
        .all(|t| s.lr_at(t + 100, 0) < s.lr_at(t, 0)));
    let g = LrSchedule::inverse_power(1.0, 0.1, 1.0);
    assert!(close(g.lr_at(10, 0), 0.5));
}

#[test]
fn warmup_composes_with_every_decay() {
    for s in [
        LrSchedule::constant(0.2),
        LrSchedule::cosine(0.2, 0.0),
        LrSchedule::step(0.2, 10, 0.5),
        LrSchedule::whvi_paper(0.2),
    ] {
        let w = s.clone().with_warmup(4);
        assert!(close(w.lr_at(0, 104), 0.05), "{w:?}");
        assert!(close(w.lr_at(1, 104), 0.1), "{w:?}");
        assert!(close(w.lr_at(3, 104), 0.2), "{w:?}");
        assert!((0..3).all(|t| w.lr_at(t + 1, 104) > w.lr_at(t, 104)));
        // After the warm-up the decay runs from its start, shifted by the warm-up.
        for t in 0..100 {
            assert!(close(w.lr_at(t + 4, 104), s.lr_at(t, 100)), "{w:?} at {t}");
        }
    }
    let w = LrSchedule::cosine(0.2, 0.02).with_warmup(4);
    assert!(close(w.lr_at(4, 104), 0.2));
    assert!(close(w.lr_at(54, 104), 0.11));
    assert!(close(w.lr_at(104, 104), 0.02));
    // No steps left after the warm-up: the cosine is already at its end.
    assert!(close(w.lr_at(4, 4), 0.02));
}

#[test]
fn schedule_validation_and_serde() -> TestResult {
    for s in [
        LrSchedule::constant(0.1),
        LrSchedule::cosine(0.1, 0.0).with_warmup(5),
        LrSchedule::step(0.1, 3, 0.1),
        LrSchedule::whvi_paper(0.1),
    ] {
        s.validate()?;
        let json = serde_json::to_string(&s)?;
        assert_eq!(serde_json::from_str::<LrSchedule>(&json)?, s);
    }
    let json = serde_json::to_string(&LrSchedule::step(0.1, 3, 0.5))?;
    assert!(json.contains(r#""kind":"step""#), "{json}");
    let partial: LrSchedule =
        serde_json::from_str(r#"{"base_lr": 0.1, "decay": {"kind": "cosine", "min_lr": 0.0}}"#)?;
    assert_eq!(partial, LrSchedule::cosine(0.1, 0.0));
    assert_eq!(LrSchedule::default(), LrSchedule::constant(1e-3));

    let bad = [
        (LrSchedule::constant(-0.1), "base_lr"),
        (LrSchedule::cosine(0.1, 0.2), "min_lr"),
        (LrSchedule::step(0.1, 0, 0.1), "every"),
        (LrSchedule::step(0.1, 2, f64::INFINITY), "gamma"),
        (LrSchedule::inverse_power(0.1, -1.0, 0.3), "rate"),
        (LrSchedule::inverse_power(0.1, 1.0, -0.3), "power"),
    ];
    for (s, what) in bad {
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.contains(what), "{s:?}: {msg}");
    }
    assert_eq!(
        LrSchedule {
            decay: LrDecay::Constant,
            ..LrSchedule::whvi_paper(0.3)
        },
        LrSchedule::constant(0.3)
    );
    Ok(())
}

#[test]
fn kl_warmup() -> TestResult {
    let none = KlWarmup::default();
    assert_eq!(none.epochs, 0);
    assert_eq!(none.beta(0.0), 1.0);
    assert_eq!(none.beta(7.0), 1.0);
    let k = KlWarmup { epochs: 4 };
    assert_eq!(k.beta(0.0), 0.0);
    assert_eq!(k.beta(1.0), 0.25);
    assert_eq!(k.beta(2.5), 0.625);
    assert_eq!(k.beta(4.0), 1.0);
    assert_eq!(k.beta(10.0), 1.0);
    assert_eq!(k.beta(-1.0), 0.0);
    let json = serde_json::to_string(&k)?;
    assert_eq!(serde_json::from_str::<KlWarmup>(&json)?, k);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gradient clipping.

/// Variables `a` (2), `b` (1) and `c` (1, unused), and a store holding `a`'s and `b`'s gradients
/// `ga` and `gb` exactly.
fn grads_of(
    ga: [f32; 2],
    gb: f32,
) -> candle_core::Result<(Vec<Var>, candle_core::backprop::GradStore)> {
    let dev = Device::Cpu;
    let a = Var::new(&[1.0f32, 2.0], &dev)?;
    let b = Var::new(&[3.0f32], &dev)?;
    let c = Var::new(&[4.0f32], &dev)?;
    let loss = ((a.as_tensor() * Tensor::new(&ga, &dev)?)?.sum_all()?
        + (b.as_tensor() * Tensor::new(&[gb], &dev)?)?.sum_all()?)?;
    let grads = loss.backward()?;
    Ok((vec![a, b, c], grads))
}

fn grad_values(
    vars: &[Var],
    grads: &candle_core::backprop::GradStore,
) -> candle_core::Result<Vec<f32>> {
    let mut out = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v) {
            out.extend(g.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

#[test]
fn clipping_by_global_norm() -> TestResult {
    // Norm √(3² + 4² + 12²) = 13.
    let (vars, mut grads) = grads_of([3.0, 4.0], 12.0)?;
    let norm = clip_grad_norm(&mut grads, &vars, 6.5)?;
    assert!((norm - 13.0).abs() < 1e-9, "{norm}");
    let clipped = grad_values(&vars, &grads)?;
    let scale = 6.5 / (13.0 + 1e-6);
    for (got, want) in clipped.iter().zip([3.0, 4.0, 12.0]) {
        assert!((*got as f64 - want * scale).abs() < 1e-6, "{clipped:?}");
    }
    let new_norm: f64 = clipped
        .iter()
        .map(|g| (*g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((new_norm - 6.5).abs() < 1e-5, "{new_norm}");

    // Below the threshold nothing changes, and the norm is still reported.
    let (vars, mut grads) = grads_of([3.0, 4.0], 12.0)?;
    assert!((clip_grad_norm(&mut grads, &vars, 13.5)? - 13.0).abs() < 1e-9);
    assert_eq!(grad_values(&vars, &grads)?, [3.0, 4.0, 12.0]);

    // Only the given variables count.
    let (vars, mut grads) = grads_of([3.0, 4.0], 12.0)?;
    assert!((clip_grad_norm(&mut grads, &vars[..1], 1.0)? - 5.0).abs() < 1e-9);
    assert_eq!(grad_values(&vars[1..], &grads)?, [12.0]);
    assert_eq!(clip_grad_norm(&mut grads, &vars[2..], 1.0)?, 0.0);
    Ok(())
}

#[test]
fn clipping_reports_non_finite_norms() -> TestResult {
    for bad in [f32::NAN, f32::INFINITY] {
        let (vars, mut grads) = grads_of([3.0, 4.0], bad)?;
        let err = clip_grad_norm(&mut grads, &vars, 1.0).unwrap_err();
        assert!(matches!(err, Error::Diverged(_)), "{err:?}");
        assert_eq!(grad_values(&vars, &grads)?[..2], [3.0, 4.0]);
    }
    let (vars, mut grads) = grads_of([3.0, 4.0], 1.0)?;
    for max_norm in [0.0, -1.0, f64::NAN] {
        let err = clip_grad_norm(&mut grads, &vars, max_norm).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }
    Ok(())
}

#[test]
fn optimiser_state_holds_no_backprop_graph() -> TestResult {
    // d(w · exp(w))/dw multiplies by exp(w), a tracked tensor, so w's gradient carries the
    // forward graph: a moment built from it without detaching would keep every step's graph
    // (and its activations) alive.
    let configs = [
        OptimizerConfig::AdamW(AdamWConfig::default()),
        OptimizerConfig::Sgd(SgdConfig {
            momentum: 0.9,
            ..SgdConfig::default()
        }),
    ];
    for config in configs {
        let w = Var::new(&[0.1f32, -0.2, 0.3], &Device::Cpu)?;
        let mut opt = AnyOptimizer::from_named(vec![("w".into(), w.clone())], config)?;
        for _ in 0..3 {
            let loss = (w.as_tensor() * w.exp()?)?.sum_all()?;
            let grads = loss.backward()?;
            assert!(
                grads.get(&w).expect("a gradient").track_op(),
                "the premise holds"
            );
            opt.step(&grads)?;
        }
        for (name, tensor) in opt.state() {
            assert!(!tensor.track_op(), "{name} keeps a backprop graph");
        }
    }
    Ok(())
}

#[test]
fn learning_rate_factors_must_be_positive() {
    for factor in [0.0, -1.0, f64::NAN] {
        let config = AdamWConfig {
            lr_scale: bias_lr_scale(factor),
            ..AdamWConfig::default()
        };
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let err = AdamW::from_named(vec![("layer.bias".into(), w)], config).unwrap_err();
        assert!(err.to_string().contains("learning-rate factor"), "{err}");
        let config = SgdConfig {
            lr_scale: bias_lr_scale(factor),
            ..SgdConfig::default()
        };
        assert!(config.validate().is_err(), "factor {factor}");
    }
}

#[test]
fn training_config_gives_whvi_diagonals_no_decay_and_their_own_learning_rate() -> TestResult {
    use whvi::layers::ParamRole;
    use whvi::train::{trainable, NamedParameter, TrainConfig, DEFAULT_DIAGONAL_LR_SCALE};
    let config = TrainConfig::default();
    let dev = Device::Cpu;
    let names = ["fc1.s1", "fc1.s2", "fc1.mu", "conv1.weight"];
    let roles = [
        ParamRole::Diagonal,
        ParamRole::Diagonal,
        ParamRole::Variational,
        ParamRole::Weight,
    ];
    let vars: Vec<Var> = names
        .iter()
        .map(|_| Var::new(&[1.0f32], &dev))
        .collect::<candle_core::Result<_>>()?;
    let parameters: Vec<NamedParameter> = names
        .iter()
        .zip(&vars)
        .zip(roles)
        .map(|((name, var), role)| NamedParameter {
            name: name.to_string(),
            var: var.clone(),
            role,
        })
        .collect();
    let mut opt =
        AnyOptimizer::from_named(trainable(&parameters), config.optimizer_config(&parameters))?;
    assert_eq!(opt.weight_decay_of("fc1.s1"), Some(0.0));
    assert_eq!(opt.weight_decay_of("fc1.s2"), Some(0.0));
    assert_eq!(opt.weight_decay_of("fc1.mu"), Some(0.0));
    assert_eq!(
        opt.weight_decay_of("conv1.weight"),
        Some(config.weight_decay)
    );
    // Same gradient for all: Adam's first step moves each by its learning rate (times the sign).
    let loss = vars
        .iter()
        .map(|v| v.as_tensor().sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let loss = Tensor::stack(&loss, 0)?.sum_all()?;
    opt.backward_step(&loss)?;
    let moved: Vec<f32> = vars
        .iter()
        .map(|v| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0])
        .collect();
    let base = moved[2];
    assert!(base > 0.0);
    for (name, m) in names.iter().zip(&moved).take(2) {
        let ratio = f64::from(m / base);
        assert!(
            (ratio - DEFAULT_DIAGONAL_LR_SCALE).abs() < 1e-3 * DEFAULT_DIAGONAL_LR_SCALE,
            "{name}: moved {ratio}x the mean's step"
        );
    }
    Ok(())
}
