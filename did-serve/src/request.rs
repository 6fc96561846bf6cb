//! `POST /v1/completions`: the request body as OpenAI's completions API shapes it, plus did's
//! own fields (the stage plan, the update rule, the remasking), checked into the work the engine
//! runs. Every refusal names the field and the fix (docs/serving.md lists them).

use did_core::refine::GenerateConfig;
use did_core::sample::SequenceId;
use did_engine::data::tokenizer::Tokenizer;
use did_engine::sampling::SamplingSettings;
use serde::Deserialize;
use serde_json::Value;

/// An API error: the HTTP status and OpenAI's error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, …
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<&'static str>,
    /// OpenAI's `code` (`model_not_found`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
            code: None,
        }
    }

    /// The JSON body: `{"error": {message, type, param, code}}`.
    pub fn body(&self) -> Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The body of `POST /v1/completions`. OpenAI's fields that did does not implement are accepted
/// at their neutral values (`temperature` 1, `logprobs` null, …) and refused otherwise; any other
/// field is refused by name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The model's id (`GET /v1/models`); may be left out.
    pub model: Option<String>,
    /// A text, or a list of texts; each is sampled `n` times. Left out: BOS alone.
    pub prompt: Option<Value>,
    /// At most this many tokens after the prompt (default: all the length allows).
    pub max_tokens: Option<u64>,
    /// Only 1: did draws at temperature 1 (shape the draws with `top_p`).
    pub temperature: Option<f64>,
    /// Nucleus of every draw (default: the server's, 0.9).
    pub top_p: Option<f64>,
    /// Completions per prompt.
    pub n: Option<u64>,
    /// Server-sent events: the draft block by block, then the refined text.
    pub stream: Option<bool>,
    /// Up to 4 texts; a completion ends before the first it contains.
    pub stop: Option<Value>,
    /// The seed of this request's draws; completion k is sample k of it. Left out: the server
    /// picks one and returns it.
    pub seed: Option<u64>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// Only null or 0.
    pub logprobs: Option<Value>,
    /// Only false.
    pub echo: Option<bool>,
    /// Only 1 or `n`.
    pub best_of: Option<u64>,
    /// Only 0.
    pub presence_penalty: Option<f64>,
    /// Only 0.
    pub frequency_penalty: Option<f64>,
    /// Only empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Only null.
    pub suffix: Option<String>,
    /// Accepted and ignored (usage is always in the last event).
    pub stream_options: Option<Value>,
    /// did: the stage plan (`4,L:0.25`, `4@threshold:0.9,L:0.25`, …).
    pub stages: Option<String>,
    /// did: the update rule of stages that name none (`first-hitting`, `threshold:0.9`, …).
    pub sampler: Option<String>,
    /// did: how tokens are chosen for remasking (`snapshot`, `posthoc`, `random`, …).
    pub remask: Option<String>,
    /// did: where the remask fraction is counted (`global`, `block`).
    pub scope: Option<String>,
}

/// What the server samples: its model's id, tokenizer, sequence length and default settings.
#[derive(Debug, Clone)]
pub struct Served {
    /// The id clients name (`GET /v1/models`).
    pub model_id: String,
    /// The checkpoint's tokenizer.
    pub tokenizer: Tokenizer,
    /// Every sequence's length (prompt and completion): `did serve --length`.
    pub len: usize,
    /// Settings a request does not override.
    pub defaults: SamplingSettings,
    /// At most this many sequences (prompts × n) per request.
    pub max_sequences: usize,
}

/// A checked request: what the engine runs and how to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Plan, sampler and remasking.
    pub config: GenerateConfig,
    /// Per sequence: BOS and its prompt's tokens.
    pub prompts: Vec<Vec<u32>>,
    /// Per sequence: `(seed, k)` for completion k.
    pub ids: Vec<SequenceId>,
    /// The seed.
    pub seed: u64,
    /// At most this many tokens after each prompt.
    pub max_tokens: Vec<usize>,
    /// Stop texts.
    pub stop: Vec<String>,
    /// Stream events.
    pub stream: bool,
    /// The plan has stages after the draft.
    pub refines: bool,
}

