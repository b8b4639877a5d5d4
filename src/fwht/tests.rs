//! The fast Walsh-Hadamard transform against its definition, through every kernel path and
//! through the tensor op (dtypes, layouts, gradients, errors).
//!
//! Tolerances follow the error bound of the butterfly network: each output of an `L`-level
//! transform is a signed sum of the row in which every term passes through at most `L`
//! roundings, plus one for the scale, so `|computed - exact| <= (L + 1) u |scale| sum|x|` to
//! first order, with `u` the unit roundoff. The checks use `eps = 2u` (a factor 2 of margin).
//! The exact reference is a dense product with `H_ij = (-1)^popcount(i & j)` summed in f64 with
//! compensation, whose own error is far below these bounds.

use super::cpu::{self, Path};
use super::{fwht, Scaling};
use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use rand::Rng;

/// `Auto` and every concrete path this CPU runs (AVX-512 and AVX2 where present).
fn paths() -> Vec<Path> {
    let mut paths = Path::available();
    paths.push(Path::Auto);
    paths
}

fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = crate::rng::seeded(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Exact-enough dense transform of every row of `x`: Neumaier-compensated sums in f64.
fn dense(x: &[f64], d: usize, scale: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        for i in 0..d {
            let (mut sum, mut carry) = (0.0f64, 0.0f64);
            for (j, &v) in row.iter().enumerate() {
                let term = if (i & j).count_ones() % 2 == 0 { v } else { -v };
                let t = sum + term;
                carry += if sum.abs() >= term.abs() {
                    (sum - t) + term
                } else {
                    (term - t) + sum
                };
                sum = t;
            }
            out.push((sum + carry) * scale);
        }
    }
    out
}

/// Asserts that every row of `got` is within `(levels + extra) * eps * |scale| * sum|x_row|` of
/// `want`, where `levels = log2 d`.
fn assert_close(got: &[f64], want: &[f64], x: &[f64], d: usize, scale: f64, eps: f64, extra: u32) {
    assert_eq!(got.len(), want.len());
    let levels = d.trailing_zeros() + extra;
    for (r, ((g, w), xr)) in got
        .chunks_exact(d)
        .zip(want.chunks_exact(d))
        .zip(x.chunks_exact(d))
        .enumerate()
    {
        let l1: f64 = xr.iter().map(|v| v.abs()).sum();
        let tol = f64::from(levels) * eps * scale.abs() * l1;
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "d = {d}, row {r}, element {i}: got {a}, want {b}, tolerance {tol}"
            );
        }
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn every_path_matches_the_dense_matrix_up_to_1024_f32() {
    for log_d in 0..=10 {
        let d = 1usize << log_d;
        let rows = 3;
        let x = to_f32(&random(rows * d, log_d as u64));
        let xw = widen(&x);
        for scale in [1.0f32, 0.375] {
            let want = dense(&xw, d, f64::from(scale));
            for path in paths() {
                let mut inplace = x.clone();
                cpu::fwht_rows_f32_using(path, &mut inplace, d, scale);
                assert_close(
                    &widen(&inplace),
                    &want,
                    &xw,
                    d,
                    scale.into(),
                    f32::EPSILON.into(),
                    1,
                );
                let mut out = vec![f32::NAN; x.len()];
                cpu::fwht_rows_f32_into_using(path, &x, &mut out, d, scale);
                assert_close(
                    &widen(&out),
                    &want,
                    &xw,
                    d,
                    scale.into(),
                    f32::EPSILON.into(),
                    1,
                );
            }
        }
    }
}

#[test]
fn every_path_matches_the_dense_matrix_up_to_1024_f64() {
    for log_d in 0..=10 {
        let d = 1usize << log_d;
        let rows = 3;
        let x = random(rows * d, 100 + log_d as u64);
        for scale in [1.0f64, 0.375] {
            let want = dense(&x, d, scale);
            for path in paths() {
                let mut inplace = x.clone();
                cpu::fwht_rows_f64_using(path, &mut inplace, d, scale);
                assert_close(&inplace, &want, &x, d, scale, f64::EPSILON, 1);
                let mut out = vec![f64::NAN; x.len()];
                cpu::fwht_rows_f64_into_using(path, &x, &mut out, d, scale);
                assert_close(&out, &want, &x, d, scale, f64::EPSILON, 1);
            }
        }
    }
}

