//! Image data: loading CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST and SVHN, augmentation, and batching into
//! candle tensors.
//!
//! Data sets live in memory as bytes ([`ImageDataset`], CHW per image) and become `f32`
//! tensors one batch at a time ([`Batches`]). Everything random (the epoch order, the
//! validation split, crops and flips) draws from a caller-owned
//! [`WhviRng`](crate::rng::WhviRng), so a run is reproducible bit for bit and resumable.
//!
//! ```no_run
//! use candle_core::Device;
//! use whvi::data::{self, Augment, Batches, DatasetKind, Normalization};
//!
//! # fn main() -> whvi::Result<()> {
//! let sets = data::load(DatasetKind::Cifar10, None)?; // the embedded CIFAR-10 sample
//! let mut rng = whvi::rng::seeded(0);
//! let (train, validation) = sets.train.split_validation(5_000, &mut rng)?;
//! let order = data::shuffled_order(train.len(), &mut rng);
//! let norm = Normalization::cifar10();
//! for batch in Batches::new(&train, order, 128, &norm, &Device::Cpu)?
//!     .drop_last(true)
//!     .augment(Augment::for_kind(DatasetKind::Cifar10), &mut rng)
//! {
//!     let (images, labels) = batch?; // f32 [128, 3, 32, 32], u32 [128]
//! #   let _ = (images, labels);
//! }
//! # let _ = validation;
//! # Ok(())
//! # }
//! ```

mod batch;
pub mod cifar10;
pub mod cifar100;
mod dataset;
pub mod idx;
pub mod svhn;
mod transform;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use batch::{sequential_order, shuffled_order, Batches};
pub use dataset::{ImageDataset, Resize};
pub use transform::{flip_horizontal, padded_crop, Augment, Normalization};

use crate::{Error, Result};

/// The number of validation images usually carved out of a training set (at most half of a
/// set can be: see [`ImageDataset::split_validation`]).
pub const DEFAULT_VALIDATION_SIZE: usize = 5_000;

/// The data sets `whvi` can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// CIFAR-10: 32x32 RGB images of 10 object classes.
    Cifar10,
    /// CIFAR-100: 32x32 RGB images of 100 object classes (the fine labels).
    Cifar100,
    /// MNIST: 28x28 grey images of handwritten digits.
    Mnist,
    /// Fashion-MNIST: 28x28 grey images of 10 kinds of clothing.
    FashionMnist,
}

impl DatasetKind {
    /// The name used on the command line and in files: `cifar10`, `cifar100`, `mnist`,
    /// `fashion-mnist`.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
        }
    }

    /// The class names, indexed by label.
    pub fn classes(self) -> &'static [&'static str] {
        match self {
            DatasetKind::Cifar10 => &cifar10::CLASSES,
            DatasetKind::Cifar100 => &cifar100::CLASSES,
            DatasetKind::Mnist => &idx::MNIST_CLASSES,
            DatasetKind::FashionMnist => &idx::FASHION_MNIST_CLASSES,
        }
    }

    /// The image shape `(channels, height, width)`.
    pub fn shape(self) -> (usize, usize, usize) {
        match self {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => (3, 32, 32),
            DatasetKind::Mnist | DatasetKind::FashionMnist => (1, 28, 28),
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A data set's training and test parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainTest {
    /// The training images (carve a validation set from them with
    /// [`ImageDataset::split_validation`]).
    pub train: ImageDataset,
    /// The test images.
    pub test: ImageDataset,
    /// What the reader noticed and a user should know (e.g. a batch file with fewer records
    /// than the official one): trainers and evaluators print these.
    pub notes: Vec<String>,
}

/// Loads the training and test sets of `kind`.
///
/// `path` is where the files are:
/// - CIFAR-10: `cifar-10-binary.tar.gz`, the extracted `cifar-10-batches-bin` directory, or
///   its parent (see [`cifar10::load`]). `None` gives the small sample embedded in the binary
///   ([`cifar10::embedded_sample`]).
/// - CIFAR-100: `cifar-100-binary.tar.gz`, the extracted `cifar-100-binary` directory, or its
///   parent (see [`cifar100::load`]). Required.
/// - MNIST: the directory with the four idx files (see [`idx::load_mnist`]). Required.
/// - Fashion-MNIST: the directory with the four idx files; `None` looks in
///   [`idx::FASHION_MNIST_SYSTEM_DIR`], where Debian's `dataset-fashion-mnist` puts them.
pub fn load(kind: DatasetKind, path: Option<&Path>) -> Result<TrainTest> {
    match (kind, path) {
        (DatasetKind::Cifar10, Some(path)) => cifar10::load(path),
        (DatasetKind::Cifar10, None) => cifar10::embedded_sample(),
        (DatasetKind::Cifar100, Some(path)) => cifar100::load(path),
        (DatasetKind::Cifar100, None) => Err(Error::invalid(format!(
            "CIFAR-100 has no default location: pass its archive or directory; {}",
            cifar100::HINT
        ))),
        (DatasetKind::Mnist, Some(dir)) => idx::load_mnist(dir),
        (DatasetKind::Mnist, None) => Err(Error::invalid(format!(
            "MNIST has no default location: pass the directory that holds its four idx files; {}",
            idx::MNIST_HINT
        ))),
        (DatasetKind::FashionMnist, Some(dir)) => idx::load_fashion_mnist(dir),
        (DatasetKind::FashionMnist, None) => {
            idx::load_fashion_mnist(Path::new(idx::FASHION_MNIST_SYSTEM_DIR))
        }
    }
}

/// Reads a whole file, decompressing it when its name ends in `.gz`. `hint` says what to do
/// about a missing or damaged file.
fn read_maybe_gz(path: &Path, hint: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::data(path, format!("cannot open ({e}); {hint}")))?;
    let mut bytes = Vec::new();
    let read = if path.extension().is_some_and(|ext| ext == "gz") {
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)).read_to_end(&mut bytes)
    } else {
        std::io::BufReader::new(file).read_to_end(&mut bytes)
    };
    read.map_err(|e| {
        Error::data(
            path,
            format!("cannot read ({e}): the file is damaged or truncated; {hint}"),
        )
    })?;
    Ok(bytes)
}

