//! The im2col + gemm convolution against candle's conv2d and a naive loop: forward, input and
//! weight gradients.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use whvi::conv::{conv2d, conv2d_per_example, ConvGeometry};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f32::max)
}

/// Direct definition: y[b, o, i, j] = sum_{c, ky, kx} w[o, c, ky, kx] x[b, c, i·s + ky - p, j·s + kx - p].
fn naive(x: &Tensor, w: &Tensor, geo: ConvGeometry) -> Tensor {
    let (b, c, h, wd) = x.dims4().unwrap();
    let (o, _, kh, kw) = w.dims4().unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (s, p) = (geo.stride as isize, geo.padding as isize);
    let ho = (h + 2 * geo.padding - kh) / geo.stride + 1;
    let wo = (wd + 2 * geo.padding - kw) / geo.stride + 1;
    let mut y = vec![0f32; b * o * ho * wo];
    for bi in 0..b {
        for oi in 0..o {
            for i in 0..ho {
                for j in 0..wo {
                    let mut acc = 0f32;
                    for ci in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = i as isize * s + ky as isize - p;
                                let ix = j as isize * s + kx as isize - p;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((bi * c + ci) * h + iy as usize) * wd + ix as usize;
                                let wi = ((oi * c + ci) * kh + ky) * kw + kx;
                                acc += xv[xi] * wv[wi];
                            }
                        }
                    }
                    y[((bi * o + oi) * ho + i) * wo + j] = acc;
                }
            }
        }
    }
    Tensor::from_vec(y, (b, o, ho, wo), &Device::Cpu).unwrap()
}

