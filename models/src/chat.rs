//! Chat templates: the Jinja template an instruct model ships (`chat_template.jinja`, the
//! `chat_template` key of tokenizer_config.json, or GGUF's `tokenizer.chat_template`),
//! rendered the way transformers' `apply_chat_template` renders it.
//!
//! transformers compiles templates in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, loop controls, a `tojson` filter that is Python's `json.dumps` (no ASCII
//! escaping, `", "` and `": "` separators), `raise_exception(msg)`, and the special tokens as
//! variables (`bos_token`, `eos_token`, ...). [`ChatTemplate`] builds the same environment on
//! `minijinja` (with its Python-compatibility methods: `.strip()`, `.startswith()`, `.items()`).
//!
//! Training on conversations needs to know which characters the assistant wrote (trl's
//! `assistant_only_loss`). Templates may mark them with transformers' `{% generation %}` …
//! `{% endgeneration %}` block; [`ChatTemplate::render_conversation`] turns that block into a
//! filter block with the same whitespace handling and records where its output lands. A
//! template without the block is rendered turn by turn instead: an assistant turn is what
//! rendering the conversation through that turn adds to rendering it up to the turn with
//! the generation prompt (refused, with a message, when the template is not prefix-stable).
//!
//! ```
//! use lathe_models::chat::{ChatTemplate, Message};
//! let template = ChatTemplate::new(
//!     "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}\
//!      {% if add_generation_prompt %}<|assistant|>{% endif %}",
//!     Default::default(),
//! ).unwrap();
//! let text = template.render(&[Message::new("user", " Hi ")], true).unwrap();
//! assert_eq!(text, "<|user|>Hi\n<|assistant|>");
//! ```

use std::ops::Range;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One turn of a conversation, as trl's conversational datasets store it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks: "system", "user" or "assistant" (what the template expects).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A turn of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special tokens a template sees as variables (transformers passes the tokenizer's
/// special-tokens map).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// The beginning-of-sequence token's text (`bos_token` in the template).
    pub bos_token: Option<String>,
    /// The end-of-sequence token's text (`eos_token`).
    pub eos_token: Option<String>,
    /// The padding token's text (`pad_token`).
    pub pad_token: Option<String>,
    /// The unknown token's text (`unk_token`).
    pub unk_token: Option<String>,
}

/// Marks around the output of a `{% generation %}` block while rendering; private-use
/// code points no template writes (checked: a rendered text that contains them is refused).
const GENERATION_START: char = '\u{F8F0}';
const GENERATION_END: char = '\u{F8F1}';
const GENERATION_FILTER: &str = "__lathe_generation";

/// A compiled chat template.
pub struct ChatTemplate {
    /// The Jinja source as the model ships it (written back when a model is saved).
    source: String,
    env: Environment<'static>,
    special: SpecialTokens,
    /// The template has `{% generation %}` blocks (rewritten into filter blocks).
    marks_generation: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special", &self.special)
            .field("marks_generation", &self.marks_generation)
            .finish()
    }
}

fn template_error(detail: impl std::fmt::Display) -> Error {
    Error::ChatTemplate(detail.to_string())
}