/// The class names of a names file (one per non-blank line), which must hold `expected` of
/// them; `what` names the data set in the message ("CIFAR-10 has 10").
fn parse_class_names(
    bytes: &[u8],
    path: &Path,
    expected: usize,
    what: &str,
    hint: &str,
) -> Result<Vec<String>> {
    let names: Vec<String> = String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != expected {
        return Err(Error::data(
            path,
            format!(
                "names {} classes, {what} has {expected}: the file is damaged or from another \
                 data set (delete it to use the standard names); {hint}",
                names.len()
            ),
        ));
    }
    Ok(names)
}

/// Where a data set in its binary version is: the archive, or the directory of its files.
enum BinaryLayout {
    Archive(PathBuf),
    Dir(PathBuf),
}

/// Finds a binary-version data set at `path`: an archive file, a directory holding one of
/// `markers`, one holding the extracted `dir_name`, or one holding `archive_name` (in that
/// order). `None` when `path` is none of these.
fn find_binary_layout(
    path: &Path,
    markers: &[&str],
    dir_name: &str,
    archive_name: &str,
) -> Option<BinaryLayout> {
    if path.is_file() {
        Some(BinaryLayout::Archive(path.to_path_buf()))
    } else if markers.iter().any(|m| path.join(m).exists()) {
        Some(BinaryLayout::Dir(path.to_path_buf()))
    } else if path.join(dir_name).is_dir() {
        Some(BinaryLayout::Dir(path.join(dir_name)))
    } else if path.join(archive_name).is_file() {
        Some(BinaryLayout::Archive(path.join(archive_name)))
    } else {
        None
    }
}

/// The largest archive member read (CIFAR-100's `train.bin`, the largest, is 154 MB).
const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// The members of a gzip-compressed tar archive that a reader wants, by file name whatever
/// their directory (a later member of the same name replaces an earlier one).
struct ArchiveMembers<'a> {
    archive: &'a Path,
    what: &'static str,
    hint: &'static str,
    members: Vec<(String, Vec<u8>)>,
}

impl<'a> ArchiveMembers<'a> {
    /// Reads the members whose file name `wanted` accepts. `what` names the expected content
    /// ("the CIFAR-10 binary version") and `hint` what to do about a damaged archive.
    fn read(
        archive: &'a Path,
        what: &'static str,
        hint: &'static str,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let file = std::fs::File::open(archive)
            .map_err(|e| Error::data(archive, format!("cannot open ({e}); {hint}")))?;
        let damaged = |e: std::io::Error| {
            Error::data(
                archive,
                format!(
                    "cannot read the archive ({e}): it is truncated or not a gzip-compressed \
                     tar file; {hint}"
                ),
            )
        };
        let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(file));
        let mut tar = tar::Archive::new(gz);
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in tar.entries().map_err(damaged)? {
            let entry = entry.map_err(damaged)?;
            let name = entry
                .path()
                .map_err(damaged)?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            let Some(name) = name.filter(|n| wanted(n)) else {
                continue;
            };
            let mut bytes = Vec::new();
            entry
                .take(MAX_MEMBER_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(damaged)?;
            if bytes.len() as u64 > MAX_MEMBER_BYTES {
                return Err(Error::data(
                    archive,
                    format!(
                        "member {name} is larger than {} MiB, far beyond any file of {what}: \
                         the archive is damaged; {hint}",
                        MAX_MEMBER_BYTES >> 20
                    ),
                ));
            }
            members.retain(|(n, _)| *n != name);
            members.push((name, bytes));
        }
        Ok(ArchiveMembers {
            archive,
            what,
            hint,
            members,
        })
    }

    /// Takes member `name` out, with a path for messages (`ARCHIVE/name`).
    fn take(&mut self, name: &str) -> Result<(PathBuf, Vec<u8>)> {
        match self.members.iter().position(|(n, _)| n == name) {
            Some(i) => Ok((self.archive.join(name), self.members.swap_remove(i).1)),
            None => Err(Error::data(
                self.archive,
                format!(
                    "has no member {name}: it is not {}; {}",
                    self.what, self.hint
                ),
            )),
        }
    }
}

/// The training / validation split of a run with this seed: the same images every time, so
/// evaluation can fit a temperature on the validation images the run held out.
pub fn validation_split(
    train: &ImageDataset,
    validation: usize,
    seed: u64,
) -> Result<(ImageDataset, ImageDataset)> {
    train.split_validation(validation, &mut crate::rng::seeded(seed ^ 0x5eed_0001))
}
