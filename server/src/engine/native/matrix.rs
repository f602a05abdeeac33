//! A decoder weight matrix in the format `--native-weights` asks for: int8 per row (the
//! default), or 4-bit blocks ([`super::q4`]) where the shape allows, int8 elsewhere.

use super::kernels::{gemv_rows_with, kernel, Kernel, QuantMatrix, QuantVector, RowProduct};
use super::q4::{self, Q4Matrix};

/// How the native decoder stores its step weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightFormat {
    /// int8, one scale per row: answers the tests hold to ONNX Runtime's.
    #[default]
    Int8,
    /// 4-bit, blocks of 32 with 8-bit block multipliers: half the bytes per step, answers
    /// measured separately (docs/performance.md).
    Q4,
}

impl WeightFormat {
    /// The name used by `--native-weights`, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Int8 => "int8",
            WeightFormat::Q4 => "q4",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Matrix {
    Int8(QuantMatrix),
    Q4(Q4Matrix),
}

impl Matrix {
    pub fn quantize(format: WeightFormat, rows: usize, cols: usize, w: &[f32]) -> Self {
        match format {
            WeightFormat::Q4 => match Q4Matrix::quantize(rows, cols, w) {
                Some(m) => Matrix::Q4(m),
                None => Matrix::Int8(QuantMatrix::quantize(rows, cols, w)),
            },
            WeightFormat::Int8 => Matrix::Int8(QuantMatrix::quantize(rows, cols, w)),
        }
    }

    /// Non-temporal prefetch of the int8 kernels (`QuantMatrix::streamed`); the 4-bit kernels
    /// read half the bytes and do not prefetch.
    pub fn set_streamed(&mut self, streamed: bool) {
        if let Matrix::Int8(m) = self {
            m.streamed = streamed;
        }
    }

    /// Rows `first..first + y.len()` of `W x` with a given kernel (benchmarks and tests).
    pub fn product_rows_with(&self, kernel: Kernel, first: usize, x: &QuantVector, y: &mut [f32]) {
        match self {
            Matrix::Int8(m) => gemv_rows_with(kernel, m, first, x, y),
            Matrix::Q4(m) => q4::gemv_rows_with(kernel, m, first, x, y),
        }
    }
}

impl RowProduct for Matrix {
    fn rows(&self) -> usize {
        match self {
            Matrix::Int8(m) => m.rows,
            Matrix::Q4(m) => m.rows,
        }
    }
    fn cols(&self) -> usize {
        match self {
            Matrix::Int8(m) => m.cols,
            Matrix::Q4(m) => m.cols,
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Matrix::Int8(m) => m.data.len(),
            Matrix::Q4(m) => m.bytes(),
        }
    }
    fn product_rows(&self, first: usize, x: &QuantVector, y: &mut [f32]) {
        self.product_rows_with(kernel(), first, x, y)
    }
    fn product_rows_batch(&self, first: usize, xs: &[&QuantVector], ys: &mut [&mut [f32]]) {
        match self {
            Matrix::Int8(m) => m.product_rows_batch(first, xs, ys),
            Matrix::Q4(m) => q4::gemv_rows_batch_with(kernel(), m, first, xs, ys),
        }
    }
}
