//! Augmentation, normalisation, validation split, epoch orders, batching and conversion.

use candle_core::{DType, Device};
use whvi::data::{
    flip_horizontal, padded_crop, sequential_order, shuffled_order, Augment, Batches, DatasetKind,
    ImageDataset, Normalization, Resize,
};
use whvi::rng::{seeded, RngState};

fn classes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i}")).collect()
}

/// `n` single-pixel-distinct images of shape `(c, h, w)`: image `i` has every byte equal to
/// `i` plus its position within the image, labels cycle through 3 classes.
fn numbered(n: usize, (c, h, w): (usize, usize, usize)) -> ImageDataset {
    let len = c * h * w;
    let images = (0..n)
        .flat_map(|i| (0..len).map(move |p| ((i * 7 + p) % 251) as u8))
        .collect();
    let labels = (0..n).map(|i| (i % 3) as u8).collect();
    ImageDataset::new(images, labels, c, h, w, classes(3)).unwrap()
}

/// A 2x3x5 CHW image with distinct nonzero bytes.
fn tiny() -> Vec<u8> {
    (1..=30).collect()
}

#[test]
fn horizontal_flip_reverses_every_row() {
    let mut image = tiny();
    flip_horizontal(&mut image, (2, 3, 5));
    let expected: Vec<u8> = tiny()
        .chunks(5)
        .flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>())
        .collect();
    assert_eq!(image, expected);
    flip_horizontal(&mut image, (2, 3, 5));
    assert_eq!(image, tiny());
}

#[test]
fn padded_crop_shifts_with_zero_fill() {
    let src = tiny();
    let shape = (2, 3, 5);
    let mut out = vec![0; 30];
    padded_crop(&src, shape, 4, (4, 4), &mut out);
    assert_eq!(out, src, "offset (p, p) is the identity");

    // Offset (3, 5) with padding 4: one row up... output row y reads source row y - 1 and
    // column x reads source column x + 1.
    padded_crop(&src, shape, 4, (3, 5), &mut out);
    for c in 0..2 {
        for y in 0..3 {
            for x in 0..5 {
                let expected = if y >= 1 && x + 1 < 5 {
                    src[c * 15 + (y - 1) * 5 + x + 1]
                } else {
                    0
                };
                assert_eq!(out[c * 15 + y * 5 + x], expected, "c{c} y{y} x{x}");
            }
        }
    }
    // Far corners see only padding.
    padded_crop(&src, shape, 4, (0, 0), &mut out);
    assert!(out.iter().all(|&v| v == 0));
    padded_crop(&src, shape, 4, (8, 8), &mut out);
    assert!(out.iter().all(|&v| v == 0));
    // Padding 1, offset (2, 2): shifted up-left by one.
    padded_crop(&src, shape, 1, (2, 2), &mut out);
    assert_eq!(out[0], src[6]);
    assert_eq!(out[4], 0);
    assert_eq!(out[10], 0);
}

#[test]
fn augmentation_is_reproducible_and_varies() {
    // Padding 1 on a 3x5 image: 9 crop offsets x 2 flips, so 20 draws must differ; a
    // 4-pixel padding would crop this tiny image to mostly empty canvases.
    let augment = Augment {
        crop_padding: 1,
        horizontal_flip: true,
    };
    let src = tiny();
    let run = |seed| {
        let mut rng = seeded(seed);
        (0..20)
            .map(|_| {
                let mut out = vec![0; 30];
                augment.apply(&src, (2, 3, 5), &mut out, &mut rng);
                out
            })
            .collect::<Vec<_>>()
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() > 5, "crops and flips should vary");

    // Flip only: every output is the image or its mirror, and both occur.
    let flip = Augment {
        crop_padding: 0,
        horizontal_flip: true,
    };
    let mut mirrored = tiny();
    flip_horizontal(&mut mirrored, (2, 3, 5));
    let mut rng = seeded(3);
    let mut seen = [false; 2];
    for _ in 0..40 {
        let mut out = vec![0; 30];
        flip.apply(&src, (2, 3, 5), &mut out, &mut rng);
        assert!(out == src || out == mirrored);
        seen[usize::from(out == mirrored)] = true;
    }
    assert_eq!(seen, [true, true]);
    assert!(!Augment::for_kind(DatasetKind::Mnist).is_active());
    assert!(!Augment::for_kind(DatasetKind::FashionMnist).is_active());
    assert!(Augment::for_kind(DatasetKind::Cifar10).horizontal_flip);
    assert!(!Augment::NONE.is_active());
}

