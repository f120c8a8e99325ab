//! The model's chat template, rendered with minijinja the way Hugging Face `transformers`
//! renders it with jinja2.
//!
//! `transformers` compiles templates with `trim_blocks` and `lstrip_blocks` on, and gives them
//! `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that writes Python's
//! `json.dumps` spacing; Python string and dict methods (`.strip()`, `.items()`, ...) work on
//! values because they are Python objects. All of that is reproduced here: the common methods in
//! an unknown-method callback ([`py_method`]).

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

use super::TokenizerError;
use crate::gguf::GgufFile;

/// One chat message: `role` is `"system"`, `"user"` or `"assistant"` (templates may accept
/// others).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the model's BOS and EOS texts.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Plain ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n` for the generation prompt): used when a file has no template.
    pub const CHATML: &'static str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// The file's `tokenizer.chat_template`, or [`CHATML`](Self::CHATML) when the key is absent
    /// (see [`is_fallback`](Self::is_fallback)). `bos_token` and `eos_token` are the texts of the
    /// tokens `tokenizer.ggml.bos_token_id` / `eos_token_id` name (empty when absent).
    pub fn from_gguf(file: &GgufFile) -> Result<ChatTemplate, TokenizerError> {
        let meta = file.metadata();
        let special = |key: &'static str| -> Result<String, TokenizerError> {
            if !meta.contains_key(key) {
                return Ok(String::new());
            }
            let id = file.get_u64(key)?;
            let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
            usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .map(|t| t.to_string())
                .ok_or(TokenizerError::BadSpecialId {
                    key,
                    id,
                    vocab_size: tokens.len(),
                })
        };
        let bos = special("tokenizer.ggml.bos_token_id")?;
        let eos = special("tokenizer.ggml.eos_token_id")?;
        match meta.get("tokenizer.chat_template") {
            Some(_) => {
                let source = file.get_str("tokenizer.chat_template")?;
                ChatTemplate::new(source, bos, eos)
            }
            None => {
                let mut t = ChatTemplate::new(Self::CHATML, bos, eos)?;
                t.fallback = true;
                Ok(t)
            }
        }
    }

    /// Compiles a template (Jinja source as found in `tokenizer_config.json` or GGUF).
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate, TokenizerError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(py_method);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            fallback: false,
        })
    }

    /// The plain ChatML template, with SmolLM2's / Qwen's token texts as BOS and EOS.
    pub fn chatml() -> Result<ChatTemplate, TokenizerError> {
        let mut t = ChatTemplate::new(Self::CHATML, "<|im_start|>", "<|im_end|>")?;
        t.fallback = true;
        Ok(t)
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether this is the ChatML fallback rather than the file's own template.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// The conversation as the model expects to read it (tokenize the result with
    /// `parse_special = true`). With `add_generation_prompt`, it ends with the opening of an
    /// assistant turn. Variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self.env.get_template(NAME)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        Ok(template.render(ctx)?)
    }
}

/// `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time; supports `%Y %m %d %e %H %M %S %b %B %a %A %j
/// %y %%` (what chat templates use, e.g. Llama 3.1's `"%d %b %Y"`).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime(secs, &format)))
}

fn strftime(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The `tojson` filter as `transformers` defines it: `json.dumps(value, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`, so `", "` and `": "` separators when not indented.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Python methods templates call on strings, maps and lists (`"x".strip()`, `d.items()`,
/// `d.get(k, default)`, ...).
fn py_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let unknown = || Err(Error::from(ErrorKind::UnknownMethod));
    let arg_str = |i: usize| args.get(i).and_then(Value::as_str);
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars: Option<Vec<char>> = arg_str(0).map(|c| c.chars().collect());
            let strip_set = |c: char| match &chars {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            Ok(match method {
                "strip" => Value::from(s.trim_matches(strip_set)),
                "lstrip" => Value::from(s.trim_start_matches(strip_set)),
                "rstrip" => Value::from(s.trim_end_matches(strip_set)),
                "upper" => Value::from(s.to_uppercase()),
                "lower" => Value::from(s.to_lowercase()),
                "capitalize" => {
                    let mut cs = s.chars();
                    Value::from(match cs.next() {
                        Some(f) => f
                            .to_uppercase()
                            .chain(cs.flat_map(char::to_lowercase))
                            .collect(),
                        None => String::new(),
                    })
                }
                "title" => state.apply_filter("title", std::slice::from_ref(value))?,
                "startswith" | "endswith" => {
                    let test = |p: &str| {
                        if method == "startswith" {
                            s.starts_with(p)
                        } else {
                            s.ends_with(p)
                        }
                    };
                    let hit = match args.first() {
                        Some(a) if a.kind() == ValueKind::Seq => {
                            a.try_iter()?.any(|p| p.as_str().is_some_and(test))
                        }
                        Some(a) => a.as_str().is_some_and(test),
                        None => return unknown(),
                    };
                    Value::from(hit)
                }
                "replace" => match (arg_str(0), arg_str(1)) {
                    (Some(from), Some(to)) => Value::from(s.replace(from, to)),
                    _ => return unknown(),
                },
                "split" => {
                    let parts: Vec<Value> = match arg_str(0) {
                        Some(sep) => s.split(sep).map(Value::from).collect(),
                        None => s.split_whitespace().map(Value::from).collect(),
                    };
                    Value::from(parts)
                }
                "splitlines" => Value::from(s.lines().map(Value::from).collect::<Vec<_>>()),
                "find" => match arg_str(0) {
                    Some(p) => Value::from(
                        s.find(p)
                            .map(|b| s[..b].chars().count() as i64)
                            .unwrap_or(-1),
                    ),
                    None => return unknown(),
                },
                "count" => match arg_str(0) {
                    Some(p) if !p.is_empty() => Value::from(s.matches(p).count()),
                    _ => return unknown(),
                },
                "join" => match args.first() {
                    Some(items) => {
                        let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
                        Value::from(parts.join(s))
                    }
                    None => return unknown(),
                },
                "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
                "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
                _ => return unknown(),
            })
        }
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let vals: Result<Vec<Value>, Error> =
                    value.try_iter()?.map(|k| value.get_item(&k)).collect();
                Ok(Value::from(vals?))
            }
            "get" => {
                let Some(key) = args.first() else {
                    return unknown();
                };
                let v = value.get_item(key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => unknown(),
        },
        _ => unknown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello."),
        ]
    }

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::chatml().unwrap();
        assert!(t.is_fallback());
        assert_eq!(
            t.render(&msgs(), true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&msgs(), false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn python_compat() {
        let src = "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}\
                   {{ raise_exception('bad role ' + m['role']) }}{% endif %}\
                   [{{ m.content.strip().upper() }}|{{ m.get('role') }}|{{ m.get('x', 'd') }}]\
                   {% endfor %}{{ bos_token }}{{ eos_token }}{{ {'a': [1, 'é']} | tojson }}\
                   {{ '  xx '.lstrip() }}{{ 'a,b'.split(',') | length }}{{ 'abc'.startswith(('x', 'a')) }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], false)
            .unwrap();
        assert_eq!(out, "[HI|user|d]<s></s>{\"a\": [1, \"é\"]}xx 2True");
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("bad role tool"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false
            )
            .unwrap(),
            "a\nb\n"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let secs = 1_721_999_109;
        assert_eq!(strftime(secs, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(secs, "%A %B %H:%M:%S %j %%"),
            "Friday July 13:05:09 208 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn messages_serde() {
        let m: ChatMessage = serde_json::from_str(r#"{"role":"user","content":"x"}"#).unwrap();
        assert_eq!(m, ChatMessage::new("user", "x"));
    }
}
