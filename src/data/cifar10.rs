//! CIFAR-10 in its binary version, from disk, from the `.tar.gz`, from the Hugging Face hub,
//! or from the small sample embedded in the binary.
//!
//! The binary version (<https://www.cs.toronto.edu/~kriz/cifar.html>, file
//! `cifar-10-binary.tar.gz`) is a directory `cifar-10-batches-bin/` holding `data_batch_1.bin`
//! to `data_batch_5.bin` (training), `test_batch.bin` and `batches.meta.txt` (class names, one
//! per line). Each batch file is a sequence of 3,073-byte records: one label byte, then the
//! 32x32 red, green and blue planes, row by row. Files of any whole number of records are
//! accepted; one that holds other than the official 10,000 gets a note in
//! [`TrainTest::notes`](super::TrainTest::notes) (a file cut at a record boundary would
//! otherwise pass unnoticed).

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::{
    find_binary_layout, parse_class_names, read_maybe_gz, ArchiveMembers, BinaryLayout,
    ImageDataset, TrainTest,
};
use crate::{Error, Result};

/// The CIFAR-10 class names, indexed by label.
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Image side in pixels.
const SIDE: usize = 32;
/// Bytes per image: 3 channels of 32x32.
const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
/// Bytes per record: a label byte and the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// The training batch files, in order.
const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
const TEST_FILE: &str = "test_batch.bin";
/// The class-name file.
const META_FILE: &str = "batches.meta.txt";
/// The directory the official archive extracts to.
const DIR_NAME: &str = "cifar-10-batches-bin";
/// The official archive's file name.
const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";

/// What to do when CIFAR-10 files are missing or damaged.
pub const HINT: &str = "download the CIFAR-10 binary version (cifar-10-binary.tar.gz) from \
    https://www.cs.toronto.edu/~kriz/cifar.html and pass the .tar.gz, the extracted \
    cifar-10-batches-bin directory or its parent (from Rust, cifar10::download fetches it from \
    the Hugging Face hub); or pass no path to use the small sample built into whvi";

/// Loads CIFAR-10 from `path`, which may be the `cifar-10-binary.tar.gz` archive (any file
/// name ending in `.tar.gz` or `.tgz`), the extracted `cifar-10-batches-bin` directory, its
/// parent directory, or a directory holding `cifar-10-binary.tar.gz`.
pub fn load(path: &Path) -> Result<TrainTest> {
    if !path.exists() {
        return Err(Error::data(path, format!("does not exist; {HINT}")));
    }
    match find_binary_layout(path, &[TRAIN_FILES[0]], DIR_NAME, ARCHIVE_NAME) {
        Some(BinaryLayout::Archive(archive)) => return load_tar_gz(&archive),
        Some(BinaryLayout::Dir(dir)) => return load_dir(&dir),
        None => {}
    }
    Err(Error::data(
        path,
        format!(
            "holds no CIFAR-10 binary data: expected {} ... {TEST_FILE} in it, a {DIR_NAME} \
             directory or {ARCHIVE_NAME}; {HINT}",
            TRAIN_FILES[0]
        ),
    ))
}

/// Loads CIFAR-10 from an extracted `cifar-10-batches-bin` directory. All five training
/// batches and the test batch must be present; `batches.meta.txt` is optional.
pub fn load_dir(dir: &Path) -> Result<TrainTest> {
    if !dir.is_dir() {
        return Err(Error::data(
            dir,
            format!("is not a directory of CIFAR-10 batch files; {HINT}"),
        ));
    }
    let read = |name: &str| -> Result<Vec<u8>> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::data(
                &path,
                format!("missing from the CIFAR-10 directory; {HINT}"),
            ));
        }
        read_maybe_gz(&path, HINT)
    };
    let meta_path = dir.join(META_FILE);
    let classes = if meta_path.is_file() {
        parse_meta(&read(META_FILE)?, &meta_path)?
    } else {
        default_classes()
    };
    let train: Vec<(PathBuf, Vec<u8>)> = TRAIN_FILES
        .iter()
        .map(|name| Ok((dir.join(name), read(name)?)))
        .collect::<Result<_>>()?;
    let test = (dir.join(TEST_FILE), read(TEST_FILE)?);
    from_batches(&train, &test, &classes)
}