/// Every kernel runs each butterfly as one rounded `a + b` and `a - b`, levels in the same
/// order, the scale last: the paths agree to the last bit, in place and out of place, for every
/// row length up to 2^17 (past one L1 block and more than one pass across blocks) and for row
/// counts that are not a multiple of anything.
#[test]
fn every_path_gives_the_same_bits() {
    let available = Path::available();
    eprintln!("paths compared on this CPU: {available:?}");
    for log_d in 0..=17u32 {
        let d = 1usize << log_d;
        let rows = if log_d <= 12 { 7 } else { 1 };
        let x64 = random(rows * d, 300 + u64::from(log_d));
        let x32 = to_f32(&x64);
        for scale in [1.0, 0.1875] {
            let mut want32 = x32.clone();
            cpu::fwht_rows_f32_using(Path::Reference, &mut want32, d, scale as f32);
            let mut want64 = x64.clone();
            cpu::fwht_rows_f64_using(Path::Reference, &mut want64, d, scale);
            for &path in &available {
                let mut got32 = x32.clone();
                cpu::fwht_rows_f32_using(path, &mut got32, d, scale as f32);
                let mut into32 = vec![f32::NAN; x32.len()];
                cpu::fwht_rows_f32_into_using(path, &x32, &mut into32, d, scale as f32);
                let mut got64 = x64.clone();
                cpu::fwht_rows_f64_using(path, &mut got64, d, scale);
                let mut into64 = vec![f64::NAN; x64.len()];
                cpu::fwht_rows_f64_into_using(path, &x64, &mut into64, d, scale);
                for (name, got) in [("in place", &got32), ("into", &into32)] {
                    let same = got
                        .iter()
                        .zip(&want32)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{path:?} f32 {name}, d = {d}, scale {scale}: bits differ"
                    );
                }
                for (name, got) in [("in place", &got64), ("into", &into64)] {
                    let same = got
                        .iter()
                        .zip(&want64)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{path:?} f64 {name}, d = {d}, scale {scale}: bits differ"
                    );
                }
            }
        }
    }
}

#[test]
fn a_path_this_cpu_lacks_is_refused_not_run() {
    use crate::simd::Level;
    for level in Level::ALL {
        let mut x = vec![1f32; 64];
        let run = std::panic::catch_unwind(move || {
            cpu::fwht_rows_f32_using(Path::Simd(level), &mut x, 64, 1.0);
            x
        });
        match run {
            Ok(x) => {
                assert!(level.is_supported(), "{level:?} ran on a CPU without it");
                assert_eq!(x[0], 64.0);
                assert!(x[1..].iter().all(|&v| v == 0.0));
            }
            Err(_) => assert!(
                !level.is_supported(),
                "{level:?} refused on a CPU that has it"
            ),
        }
    }
}

/// Long rows go through the L1 blocking and the passes across blocks; there the reference is
/// the plain radix-2 path, itself checked against the dense matrix above.
#[test]
fn long_rows_match_the_reference_path() {
    for log_d in [11, 12, 13, 14, 15, 16, 17, 18, 19] {
        let d = 1usize << log_d;
        let rows = if log_d <= 14 { 3 } else { 1 };
        let x64 = random(rows * d, 200 + log_d as u64);
        let x32 = to_f32(&x64);
        let xw = widen(&x32);
        let mut want32 = x32.clone();
        cpu::fwht_rows_f32_using(Path::Reference, &mut want32, d, 0.5);
        let mut want64 = x64.clone();
        cpu::fwht_rows_f64_using(Path::Reference, &mut want64, d, 0.5);
        for path in paths().into_iter().filter(|&p| p != Path::Reference) {
            let mut got = x32.clone();
            cpu::fwht_rows_f32_using(path, &mut got, d, 0.5);
            // Both sides carry rounding error: twice the bound of one.
            assert_close(
                &widen(&got),
                &widen(&want32),
                &xw,
                d,
                0.5,
                2.0 * f64::from(f32::EPSILON),
                1,
            );
            let mut out = vec![0f32; x32.len()];
            cpu::fwht_rows_f32_into_using(path, &x32, &mut out, d, 0.5);
            assert_close(
                &widen(&out),
                &widen(&want32),
                &xw,
                d,
                0.5,
                2.0 * f64::from(f32::EPSILON),
                1,
            );
            let mut got = x64.clone();
            cpu::fwht_rows_f64_using(path, &mut got, d, 0.5);
            assert_close(&got, &want64, &x64, d, 0.5, 2.0 * f64::EPSILON, 1);
            let mut out = vec![0f64; x64.len()];
            cpu::fwht_rows_f64_into_using(path, &x64, &mut out, d, 0.5);
            assert_close(&out, &want64, &x64, d, 0.5, 2.0 * f64::EPSILON, 1);
        }
    }
}