impl ChatTemplate {
    /// Compiles `source` (Jinja) with the special tokens it may refer to.
    pub fn new(source: &str, special: SpecialTokens) -> Result<ChatTemplate> {
        let original = source.to_string();
        let (source, marks_generation) = rewrite_generation_blocks(source);
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_tojson);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter(GENERATION_FILTER, |content: String| {
            format!("{GENERATION_START}{content}{GENERATION_END}")
        });
        env.add_template_owned("chat", source)
            .map_err(|e| template_error(format!("cannot compile the chat template: {e}")))?;
        Ok(ChatTemplate {
            source: original,
            env,
            special,
            marks_generation,
        })
    }

    /// The template's Jinja source, as read.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template of a HF model or tokenizer directory, as transformers 5.x saves it
    /// (`chat_template.jinja`) or 4.x did (`chat_template` in tokenizer_config.json: a string,
    /// or a list of named templates of which `default` is taken), or `chat_template.json`.
    /// `None` when the directory has none. Special tokens come from tokenizer_config.json.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::File {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::File {
                    path: path.display().to_string(),
                    detail: format!("invalid JSON: {e}"),
                })
        };
        let config = read_json("tokenizer_config.json")?;
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::File {
                path: jinja.display().to_string(),
                detail: e.to_string(),
            })?)
        } else if let Some(found) = config.as_ref().and_then(|c| c.get("chat_template")) {
            Some(template_from_json(found).ok_or_else(|| {
                template_error(format!(
                    "{}: chat_template is neither a string nor a list with a \"default\" entry",
                    dir.join("tokenizer_config.json").display()
                ))
            })?)
        } else if let Some(found) = read_json("chat_template.json")? {
            let entry = found.get("chat_template").unwrap_or(&found);
            Some(template_from_json(entry).ok_or_else(|| {
                template_error(format!(
                    "{}: no chat_template string",
                    dir.join("chat_template.json").display()
                ))
            })?)
        } else {
            None
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let token = |key: &str| {
            let value = config.as_ref()?.get(key)?;
            value
                .as_str()
                .or_else(|| value.get("content")?.as_str())
                .map(str::to_string)
        };
        let special = SpecialTokens {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
        };
        ChatTemplate::new(&source, special).map(Some)
    }

    /// The template in a GGUF file's metadata (`tokenizer.chat_template`), its special tokens
    /// from the file's vocabulary; `None` when the file has none.
    pub fn from_gguf(file: &GgufFile) -> Result<Option<ChatTemplate>> {
        let Ok(source) = file.get_str("tokenizer.chat_template") else {
            return Ok(None);
        };
        let tokens = file.get_str_array("tokenizer.ggml.tokens").ok();
        let token = |key: &str| -> Option<String> {
            let id = file.get(key).ok()?.as_u64()?;
            Some(tokens.as_ref()?.get(id as usize)?.to_string())
        };
        let special = SpecialTokens {
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
            pad_token: token("tokenizer.ggml.padding_token_id"),
            unk_token: token("tokenizer.ggml.unknown_token_id"),
        };
        ChatTemplate::new(source, special).map(Some)
    }

    /// The text of `messages`; `add_generation_prompt` appends the start of an assistant
    /// turn (for prompting a model), as transformers' argument of that name.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let marked = self.render_marked(messages, add_generation_prompt)?;
        Ok(marked
            .chars()
            .filter(|&c| c != GENERATION_START && c != GENERATION_END)
            .collect())
    }

    /// The text of a whole conversation and the byte ranges of it the assistant wrote (its
    /// turns as the template delimits them: content and end-of-turn marker).
    pub fn render_conversation(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        if self.marks_generation {
            let marked = self.render_marked(messages, false)?;
            return split_generation_marks(&marked);
        }
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(template_error(format!(
                    "cannot find assistant turn {i} in the rendered conversation: the template \
                     does not render a conversation as the prefix of a longer one; mark the \
                     assistant's text with {{% generation %}} ... {{% endgeneration %}}"
                )));
            }
            // The turn ends with its end-of-turn token: what the template writes after it
            // (a newline) is not the assistant's to learn.
            let turn = &through[before.len()..];
            let end = match self.special.eos_token.as_deref() {
                Some(eos) if !eos.is_empty() => {
                    turn.rfind(eos).map_or(turn.len(), |at| at + eos.len())
                }
                _ => turn.len(),
            };
            if end > 0 {
                spans.push(before.len()..before.len() + end);
            }
        }
        Ok((text, spans))
    }

    fn render_marked(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(template_error)?;
        // A special token the tokenizer lacks is undefined (renders as ""), not none.
        let mut context = std::collections::BTreeMap::<&str, Value>::new();
        context.insert("messages", Value::from(minijinja::value::Serde(messages)));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let special = &self.special;
        for (name, token) in [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("pad_token", &special.pad_token),
            ("unk_token", &special.unk_token),
        ] {
            if let Some(token) = token {
                context.insert(name, Value::from(token.as_str()));
            }
        }
        let text = template
            .render(context)
            .map_err(|e| template_error(format!("rendering the chat template: {e:#}")))?;
        let marks = text
            .chars()
            .filter(|&c| c == GENERATION_START || c == GENERATION_END)
            .count();
        let from_messages: usize = messages
            .iter()
            .map(|m| {
                m.content
                    .chars()
                    .filter(|&c| c == GENERATION_START || c == GENERATION_END)
                    .count()
            })
            .sum();
        if from_messages > 0 || (!self.marks_generation && marks > 0) {
            return Err(template_error(
                "a message contains a reserved private-use character (U+F8F0 or U+F8F1)",
            ));
        }
        Ok(text)
    }
}

