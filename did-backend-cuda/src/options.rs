//! The switches that choose between kernels and paths, as one value the caller fills.
//!
//! The library reads no environment variable: the `did` CLI, the GPU test harness and the
//! benches fill [`CudaOptions`] from `DID_CUDA_*` through [`CudaOptions::from_vars`], so the
//! names, their values and their errors live in one place.

use crate::{AttentionKernel, CudaError, DrawLocation, KeySplit};

/// How a [`CudaBackend`](crate::CudaBackend) runs. The defaults are what every GPU check passed
/// with (docs/gpu/): flash attention wherever it can run, device draws, automatic key splits,
/// the few-rows kernel, no CUDA graphs.
///
/// ```
/// use did_backend_cuda::{AttentionKernel, CudaOptions, DrawLocation};
/// let vars = |name: &str| (name == "DID_CUDA_DRAW").then(|| "host".to_string());
/// let options = CudaOptions::from_vars(vars)?;
/// assert_eq!(options.draw, DrawLocation::Host);
/// assert_eq!(options.attention, AttentionKernel::Flash);
/// assert!(CudaOptions::from_vars(|_| Some("sideways".into())).is_err());
/// # Ok::<(), did_backend_cuda::CudaError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Attention kernels (`DID_CUDA_ATTENTION=flash|reference`): flash falls back to the
    /// reference kernels where it cannot run (f32 storage, compute capability below 8.0).
    pub attention: AttentionKernel,
    /// Where tokens are drawn (`DID_CUDA_DRAW=device|host`).
    pub draw: DrawLocation,
    /// How the flash forward splits key tiles (`DID_CUDA_KEY_SPLIT=auto|off|N`).
    pub key_split: KeySplit,
    /// The few-rows linear kernel for ≤ 8 rows (`DID_CUDA_FEW_ROWS=on|off`).
    pub few_rows: bool,
    /// Draft passes recorded as CUDA graphs (`DID_CUDA_GRAPHS=on|off`).
    pub graphs: bool,
    /// Print the launch, transfer and draw counts when the backend is dropped
    /// (`DID_CUDA_STATS=1`).
    pub report_counts: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            attention: AttentionKernel::Flash,
            draw: DrawLocation::Device,
            key_split: KeySplit::Auto,
            few_rows: true,
            graphs: false,
            report_counts: false,
        }
    }
}

impl CudaOptions {
    /// The options that `vars` sets, by `DID_CUDA_*` name (a variable that is not set: `None`);
    /// the rest keep their defaults. An unknown value is an error that names the variable and
    /// what it takes. Pass `|name| std::env::var(name).ok()` for the environment.
    pub fn from_vars(vars: impl Fn(&str) -> Option<String>) -> Result<Self, CudaError> {
        let mut o = CudaOptions::default();
        let bad = |name: &str, value: &str, expected: &str| {
            CudaError::Shape(format!("{name}={value:?}: expected {expected}"))
        };
        if let Some(v) = vars("DID_CUDA_ATTENTION") {
            o.attention = match v.as_str() {
                "flash" => AttentionKernel::Flash,
                "reference" => AttentionKernel::Reference,
                _ => return Err(bad("DID_CUDA_ATTENTION", &v, "`flash` or `reference` (unset = flash wherever it can run: bf16 storage, compute capability 8.0 or later)")),
            };
        }
        if let Some(v) = vars("DID_CUDA_DRAW") {
            o.draw = match v.as_str() {
                "device" => DrawLocation::Device,
                "host" => DrawLocation::Host,
                _ => {
                    return Err(bad(
                        "DID_CUDA_DRAW",
                        &v,
                        "`device` or `host` (unset = device)",
                    ))
                }
            };
        }
        if let Some(v) = vars("DID_CUDA_KEY_SPLIT") {
            o.key_split = match v.as_str() {
                "auto" => KeySplit::Auto,
                "off" => KeySplit::Off,
                n => match n.parse::<usize>() {
                    Ok(n) if n >= 1 => KeySplit::TilesPerBlock(n),
                    _ => return Err(bad(
                        "DID_CUDA_KEY_SPLIT",
                        &v,
                        "`auto`, `off` or a number of key tiles a block (1 or more; unset = auto)",
                    )),
                },
            };
        }
        if let Some(v) = vars("DID_CUDA_FEW_ROWS") {
            o.few_rows = on_off(&v)
                .ok_or_else(|| bad("DID_CUDA_FEW_ROWS", &v, "`on` or `off` (unset = on)"))?;
        }
        if let Some(v) = vars("DID_CUDA_GRAPHS") {
            o.graphs = on_off(&v)
                .ok_or_else(|| bad("DID_CUDA_GRAPHS", &v, "`on` or `off` (unset = off)"))?;
        }
        if let Some(v) = vars("DID_CUDA_STATS") {
            o.report_counts = v == "1";
        }
        Ok(o)
    }
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn nothing_set_is_the_default_and_each_variable_sets_its_switch() {
        assert_eq!(
            CudaOptions::from_vars(|_| None).ok(),
            Some(CudaOptions::default())
        );
        let o = CudaOptions::from_vars(vars(&[
            ("DID_CUDA_ATTENTION", "reference"),
            ("DID_CUDA_DRAW", "host"),
            ("DID_CUDA_KEY_SPLIT", "3"),
            ("DID_CUDA_FEW_ROWS", "off"),
            ("DID_CUDA_GRAPHS", "on"),
            ("DID_CUDA_STATS", "1"),
        ]))
        .expect("valid values");
        assert_eq!(
            o,
            CudaOptions {
                attention: AttentionKernel::Reference,
                draw: DrawLocation::Host,
                key_split: KeySplit::TilesPerBlock(3),
                few_rows: false,
                graphs: true,
                report_counts: true,
            }
        );
    }

    #[test]
    fn a_bad_value_names_its_variable_and_what_it_takes() {
        for (name, value) in [
            ("DID_CUDA_ATTENTION", "fast"),
            ("DID_CUDA_DRAW", "gpu"),
            ("DID_CUDA_KEY_SPLIT", "0"),
            ("DID_CUDA_FEW_ROWS", "yes"),
            ("DID_CUDA_GRAPHS", "1"),
        ] {
            let err = CudaOptions::from_vars(|n| (n == name).then(|| value.to_string()))
                .expect_err(name)
                .to_string();
            assert!(err.contains(name) && err.contains("expected"), "{err}");
        }
    }
}