/// Loads CIFAR-10 straight from the gzip-compressed tar archive `cifar-10-binary.tar.gz`,
/// without extracting it. Members are recognised by file name, whatever their directory.
pub fn load_tar_gz(archive: &Path) -> Result<TrainTest> {
    let mut members = ArchiveMembers::read(archive, "the CIFAR-10 binary version", HINT, |name| {
        name == META_FILE || name == TEST_FILE || TRAIN_FILES.contains(&name)
    })?;
    let classes = match members.take(META_FILE) {
        Ok((path, bytes)) => parse_meta(&bytes, &path)?,
        Err(_) => default_classes(),
    };
    let train: Vec<(PathBuf, Vec<u8>)> = TRAIN_FILES
        .iter()
        .map(|name| members.take(name))
        .collect::<Result<_>>()?;
    let test = members.take(TEST_FILE)?;
    from_batches(&train, &test, &classes)
}

/// The gzip-compressed records of the embedded sample's training images.
static SAMPLE_TRAIN: &[u8] = include_bytes!("cifar10_sample_train.bin.gz");
/// The gzip-compressed records of the embedded sample's test images.
static SAMPLE_TEST: &[u8] = include_bytes!("cifar10_sample_test.bin.gz");

/// Training images in the embedded sample: 100 per class.
pub const SAMPLE_TRAIN_LEN: usize = 1_000;
/// Test images in the embedded sample: 50 per class.
pub const SAMPLE_TEST_LEN: usize = 500;

/// The small CIFAR-10 sample built into the binary, so training works without a download:
/// 1,000 training images (100 per class) and 500 test images (50 per class).
///
/// The data are "CIFAR-10 (JPEG copy)": the real CIFAR-10 images and labels, but taken from a
/// public mirror that re-encoded them once as JPEG, so pixel values differ slightly from the
/// official files; say so next to any number measured on it. The sample keeps, in file order,
/// the first 100 images of each class in `data_batch_1.bin` .. `data_batch_5.bin` and the
/// first 50 of each class in `test_batch.bin`, stored as gzip-compressed binary-version
/// records (`src/data/cifar10_sample_{train,test}.bin.gz`, about 4.3 MB together);
/// `benches/make_cifar10_sample.py` documents and reproduces the exact steps.
pub fn embedded_sample() -> Result<TrainTest> {
    let decode = |name: &str, gz: &[u8]| -> Result<(PathBuf, Vec<u8>)> {
        let path = PathBuf::from(format!("<embedded CIFAR-10 sample>/{name}"));
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::data(&path, format!("cannot decompress ({e})")))?;
        Ok((path, bytes))
    };
    let classes = default_classes();
    Ok(TrainTest {
        train: parse_batches(
            &[decode("cifar10_sample_train.bin", SAMPLE_TRAIN)?],
            &classes,
        )?,
        test: parse_batches(&[decode("cifar10_sample_test.bin", SAMPLE_TEST)?], &classes)?,
        notes: Vec::new(),
    })
}

/// Downloads CIFAR-10 from the Hugging Face hub (the `cifar10` data set's parquet files,
/// cached under `~/.cache/huggingface`) with `candle_datasets::vision::cifar::load`, and
/// converts it with [`from_hub_tensors`].
pub fn download() -> Result<TrainTest> {
    let hub = candle_datasets::vision::cifar::load().map_err(|e| {
        Error::invalid(format!(
            "downloading CIFAR-10 from the Hugging Face hub failed ({e}); without network \
             access, download the binary version (cifar-10-binary.tar.gz) from \
             https://www.cs.toronto.edu/~kriz/cifar.html and pass its path"
        ))
    })?;
    Ok(TrainTest {
        train: from_hub_tensors(&hub.train_images, &hub.train_labels)?,
        test: from_hub_tensors(&hub.test_images, &hub.test_labels)?,
        notes: Vec::new(),
    })
}

