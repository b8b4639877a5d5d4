//! CIFAR-10-C (Hendrycks and Dietterich, 2019) in its published layout, read and written.
//!
//! A CIFAR-10-C directory holds one `<corruption>.npy` per corruption (uint8
//! `[50000, 32, 32, 3]`, height-width-channel: the 10,000 test images at severity 1, then at
//! severity 2, ... 5) and `labels.npy` (the 50,000 labels, the test labels five times). The
//! 15 standard corruption files and the 4 extra ones are recognised by name
//! ([`Corruption::file_stem`]); other `.npy` files are listed in [`Cifar10C::notes`].
//! [`write_cifar10c`] writes whvi's on-the-fly corruptions in the same layout, so that other
//! tools can read them and `--corruptions cifar10-c:DIR` can check them.

use std::path::{Path, PathBuf};

use super::corrupt::{corrupt_dataset, Corruption};
use crate::data::ImageDataset;
use crate::metrics::{read_npy, write_npy, NpyArray};
use crate::rng::seeded_stream;
use crate::{Error, Result};

/// The labels file of a CIFAR-10-C directory.
pub const LABELS_FILE: &str = "labels.npy";
/// Severities per corruption.
pub const SEVERITIES: usize = 5;
/// The image shape of CIFAR-10-C, channel-major.
const SHAPE: (usize, usize, usize) = (3, 32, 32);

/// A CIFAR-10-C directory, opened: its labels and the corruption files found.
#[derive(Debug, Clone)]
pub struct Cifar10C {
    dir: PathBuf,
    labels: Vec<u8>,
    files: Vec<(Corruption, PathBuf)>,
    notes: Vec<String>,
}

