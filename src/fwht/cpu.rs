//! CPU kernels of the fast Walsh-Hadamard transform.
//!
//! Every entry point transforms contiguous rows of length `d` (a power of two), in natural
//! (Sylvester) order, and multiplies the result by `scale`.

/// Transforms every row of `data` (rows of length `d`) in place and multiplies by `scale`.
pub fn fwht_rows_f32(data: &mut [f32], d: usize, scale: f32) {
    for row in data.chunks_exact_mut(d) {
        radix2(row, scale);
    }
}

/// Transforms every row of `data` (rows of length `d`) in place and multiplies by `scale`.
pub fn fwht_rows_f64(data: &mut [f64], d: usize, scale: f64) {
    for row in data.chunks_exact_mut(d) {
        radix2(row, scale);
    }
}

/// Writes the transform of every row of `src` into `dst` (same length), times `scale`.
pub fn fwht_rows_f32_into(src: &[f32], dst: &mut [f32], d: usize, scale: f32) {
    dst.copy_from_slice(src);
    fwht_rows_f32(dst, d, scale);
}

/// Writes the transform of every row of `src` into `dst` (same length), times `scale`.
pub fn fwht_rows_f64_into(src: &[f64], dst: &mut [f64], d: usize, scale: f64) {
    dst.copy_from_slice(src);
    fwht_rows_f64(dst, d, scale);
}

fn radix2<T>(row: &mut [T], scale: T)
where
    T: Copy + std::ops::Add<Output = T> + std::ops::Sub<Output = T> + std::ops::MulAssign,
{
    let d = row.len();
    let mut h = 1;
    while h < d {
        for block in row.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (x, y) = (*a, *b);
                *a = x + y;
                *b = x - y;
            }
        }
        h *= 2;
    }
    for v in row.iter_mut() {
        *v *= scale;
    }
}