/// `H·H = D·I`: transforming twice gives `D·x`, for sizes too large for the dense product.
#[test]
fn transforming_twice_multiplies_by_d() {
    for log_d in [12, 14, 16, 20] {
        let d = 1usize << log_d;
        let x = random(2 * d, 300 + log_d as u64);
        let mut y = x.clone();
        cpu::fwht_rows_f64(&mut y, d, 1.0);
        cpu::fwht_rows_f64(&mut y, d, 1.0);
        let want: Vec<f64> = x.iter().map(|v| v * d as f64).collect();
        // The second transform sees `|Hx|_1 <= D |x|_1` per row: bound of two passes, each
        // `L` levels, relative to `D |x|_1`.
        assert_close(&y, &want, &x, d, d as f64, f64::EPSILON, log_d + 1);
    }
}

#[test]
fn the_transform_is_linear() {
    let d = 256;
    let (x, y) = (random(4 * d, 1), random(4 * d, 2));
    let (a, b) = (0.75, -1.5);
    let combo: Vec<f64> = x.iter().zip(&y).map(|(u, v)| a * u + b * v).collect();
    let mut hc = combo.clone();
    cpu::fwht_rows_f64(&mut hc, d, 1.0);
    let (mut hx, mut hy) = (x.clone(), y.clone());
    cpu::fwht_rows_f64(&mut hx, d, 1.0);
    cpu::fwht_rows_f64(&mut hy, d, 1.0);
    let want: Vec<f64> = hx.iter().zip(&hy).map(|(u, v)| a * u + b * v).collect();
    // Each side is within the bound of the exact `H(ax + by)`, measured against `|a x| + |b y|`.
    let mag: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(u, v)| (a * u).abs() + (b * v).abs())
        .collect();
    assert_close(&hc, &want, &mag, d, 1.0, 2.0 * f64::EPSILON, 2);
}