#[test]
fn normalisation_values() {
    let norm = Normalization::new(vec![0.5, 0.25], vec![0.5, 2.0]).unwrap();
    assert_eq!(norm.apply(255, 0), 1.0);
    assert_eq!(norm.apply(0, 0), -1.0);
    assert_eq!(norm.apply(51, 1), (0.2 - 0.25) / 2.0);
    assert!(Normalization::new(vec![0.5], vec![0.0]).is_err());
    assert!(Normalization::new(vec![0.5, 0.1], vec![1.0]).is_err());
    assert_eq!(Normalization::cifar10().mean(), &[0.4914, 0.4822, 0.4465]);
    assert_eq!(Normalization::for_kind(DatasetKind::Mnist).std(), &[0.3081]);

    // Channel 0 holds 0 and 255 in equal numbers (mean 0.5, std 0.5); channel 1 is all 51.
    let data = ImageDataset::new(
        vec![0, 255, 51, 51, 255, 0, 51, 51],
        vec![0, 1],
        2,
        1,
        2,
        classes(2),
    )
    .unwrap();
    let stats = Normalization::from_dataset(&data);
    assert!(stats.is_err(), "a constant channel has no spread");
    let mut pixels = data.images().to_vec();
    pixels[2] = 0;
    pixels[3] = 102;
    let data = ImageDataset::new(pixels, vec![0, 1], 2, 1, 2, classes(2)).unwrap();
    let stats = Normalization::from_dataset(&data).unwrap();
    assert!((stats.mean()[0] - 0.5).abs() < 1e-6 && (stats.std()[0] - 0.5).abs() < 1e-6);
    let (m1, s1) = (51.0 / 255.0, (51.0f32 * 51.0 / 2.0).sqrt() / 255.0);
    assert!((stats.mean()[1] - m1).abs() < 1e-6, "{:?}", stats.mean());
    assert!((stats.std()[1] - s1).abs() < 1e-6, "{:?}", stats.std());
}

#[test]
fn batches_have_the_right_shapes_values_and_sizes() {
    let data = numbered(10, (2, 3, 4));
    let norm = Normalization::new(vec![0.1, 0.2], vec![0.5, 0.25]).unwrap();
    let order = vec![3, 1, 4, 1, 5, 9, 2];
    let batches: Vec<_> = Batches::new(&data, order.clone(), 3, &norm, &Device::Cpu)
        .unwrap()
        .collect::<whvi::Result<_>>()
        .unwrap();
    assert_eq!(batches.len(), 3);
    let (images, labels) = &batches[0];
    assert_eq!(images.dims(), &[3, 2, 3, 4]);
    assert_eq!(images.dtype(), DType::F32);
    assert_eq!(labels.dtype(), DType::U32);
    assert_eq!(batches[2].0.dims(), &[1, 2, 3, 4]);
    let values: Vec<f32> = images.flatten_all().unwrap().to_vec1().unwrap();
    for (k, &i) in order[..3].iter().enumerate() {
        for (p, &v) in data.image(i).iter().enumerate() {
            let expected = norm.apply(v, p / 12);
            assert_eq!(values[k * 24 + p], expected);
        }
    }
    assert_eq!(labels.to_vec1::<u32>().unwrap(), vec![0, 1, 1]);

    let kept = Batches::new(&data, order, 3, &norm, &Device::Cpu)
        .unwrap()
        .drop_last(true);
    assert_eq!(kept.len(), 2);
    assert_eq!(kept.count(), 2);

    assert!(Batches::new(&data, vec![10], 3, &norm, &Device::Cpu).is_err());
    assert!(Batches::new(&data, vec![0], 0, &norm, &Device::Cpu).is_err());
    assert!(Batches::new(&data, vec![0], 1, &Normalization::mnist(), &Device::Cpu).is_err());
}

