//! CIFAR-100 in its binary version, from disk or from the `.tar.gz`.
//!
//! The binary version (<https://www.cs.toronto.edu/~kriz/cifar.html>, file
//! `cifar-100-binary.tar.gz`) is a directory `cifar-100-binary/` holding `train.bin` (50,000
//! images), `test.bin` (10,000), `fine_label_names.txt` and `coarse_label_names.txt`. Each
//! `.bin` file is a sequence of 3,074-byte records: the coarse label (one of 20 superclasses),
//! the fine label (one of 100 classes), then the 32x32 red, green and blue planes, row by
//! row. whvi trains and evaluates on the 100 fine labels; the class names come from
//! `fine_label_names.txt` when it is there and are the standard ones otherwise.

use std::path::{Path, PathBuf};

use super::{
    find_binary_layout, parse_class_names, read_maybe_gz, ArchiveMembers, BinaryLayout,
    ImageDataset, TrainTest,
};
use crate::{Error, Result};

/// The 100 fine class names of CIFAR-100, indexed by fine label.
pub const CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// Superclasses (coarse labels) in CIFAR-100.
const COARSE_CLASSES: usize = 20;
/// Bytes per image: 3 channels of 32x32.
const IMAGE_BYTES: usize = 3 * 32 * 32;
/// Bytes per record: the coarse label, the fine label and the image.
pub const RECORD_BYTES: usize = 2 + IMAGE_BYTES;
/// Records in the official training file.
const OFFICIAL_TRAIN: usize = 50_000;
/// Records in the official test file.
const OFFICIAL_TEST: usize = 10_000;

const TRAIN_FILE: &str = "train.bin";
const TEST_FILE: &str = "test.bin";
const NAMES_FILE: &str = "fine_label_names.txt";
const DIR_NAME: &str = "cifar-100-binary";
const ARCHIVE_NAME: &str = "cifar-100-binary.tar.gz";

/// What to do when CIFAR-100 files are missing or damaged.
pub const HINT: &str = "download the CIFAR-100 binary version (cifar-100-binary.tar.gz) from \
    https://www.cs.toronto.edu/~kriz/cifar.html and pass the .tar.gz, the extracted \
    cifar-100-binary directory or its parent";

/// Loads CIFAR-100 from `path`: the `cifar-100-binary.tar.gz` archive (any file name), the
/// extracted `cifar-100-binary` directory, its parent, or a directory holding the archive.
pub fn load(path: &Path) -> Result<TrainTest> {
    if !path.exists() {
        return Err(Error::data(path, format!("does not exist; {HINT}")));
    }
    match find_binary_layout(path, &[TRAIN_FILE, TEST_FILE], DIR_NAME, ARCHIVE_NAME) {
        Some(BinaryLayout::Archive(archive)) => return load_tar_gz(&archive),
        Some(BinaryLayout::Dir(dir)) => return load_dir(&dir),
        None => {}
    }
    Err(Error::data(
        path,
        format!(
            "holds no CIFAR-100 binary data: expected {TRAIN_FILE} and {TEST_FILE} in it, a \
             {DIR_NAME} directory or {ARCHIVE_NAME}; {HINT}"
        ),
    ))
}

/// Loads CIFAR-100 from an extracted `cifar-100-binary` directory: `train.bin` and `test.bin`
/// must be there, `fine_label_names.txt` is optional.
pub fn load_dir(dir: &Path) -> Result<TrainTest> {
    let read = |name: &str| -> Result<(PathBuf, Vec<u8>)> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::data(
                &path,
                format!("missing from the CIFAR-100 directory; {HINT}"),
            ));
        }
        let bytes = read_maybe_gz(&path, HINT)?;
        Ok((path, bytes))
    };
    let classes = match dir.join(NAMES_FILE).is_file() {
        true => {
            let (path, bytes) = read(NAMES_FILE)?;
            parse_names(&bytes, &path)?
        }
        false => default_classes(),
    };
    from_files(read(TRAIN_FILE)?, read(TEST_FILE)?, classes)
}

/// Loads CIFAR-100 from the gzip-compressed tar archive without extracting it.
pub fn load_tar_gz(archive: &Path) -> Result<TrainTest> {
    let mut members = ArchiveMembers::read(archive, "the CIFAR-100 binary version", HINT, |n| {
        [TRAIN_FILE, TEST_FILE, NAMES_FILE].contains(&n)
    })?;
    let classes = match members.take(NAMES_FILE) {
        Ok((path, bytes)) => parse_names(&bytes, &path)?,
        Err(_) => default_classes(),
    };
    let train = members.take(TRAIN_FILE)?;
    let test = members.take(TEST_FILE)?;
    from_files(train, test, classes)
}

fn default_classes() -> Vec<String> {
    CLASSES.iter().map(|c| c.to_string()).collect()
}

/// The 100 fine class names of `fine_label_names.txt`, one per non-blank line.
fn parse_names(bytes: &[u8], path: &Path) -> Result<Vec<String>> {
    parse_class_names(bytes, path, CLASSES.len(), "CIFAR-100", HINT)
}

fn from_files(
    (train_path, train): (PathBuf, Vec<u8>),
    (test_path, test): (PathBuf, Vec<u8>),
    classes: Vec<String>,
) -> Result<TrainTest> {
    let notes = [
        (&train_path, &train, OFFICIAL_TRAIN),
        (&test_path, &test, OFFICIAL_TEST),
    ]
    .into_iter()
    .filter(|(_, bytes, official)| bytes.len() != official * RECORD_BYTES)
    .map(|(path, bytes, official)| {
        format!(
            "{} holds {} records where the official file holds {official}",
            path.display(),
            bytes.len() / RECORD_BYTES
        )
    })
    .collect();
    Ok(TrainTest {
        train: parse_records(&train, &train_path, &classes)?,
        test: parse_records(&test, &test_path, &classes)?,
        notes,
    })
}

/// The images and fine labels of a `.bin` file's records.
pub fn parse_records(bytes: &[u8], path: &Path, classes: &[String]) -> Result<ImageDataset> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(Error::data(
            path,
            format!(
                "is {} bytes, not a positive whole number of {RECORD_BYTES}-byte records \
                 (coarse label, fine label, 3x32x32 pixels): the file is truncated, or not \
                 from the CIFAR-100 binary version (a CIFAR-10 file has 3073-byte records); \
                 {HINT}",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / RECORD_BYTES;
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let (coarse, fine) = (usize::from(record[0]), usize::from(record[1]));
        if coarse >= COARSE_CLASSES || fine >= classes.len() {
            return Err(Error::data(
                path,
                format!(
                    "record {i} has coarse label {coarse} and fine label {fine}; CIFAR-100 has \
                     {COARSE_CLASSES} and {} of them: the file is damaged; {HINT}",
                    classes.len()
                ),
            ));
        }
        labels.push(record[1]);
        images.extend_from_slice(&record[2..]);
    }
    ImageDataset::new(images, labels, 3, 32, 32, classes.to_vec())
}
