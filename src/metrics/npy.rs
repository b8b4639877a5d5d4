//! Reading and writing NumPy `.npy` files (format versions 1.0, 2.0 and 3.0).
//!
//! A file is the magic `\x93NUMPY`, a major and minor version byte, the header length
//! (little-endian u16 for version 1, u32 for versions 2 and 3), an ASCII (UTF-8 for version 3)
//! header holding a Python dict literal with `descr`, `fortran_order` and `shape`, then the
//! raw array data. Little-endian floats (`<f4`, `<f8`), signed and unsigned integers of 1, 2,
//! 4 and 8 bytes and booleans (`|b1`) are supported, in C order.

use std::path::Path;

use super::{Predictions, Probs, SampleProbs};
use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The element type of an `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NpyDtype {
    /// `<f4`
    F32,
    /// `<f8`
    F64,
    /// `|i1`
    I8,
    /// `<i2`
    I16,
    /// `<i4`
    I32,
    /// `<i8`
    I64,
    /// `|u1`
    U8,
    /// `<u2`
    U16,
    /// `<u4`
    U32,
    /// `<u8`
    U64,
    /// `|b1`
    Bool,
}

impl NpyDtype {
    const ALL: [NpyDtype; 11] = [
        NpyDtype::F32,
        NpyDtype::F64,
        NpyDtype::I8,
        NpyDtype::I16,
        NpyDtype::I32,
        NpyDtype::I64,
        NpyDtype::U8,
        NpyDtype::U16,
        NpyDtype::U32,
        NpyDtype::U64,
        NpyDtype::Bool,
    ];

    /// The `descr` string NumPy writes for this type on a little-endian machine.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
            NpyDtype::I8 => "|i1",
            NpyDtype::I16 => "<i2",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
            NpyDtype::U8 => "|u1",
            NpyDtype::U16 => "<u2",
            NpyDtype::U32 => "<u4",
            NpyDtype::U64 => "<u8",
            NpyDtype::Bool => "|b1",
        }
    }

    /// The size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::I8 | NpyDtype::U8 | NpyDtype::Bool => 1,
            NpyDtype::I16 | NpyDtype::U16 => 2,
            NpyDtype::F32 | NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::F64 | NpyDtype::I64 | NpyDtype::U64 => 8,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, NpyDtype::F32 | NpyDtype::F64)
    }

    /// Parses a `descr` string: little-endian (`<`), not applicable (`|`) or native (`=`, on
    /// a little-endian machine); big-endian (`>`) only for one-byte types.
    fn parse(descr: &str) -> std::result::Result<Self, String> {
        let order = descr.get(..1).unwrap_or("");
        let code = descr.get(1..).unwrap_or("");
        let found = NpyDtype::ALL.into_iter().find(|d| &d.descr()[1..] == code);
        match (found, order) {
            (Some(d), "<" | "|") => Ok(d),
            (Some(d), "=") if cfg!(target_endian = "little") => Ok(d),
            (Some(d), ">") if d.size() == 1 => Ok(d),
            (Some(_), ">") => Err(format!(
                "array is big-endian ('{descr}'); save it little-endian, e.g. \
                 np.save(path, a.astype(a.dtype.newbyteorder('<')))"
            )),
            _ => Err(format!(
                "unsupported dtype '{descr}'; use float32/float64 for probabilities and an \
                 integer type (int64, int32, uint8, ...) for labels"
            )),
        }
    }
}

/// A type that can be stored in an `.npy` file.
pub trait NpyElement: Copy {
    /// The `.npy` element type.
    const DTYPE: NpyDtype;
    /// Appends the little-endian bytes of `self`.
    fn put_le(self, out: &mut Vec<u8>);
}

macro_rules! npy_element {
    ($($t:ty => $d:ident),*) => {$(
        impl NpyElement for $t {
            const DTYPE: NpyDtype = NpyDtype::$d;
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
npy_element!(f32 => F32, f64 => F64, i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64);

impl NpyElement for bool {
    const DTYPE: NpyDtype = NpyDtype::Bool;
    fn put_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

/// An n-dimensional array as stored in an `.npy` file: shape, element type and the
/// little-endian data in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    shape: Vec<usize>,
    dtype: NpyDtype,
    data: Vec<u8>,
}

impl NpyArray {
    /// An array of the given shape holding `values` in C order.
    pub fn new<T: NpyElement>(shape: &[usize], values: &[T]) -> Result<Self> {
        let count = element_count(shape)
            .ok_or_else(|| Error::invalid(format!("npy: shape {shape:?} is too large")))?;
        if count != values.len() {
            return Err(Error::invalid(format!(
                "npy: {} values do not fill the shape {shape:?} ({count} elements)",
                values.len()
            )));
        }
        let mut data = Vec::with_capacity(count * T::DTYPE.size());
        values.iter().for_each(|v| v.put_le(&mut data));
        Ok(NpyArray {
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            data,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> NpyDtype {
        self.dtype
    }

    /// Parses the bytes of an `.npy` file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        parse(bytes).map_err(Error::invalid)
    }

    /// The bytes of an `.npy` file holding this array: format 1.0, or 2.0 when the header
    /// does not fit 1.0's 16-bit length.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = match self.shape.as_slice() {
            [d] => format!("({d},)"),
            dims => format!(
                "({})",
                dims.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let dict = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.dtype.descr()
        );
        // The data starts on a 64-byte boundary, the header ending in '\n'.
        let v1 = dict.len() + 1 + 10 <= usize::from(u16::MAX);
        let prefix = if v1 { 10 } else { 12 };
        let padded = (prefix + dict.len() + 1).div_ceil(64) * 64 - prefix;
        let mut header = dict.into_bytes();
        header.resize(padded - 1, b' ');
        header.push(b'\n');
        let mut out = Vec::with_capacity(prefix + header.len() + self.data.len());
        out.extend_from_slice(MAGIC);
        if v1 {
            out.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&[2, 0]);
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.data);
        out
    }

    /// The data of a uint8 array (in C order); another element type is an error.
    pub fn into_u8(self) -> Result<Vec<u8>> {
        match self.dtype {
            NpyDtype::U8 => Ok(self.data),
            other => Err(Error::invalid(format!(
                "expected a uint8 array ('|u1'), found '{}'",
                other.descr()
            ))),
        }
    }

    /// The values as `f64`; the array must hold floats.
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        match self.dtype {
            NpyDtype::F32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect()),
            NpyDtype::F64 => Ok(self
                .data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                .collect()),
            other => Err(Error::invalid(format!(
                "expected a float32 or float64 array, found '{}'",
                other.descr()
            ))),
        }
    }

    /// The values as `i128` (wide enough for every integer type); the array must hold
    /// integers or booleans.
    pub fn to_integers(&self) -> Result<Vec<i128>> {
        let b = &self.data;
        let values: Vec<i128> = match self.dtype {
            NpyDtype::I8 => b.iter().map(|&v| i128::from(v as i8)).collect(),
            NpyDtype::U8 | NpyDtype::Bool => b.iter().map(|&v| i128::from(v)).collect(),
            NpyDtype::I16 => words::<2>(b)
                .map(|w| i16::from_le_bytes(w).into())
                .collect(),
            NpyDtype::U16 => words::<2>(b)
                .map(|w| u16::from_le_bytes(w).into())
                .collect(),
            NpyDtype::I32 => words::<4>(b)
                .map(|w| i32::from_le_bytes(w).into())
                .collect(),
            NpyDtype::U32 => words::<4>(b)
                .map(|w| u32::from_le_bytes(w).into())
                .collect(),
            NpyDtype::I64 => words::<8>(b)
                .map(|w| i64::from_le_bytes(w).into())
                .collect(),
            NpyDtype::U64 => words::<8>(b)
                .map(|w| u64::from_le_bytes(w).into())
                .collect(),
            NpyDtype::F32 | NpyDtype::F64 => {
                return Err(Error::invalid(format!(
                    "expected an integer array, found floats ('{}'); save labels as integers, \
                     e.g. np.save(path, y.astype(np.int64))",
                    self.dtype.descr()
                )))
            }
        };
        Ok(values)
    }
}

/// Fixed-size little-endian words of `bytes`.
fn words<const W: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; W]> + '_ {
    bytes
        .chunks_exact(W)
        .map(|c| c.try_into().expect("chunk of the word size"))
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Reads an `.npy` file; a missing, truncated or malformed file is an error naming it.
pub fn read_npy(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|m| Error::data(path, format!("not a valid .npy file: {m}")))
}

/// Writes `array` as an `.npy` file, atomically (a crash leaves the old file or the new one).
pub fn write_npy(path: impl AsRef<Path>, array: &NpyArray) -> Result<()> {
    crate::output::write_atomic(path.as_ref(), |w| w.write_all(&array.to_bytes()))
}

/// Loads predictive probabilities: a float array `[N, K]` (averaged probabilities) or
/// `[T, N, K]` (per-sample probabilities, averaged here).
pub fn load_predictions(path: impl AsRef<Path>) -> Result<Predictions> {
    let path = path.as_ref();
    let array = read_npy(path)?;
    let values = array.to_f64().map_err(|e| in_file(path, e))?;
    match *array.shape() {
        [n, k] => Probs::new(values, n, k)
            .map(Predictions::from_mean)
            .map_err(|e| in_file(path, e)),
        [t, n, k] => SampleProbs::new(values, t, n, k)
            .map(Predictions::from_samples)
            .map_err(|e| in_file(path, e)),
        ref shape => Err(Error::data(
            path,
            format!("probabilities must have shape [N, K] or [T, N, K], found {shape:?}"),
        )),
    }
}

/// Loads class labels: an integer array of shape `[N]` with non-negative values.
pub fn load_labels(path: impl AsRef<Path>) -> Result<Vec<usize>> {
    let path = path.as_ref();
    let array = read_npy(path)?;
    if array.shape().len() != 1 {
        return Err(Error::data(
            path,
            format!(
                "labels must be a 1-D array [N], found shape {:?}",
                array.shape()
            ),
        ));
    }
    let values = array.to_integers().map_err(|e| in_file(path, e))?;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            usize::try_from(v).map_err(|_| {
                Error::data(
                    path,
                    format!("label {i} is {v}; labels must be class indices 0, 1, ..., K-1"),
                )
            })
        })
        .collect()
}

/// Re-labels an argument error as a data error in `path`.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::InvalidArgument(message) => Error::data(path, message),
        other => other,
    }
}

/// Parses an `.npy` file, describing what is wrong on failure.
fn parse(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(
            "it does not start with the .npy magic \\x93NUMPY (is it an .npz, \
                    a text file or truncated?)"
                .into(),
        );
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            let b = bytes
                .get(8..12)
                .ok_or("truncated before the end of the header length")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => {
            return Err(format!(
                "format version {v}.{} is not supported (1, 2, 3 are)",
                bytes[7]
            ))
        }
    };
    let header_bytes = bytes
        .get(start..start + header_len)
        .ok_or("truncated inside the header")?;
    let header = std::str::from_utf8(header_bytes)
        .map_err(|_| "the header is not valid text".to_string())?;
    if major < 3 && !header.is_ascii() {
        return Err("the header of a version 1 or 2 file must be ASCII".into());
    }
    let header = Header::parse(header)?;
    let dtype = NpyDtype::parse(&header.descr)?;
    if header.fortran_order {
        return Err(
            "the array is in Fortran order; save a C-ordered array, e.g. \
                    np.save(path, np.ascontiguousarray(a))"
                .into(),
        );
    }
    let count = element_count(&header.shape).ok_or("the shape is too large")?;
    let data = &bytes[start + header_len..];
    let expected = count
        .checked_mul(dtype.size())
        .ok_or("the shape is too large")?;
    if data.len() != expected {
        return Err(format!(
            "the shape {:?} of '{}' needs {expected} data bytes but the file holds {} \
             ({})",
            header.shape,
            header.descr,
            data.len(),
            if data.len() < expected {
                "truncated"
            } else {
                "trailing bytes"
            }
        ));
    }
    if dtype == NpyDtype::Bool {
        if let Some(i) = data.iter().position(|&b| b > 1) {
            return Err(format!("boolean element {i} is {}, not 0 or 1", data[i]));
        }
    }
    Ok(NpyArray {
        shape: header.shape,
        dtype,
        data: data.to_vec(),
    })
}

/// The three keys of an `.npy` header.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A parsed value of the header's Python literal.
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl Header {
    /// Parses `{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }` and its
    /// variations (any key order, either quote, optional trailing commas, whitespace).
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut p = Cursor {
            s: text.trim_end().as_bytes(),
            i: 0,
        };
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        p.expect(b'{')?;
        loop {
            if p.eat(b'}') {
                break;
            }
            let key = match p.literal()? {
                Literal::Str(k) => k,
                _ => return Err("header keys must be strings".into()),
            };
            p.expect(b':')?;
            match (key.as_str(), p.literal()?) {
                ("descr", Literal::Str(s)) => descr = Some(s),
                ("fortran_order", Literal::Bool(b)) => fortran = Some(b),
                ("shape", Literal::Tuple(t)) => shape = Some(t),
                ("descr" | "fortran_order" | "shape", _) => {
                    return Err(format!("header key '{key}' has a value of the wrong type"))
                }
                _ => return Err(format!("unexpected header key '{key}'")),
            }
            if !p.eat(b',') {
                p.expect(b'}')?;
                break;
            }
        }
        p.skip_ws();
        if p.i != p.s.len() {
            return Err("unexpected text after the header dictionary".into());
        }
        Ok(Header {
            descr: descr.ok_or("the header has no 'descr'")?,
            fortran_order: fortran.ok_or("the header has no 'fortran_order'")?,
            shape: shape.ok_or("the header has no 'shape'")?,
        })
    }
}

/// A position in the header text.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "malformed header: expected '{}' at byte {}",
                char::from(c),
                self.i
            ))
        }
    }

    fn literal(&mut self) -> std::result::Result<Literal, String> {
        self.skip_ws();
        let rest = &self.s[self.i..];
        match rest.first() {
            Some(&q @ (b'\'' | b'"')) => {
                let end = rest[1..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or("malformed header: unterminated string")?;
                self.i += end + 2;
                Ok(Literal::Str(
                    String::from_utf8_lossy(&rest[1..end + 1]).into_owned(),
                ))
            }
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        break;
                    }
                    self.skip_ws();
                    let digits = self.s[self.i..]
                        .iter()
                        .take_while(|c| c.is_ascii_digit())
                        .count();
                    let text = std::str::from_utf8(&self.s[self.i..self.i + digits])
                        .expect("ASCII digits");
                    let dim = text.parse::<usize>().map_err(|_| {
                        format!("malformed header: bad shape entry at byte {}", self.i)
                    })?;
                    self.i += digits;
                    dims.push(dim);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(Literal::Tuple(dims))
            }
            _ if rest.starts_with(b"True") => {
                self.i += 4;
                Ok(Literal::Bool(true))
            }
            _ if rest.starts_with(b"False") => {
                self.i += 5;
                Ok(Literal::Bool(false))
            }
            _ => Err(format!(
                "malformed header: unexpected value at byte {}",
                self.i
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_literals() {
        let h = Header::parse("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }  \n")
            .unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("<f8", false, vec![3, 4])
        );
        let h = Header::parse("{'shape':(), 'descr':'|u1','fortran_order':True}").unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("|u1", true, vec![])
        );
        assert!(
            Header::parse("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), } x").is_err()
        );
        assert!(Header::parse("{'descr': '<f8', 'shape': (3,), 'extra': 1}").is_err());
        assert!(Header::parse("{'descr': '<f8', 'fortran_order': False, 'shape': (3,)").is_err());
        assert!(Header::parse("{'descr: '<f8'}").is_err());
    }

    #[test]
    fn dtype_descr_strings() {
        assert_eq!(NpyDtype::parse("<i8"), Ok(NpyDtype::I64));
        assert_eq!(NpyDtype::parse("|b1"), Ok(NpyDtype::Bool));
        assert_eq!(NpyDtype::parse(">u1"), Ok(NpyDtype::U8));
        assert!(NpyDtype::parse(">i4").unwrap_err().contains("big-endian"));
        assert!(NpyDtype::parse("<f2").unwrap_err().contains("unsupported"));
        assert!(NpyDtype::parse("").is_err());
        assert!(NpyDtype::parse("é").is_err());
    }
}
