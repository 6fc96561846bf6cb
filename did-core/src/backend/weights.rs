//! How a backend may keep a model's weight matrices for inference: f32, bf16, or int8 with a
//! scale per output row. The model asks for a format once, when it uploads its parameters
//! ([`MemoryOps::upload_weights`](crate::backend::MemoryOps::upload_weights)); every op then
//! reads the matrices as stored. `docs/cpu-inference.md` says what each format costs in quality
//! and what it saves in bytes read.

use core::fmt;
use core::str::FromStr;

/// The storage of a model's weight matrices (embedding, linear layers, output head); LayerNorm,
/// biases and adaLN stay f32 whatever the format.
///
/// ```
/// use did_core::backend::WeightFormat;
/// let f: WeightFormat = "int8".parse()?;
/// assert_eq!(f, WeightFormat::Int8);
/// assert_eq!(f.to_string(), "int8");
/// assert!("fp8".parse::<WeightFormat>().is_err());
/// # Ok::<(), did_core::backend::UnknownWeightFormat>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightFormat {
    /// As trained: 4 bytes a weight.
    #[default]
    F32,
    /// bf16, rounded to nearest even: 2 bytes a weight.
    Bf16,
    /// Symmetric int8 with one f32 scale an output row: 1 byte a weight.
    Int8,
}

impl WeightFormat {
    /// Every format, widest first.
    pub const ALL: [WeightFormat; 3] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Int8];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
        }
    }

    /// Bytes a `[rows, cols]` matrix takes in this format (int8's scales included).
    ///
    /// ```
    /// use did_core::backend::WeightFormat;
    /// assert_eq!(WeightFormat::Bf16.matrix_bytes(768, 2304), 2 * 768 * 2304);
    /// assert_eq!(WeightFormat::Int8.matrix_bytes(768, 2304), 768 * 2304 + 4 * 768);
    /// ```
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            WeightFormat::F32 => 4 * rows * cols,
            WeightFormat::Bf16 => 2 * rows * cols,
            WeightFormat::Int8 => rows * cols + 4 * rows,
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A weight format name that is not one of `f32`, `bf16`, `int8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWeightFormat(pub alloc::string::String);

impl fmt::Display for UnknownWeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown weight format `{}`; the formats are f32, bf16 and int8",
            self.0
        )
    }
}

impl core::error::Error for UnknownWeightFormat {}

impl FromStr for WeightFormat {
    type Err = UnknownWeightFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WeightFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownWeightFormat(s.into()))
    }
}

/// A `[rows, cols]` weight matrix inside a flat parameter buffer, row-major from `offset`: a
/// linear layer's `[out, in]` weight, or an embedding table `[vocab, channels]`.
///
/// ```
/// use did_core::backend::WeightMatrix;
/// let m = WeightMatrix { offset: 100, rows: 4, cols: 3 };
/// assert_eq!(m.range(), 100..112);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightMatrix {
    /// Its first element.
    pub offset: usize,
    /// Rows (a linear layer's outputs).
    pub rows: usize,
    /// Columns (its inputs).
    pub cols: usize,
}

impl WeightMatrix {
    /// The elements it spans.
    pub fn range(&self) -> core::ops::Range<usize> {
        self.offset..self.offset + self.rows * self.cols
    }
}
