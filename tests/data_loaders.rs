//! Loaders on small files written here in the official formats: CIFAR-10 binary (directory
//! and .tar.gz), MNIST-style idx (plain and .gz); every kind of bad input; the embedded sample;
//! the hub-tensor conversion.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use flate2::write::GzEncoder;
use flate2::Compression;
use whvi::data::{self, cifar10, idx, DatasetKind, ImageDataset};

/// A fresh, empty scratch directory for one test.
/// It lives under cargo's temporary folder for tests, so what a failed run leaves is replaced
/// by the next run instead of piling up in /tmp.
fn scratch(name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `count` CIFAR records whose labels and pixels depend on `seed` and the record index.
fn cifar_records(seed: u8, count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for r in 0..count {
        out.push((seed as usize + r) as u8 % 10);
        out.extend((0..3072).map(|p| (p * 7 + r * 13 + seed as usize * 31) as u8));
    }
    out
}

const TRAIN_NAMES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

/// The member files of a small CIFAR-10 binary set: batches of 3, 1, 2, 1, 4 records and a
/// test batch of 2, plus custom class names.
fn cifar_members() -> Vec<(&'static str, Vec<u8>)> {
    let mut members: Vec<(&str, Vec<u8>)> = TRAIN_NAMES
        .iter()
        .zip([3, 1, 2, 1, 4])
        .enumerate()
        .map(|(i, (name, n))| (*name, cifar_records(i as u8, n)))
        .collect();
    members.push(("test_batch.bin", cifar_records(9, 2)));
    let names: String = (0..10).map(|i| format!("class-{i}\n")).collect();
    members.push(("batches.meta.txt", format!("{names}\n").into_bytes()));
    members
}

fn write_cifar_dir(dir: &Path, members: &[(&str, Vec<u8>)]) {
    fs::create_dir_all(dir).unwrap();
    for (name, bytes) in members {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

fn write_cifar_tar_gz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let gz = GzEncoder::new(fs::File::create(path).unwrap(), Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_cksum();
    tar.append_data(&mut dir, "cifar-10-batches-bin/", std::io::empty())
        .unwrap();
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            &bytes[..],
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

/// Checks that `set` holds exactly the records of `files`, concatenated.
fn assert_records(set: &ImageDataset, files: &[&[u8]]) {
    let records: Vec<u8> = files.concat();
    assert_eq!(set.len(), records.len() / 3073);
    assert_eq!(set.shape(), (3, 32, 32));
    for (i, record) in records.chunks_exact(3073).enumerate() {
        assert_eq!(set.label(i), record[0]);
        assert_eq!(set.image(i), &record[1..]);
    }
}

fn assert_small_cifar(sets: &data::TrainTest, members: &[(&str, Vec<u8>)]) {
    let train: Vec<&[u8]> = members[..5].iter().map(|(_, b)| &b[..]).collect();
    assert_records(&sets.train, &train);
    assert_records(&sets.test, &[&members[5].1]);
    assert_eq!(sets.train.classes()[3], "class-3");
    assert_eq!(sets.test.num_classes(), 10);
}

fn error_text<T: std::fmt::Debug>(result: whvi::Result<T>) -> String {
    result.unwrap_err().to_string()
}

fn assert_cifar_hint(message: &str) {
    assert!(
        message.contains("https://www.cs.toronto.edu/~kriz/cifar.html")
            && message.contains("cifar10::download"),
        "no download hint in: {message}"
    );
}

#[test]
fn cifar_directory_round_trips_from_the_dir_and_its_parent() {
    let root = scratch("cifar-dir");
    let dir = root.join("cifar-10-batches-bin");
    let members = cifar_members();
    write_cifar_dir(&dir, &members);
    for path in [&dir, &root] {
        assert_small_cifar(&cifar10::load(path).unwrap(), &members);
    }
    assert_small_cifar(
        &data::load(DatasetKind::Cifar10, Some(&root)).unwrap(),
        &members,
    );
    // Without batches.meta.txt the standard names are used.
    fs::remove_file(dir.join("batches.meta.txt")).unwrap();
    let sets = cifar10::load_dir(&dir).unwrap();
    assert_eq!(sets.train.classes()[0], "airplane");
    assert_eq!(sets.train.classes()[9], "truck");
}

#[test]
fn cifar_tar_gz_round_trips_from_the_archive_and_its_directory() {
    let root = scratch("cifar-tar");
    let archive = root.join("cifar-10-binary.tar.gz");
    let members = cifar_members();
    write_cifar_tar_gz(&archive, &members);
    assert_small_cifar(&cifar10::load(&archive).unwrap(), &members);
    assert_small_cifar(&cifar10::load(&root).unwrap(), &members);
    assert_small_cifar(&cifar10::load_tar_gz(&archive).unwrap(), &members);
    // Files shorter than the official 10,000 records are read, with a note for each.
    let notes = cifar10::load(&archive).unwrap().notes;
    assert_eq!(notes.len(), 6, "{notes:?}");
    assert!(
        notes[0].contains("data_batch_1.bin") && notes[0].contains("official file holds 10000"),
        "{notes:?}"
    );
}

#[test]
fn cifar_missing_paths_and_files_name_the_file_and_the_download() {
    let root = scratch("cifar-missing");
    let nowhere = root.join("no-such-dir");
    let message = error_text(cifar10::load(&nowhere));
    assert!(message.contains("no-such-dir") && message.contains("does not exist"));
    assert_cifar_hint(&message);

    let message = error_text(cifar10::load(&root));
    assert!(
        message.contains("holds no CIFAR-10 binary data"),
        "{message}"
    );
    assert_cifar_hint(&message);

    let dir = root.join("cifar-10-batches-bin");
    let mut members = cifar_members();
    members.remove(2);
    write_cifar_dir(&dir, &members);
    let message = error_text(cifar10::load(&root));
    assert!(message.contains("data_batch_3.bin") && message.contains("missing"));
    assert_cifar_hint(&message);
}

#[test]
fn cifar_truncated_empty_and_mislabelled_batches_are_errors() {
    let dir = scratch("cifar-bad");
    let mut members = cifar_members();
    members[1].1.pop();
    write_cifar_dir(&dir, &members);
    let message = error_text(cifar10::load(&dir));
    assert!(
        message.contains("data_batch_2.bin")
            && message.contains("3072 bytes")
            && message.contains("3073-byte records"),
        "{message}"
    );
    assert_cifar_hint(&message);

    let mut members = cifar_members();
    members[5].1.clear();
    write_cifar_dir(&dir, &members);
    let message = error_text(cifar10::load(&dir));
    assert!(message.contains("test_batch.bin") && message.contains("is 0 bytes"));

    let mut members = cifar_members();
    members[2].1[3073] = 10; // data_batch_3.bin holds 2 records: the label of record 1
    write_cifar_dir(&dir, &members);
    let message = error_text(cifar10::load(&dir));
    assert!(
        message.contains("data_batch_3.bin") && message.contains("record 1 has label 10"),
        "{message}"
    );

    let mut members = cifar_members();
    members[6].1 = b"cat\ndog\n".to_vec();
    write_cifar_dir(&dir, &members);
    let message = error_text(cifar10::load(&dir));
    assert!(message.contains("batches.meta.txt") && message.contains("names 2 classes"));
}

#[test]
fn cifar_damaged_archives_are_errors() {
    let root = scratch("cifar-bad-tar");
    let archive = root.join("cifar-10-binary.tar.gz");
    write_cifar_tar_gz(&archive, &cifar_members());
    let bytes = fs::read(&archive).unwrap();
    fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
    let message = error_text(cifar10::load(&archive));
    assert!(
        message.contains("cifar-10-binary.tar.gz") && message.contains("truncated"),
        "{message}"
    );
    assert_cifar_hint(&message);

    let mut members = cifar_members();
    members.remove(5);
    write_cifar_tar_gz(&archive, &members);
    let message = error_text(cifar10::load(&archive));
    assert!(
        message.contains("has no member test_batch.bin"),
        "{message}"
    );

    let not_gzip = root.join("plain.tar.gz");
    fs::write(&not_gzip, b"this is not an archive").unwrap();
    let message = error_text(cifar10::load(&not_gzip));
    assert!(message.contains("plain.tar.gz") && message.contains("not a gzip-compressed tar"));
}

/// An idx images file: `count` images of `rows` x `cols`, pixel values from `seed`.
fn idx_images(count: usize, rows: usize, cols: usize, seed: usize) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [count, rows, cols] {
        out.extend((d as u32).to_be_bytes());
    }
    out.extend((0..count * rows * cols).map(|p| (p * 3 + seed) as u8));
    out
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, 1];
    out.extend((labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

/// Writes the four idx files of a tiny 3x4-pixel set, gzipped when `gz`.
fn write_idx_dir(dir: &Path, gz: bool) {
    let files = [
        ("train-images-idx3-ubyte", idx_images(5, 3, 4, 1)),
        ("train-labels-idx1-ubyte", idx_labels(&[0, 9, 3, 3, 7])),
        ("t10k-images-idx3-ubyte", idx_images(2, 3, 4, 2)),
        ("t10k-labels-idx1-ubyte", idx_labels(&[5, 1])),
    ];
    for (name, bytes) in files {
        if gz {
            fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        } else {
            fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[test]
fn idx_files_round_trip_plain_and_gzipped() {
    for gz in [false, true] {
        let dir = scratch(&format!("idx-{gz}"));
        write_idx_dir(&dir, gz);
        for (sets, first_class) in [
            (idx::load_mnist(&dir).unwrap(), "0"),
            (idx::load_fashion_mnist(&dir).unwrap(), "T-shirt/top"),
            (data::load(DatasetKind::Mnist, Some(&dir)).unwrap(), "0"),
        ] {
            assert_eq!(sets.train.shape(), (1, 3, 4));
            assert_eq!(sets.train.labels(), &[0, 9, 3, 3, 7]);
            assert_eq!(sets.test.labels(), &[5, 1]);
            assert_eq!(sets.train.images(), &idx_images(5, 3, 4, 1)[16..]);
            assert_eq!(sets.test.images(), &idx_images(2, 3, 4, 2)[16..]);
            assert_eq!(sets.train.classes()[0], first_class);
        }
    }
}

#[test]
fn idx_bad_inputs_name_the_file_and_where_to_get_it() {
    let dir = scratch("idx-bad");
    let message = error_text(idx::load_mnist(&dir.join("absent")));
    assert!(message.contains("absent") && message.contains("yann.lecun.com"));
    let message = error_text(idx::load_fashion_mnist(&dir));
    assert!(
        message.contains("train-images-idx3-ubyte")
            && message.contains("apt-get install -y dataset-fashion-mnist"),
        "{message}"
    );

    let rewrite = |name: &str, bytes: Vec<u8>| {
        write_idx_dir(&dir, false);
        fs::write(dir.join(name), bytes).unwrap();
        error_text(idx::load_mnist(&dir))
    };
    // Header dimensions that disagree with the data.
    let mut truncated = idx_images(2, 3, 4, 0);
    truncated.pop();
    let message = rewrite("t10k-images-idx3-ubyte", truncated);
    assert!(
        message.contains("t10k-images-idx3-ubyte")
            && message.contains("2x3x4 call for 24 data bytes but the file holds 23"),
        "{message}"
    );
    let message = rewrite("t10k-images-idx3-ubyte", vec![0, 0, 8]);
    assert!(message.contains("too short"), "{message}");
    // A labels file (long enough to hold an images header) where images belong.
    let message = rewrite("train-images-idx3-ubyte", idx_labels(&[1; 10]));
    assert!(message.contains("magic number 0x00000803"), "{message}");
    let message = rewrite("train-labels-idx1-ubyte", idx_labels(&[1, 2, 3]));
    assert!(
        message.contains("train-labels-idx1-ubyte")
            && message.contains("holds 3 labels but")
            && message.contains("holds 5 images"),
        "{message}"
    );
    let message = rewrite("train-labels-idx1-ubyte", idx_labels(&[1, 2, 3, 10, 4]));
    assert!(
        message.contains("label 10 of item 3 is out of range"),
        "{message}"
    );
    assert!(message.contains("yann.lecun.com"));

    // A truncated .gz.
    let gz_dir = scratch("idx-bad-gz");
    write_idx_dir(&gz_dir, true);
    let path = gz_dir.join("train-images-idx3-ubyte.gz");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let message = error_text(idx::load_mnist(&gz_dir));
    assert!(
        message.contains("train-images-idx3-ubyte.gz") && message.contains("truncated"),
        "{message}"
    );
}

#[test]
fn default_locations() {
    let message = error_text(data::load(DatasetKind::Mnist, None));
    assert!(message.contains("yann.lecun.com"), "{message}");
    let system = Path::new(idx::FASHION_MNIST_SYSTEM_DIR);
    let fashion = data::load(DatasetKind::FashionMnist, None);
    if system.join("train-images-idx3-ubyte.gz").exists() {
        let sets = fashion.unwrap();
        assert_eq!((sets.train.len(), sets.test.len()), (60_000, 10_000));
        assert_eq!(sets.train.shape(), (1, 28, 28));
        assert_eq!(sets.test.class_counts(), vec![1_000; 10]);
    } else {
        let message = error_text(fashion);
        assert!(message.contains("apt-get install -y dataset-fashion-mnist"));
    }
}

#[test]
fn embedded_sample_is_balanced_cifar10() {
    let sets = data::load(DatasetKind::Cifar10, None).unwrap();
    assert_eq!(sets.train.len(), cifar10::SAMPLE_TRAIN_LEN);
    assert_eq!(sets.test.len(), cifar10::SAMPLE_TEST_LEN);
    assert_eq!(sets.train.shape(), (3, 32, 32));
    assert_eq!(sets.train.class_counts(), vec![100; 10]);
    assert_eq!(sets.test.class_counts(), vec![50; 10]);
    assert_eq!(sets.train.classes(), &cifar10::CLASSES);
    // Real photographs: no image is blank, and the pixels use the whole range.
    assert!((0..sets.train.len()).all(|i| sets.train.image(i).iter().any(|&v| v != 0)));
    let (lo, hi) = sets
        .test
        .images()
        .iter()
        .fold((255, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert_eq!((lo, hi), (0, 255));
}

#[test]
fn hub_tensors_are_transposed_back_to_height_by_width() {
    // Two 3x2x5 (CxHxW) images with distinct bytes, as candle's parquet loader delivers them:
    // f32 in [0, 1] with height and width swapped, i.e. [N, C, W, H].
    let (n, c, h, w) = (2, 3, 2, 5);
    let bytes: Vec<u8> = (0..n * c * h * w).map(|v| (v * 4) as u8).collect();
    let chw = Tensor::from_vec(
        bytes
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect::<Vec<_>>(),
        (n, c, h, w),
        &Device::Cpu,
    )
    .unwrap();
    let swapped = chw.transpose(2, 3).unwrap().contiguous().unwrap();
    assert_eq!(swapped.dims(), &[n, c, w, h]);
    let labels = Tensor::new(&[7u8, 2], &Device::Cpu).unwrap();
    let set = cifar10::from_hub_tensors(&swapped, &labels).unwrap();
    assert_eq!(set.shape(), (c, h, w));
    assert_eq!(set.images(), &bytes[..]);
    assert_eq!(set.labels(), &[7, 2]);

    let bad_labels = Tensor::new(&[7u8, 10], &Device::Cpu).unwrap();
    let message = error_text(cifar10::from_hub_tensors(&swapped, &bad_labels));
    assert!(message.contains("label 10 of image 1"), "{message}");
}
