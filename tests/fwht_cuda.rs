//! The FWHT and a WHVI layer on an NVIDIA GPU, against the CPU implementation.
//!
//! Built only with `--features cuda` (CI type-checks them with `cargo check --features cuda
//! --all-targets`); they need a GPU to run: `cargo test --features cuda --test fwht_cuda`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use whvi::fwht::{fwht, Scaling};
use whvi::layers::{PosteriorConfig, WhviBlocks};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need an NVIDIA GPU and a build with --features cuda")
}

/// Deterministic test data with values of both signs.
fn data(rows: usize, d: usize) -> Vec<f32> {
    (0..rows * d)
        .map(|i| (((i * 2654435761) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// max |a - b| / max |b| over all elements.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let scale = b.abs().unwrap().max(0).unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-30)
}

#[test]
fn f32_matches_the_cpu_for_every_length_up_to_two_passes() {
    let gpu = gpu();
    for log_d in 0..=17 {
        let d = 1usize << log_d;
        for rows in [1usize, 3, 257] {
            if rows * d > 1 << 22 {
                continue;
            }
            let x = Tensor::from_vec(data(rows, d), (rows, d), &Device::Cpu).unwrap();
            for norm in [Scaling::None, Scaling::Orthonormal] {
                let cpu = fwht(&x, norm).unwrap();
                let on_gpu = fwht(&x.to_device(&gpu).unwrap(), norm).unwrap();
                let err = relative_error(&on_gpu.to_device(&Device::Cpu).unwrap(), &cpu);
                assert!(
                    err <= 1e-5,
                    "D = 2^{log_d}, {rows} rows, {norm:?}: error {err}"
                );
            }
        }
    }
}

#[test]
fn f64_matches_the_cpu_including_multi_pass_rows() {
    let gpu = gpu();
    for log_d in [5, 10, 14, 15, 16] {
        let d = 1usize << log_d;
        let x = Tensor::from_vec(data(2, d), (2, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let cpu = fwht(&x, Scaling::Orthonormal).unwrap();
        let on_gpu = fwht(&x.to_device(&gpu).unwrap(), Scaling::Orthonormal).unwrap();
        let err = relative_error(&on_gpu.to_device(&Device::Cpu).unwrap(), &cpu);
        assert!(err <= 1e-12, "D = 2^{log_d}: error {err}");
    }
}

#[test]
fn half_types_match_the_cpu_to_their_precision() {
    let gpu = gpu();
    // One rounding at the end: the error is within one unit in the last place of the largest
    // output (bf16 keeps 8 bits of mantissa, f16 11).
    for (dtype, tolerance) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
        for log_d in [4, 10, 13, 15, 16] {
            let d = 1usize << log_d;
            let x = Tensor::from_vec(data(4, d), (4, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let exact = fwht(&x.to_dtype(DType::F32).unwrap(), Scaling::Orthonormal).unwrap();
            let on_gpu = fwht(&x.to_device(&gpu).unwrap(), Scaling::Orthonormal).unwrap();
            assert_eq!(on_gpu.dtype(), dtype);
            let err = relative_error(&on_gpu.to_device(&Device::Cpu).unwrap(), &exact);
            assert!(err <= tolerance, "{dtype:?}, D = 2^{log_d}: error {err}");
        }
    }
}

#[test]
fn more_rows_than_a_grid_dimension_holds() {
    let gpu = gpu();
    let (rows, d) = (70_000, 64);
    let x = Tensor::from_vec(data(rows, d), (rows, d), &Device::Cpu).unwrap();
    let cpu = fwht(&x, Scaling::None).unwrap();
    let on_gpu = fwht(&x.to_device(&gpu).unwrap(), Scaling::None).unwrap();
    assert!(relative_error(&on_gpu.to_device(&Device::Cpu).unwrap(), &cpu) <= 1e-5);
}

#[test]
fn strided_inputs_and_gradients() {
    let gpu = gpu();
    let (rows, d) = (16, 512);
    let x = Tensor::from_vec(data(d, rows), (d, rows), &Device::Cpu).unwrap();
    let cpu = fwht(&x.t().unwrap(), Scaling::None).unwrap();
    let x_gpu = Var::from_tensor(&x.to_device(&gpu).unwrap()).unwrap();
    let y = fwht(&x_gpu.as_tensor().t().unwrap(), Scaling::None).unwrap();
    assert!(relative_error(&y.to_device(&Device::Cpu).unwrap(), &cpu) <= 1e-5);

    // d/dx sum(w ⊙ H x^T) = (H w)^T.
    let w = Tensor::from_vec(data(rows, d), (rows, d), &Device::Cpu).unwrap();
    let loss = (y * w.to_device(&gpu).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(x_gpu.as_tensor()).expect("x has a gradient");
    let expected = fwht(&w, Scaling::None).unwrap().t().unwrap();
    assert!(relative_error(&grad.to_device(&Device::Cpu).unwrap(), &expected) <= 1e-5);
}

#[test]
fn a_whvi_layer_gives_the_same_outputs_and_input_gradients() {
    let gpu = gpu();
    let (d_in, d_out, batch): (usize, usize, usize) = (300, 700, 8);
    let mut params = HashMap::new();
    let blocks = d_out.div_ceil(d_in.next_power_of_two());
    let d = d_in.next_power_of_two();
    for (i, name) in ["s1", "s2", "mu", "log_sigma"].into_iter().enumerate() {
        let values: Vec<f32> = data(blocks, d)
            .into_iter()
            .map(|v| match i {
                0 | 1 => 1.0 + 0.1 * v,
                2 => 0.01 * v,
                _ => -6.0 + v,
            })
            .collect();
        params.insert(
            name.to_string(),
            Tensor::from_vec(values, (blocks, d), &Device::Cpu).unwrap(),
        );
    }
    let layer = |device: &Device| {
        let on_device = params
            .iter()
            .map(|(k, v)| (k.clone(), v.to_device(device).unwrap()))
            .collect();
        let vb = VarBuilder::from_tensors(on_device, DType::F32, device);
        WhviBlocks::new(d_in, d_out, PosteriorConfig::default(), vb).unwrap()
    };
    let x = Tensor::from_vec(data(batch, d_in), (batch, d_in), &Device::Cpu).unwrap();
    let eps = Tensor::from_vec(data(batch, blocks * d), (batch, blocks, d), &Device::Cpu).unwrap();

    let run = |device: &Device| {
        let layer = layer(device);
        let x = Var::from_tensor(&x.to_device(device).unwrap()).unwrap();
        let y = layer
            .apply_with_noise(x.as_tensor(), &eps.to_device(device).unwrap(), None)
            .unwrap();
        let loss = y.sqr().unwrap().sum(D::Minus1).unwrap().sum_all().unwrap();
        let grad = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        (
            y.to_device(&Device::Cpu).unwrap(),
            grad.to_device(&Device::Cpu).unwrap(),
        )
    };
    let (y_cpu, grad_cpu) = run(&Device::Cpu);
    let (y_gpu, grad_gpu) = run(&gpu);
    assert!(relative_error(&y_gpu, &y_cpu) <= 1e-4);
    assert!(relative_error(&grad_gpu, &grad_cpu) <= 1e-4);
}
