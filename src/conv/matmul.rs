//! A bounds-checked front end to the `gemm` crate (the matrix product candle's CPU backend uses).
//!
//! The convolution calls the product on sub-matrices of its own buffers (one image's columns,
//! a transposed view of a weight), which candle's tensor matmul would first copy into fresh
//! contiguous tensors. Views here carry their strides, and every call checks that the last
//! element each view addresses lies inside its slice, which is what makes the raw-pointer call
//! sound.

use gemm::Parallelism;

/// A read-only `rows x cols` view of a slice: element `(i, j)` is `data[i·row_stride +
/// j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major matrix (`row_stride = cols`).
    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A `rows x cols` matrix whose rows start `row_stride` elements apart (a block of columns
    /// of a wider row-major matrix).
    pub(crate) fn strided(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, without moving data.
    pub(crate) fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Row `i` as a slice (a view whose rows are contiguous).
    pub(crate) fn row(&self, i: usize) -> &'a [T] {
        assert_eq!(self.col_stride, 1, "row of a view with strided rows");
        &self.data[i * self.row_stride..][..self.cols]
    }

    fn assert_in_bounds(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "matrix view past the end of its slice"
            );
        }
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `dst` row-major `m x n` with rows
/// `dst_row_stride` apart. One thread unless `threads > 1`.
///
/// Panics when the shapes disagree or a view runs past its slice: callers size their buffers
/// from the same dimensions, so either is a bug here, not bad input.
pub(crate) fn matmul<T: candle_core::WithDType>(
    dst: &mut [T],
    dst_row_stride: usize,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions of a product differ");
    assert!(dst_row_stride >= n, "destination rows overlap");
    lhs.assert_in_bounds();
    rhs.assert_in_bounds();
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_row_stride + n <= dst.len(),
        "destination past the end of its slice"
    );
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the three views were checked to lie inside their slices, `dst` is borrowed
    // mutably so it aliases neither input, and the element type is one gemm supports (callers
    // are instantiated for f32 and f64 only).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            parallelism,
        )
    }
}