/// All batches of one augmented, shuffled epoch, as raw values.
fn epoch(data: &ImageDataset, seed: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut rng = seeded(seed);
    let order = shuffled_order(data.len(), &mut rng);
    let norm = Normalization::unit(data.channels());
    Batches::new(data, order, 4, &norm, &Device::Cpu)
        .unwrap()
        .augment(Augment::for_kind(DatasetKind::Cifar10), &mut rng)
        .map(|batch| {
            let (images, labels) = batch.unwrap();
            (
                images.flatten_all().unwrap().to_vec1().unwrap(),
                labels.to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_same_batches_other_seed_other_order() {
    let data = numbered(30, (3, 6, 6));
    assert_eq!(epoch(&data, 11), epoch(&data, 11));
    assert_ne!(epoch(&data, 11), epoch(&data, 12));
    let a = shuffled_order(30, &mut seeded(11));
    let b = shuffled_order(30, &mut seeded(12));
    assert_ne!(a, b);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, sequential_order(30), "an order is a permutation");
}

#[test]
fn an_epoch_resumes_from_its_order_and_generator_state() {
    let data = numbered(30, (3, 6, 6));
    let full = epoch(&data, 5);

    // Replay: draw the order, run two batches, save the generator, then restart from the
    // stored order (serialised as JSON) and state.
    let mut rng = seeded(5);
    let order = shuffled_order(data.len(), &mut rng);
    let norm = Normalization::unit(3);
    let augment = Augment::for_kind(DatasetKind::Cifar10);
    let mut batches = Batches::new(&data, order.clone(), 4, &norm, &Device::Cpu)
        .unwrap()
        .augment(augment, &mut rng);
    batches.next().unwrap().unwrap();
    batches.next().unwrap().unwrap();
    drop(batches);
    let state = serde_json::to_string(&RngState::capture(&rng)).unwrap();
    let stored_order = serde_json::to_string(&order).unwrap();

    let order: Vec<usize> = serde_json::from_str(&stored_order).unwrap();
    let mut rng = serde_json::from_str::<RngState>(&state).unwrap().restore();
    let rest: Vec<_> = Batches::new(&data, order[2 * 4..].to_vec(), 4, &norm, &Device::Cpu)
        .unwrap()
        .augment(augment, &mut rng)
        .map(|b| {
            let (images, labels) = b.unwrap();
            (
                images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                labels.to_vec1::<u32>().unwrap(),
            )
        })
        .collect();
    assert_eq!(rest, full[2..]);
}

#[test]
fn validation_split_is_disjoint_complete_and_deterministic() {
    let data = numbered(100, (1, 2, 2));
    let (train, val) = data.split_validation(20, &mut seeded(1)).unwrap();
    assert_eq!((train.len(), val.len()), (80, 20));
    // Images are distinct, so the first byte identifies the source image.
    let id = |set: &ImageDataset| -> Vec<u8> { (0..set.len()).map(|i| set.image(i)[0]).collect() };
    let mut all: Vec<u8> = id(&train).into_iter().chain(id(&val)).collect();
    all.sort_unstable();
    let mut expected = id(&data);
    expected.sort_unstable();
    assert_eq!(all, expected, "disjoint and complete");
    for set in [&train, &val] {
        for i in 0..set.len() {
            let source = (0..data.len())
                .find(|&j| data.image(j) == set.image(i))
                .unwrap();
            assert_eq!(set.label(i), data.label(source));
        }
    }
    let again = data.split_validation(20, &mut seeded(1)).unwrap();
    assert_eq!(again, (train.clone(), val.clone()));
    let other = data.split_validation(20, &mut seeded(2)).unwrap();
    assert_ne!(other.1, val);

    // Requests above half the set are refused (not shrunk); 0 is allowed.
    let err = data.split_validation(51, &mut seeded(1)).unwrap_err();
    assert!(err.to_string().contains("at most half of it (50)"), "{err}");
    assert_eq!(
        data.split_validation(50, &mut seeded(1)).unwrap().1.len(),
        50
    );
    let (all_train, none) = data.split_validation(0, &mut seeded(1)).unwrap();
    assert_eq!((all_train.len(), none.len()), (100, 0));
    let small = numbered(3, (1, 1, 1));
    assert_eq!(
        small.split_validation(1, &mut seeded(1)).unwrap().1.len(),
        1
    );
    assert!(small.split_validation(5_000, &mut seeded(1)).is_err());
    let one = numbered(1, (1, 1, 1));
    let message = one
        .split_validation(1, &mut seeded(1))
        .unwrap_err()
        .to_string();
    assert!(message.contains("a training set of 1"), "{message}");
}

#[test]
fn grey_images_convert_to_rgb_by_padding_or_bilinear_resizing() {
    let grey = numbered(2, (1, 28, 28));
    let padded = grey.convert(3, 32, 32, Resize::Pad).unwrap();
    assert_eq!(padded.shape(), (3, 32, 32));
    assert_eq!(padded.labels(), grey.labels());
    let image = padded.image(1);
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                let expected = if (2..30).contains(&y) && (2..30).contains(&x) {
                    grey.image(1)[(y - 2) * 28 + x - 2]
                } else {
                    0
                };
                assert_eq!(image[c * 1024 + y * 32 + x], expected);
            }
        }
    }
    let resized = grey.convert(3, 32, 32, Resize::Bilinear).unwrap();
    assert_eq!(resized.shape(), (3, 32, 32));
    let image = resized.image(0);
    assert_eq!(&image[..1024], &image[1024..2048], "channels are copies");
    // Corners of an upscaled image are the source corners.
    assert_eq!(image[0], grey.image(0)[0]);
    assert_eq!(image[1023], grey.image(0)[28 * 28 - 1]);

    assert!(grey.convert(3, 20, 20, Resize::Pad).is_err());
    assert!(padded.convert(1, 32, 32, Resize::Pad).is_err());
}

#[test]
fn subset_and_kind_names() {
    let data = numbered(5, (1, 1, 2));
    let picked = data.subset(&[4, 0, 4]).unwrap();
    assert_eq!(
        picked.images(),
        &[data.image(4), data.image(0), data.image(4)].concat()[..]
    );
    assert!(data.subset(&[5]).is_err());

    for kind in [
        DatasetKind::Cifar10,
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
    ] {
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{kind}\""));
        let parsed = <DatasetKind as clap::ValueEnum>::from_str(kind.name(), false).unwrap();
        assert_eq!(parsed, kind);
    }
    assert_eq!(DatasetKind::FashionMnist.to_string(), "fashion-mnist");
    assert_eq!(DatasetKind::FashionMnist.classes()[9], "Ankle boot");
}
