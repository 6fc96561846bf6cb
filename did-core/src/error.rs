//! The one error type of did-core: every message names the cause and the fix.

use alloc::string::String;
use core::fmt;

/// A configuration or input that did-core rejects.
///
/// Every variant's `Display` says what was wrong and what to do instead, so a
/// CLI can print it as it is.
///
/// ```
/// use did_core::refine::StagePlan;
/// let err = "4,1000:0.25".parse::<StagePlan>().unwrap().resolve(1024).unwrap_err();
/// assert!(err.to_string().contains("does not divide"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A text (stage plan, mix-scale distribution, …) could not be parsed.
    Parse {
        /// What was being parsed, e.g. "stage plan".
        what: &'static str,
        /// The offending input.
        input: String,
        /// Why, and the expected form.
        reason: String,
    },
    /// A value is outside its allowed range or inconsistent with another.
    Invalid {
        /// The name of the setting.
        what: &'static str,
        /// Why, and what would be accepted.
        reason: String,
    },
    /// Rejection resampling of the forward process gave up (the clip range
    /// allows no realisable masked count for this block size).
    ResampleExhausted {
        /// The block that never satisfied the bounds.
        block: usize,
        /// How many draws were tried.
        tries: u32,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Parse {
                what,
                input,
                reason,
            } => {
                write!(f, "cannot parse {what} {input:?}: {reason}")
            }
            Error::Invalid { what, reason } => write!(f, "invalid {what}: {reason}"),
            Error::ResampleExhausted { block, tries } => write!(
                f,
                "rejection resampling of block {block} found no masked count inside the clip \
                 range after {tries} draws; widen the clip range or use a larger block size"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        reason: reason.into(),
    }
}

pub(crate) fn parse_error(what: &'static str, input: &str, reason: impl Into<String>) -> Error {
    Error::Parse {
        what,
        input: input.into(),
        reason: reason.into(),
    }
}