#[test]
fn forward_and_gradients_match_candle_and_a_naive_loop() {
    let mut case = 0u64;
    for &kernel in &[1usize, 3, 5] {
        for &stride in &[1usize, 2] {
            for padding in 0..=2usize {
                // Odd, non-square images and channel counts.
                let (b, c, h, w, o) = (3, 5, 9, 7, 4);
                case += 1;
                let geo = ConvGeometry { stride, padding };
                let x = Var::from_tensor(&random(&[b, c, h, w], case)).unwrap();
                let wt = Var::from_tensor(&random(&[o, c, kernel, kernel], 100 + case)).unwrap();
                let upstream = {
                    let ho = (h + 2 * padding - kernel) / stride + 1;
                    let wo = (w + 2 * padding - kernel) / stride + 1;
                    random(&[b, o, ho, wo], 200 + case)
                };

                let ours = conv2d(x.as_tensor(), wt.as_tensor(), None, geo).unwrap();
                let theirs = x.conv2d(wt.as_tensor(), padding, stride, 1, 1).unwrap();
                let label = format!("k={kernel} s={stride} p={padding}");
                assert!(
                    max_rel_err(&ours, &theirs) < 1e-4,
                    "forward vs candle, {label}"
                );
                let reference = naive(x.as_tensor(), wt.as_tensor(), geo);
                assert!(
                    max_rel_err(&ours, &reference) < 1e-4,
                    "forward vs naive, {label}"
                );

                let g_ours = (ours * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_theirs = (theirs * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (name, v) in [("input", &x), ("weight", &wt)] {
                    let a = g_ours.get(v).unwrap();
                    let t = g_theirs.get(v).unwrap();
                    assert!(max_rel_err(a, t) < 1e-4, "{name} gradient, {label}");
                }
            }
        }
    }
}

#[test]
fn per_example_filters_equal_one_convolution_per_example() {
    let geo = ConvGeometry {
        stride: 2,
        padding: 1,
    };
    let x = Var::from_tensor(&random(&[3, 2, 8, 6], 1)).unwrap();
    let w = Var::from_tensor(&random(&[3, 4, 2, 3, 3], 2)).unwrap();
    let y = conv2d_per_example(x.as_tensor(), w.as_tensor(), None, geo).unwrap();
    let upstream = random(y.dims(), 3);
    let grads = (&y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for i in 0..3 {
        let xi = x.narrow(0, i, 1).unwrap();
        let wi = w.get(i).unwrap();
        let expected = xi.conv2d(&wi, 1, 2, 1, 1).unwrap();
        let got = y.narrow(0, i, 1).unwrap();
        assert!(max_rel_err(&got, &expected) < 1e-4, "example {i}");
        // The weight gradient of example i only sees example i.
        let gi = (expected * upstream.narrow(0, i, 1).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ours = grads.get(&w).unwrap().get(i).unwrap();
        let theirs = gi.get(&w).unwrap().get(i).unwrap();
        assert!(max_rel_err(&ours, &theirs) < 1e-4, "weight gradient {i}");
    }
}

#[test]
fn f64_input_is_computed_in_f64() {
    let x = random(&[2, 3, 5, 5], 7).to_dtype(DType::F64).unwrap();
    let w = random(&[2, 3, 3, 3], 8).to_dtype(DType::F64).unwrap();
    let geo = ConvGeometry {
        stride: 1,
        padding: 1,
    };
    let ours = conv2d(&x, &w, None, geo).unwrap();
    assert_eq!(ours.dtype(), DType::F64);
    let theirs = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    let diff = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-12, "f64 difference {diff}");
}

#[test]
fn bad_shapes_are_errors_that_say_what_is_wrong() {
    let geo = ConvGeometry::default();
    let x = random(&[1, 3, 4, 4], 1);
    let err = conv2d(&x, &random(&[2, 4, 3, 3], 2), None, geo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected input [batch, 4"), "{err}");
    let err = conv2d(&x, &random(&[2, 3, 5, 5], 2), None, geo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not fit"), "{err}");
    let err = conv2d(
        &x,
        &random(&[2, 3, 3, 3], 2),
        None,
        ConvGeometry {
            stride: 0,
            padding: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("stride"), "{err}");
    let err = conv2d_per_example(&x, &random(&[2, 2, 3, 3, 3], 2), None, geo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 filter banks for a batch of 1"), "{err}");
}

/// Checks the biased convolution of an `x_dims` input by a `w_dims` filter bank against
/// candle's conv2d plus a broadcast bias (output and the three gradients) and the output
/// against the naive loop.
fn check_biased_against_candle(
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    geo: ConvGeometry,
    seed: u64,
) {
    let x = Var::from_tensor(&random(&x_dims, seed)).unwrap();
    let w = Var::from_tensor(&random(&w_dims, seed + 1)).unwrap();
    let bias = Var::from_tensor(&random(&[w_dims[0]], seed + 2)).unwrap();
    let ours = conv2d(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor()), geo).unwrap();
    let bias_planes = bias.reshape((1, w_dims[0], 1, 1)).unwrap();
    let theirs = x
        .conv2d(w.as_tensor(), geo.padding, geo.stride, 1, 1)
        .unwrap()
        .broadcast_add(&bias_planes)
        .unwrap();
    let label = format!("input {x_dims:?}, filters {w_dims:?}, {geo:?}");
    assert!(max_rel_err(&ours, &theirs) < 1e-4, "forward, {label}");
    let reference = naive(x.as_tensor(), w.as_tensor(), geo)
        .broadcast_add(&bias_planes)
        .unwrap();
    assert!(
        max_rel_err(&ours, &reference) < 1e-4,
        "forward vs naive, {label}"
    );
    let upstream = random(ours.dims(), seed + 3);
    let backward = |y: Tensor| {
        (y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (g_ours, g_theirs) = (backward(ours), backward(theirs));
    for (name, v) in [("input", &x), ("weight", &w), ("bias", &bias)] {
        let err = max_rel_err(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
        assert!(err < 1e-4, "{name} gradient, {label}: {err}");
    }
}

#[test]
fn bias_and_gradients_match_candle_for_one_image_and_for_grouped_images() {
    // 12x12 outputs (144 pixels) are one product per image; 5x5 outputs are grouped.
    let geo = |stride| ConvGeometry { stride, padding: 1 };
    check_biased_against_candle([5, 3, 12, 12], [6, 3, 3, 3], geo(1), 11);
    check_biased_against_candle([5, 3, 10, 10], [6, 3, 3, 3], geo(2), 11);
}

#[test]
fn per_example_bias_is_shared_by_all_examples() {
    let geo = ConvGeometry {
        stride: 1,
        padding: 1,
    };
    let x = random(&[2, 2, 12, 12], 21);
    let w = random(&[2, 3, 2, 3, 3], 22);
    let bias = Var::from_tensor(&random(&[3], 23)).unwrap();
    let y = conv2d_per_example(&x, &w, Some(bias.as_tensor()), geo).unwrap();
    for i in 0..2 {
        let expected = conv2d(
            &x.narrow(0, i, 1).unwrap(),
            &w.get(i).unwrap(),
            Some(bias.as_tensor()),
            geo,
        )
        .unwrap();
        assert!(
            max_rel_err(&y.narrow(0, i, 1).unwrap(), &expected) < 1e-5,
            "example {i}"
        );
    }
    // d(sum y)/d bias = number of output pixels of the batch, per channel.
    let grads = y.sum_all().unwrap().backward().unwrap();
    let db = grads.get(&bias).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(db, vec![2.0 * 144.0; 3]);
}

#[test]
fn images_too_large_for_one_cached_block_match_candle() {
    // 64 channels x 3x3 taps x 20 output columns: the columns of a whole image outgrow the
    // per-band buffer, so each image is unfolded in bands of lines (the last one shorter).
    for stride in [1usize, 2] {
        let geo = ConvGeometry { stride, padding: 1 };
        check_biased_against_candle([2, 64, 20 * stride, 20 * stride], [5, 64, 3, 3], geo, 31);
    }
}

#[test]
fn winograd_shaped_convolutions_match_candle_and_a_naive_loop() {
    // 3x3 filters at stride 1 with at least 16 channels on both sides and 64+ tiles of 2x2
    // outputs in the batch take Winograd's F(2x2, 3x3): odd sizes (tiles cut by the edge),
    // paddings 0-2; from 1024 tiles on in per-thread chunks of tiles (running across images),
    // below with the batch whole. (Smaller cases, down to a 1x1 image, are held against the
    // im2col path in the op's unit tests.)
    let cases = [
        ([4, 16, 33, 31], 24, 1),
        ([3, 20, 38, 40], 16, 0),
        ([4, 16, 31, 32], 17, 2),
        ([8, 16, 7, 9], 20, 1),
        ([16, 24, 4, 4], 16, 1),
        ([64, 16, 2, 2], 16, 1),
        ([9, 16, 5, 6], 16, 2),
    ];
    for (case, (x_dims, out_channels, padding)) in cases.into_iter().enumerate() {
        let geo = ConvGeometry { stride: 1, padding };
        let w_dims = [out_channels, x_dims[1], 3, 3];
        check_biased_against_candle(x_dims, w_dims, geo, 60 + 4 * case as u64);
    }
}

#[test]
fn an_empty_batch_gives_an_empty_output_and_zero_weight_gradients() {
    let geo = ConvGeometry {
        stride: 1,
        padding: 1,
    };
    let x = Var::from_tensor(&random(&[0, 2, 5, 5], 41)).unwrap();
    let w = Var::from_tensor(&random(&[3, 2, 3, 3], 42)).unwrap();
    let bias = Var::from_tensor(&random(&[3], 43)).unwrap();
    let y = conv2d(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor()), geo).unwrap();
    assert_eq!(y.dims(), [0, 3, 5, 5]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dw = grads.get(&w).unwrap();
    assert_eq!(dw.dims(), [3, 2, 3, 3]);
    assert_eq!(
        dw.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert_eq!(
        grads.get(&bias).unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0; 3]
    );
}

#[test]
fn per_example_input_gradient_at_stride_one_matches_candle() {
    // Stride 1 and padding below the kernel size: the input gradient runs as a convolution of
    // the output gradient with each example's flipped filters.
    for (kernel, padding) in [(3usize, 1usize), (3, 0), (5, 2)] {
        let geo = ConvGeometry { stride: 1, padding };
        let x = Var::from_tensor(&random(&[3, 2, 7, 6], 51)).unwrap();
        let w = random(&[3, 4, 2, kernel, kernel], 52);
        let y = conv2d_per_example(x.as_tensor(), &w, None, geo).unwrap();
        let upstream = random(y.dims(), 53);
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads.get(&x).unwrap();
        for i in 0..3 {
            let xi = Var::from_tensor(&x.narrow(0, i, 1).unwrap()).unwrap();
            let yi = xi.conv2d(&w.get(i).unwrap(), padding, 1, 1, 1).unwrap();
            let gi = (yi * upstream.narrow(0, i, 1).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let err = max_rel_err(&dx.narrow(0, i, 1).unwrap(), gi.get(&xi).unwrap());
            assert!(err < 1e-4, "k={kernel} p={padding} example {i}: {err}");
        }
    }
}

#[test]
fn an_image_with_no_columns_convolves_padding_only() {
    // Width 0 with padding 2: every output sees only padding, so it is the bias. The batch has
    // enough 2x2 output tiles for the Winograd path's size, which must leave this case alone.
    let geo = ConvGeometry {
        stride: 1,
        padding: 2,
    };
    let x = random(&[22, 16, 4, 0], 81);
    let w = random(&[16, 16, 3, 3], 82);
    let bias = random(&[16], 83);
    let y = conv2d(&x, &w, Some(&bias), geo).unwrap();
    assert_eq!(y.dims(), [22, 16, 6, 2]);
    let expected = bias
        .reshape((1, 16, 1, 1))
        .unwrap()
        .broadcast_as(y.shape())
        .unwrap();
    assert!(max_rel_err(&y, &expected.contiguous().unwrap()) < 1e-6);
}