impl Cifar10C {
    /// Opens `dir`: reads `labels.npy` (integers, length a multiple of 5) and lists the
    /// corruption files, standard ones first in the published order. A directory with no
    /// corruption file is an error.
    pub fn open(dir: &Path) -> Result<Self> {
        let labels_path = dir.join(LABELS_FILE);
        if !labels_path.is_file() {
            return Err(Error::data(
                dir,
                format!(
                    "is not a CIFAR-10-C directory: it has no {LABELS_FILE} (download \
                     CIFAR-10-C.tar from https://zenodo.org/record/2535967 and pass the \
                     extracted CIFAR-10-C directory, or write one with `whvi corrupt`)"
                ),
            ));
        }
        let labels = read_labels(&labels_path)?;
        let mut files = Vec::new();
        let mut notes = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let Some(stem) = path
                .extension()
                .filter(|e| *e == "npy")
                .and_then(|_| path.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
            else {
                continue;
            };
            match Corruption::from_file_stem(&stem) {
                Some(corruption) => files.push((corruption, path)),
                None if path.file_name().is_some_and(|n| n == LABELS_FILE) => {}
                None => notes.push(format!(
                    "{} is not a CIFAR-10-C corruption name; skipped",
                    path.display()
                )),
            }
        }
        let rank = |c: &Corruption| {
            Corruption::STANDARD
                .iter()
                .chain(&Corruption::EXTRA)
                .position(|x| x == c)
        };
        files.sort_by_key(|(c, _)| rank(c));
        if files.is_empty() {
            return Err(Error::data(
                dir,
                "holds labels.npy but no corruption file (gaussian_noise.npy, fog.npy, ...)",
            ));
        }
        Ok(Cifar10C {
            dir: dir.to_path_buf(),
            labels,
            files,
            notes,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The corruptions found, in report order.
    pub fn corruptions(&self) -> Vec<Corruption> {
        self.files.iter().map(|(c, _)| *c).collect()
    }

    /// Images per severity (10,000 in the published files).
    pub fn images_per_severity(&self) -> usize {
        self.labels.len() / SEVERITIES
    }

    /// What a user should know about the directory (files skipped).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The five severities of `corruption`, the first `limit` images of each (all when
    /// `limit` is larger), labelled with `classes`. Refuses a file of another dtype or shape
    /// than the labels say, naming the file, the expected and the found shape.
    pub fn load(
        &self,
        corruption: Corruption,
        limit: usize,
        classes: &[String],
    ) -> Result<Vec<ImageDataset>> {
        let path = self
            .files
            .iter()
            .find(|(c, _)| *c == corruption)
            .map(|(_, p)| p)
            .ok_or_else(|| {
                Error::data(&self.dir, format!("has no {}.npy", corruption.file_stem()))
            })?;
        let array = read_npy(path)?;
        let expected = [self.labels.len(), SHAPE.1, SHAPE.2, SHAPE.0];
        if array.shape() != expected {
            return Err(Error::data(
                path,
                format!(
                    "has shape {:?}; a CIFAR-10-C file has shape {expected:?} ({} labels in \
                     {LABELS_FILE}, 5 severities of {} images, 32x32x3 height-width-channel)",
                    array.shape(),
                    self.labels.len(),
                    self.images_per_severity()
                ),
            ));
        }
        let pixels = array
            .into_u8()
            .map_err(|e| Error::data(path, e.to_string()))?;
        let per = self.images_per_severity();
        let n = limit.min(per);
        (0..SEVERITIES)
            .map(|s| {
                let images = (s * per..s * per + n)
                    .flat_map(|i| hwc_to_chw(&pixels[i * 3072..(i + 1) * 3072]))
                    .collect();
                let labels = self.labels[s * per..s * per + n].to_vec();
                ImageDataset::new(images, labels, SHAPE.0, SHAPE.1, SHAPE.2, classes.to_vec())
                    .map_err(|e| Error::data(path, e.to_string()))
            })
            .collect()
    }
}

/// Reads `labels.npy`: integer labels 0-255, as many as 5 times the images per severity.
fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let array = read_npy(path)?;
    let values = match array.shape() {
        [n] if *n > 0 && n.is_multiple_of(SEVERITIES) => array
            .to_integers()
            .map_err(|e| Error::data(path, e.to_string()))?,
        shape => {
            return Err(Error::data(
                path,
                format!(
                    "has shape {shape:?}; CIFAR-10-C labels are one array of 5 x N labels \
                     ([50000] in the published files)"
                ),
            ))
        }
    };
    values
        .iter()
        .map(|&v| {
            u8::try_from(v)
                .map_err(|_| Error::data(path, format!("holds label {v}, not a class index")))
        })
        .collect()
}

/// One 32x32x3 image from height-width-channel to channel-height-width order.
fn hwc_to_chw(image: &[u8]) -> Vec<u8> {
    let (c, h, w) = SHAPE;
    (0..c * h * w)
        .map(|i| {
            let (ch, rest) = (i / (h * w), i % (h * w));
            image[rest * c + ch]
        })
        .collect()
}

/// One image from channel-height-width to height-width-channel order.
fn chw_to_hwc(image: &[u8]) -> Vec<u8> {
    let (c, h, w) = SHAPE;
    (0..c * h * w)
        .map(|i| {
            let (rest, ch) = (i / c, i % c);
            image[ch * h * w + rest]
        })
        .collect()
}

/// The generator of `corruption` at `severity` in an evaluation or a written directory seeded
/// with `seed`: the same images either way.
pub(super) fn corruption_rng(
    seed: u64,
    corruption: Corruption,
    severity: usize,
) -> crate::rng::WhviRng {
    seeded_stream(seed, &format!("corrupt/{}/{severity}", corruption.name()))
}

/// Writes `test` (3x32x32 images) under each of `corruptions` at severities 1-5 into `dir` in
/// the CIFAR-10-C layout, with `labels.npy`; `seed` decides the noise exactly as it does in
/// `whvi eval --seed`. Each file is written atomically, so an interrupted run leaves whole
/// files only; `progress` receives a line per file.
pub fn write_cifar10c(
    dir: &Path,
    test: &ImageDataset,
    corruptions: &[Corruption],
    seed: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    if test.shape() != SHAPE {
        let (c, h, w) = test.shape();
        return Err(Error::invalid(format!(
            "CIFAR-10-C images are 3x32x32; these are {c}x{h}x{w}"
        )));
    }
    if test.is_empty() {
        return Err(Error::invalid("the test set holds no images"));
    }
    let n = test.len();
    for &corruption in corruptions {
        let path = dir.join(format!("{}.npy", corruption.file_stem()));
        progress(&format!("writing {}", path.display()));
        let mut pixels = Vec::with_capacity(SEVERITIES * n * 3072);
        for severity in 1..=SEVERITIES {
            let mut rng = corruption_rng(seed, corruption, severity);
            let shifted = corrupt_dataset(test, corruption, severity, &mut rng)?;
            for i in 0..n {
                pixels.extend(chw_to_hwc(shifted.image(i)));
            }
        }
        write_npy(
            &path,
            &NpyArray::new(&[SEVERITIES * n, 32, 32, 3], &pixels)?,
        )?;
    }
    let labels: Vec<u8> = (0..SEVERITIES)
        .flat_map(|_| test.labels().iter().copied())
        .collect();
    write_npy(
        dir.join(LABELS_FILE),
        &NpyArray::new(&[labels.len()], &labels)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_convert_both_ways() {
        let chw: Vec<u8> = (0..3072).map(|i| (i % 251) as u8).collect();
        let hwc = chw_to_hwc(&chw);
        // Pixel (row 1, column 2), green: CHW index 1024 + 32 + 2, HWC index (32 + 2) * 3 + 1.
        assert_eq!(hwc[(32 + 2) * 3 + 1], chw[1024 + 32 + 2]);
        assert_eq!(hwc_to_chw(&hwc), chw);
    }
}
