//! SVHN (Street View House Numbers, cropped digits) from its MATLAB files, `test_32x32.mat`
//! and `train_32x32.mat` (<http://ufldl.stanford.edu/housenumbers/>).
//!
//! Each file is a MATLAB 5 MAT-file with two variables: `X`, uint8 `[32, 32, 3, N]` (height,
//! width, channel, image; stored column-major, so the height index runs fastest), and `y`,
//! `[N, 1]` digits with 10 standing for digit 0. Only the part of the MAT 5 format such files
//! use is read: little-endian files, top-level variables that are numeric arrays, each either
//! plain or zlib-compressed (`miCOMPRESSED`), with real data of any numeric type. No
//! maintained Rust crate reads compressed MAT 5 numeric arrays without pulling in a parser
//! framework, and this subset is small. MATLAB 7.3 files (HDF5) are recognised and refused
//! with a message.

use std::io::Read;
use std::path::Path;

use super::ImageDataset;
use crate::{Error, Result};

/// The SVHN class names: digit `d` has label `d`.
pub const CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// What to do when an SVHN file is missing or damaged.
pub const HINT: &str = "download test_32x32.mat (the cropped-digits format) from \
    http://ufldl.stanford.edu/housenumbers/ and pass the file or the directory holding it";

/// The test set file name.
pub const TEST_FILE: &str = "test_32x32.mat";

/// Bytes of the MAT 5 header: descriptive text, subsystem offset, version and endianness.
const HEADER_BYTES: usize = 128;
/// Data types of MAT 5 data elements.
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
/// The largest variable a reader accepts decompressed (the SVHN training set's X is 604 MB).
const MAX_VARIABLE_BYTES: u64 = 1 << 30;

/// Loads SVHN images and labels from `path`, a `*_32x32.mat` file or a directory holding
/// `test_32x32.mat`.
pub fn load(path: &Path) -> Result<ImageDataset> {
    let file = if path.is_dir() {
        path.join(TEST_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file)
        .map_err(|e| Error::data(&file, format!("cannot read ({e}); {HINT}")))?;
    parse(&bytes).map_err(|m| Error::data(&file, format!("{m}; {HINT}")))
}

/// Parses the bytes of an SVHN `.mat` file.
pub fn parse(bytes: &[u8]) -> std::result::Result<ImageDataset, String> {
    let variables = read_variables(bytes)?;
    let find = |name: &str| {
        variables
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| format!("holds no variable '{name}': not an SVHN cropped-digits file"))
    };
    let (x, y) = (find("X")?, find("y")?);
    let n = match x.dims[..] {
        [32, 32, 3, n] => n,
        [32, 32, 3] => 1,
        ref dims => {
            return Err(format!(
                "X has dimensions {dims:?}; SVHN's are [32, 32, 3, N] (the cropped-digits format)"
            ))
        }
    };
    let labels = y.data.to_f64();
    if labels.len() != n {
        return Err(format!(
            "y holds {} labels for {n} images in X (dimensions {:?})",
            labels.len(),
            y.dims
        ));
    }
    let labels = labels
        .iter()
        .enumerate()
        .map(|(i, &v)| match v {
            1.0..=10.0 if v.fract() == 0.0 => Ok((v as u8) % 10),
            _ => Err(format!(
                "label {i} is {v}; SVHN labels are 1 to 10 (10 for digit 0)"
            )),
        })
        .collect::<std::result::Result<Vec<u8>, String>>()?;
    let pixels = x.data.to_u8("X")?;
    // MATLAB's column-major [h, w, c, n] to whvi's row-major CHW per image.
    let mut images = vec![0u8; pixels.len()];
    for (i, out) in images.chunks_exact_mut(3 * 32 * 32).enumerate() {
        let image = &pixels[i * 3072..(i + 1) * 3072];
        for c in 0..3 {
            for h in 0..32 {
                for w in 0..32 {
                    out[c * 1024 + h * 32 + w] = image[h + 32 * w + 1024 * c];
                }
            }
        }
    }
    let classes = CLASSES.iter().map(|c| c.to_string()).collect();
    ImageDataset::new(images, labels, 3, 32, 32, classes).map_err(|e| e.to_string())
}