/// A conversation's token ids and which of them the assistant wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTokens {
    /// The rendered conversation's token ids.
    pub ids: Vec<u32>,
    /// `true` for the tokens of the assistant's turns (trl's `assistant_masks`).
    pub assistant_mask: Vec<bool>,
}

/// Renders `messages` with `template` and tokenizes the text as transformers'
/// `apply_chat_template(tokenize=True)` does (no special tokens added: the template writes
/// them), marking each token that overlaps an assistant turn.
pub fn tokenize_conversation(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<ChatTokens> {
    let (text, spans) = template.render_conversation(messages)?;
    let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
    let assistant_mask = offsets
        .iter()
        .map(|&(start, end)| {
            spans
                .iter()
                .any(|span| start < span.end && span.start < end.max(start + 1))
        })
        .collect();
    Ok(ChatTokens {
        ids,
        assistant_mask,
    })
}

fn template_from_json(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named.iter().find_map(|entry| {
            (entry.get("name")?.as_str()? == "default")
                .then(|| entry.get("template")?.as_str().map(str::to_string))
                .flatten()
        }),
        _ => None,
    }
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with any `-` whitespace control)
/// into a filter block that wraps its output in the generation marks. Being a block tag
/// still, it keeps Jinja's `trim_blocks`/`lstrip_blocks` behaviour exactly.
fn rewrite_generation_blocks(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..close];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(body) => (&inner[..1], body),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(body) => (body, &inner[inner.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => {
                found = true;
                out.push_str(&format!("{{%{left} filter {GENERATION_FILTER} {right}%}}"));
            }
            "endgeneration" => out.push_str(&format!("{{%{left} endfilter {right}%}}")),
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Removes the generation marks from `marked`, returning the text and the byte ranges that
/// were between them.
fn split_generation_marks(marked: &str) -> Result<(String, Vec<Range<usize>>)> {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in marked.chars() {
        match c {
            GENERATION_START if open.is_none() => open = Some(text.len()),
            GENERATION_END if open.is_some() => {
                let start = open.take().unwrap_or_default();
                if text.len() > start {
                    spans.push(start..text.len());
                }
            }
            GENERATION_START | GENERATION_END => {
                return Err(template_error(
                    "nested or unbalanced {% generation %} blocks",
                ))
            }
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err(template_error("an unclosed {% generation %} block"));
    }
    Ok((text, spans))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, Python's
/// separators (`", "`, `": "`; `","` between lines when indented), keys in insertion order.
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut bytes = Vec::new();
    let formatter = PythonJson {
        indent: indent.map(|n| " ".repeat(n).into_bytes()),
        depth: 0,
        has_value: false,
    };
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, formatter);
    value
        .serialize(&mut serializer)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
}

/// A serde_json formatter writing what Python's `json.dumps` writes.
struct PythonJson {
    indent: Option<Vec<u8>>,
    depth: usize,
    /// The array or object being written has a value (so its close goes on a new line).
    has_value: bool,
}

impl PythonJson {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn separator<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}
