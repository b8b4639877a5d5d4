//! MNIST and Fashion-MNIST from their idx files, plain or gzip-compressed.
//!
//! A directory must hold `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each either as is or with a `.gz`
//! suffix (the plain file is preferred when both exist). An idx file starts with two zero
//! bytes, a type byte (`0x08`: unsigned bytes), the number of dimensions, then each dimension
//! as a big-endian `u32`, then the data. Image files have 3 dimensions (count, rows, columns),
//! label files 1.

use std::path::{Path, PathBuf};

use super::{read_maybe_gz, ImageDataset, TrainTest};
use crate::{Error, Result};

/// MNIST class names: the digits.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Fashion-MNIST class names, indexed by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where Debian's `dataset-fashion-mnist` package installs the Fashion-MNIST idx files.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// What to do when MNIST files are missing or damaged.
pub const MNIST_HINT: &str = "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, \
    t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from \
    https://yann.lecun.com/exdb/mnist/ (or a mirror) into one directory and pass that directory";

/// What to do when Fashion-MNIST files are missing or damaged.
pub const FASHION_MNIST_HINT: &str = "install them with `apt-get update && apt-get install -y \
    dataset-fashion-mnist` (Debian/Ubuntu; they land in /usr/share/datasets/fashion-mnist), \
    or download the four idx .gz files from https://github.com/zalandoresearch/fashion-mnist \
    into one directory and pass that directory";

/// Loads MNIST from the idx files in `dir`.
pub fn load_mnist(dir: &Path) -> Result<TrainTest> {
    load_dir(dir, &MNIST_CLASSES, MNIST_HINT)
}

/// Loads Fashion-MNIST from the idx files in `dir`.
pub fn load_fashion_mnist(dir: &Path) -> Result<TrainTest> {
    load_dir(dir, &FASHION_MNIST_CLASSES, FASHION_MNIST_HINT)
}

/// Loads the train (`train-*`) and test (`t10k-*`) idx pairs of `dir`, labelled with
/// `classes`; `hint` says where to get the files.
fn load_dir(dir: &Path, classes: &[&str], hint: &str) -> Result<TrainTest> {
    if !dir.is_dir() {
        return Err(Error::data(
            dir,
            format!("is not a directory holding the idx files; {hint}"),
        ));
    }
    let part = |prefix: &str| -> Result<ImageDataset> {
        let images = find(dir, &format!("{prefix}-images-idx3-ubyte"), hint)?;
        let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"), hint)?;
        load_pair(&images, &labels, classes, hint)
    };
    Ok(TrainTest {
        train: part("train")?,
        test: part("t10k")?,
        notes: Vec::new(),
    })
}

/// `dir/name`, or `dir/name.gz` when only that exists.
fn find(dir: &Path, name: &str, hint: &str) -> Result<PathBuf> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if plain.is_file() {
        Ok(plain)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        Err(Error::data(
            plain,
            format!("missing (neither {name} nor {name}.gz is in this directory); {hint}"),
        ))
    }
}

/// Reads one images file and its labels file into a data set.
fn load_pair(
    images_path: &Path,
    labels_path: &Path,
    classes: &[&str],
    hint: &str,
) -> Result<ImageDataset> {
    let image_bytes = read_maybe_gz(images_path, hint)?;
    let (dims, pixels) = parse(&image_bytes, 3, images_path, hint)?;
    let label_bytes = read_maybe_gz(labels_path, hint)?;
    let (label_dims, labels) = parse(&label_bytes, 1, labels_path, hint)?;
    let (count, height, width) = (dims[0], dims[1], dims[2]);
    if height == 0 || width == 0 {
        return Err(Error::data(
            images_path,
            format!("header gives images of {height}x{width} pixels; {hint}"),
        ));
    }
    if label_dims[0] != count {
        return Err(Error::data(
            labels_path,
            format!(
                "holds {} labels but {} holds {count} images: the files do not belong \
                 together or one is truncated; {hint}",
                label_dims[0],
                images_path.display()
            ),
        ));
    }
    if let Some((i, &label)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes.len())
    {
        return Err(Error::data(
            labels_path,
            format!(
                "label {label} of item {i} is out of range (labels go from 0 to {}): \
                 the file is damaged or not a label file of this data set; {hint}",
                classes.len() - 1
            ),
        ));
    }
    ImageDataset::new(
        pixels.to_vec(),
        labels.to_vec(),
        1,
        height,
        width,
        classes.iter().map(|c| c.to_string()).collect(),
    )
}

/// Splits an idx file of unsigned bytes with `ndims` dimensions into its dimensions and data,
/// checking that the data length is exactly the product of the dimensions.
fn parse<'b>(
    bytes: &'b [u8],
    ndims: usize,
    path: &Path,
    hint: &str,
) -> Result<(Vec<usize>, &'b [u8])> {
    let kind = if ndims == 3 { "images" } else { "labels" };
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(Error::data(
            path,
            format!(
                "is {} bytes, too short for an idx {kind} header ({header_len} bytes): \
                 the file is truncated; {hint}",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || usize::from(bytes[3]) != ndims {
        return Err(Error::data(
            path,
            format!(
                "is not an idx {kind} file: expected the magic number 0x0000080{ndims}, \
                 found 0x{:02x}{:02x}{:02x}{:02x}; {hint}",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let data = &bytes[header_len..];
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if expected != Some(data.len()) {
        let dims_text: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        return Err(Error::data(
            path,
            format!(
                "header dimensions {} call for {} data bytes but the file holds {}: \
                 it is truncated or damaged; {hint}",
                dims_text.join("x"),
                expected.map_or("more than usize::MAX".to_string(), |n| n.to_string()),
                data.len()
            ),
        ));
    }
    Ok((dims, data))
}