/// A numeric MAT variable: its name, dimensions and values (in column-major order).
struct Variable {
    name: String,
    dims: Vec<usize>,
    data: Numbers,
}

/// The values of a variable: uint8 data stay bytes, so that images need no conversion.
enum Numbers {
    Bytes(Vec<u8>),
    Floats(Vec<f64>),
}

impl Numbers {
    fn to_f64(&self) -> Vec<f64> {
        match self {
            Numbers::Bytes(b) => b.iter().map(|&v| f64::from(v)).collect(),
            Numbers::Floats(v) => v.clone(),
        }
    }

    fn to_u8(&self, what: &str) -> std::result::Result<Vec<u8>, String> {
        match self {
            Numbers::Bytes(b) => Ok(b.clone()),
            Numbers::Floats(v) => v
                .iter()
                .map(|&v| match v {
                    0.0..=255.0 if v.fract() == 0.0 => Ok(v as u8),
                    _ => Err(format!("{what} holds {v}, not a pixel value 0-255")),
                })
                .collect(),
        }
    }
}

/// The numeric variables of a MAT 5 file (others, such as cell arrays, are skipped).
fn read_variables(bytes: &[u8]) -> std::result::Result<Vec<Variable>, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "is {} bytes, shorter than a MAT-file header ({HEADER_BYTES}): truncated or not a \
             MAT-file",
            bytes.len()
        ));
    }
    if bytes.starts_with(b"MATLAB 7.3") || bytes.get(512..520) == Some(b"\x89HDF\r\n\x1a\n") {
        return Err(
            "is a MATLAB 7.3 (HDF5) file, which whvi does not read: save it in the \
                    MATLAB 5 format (in MATLAB, save(..., '-v7'); in Python, \
                    scipy.io.savemat) or use the official SVHN file"
                .into(),
        );
    }
    if !bytes.starts_with(b"MATLAB 5.0 MAT-file") {
        return Err("does not start with 'MATLAB 5.0 MAT-file': not a MATLAB 5 MAT-file".into());
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => {
            return Err("is a big-endian MAT-file; re-save it on a little-endian machine".into())
        }
        other => return Err(format!("has an unknown byte-order mark {other:?}")),
    }
    let mut variables = Vec::new();
    let mut at = HEADER_BYTES;
    while at < bytes.len() {
        let (kind, data, next) = element(bytes, at)?;
        match kind {
            MI_COMPRESSED => {
                let inflated = inflate(data)?;
                let (kind, inner, _) = element(&inflated, 0)?;
                if kind == MI_MATRIX {
                    variables.extend(matrix(inner)?);
                }
            }
            MI_MATRIX => variables.extend(matrix(data)?),
            _ => {}
        }
        at = next;
    }
    Ok(variables)
}

/// The data element at `at`: its type, its data and where the next element starts.
/// Handles the small format (type and length in one word, up to 4 bytes of data).
fn element(bytes: &[u8], at: usize) -> std::result::Result<(u32, &[u8], usize), String> {
    let word = |i: usize| -> std::result::Result<u32, String> {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("ends inside a data-element tag at byte {i}: truncated"))
    };
    let first = word(at)?;
    if first >> 16 != 0 {
        let len = (first >> 16) as usize;
        if len > 4 {
            return Err(format!(
                "a small data element at byte {at} claims {len} bytes"
            ));
        }
        let data = bytes
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("ends inside a data element at byte {at}: truncated"))?;
        return Ok((first & 0xffff, data, at + 8));
    }
    let len = word(at + 4)? as usize;
    let start = at + 8;
    let data = start
        .checked_add(len)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| {
            format!(
                "a data element at byte {at} claims {len} bytes, past the end of the file \
                 ({} bytes): truncated",
                bytes.len()
            )
        })?;
    // Elements are padded to 8 bytes, except compressed ones.
    let padded = if first == MI_COMPRESSED {
        len
    } else {
        len.div_ceil(8) * 8
    };
    Ok((first, data, start.saturating_add(padded)))
}

fn inflate(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_VARIABLE_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("a compressed variable does not decompress ({e}): truncated"))?;
    if out.len() as u64 > MAX_VARIABLE_BYTES {
        return Err(format!(
            "a compressed variable holds more than {MAX_VARIABLE_BYTES} bytes"
        ));
    }
    Ok(out)
}