impl CompletionRequest {
    /// Parses a request body; errors name the field and the accepted fields.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let mut json = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let at = e.path().to_string();
            let field = if at == "." { String::new() } else { format!("field `{at}`: ") };
            ApiError::invalid(
                "body",
                format!(
                    "the request body is not a completions request: {field}{}. See docs/serving.md for the fields",
                    e.inner()
                ),
            )
        })
    }

    /// Checks the request against what is served; `fresh_seed` is used when none is given.
    pub fn check(&self, served: &Served, fresh_seed: u64) -> Result<Checked, ApiError> {
        self.check_neutral()?;
        if let Some(m) = &self.model {
            if *m != served.model_id {
                return Err(ApiError {
                    status: 404,
                    message: format!(
                        "the model {m:?} is not served here; this server serves {:?} (GET /v1/models)",
                        served.model_id
                    ),
                    kind: "invalid_request_error",
                    param: Some("model"),
                    code: Some("model_not_found"),
                });
            }
        }
        let mut prompt_texts = texts("prompt", self.prompt.as_ref(), 64)?;
        if prompt_texts.is_empty() {
            prompt_texts.push(String::new());
        }
        let n = self.n.unwrap_or(1);
        if n == 0 {
            return Err(ApiError::invalid(
                "n",
                "n is 0: ask for at least 1 completion",
            ));
        }
        let sequences = (prompt_texts.len() as u64).saturating_mul(n);
        if sequences > served.max_sequences as u64 {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "{} prompts × n {n} = {sequences} completions, more than the {} a request may ask for (did serve --max-batch); split the request",
                    prompt_texts.len(),
                    served.max_sequences
                ),
            ));
        }
        let stop = texts("stop", self.stop.as_ref(), 4)?;
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "a stop text is empty; leave it out",
            ));
        }
        let eos = served.tokenizer.kind().eos();
        let mut prompts = Vec::with_capacity(sequences as usize);
        let mut max_tokens = Vec::with_capacity(sequences as usize);
        for (i, text) in prompt_texts.iter().enumerate() {
            let mut tokens = vec![eos];
            tokens.extend(served.tokenizer.encode(text));
            let room = served.len.saturating_sub(tokens.len());
            if room == 0 {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "prompt {i} is {} tokens with BOS; the server samples sequences of {} tokens (did serve --length), so it leaves no room: shorten it",
                        tokens.len(),
                        served.len
                    ),
                ));
            }
            let max = match self.max_tokens {
                None => room,
                Some(0) => {
                    return Err(ApiError::invalid(
                        "max_tokens",
                        "max_tokens is 0: ask for at least 1 token",
                    ))
                }
                Some(m) if m > room as u64 => {
                    return Err(ApiError::invalid(
                        "max_tokens",
                        format!(
                            "max_tokens {m} is more than the {room} tokens prompt {i} leaves of the server's length {} (did serve --length); lower it or shorten the prompt",
                            served.len
                        ),
                    ))
                }
                Some(m) => m as usize,
            };
            for _ in 0..n {
                prompts.push(tokens.clone());
                max_tokens.push(max);
            }
        }
        let seed = self.seed.unwrap_or(fresh_seed);
        let mut settings = served.defaults.clone();
        settings.seed = seed;
        let own = |field: &Option<String>, slot: &mut String| {
            if let Some(v) = field {
                slot.clone_from(v);
            }
        };
        own(&self.stages, &mut settings.stages);
        own(&self.sampler, &mut settings.sampler);
        own(&self.remask, &mut settings.remask);
        own(&self.scope, &mut settings.scope);
        if let Some(p) = self.top_p {
            settings.top_p = p;
        }
        let config = settings
            .generate_config(&settings.stages, served.len, eos)
            .map_err(|e| {
                let text = e.to_string();
                let param = ["stages", "sampler", "remask", "scope", "top-p"]
                    .into_iter()
                    .find(|p| text.contains(&format!("--{p}")) || text.contains(p))
                    .map(|p| if p == "top-p" { "top_p" } else { p })
                    .unwrap_or("stages");
                ApiError::invalid(param, text.replace("--top-p", "top_p").replace("--", ""))
            })?;
        let refines = config.plan.stages().len() > 1;
        Ok(Checked {
            config,
            ids: SequenceId::numbered(seed, 0, prompts.len()),
            prompts,
            seed,
            max_tokens,
            stop,
            stream: self.stream.unwrap_or(false),
            refines,
        })
    }

    /// OpenAI's fields did does not implement, at anything but their neutral values.
    fn check_neutral(&self) -> Result<(), ApiError> {
        let unsupported = |param: &'static str, why: &str| {
            Err(ApiError::invalid(param, format!("{param}: {why}")))
        };
        if self.temperature.is_some_and(|t| t != 1.0) {
            return unsupported(
                "temperature",
                "did draws at temperature 1; leave it out or send 1, and shape the draws with top_p",
            );
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !(v.is_null() || v == &Value::from(0)))
        {
            return unsupported("logprobs", "not available; leave it out");
        }
        if self.echo == Some(true) {
            return unsupported("echo", "not available; prepend the prompt yourself");
        }
        if self.best_of.is_some_and(|b| b != 1 && Some(b) != self.n) {
            return unsupported("best_of", "not available; leave it out");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0)
            || self.frequency_penalty.is_some_and(|p| p != 0.0)
        {
            return unsupported(
                "presence_penalty",
                "penalties are not available; leave presence_penalty and frequency_penalty out",
            );
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return unsupported("logit_bias", "not available; leave it out");
        }
        if self.suffix.is_some() {
            return unsupported("suffix", "insertion is not available; leave it out");
        }
        Ok(())
    }
}