/// Converts the tensors of `candle_datasets::vision::cifar::load` (the hub's parquet files)
/// into an [`ImageDataset`].
///
/// That loader returns `f32` images in `[0, 1]` whose last two axes are swapped: the shape
/// reads `[N, 3, 32, 32]` but the layout is `[N, C, W, H]` (candle issue #2632). This
/// function swaps them back, so a `[N, C, A, B]` input gives images of height `B` and width
/// `A`, and rounds the pixels to bytes. Labels may have any integer or float dtype and must
/// be class indices below 10.
pub fn from_hub_tensors(images: &Tensor, labels: &Tensor) -> Result<ImageDataset> {
    let source = Path::new("<Hugging Face hub cifar10>");
    let (n, channels, width, height) = images.dims4().map_err(|e| {
        Error::data(
            source,
            format!("images are not a [N, C, W, H] tensor ({e})"),
        )
    })?;
    let pixels = images
        .transpose(2, 3)?
        .to_dtype(DType::F32)?
        .affine(255.0, 0.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let labels = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    if labels.len() != n {
        return Err(Error::data(
            source,
            format!("{n} images but {} labels", labels.len()),
        ));
    }
    if let Some((i, label)) = labels.iter().enumerate().find(|&(_, &l)| l >= 10) {
        return Err(Error::data(
            source,
            format!("label {label} of image {i} is out of range for CIFAR-10's 10 classes"),
        ));
    }
    ImageDataset::new(
        pixels,
        labels.into_iter().map(|l| l as u8).collect(),
        channels,
        height,
        width,
        default_classes(),
    )
}

/// [`CLASSES`] as owned strings.
fn default_classes() -> Vec<String> {
    CLASSES.iter().map(|c| c.to_string()).collect()
}

/// Reads class names from `batches.meta.txt`: the first 10 non-blank lines.
fn parse_meta(bytes: &[u8], path: &Path) -> Result<Vec<String>> {
    parse_class_names(bytes, path, CLASSES.len(), "CIFAR-10", HINT)
}

/// Records in each official batch file.
pub const OFFICIAL_RECORDS: usize = 10_000;

/// The training and test sets of the batch files, with a note for each file whose record count
/// is not the official one.
fn from_batches(
    train: &[(PathBuf, Vec<u8>)],
    test: &(PathBuf, Vec<u8>),
    classes: &[String],
) -> Result<TrainTest> {
    let notes = train
        .iter()
        .chain(std::iter::once(test))
        .filter(|(_, bytes)| bytes.len() != OFFICIAL_RECORDS * RECORD_BYTES)
        .map(|(path, bytes)| {
            format!(
                "{} holds {} records where the official file holds {OFFICIAL_RECORDS}: a copy \
                 cut short trains and tests on fewer images",
                path.display(),
                bytes.len() / RECORD_BYTES
            )
        })
        .collect();
    Ok(TrainTest {
        train: parse_batches(train, classes)?,
        test: parse_batches(std::slice::from_ref(test), classes)?,
        notes,
    })
}

/// Parses and concatenates batch files given as `(path for messages, contents)`.
fn parse_batches(files: &[(PathBuf, Vec<u8>)], classes: &[String]) -> Result<ImageDataset> {
    let total: usize = files.iter().map(|(_, b)| b.len() / RECORD_BYTES).sum();
    let mut images = Vec::with_capacity(total * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(total);
    for (path, bytes) in files {
        if bytes.is_empty() || bytes.len() % RECORD_BYTES != 0 {
            return Err(Error::data(
                path,
                format!(
                    "is {} bytes, not a positive whole number of {RECORD_BYTES}-byte records \
                     (1 label byte + 3x32x32 pixels): the file is truncated, or not from the \
                     binary version (the Python and MATLAB versions are not read); {HINT}",
                    bytes.len()
                ),
            ));
        }
        for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            if usize::from(record[0]) >= classes.len() {
                return Err(Error::data(
                    path,
                    format!(
                        "record {i} has label {}, out of range for {} classes: the file is \
                         damaged; {HINT}",
                        record[0],
                        classes.len()
                    ),
                ));
            }
            labels.push(record[0]);
            images.extend_from_slice(&record[1..]);
        }
    }
    ImageDataset::new(images, labels, 3, SIDE, SIDE, classes.to_vec())
}