/// Classes of MAT arrays: 6 double, 7 single, 8-15 the integer types.
fn is_numeric_class(class: u8) -> bool {
    (6..=15).contains(&class)
}

/// Reads a numeric `miMATRIX` element's name, dimensions and real values (`None` for other
/// array classes, which SVHN files do not hold).
fn matrix(data: &[u8]) -> std::result::Result<Option<Variable>, String> {
    let (_, flags, at) = element(data, 0)?;
    let class = *flags.first().ok_or("an array has empty flags")?;
    if !is_numeric_class(class) {
        return Ok(None);
    }
    if flags.get(1).is_some_and(|f| f & 0x08 != 0) {
        return Err("holds a complex array; SVHN data are real".into());
    }
    let (_, dims, at) = element(data, at)?;
    let dims: Vec<usize> = dims
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .map(|d| usize::try_from(d).map_err(|_| format!("an array has dimension {d}")))
        .collect::<std::result::Result<_, _>>()?;
    let (_, name, at) = element(data, at)?;
    let name = String::from_utf8_lossy(name).into_owned();
    // Only SVHN's two variables are kept, so other variables cost no memory.
    if name != "X" && name != "y" {
        return Ok(None);
    }
    let (kind, real, _) = element(data, at)?;
    let count = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("'{name}' has dimensions {dims:?}, too many elements"))?;
    // Checked before converting, so that a small element type cannot grow 8-fold first.
    let found = real.len()
        / type_size(kind).ok_or_else(|| format!("'{name}' has data of unknown MAT type {kind}"))?;
    if found == count && kind != 2 {
        crate::device::check_memory(
            u64::try_from(count).ok().and_then(|n| n.checked_mul(8)),
            format_args!("reading '{name}' ({count} values)"),
            "check that the file is an SVHN file",
        )
        .map_err(|e| e.to_string())?;
    }
    if found != count {
        return Err(format!(
            "'{name}' has dimensions {dims:?} ({count} elements) but holds {found} values: \
             truncated or damaged"
        ));
    }
    let data = numbers(kind, real, &name)?;
    Ok(Some(Variable { name, dims, data }))
}

/// The bytes per value of MAT numeric type `kind` (`None` for another type).
fn type_size(kind: u32) -> Option<usize> {
    match kind {
        1 | 2 => Some(1),
        3 | 4 => Some(2),
        5..=7 => Some(4),
        9 | 12 | 13 => Some(8),
        _ => None,
    }
}

/// The values of a numeric data element of MAT type `kind`; uint8 data come back as bytes.
fn numbers(kind: u32, data: &[u8], name: &str) -> std::result::Result<Numbers, String> {
    fn words<const W: usize>(data: &[u8]) -> impl Iterator<Item = [u8; W]> + '_ {
        data.chunks_exact(W).map(|c| {
            let mut w = [0u8; W];
            w.copy_from_slice(c);
            w
        })
    }
    let values: Vec<f64> = match kind {
        1 => data.iter().map(|&b| f64::from(b as i8)).collect(),
        2 => return Ok(Numbers::Bytes(data.to_vec())),
        3 => words::<2>(data)
            .map(|w| i16::from_le_bytes(w).into())
            .collect(),
        4 => words::<2>(data)
            .map(|w| u16::from_le_bytes(w).into())
            .collect(),
        5 => words::<4>(data)
            .map(|w| i32::from_le_bytes(w).into())
            .collect(),
        6 => words::<4>(data)
            .map(|w| u32::from_le_bytes(w).into())
            .collect(),
        7 => words::<4>(data)
            .map(|w| f32::from_le_bytes(w).into())
            .collect(),
        9 => words::<8>(data).map(f64::from_le_bytes).collect(),
        12 => words::<8>(data)
            .map(|w| i64::from_le_bytes(w) as f64)
            .collect(),
        13 => words::<8>(data)
            .map(|w| u64::from_le_bytes(w) as f64)
            .collect(),
        other => return Err(format!("'{name}' has data of unknown MAT type {other}")),
    };
    Ok(Numbers::Floats(values))
}