/// A text or a list of texts (at most `max`); token-id prompts are refused.
fn texts(param: &'static str, v: Option<&Value>, max: usize) -> Result<Vec<String>, ApiError> {
    let wrong = || {
        ApiError::invalid(
            param,
            format!("{param} must be a text or a list of at most {max} texts"),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => {
            if items.len() > max {
                return Err(wrong());
            }
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(_) | Value::Array(_) if param == "prompt" => {
                        Err(ApiError::invalid(
                            param,
                            "prompts as token ids are not accepted; send the text",
                        ))
                    }
                    _ => Err(wrong()),
                })
                .collect()
        }
        Some(_) => Err(wrong()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use did_engine::data::tokenizer::TokenizerKind;

    fn served() -> Served {
        Served {
            model_id: "dit".into(),
            tokenizer: Tokenizer::new(TokenizerKind::Bytes),
            len: 32,
            defaults: SamplingSettings {
                stop_at_eos: true,
                ..SamplingSettings::default()
            },
            max_sequences: 8,
        }
    }

    fn check(body: &str) -> Result<Checked, ApiError> {
        CompletionRequest::from_json(body.as_bytes())?.check(&served(), 99)
    }

    #[test]
    fn a_request_becomes_one_sequence_per_prompt_and_completion() {
        let c =
            check(r#"{"model": "dit", "prompt": ["ab", "c"], "n": 2, "seed": 7, "max_tokens": 5}"#)
                .unwrap();
        assert_eq!(c.prompts.len(), 4);
        assert_eq!(c.prompts[0], [256, 97, 98]);
        assert_eq!(c.prompts[2], [256, 99]);
        assert_eq!(c.ids, SequenceId::numbered(7, 0, 4));
        assert_eq!(c.max_tokens, [5; 4]);
        assert!(c.refines && !c.stream);
        let defaults = check("{}").unwrap();
        assert_eq!((defaults.seed, defaults.max_tokens[0]), (99, 31));
    }

    #[test]
    fn refusals_name_the_field_and_the_fix() {
        let cases = [
            (
                r#"{"prompt": "x", "colour": 1}"#,
                "body",
                "unknown field `colour`",
            ),
            (r#"{"model": "gpt-4"}"#, "model", "not served here"),
            (r#"{"n": 0}"#, "n", "at least 1"),
            (r#"{"n": 9}"#, "n", "--max-batch"),
            (r#"{"max_tokens": 40}"#, "max_tokens", "lower it"),
            (r#"{"prompt": [1, 2]}"#, "prompt", "token ids"),
            (r#"{"temperature": 0.7}"#, "temperature", "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p", "top_p"),
            (r#"{"stages": "3,L:0.25"}"#, "stages", "stages"),
            (r#"{"sampler": "greedy"}"#, "sampler", "sampler"),
            (r#"{"remask": "best"}"#, "remask", "remask"),
            (
                r#"{"stop": ["a", "b", "c", "d", "e"]}"#,
                "stop",
                "at most 4",
            ),
            (r#"{"logprobs": 3}"#, "logprobs", "leave it out"),
            (r#"{"seed": -1}"#, "body", "field `seed`"),
        ];
        for (body, param, says) in cases {
            let e = check(body).unwrap_err();
            assert_eq!(e.param, Some(param), "{body}: {e:?}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
            assert_eq!(e.status, if param == "model" { 404 } else { 400 });
        }
        let long = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(40));
        assert!(check(&long).unwrap_err().message.contains("shorten it"));
    }

    #[test]
    fn requests_differing_only_in_seed_share_settings() {
        let a = check(r#"{"seed": 1}"#).unwrap();
        let b = check(r#"{"seed": 2, "prompt": "zz"}"#).unwrap();
        let c = check(r#"{"seed": 1, "stages": "4"}"#).unwrap();
        assert!(crate::engine::same_settings(&a.config, &b.config));
        assert!(!crate::engine::same_settings(&a.config, &c.config));
        assert!(!c.refines);
    }
}