#[test]
fn kernel_entry_points_reject_bad_layouts() {
    let bad_d = std::panic::catch_unwind(|| cpu::fwht_rows_f32(&mut [0.0; 6], 3, 1.0));
    let msg = *bad_d.unwrap_err().downcast::<String>().unwrap();
    assert!(msg.contains("not a power of two"), "{msg}");
    let ragged = std::panic::catch_unwind(|| cpu::fwht_rows_f64(&mut [0.0; 6], 4, 1.0));
    let msg = *ragged.unwrap_err().downcast::<String>().unwrap();
    assert!(msg.contains("whole number of rows"), "{msg}");
    let lengths =
        std::panic::catch_unwind(|| cpu::fwht_rows_f32_into(&[0.0; 8], &mut [0.0; 4], 4, 1.0));
    let msg = *lengths.unwrap_err().downcast::<String>().unwrap();
    assert!(msg.contains("lengths differ"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// The tensor op

fn tensor_values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn op_matches_the_dense_matrix_for_every_float_dtype() {
    let d = 64;
    let x = random(3 * d, 7);
    let scale = Scaling::Orthonormal.scale(d);
    for (dtype, eps) in [
        (DType::F64, f64::EPSILON),
        (DType::F32, f64::from(f32::EPSILON)),
        (DType::F16, f64::from(half::f16::EPSILON)),
        (DType::BF16, f64::from(half::bf16::EPSILON)),
    ] {
        let t = Tensor::from_slice(&x, (3, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let xs = tensor_values(&t);
        let y = fwht(&t, Scaling::Orthonormal).unwrap();
        assert_eq!(y.dtype(), dtype);
        assert_eq!(y.dims(), &[3, d]);
        let want = dense(&xs, d, scale);
        // Every step rounds in the tensor's precision, `L + 1` times, except for half
        // precision: computed in f32 (`L + 1` f32 roundings) and rounded once at the end (`eps`
        // of `|y| <= scale |x|_1`).
        let levels = f64::from(d.trailing_zeros() + 1);
        let f32_eps = f64::from(f32::EPSILON);
        let rel = match dtype {
            DType::F16 | DType::BF16 => eps + levels * f32_eps,
            _ => levels * eps,
        };
        let got = tensor_values(&y);
        for (r, ((g, w), xr)) in got
            .chunks(d)
            .zip(want.chunks(d))
            .zip(xs.chunks(d))
            .enumerate()
        {
            let tol = rel * scale * xr.iter().map(|v| v.abs()).sum::<f64>();
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= tol,
                    "{dtype:?} row {r}: {a} vs {b}, tolerance {tol}"
                );
            }
        }
    }
}

#[test]
fn op_handles_ranks_one_to_four() {
    for shape in [vec![16], vec![3, 8], vec![2, 3, 8], vec![2, 1, 3, 32]] {
        let n: usize = shape.iter().product();
        let d = *shape.last().unwrap();
        let x = random(n, n as u64);
        let t = Tensor::from_slice(&x, shape.as_slice(), &Device::Cpu).unwrap();
        let y = fwht(&t, Scaling::None).unwrap();
        assert_eq!(y.dims(), shape.as_slice());
        assert_close(
            &tensor_values(&y),
            &dense(&x, d, 1.0),
            &x,
            d,
            1.0,
            f64::EPSILON,
            1,
        );
    }
}

#[test]
fn op_accepts_strided_inputs() {
    let d = 32;
    let dev = &Device::Cpu;
    // Transposed: rows of the view are columns of the storage.
    let base = Tensor::from_slice(&random(d * 5, 11), (d, 5), dev).unwrap();
    let transposed = base.t().unwrap();
    assert!(!transposed.is_contiguous());
    // Narrowed along the last dimension: rows with a gap between them.
    let wide = Tensor::from_slice(&random(4 * 3 * d, 12), (4, 3 * d), dev).unwrap();
    let narrowed = wide.narrow(1, d, d).unwrap();
    assert!(!narrowed.is_contiguous());
    // Narrowed along the first dimension: contiguous, but starting at an offset.
    let offset = wide.reshape((12, d)).unwrap().narrow(0, 5, 4).unwrap();
    for (name, view) in [
        ("transposed", transposed),
        ("narrowed", narrowed),
        ("offset", offset),
    ] {
        let x = tensor_values(&view);
        for norm in [Scaling::None, Scaling::Orthonormal] {
            let y = fwht(&view, norm).unwrap();
            let scale = norm.scale(d);
            let got = tensor_values(&y);
            let want = dense(&x, d, scale);
            let l = d.trailing_zeros();
            let ok = got
                .iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() <= f64::from(l + 2) * f64::EPSILON * scale * d as f64);
            assert!(ok, "{name} ({norm:?}): {got:?} vs {want:?}");
        }
    }
}

#[test]
fn orthonormal_op_is_its_own_inverse() {
    let d = 1024;
    let x = random(2 * d, 21);
    let t = Tensor::from_slice(&x, (2, d), &Device::Cpu).unwrap();
    let back = fwht(
        &fwht(&t, Scaling::Orthonormal).unwrap(),
        Scaling::Orthonormal,
    )
    .unwrap();
    // With |x_i| <= 1: the first pass errs by at most `(L + 2) eps |x|_1 / sqrt(D)` per element
    // (one more rounding for the irrational scale), i.e. `(L + 2) eps sqrt(D)`; the second pass
    // carries that error through `H / sqrt(D)` (at most `sqrt(D)` times larger element-wise)
    // and adds its own, on data with `|y|_1 <= D`: `(L + 2) eps (D + sqrt(D))` in all.
    let l = f64::from(d.trailing_zeros());
    let tol = (l + 2.0) * f64::EPSILON * (d as f64 + (d as f64).sqrt());
    for (a, b) in tensor_values(&back).iter().zip(&x) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }
}

/// `loss(x) = sum(w * sin(fwht(x)))`: the analytic gradient from `backward` against central
/// differences.
#[test]
fn gradient_matches_finite_differences() {
    let (rows, d) = (2, 16);
    let dev = &Device::Cpu;
    let x0 = random(rows * d, 31);
    let w = Tensor::from_slice(&random(rows * d, 32), (rows, d), dev).unwrap();
    for norm in [Scaling::None, Scaling::Orthonormal] {
        let loss = |x: &Tensor| -> Tensor {
            (fwht(x, norm).unwrap().sin().unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let x = Var::from_slice(&x0, (rows, d), dev).unwrap();
        let grads = loss(x.as_tensor()).backward().unwrap();
        let g = tensor_values(grads.get(x.as_tensor()).unwrap());
        let h = 1e-6;
        for i in 0..rows * d {
            let at = |delta: f64| -> f64 {
                let mut v = x0.clone();
                v[i] += delta;
                let t = Tensor::from_slice(&v, (rows, d), dev).unwrap();
                loss(&t).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            // Central differences err by O(h^2 |f'''|) plus O(u |f| / h); both are below 1e-6 of
            // the gradient's scale (up to `D·scale` here).
            let tol = 1e-6 * d as f64 * norm.scale(d);
            assert!(
                (fd - g[i]).abs() <= tol,
                "{norm:?} x[{i}]: fd {fd}, backward {}",
                g[i]
            );
        }
    }
}

/// Gradient descent on `|fwht(x) - target|^2` reaches the target only if the gradient is right
/// (a wrong scale diverges or stalls, a wrong transform converges elsewhere).
#[test]
fn gradient_descent_inverts_the_transform() {
    let d = 64;
    let dev = &Device::Cpu;
    let target = Tensor::from_slice(&random(d, 41), (1, d), dev).unwrap();
    for (norm, lr) in [
        (Scaling::Orthonormal, 0.25),
        (Scaling::None, 0.25 / d as f64),
    ] {
        let x = Var::zeros((1, d), DType::F64, dev).unwrap();
        for _ in 0..60 {
            let residual = (fwht(x.as_tensor(), norm).unwrap() - &target).unwrap();
            let loss = residual.sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap();
            x.set(&(x.as_tensor() - (g * lr).unwrap()).unwrap())
                .unwrap();
        }
        // Each step halves the error: after 60 steps only rounding remains.
        let residual = (fwht(x.as_tensor(), norm).unwrap() - &target).unwrap();
        let err: f64 = residual
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12, "{norm:?}: residual {err}");
    }
}

#[test]
fn op_errors_say_what_is_wrong() {
    let dev = &Device::Cpu;
    let msg = |t: &Tensor| fwht(t, Scaling::None).unwrap_err().to_string();

    let m = msg(&Tensor::zeros((2, 6), DType::F32, dev).unwrap());
    assert!(m.contains("not a power of two") && m.contains("6"), "{m}");
    assert!(m.contains("fwht_padded"), "{m}");

    let m = msg(&Tensor::zeros((2, 0), DType::F32, dev).unwrap());
    assert!(m.contains("size 0"), "{m}");

    let m = msg(&Tensor::new(1.0f32, dev).unwrap());
    assert!(m.contains("rank 0"), "{m}");

    for dtype in [DType::U8, DType::U32, DType::I64] {
        let m = msg(&Tensor::zeros((2, 4), dtype, dev).unwrap());
        assert!(
            m.contains(&format!("{dtype:?}")) && m.contains("float"),
            "{m}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The op (fastest kernel, through any contiguous shape) against the reference kernel,
    /// relative to each row's magnitude.
    #[test]
    fn op_matches_the_reference_kernel(
        lead in proptest::collection::vec(1usize..4, 0..3),
        log_d in 0u32..=12,
        magnitude in -20i32..20,
        seed in any::<u64>(),
    ) {
        let d = 1usize << log_d;
        let rows: usize = lead.iter().product();
        let mut shape = lead.clone();
        shape.push(d);
        let factor = 2f64.powi(magnitude);
        let x: Vec<f32> = random(rows * d, seed).iter().map(|v| (v * factor) as f32).collect();
        let t = Tensor::from_slice(&x, shape.as_slice(), &Device::Cpu).unwrap();
        let got: Vec<f32> = fwht(&t, Scaling::None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut want = x.clone();
        cpu::fwht_rows_f32_using(Path::Reference, &mut want, d, 1.0);
        let xw = widen(&x);
        for (r, ((g, w), xr)) in got.chunks_exact(d).zip(want.chunks_exact(d)).zip(xw.chunks_exact(d)).enumerate() {
            let l1: f64 = xr.iter().map(|v| v.abs()).sum();
            // Two computations, each within `(L + 1) eps |x|_1` of the exact result.
            let tol = 2.0 * f64::from(log_d + 1) * f64::from(f32::EPSILON) * l1;
            for (a, b) in g.iter().zip(w) {
                prop_assert!((f64::from(*a) - f64::from(*b)).abs() <= tol, "row {}: {} vs {}", r, a, b);
            }
        }
    }
}
