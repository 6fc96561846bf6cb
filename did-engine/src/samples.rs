//! The sample files `did sample --out` writes (one JSON object a line), as `did eval` reads
//! them back.

use crate::Error;
/// One line of a `did sample --out` file, as `did eval` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRecord {
    /// The sample's tokens.
    pub tokens: Vec<u32>,
    /// Denoiser calls, summed over the stages.
    pub nfe: u32,
    /// Wall time.
    pub seconds: f64,
    /// The decoded text, when the file has it.
    pub text: Option<String>,
}

/// Parses the JSON lines of a `did sample --out` file named `source`.
///
/// ```
/// let s = did_engine::samples::parse_samples("x.jsonl", "{\"tokens\": [256, 72], \"nfe\": [3, 1]}\n")?;
/// assert_eq!((s[0].tokens.clone(), s[0].nfe), (vec![256, 72], 4));
/// let err = did_engine::samples::parse_samples("x.jsonl", "{}\n").unwrap_err();
/// assert!(matches!(err, did_engine::Error::Samples(_)) && err.to_string().contains("line 1"));
/// # Ok::<(), did_engine::Error>(())
/// ```
pub fn parse_samples(source: &str, text: &str) -> Result<Vec<SampleRecord>, Error> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |why: &str| {
            Error::Samples(format!(
                "{source} line {}: {why}; give a file written by `did sample --out`",
                i + 1
            ))
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let tokens = v["tokens"]
            .as_array()
            .ok_or_else(|| bad("no \"tokens\" array"))?
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| bad("a token is not a u32"))
            })
            .collect::<Result<Vec<u32>, Error>>()?;
        let nfe = v["nfe"].as_array().map_or(0, |a| {
            a.iter().filter_map(|x| x.as_u64()).fold(0u32, |s, x| {
                s.saturating_add(u32::try_from(x).unwrap_or(u32::MAX))
            })
        });
        let seconds = v["wall_s"].as_f64().unwrap_or(0.0);
        out.push(SampleRecord {
            tokens,
            nfe,
            seconds,
            text: v["text"].as_str().map(str::to_string),
        });
    }
    if out.is_empty() {
        return Err(Error::Samples(format!("{source} holds no sample")));
    }
    Ok(out)
}
