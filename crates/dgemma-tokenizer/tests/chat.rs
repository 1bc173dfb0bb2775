//! Chat template rendering and prompt construction against HF `apply_chat_template` output.

mod common;

use common::hf_expected::CHAT_CASES;
use common::{reference_dir, tok, TempDir};
use dgemma_tokenizer::{
    chat_prompt_ids, raw_prompt_ids, ChatOptions, ChatTemplate, Error, Message,
};

fn template() -> ChatTemplate {
    ChatTemplate::from_dir(reference_dir())
        .expect("load template")
        .expect("reference dir has a template")
}

fn messages(case: &[(&str, &str)]) -> Vec<Message> {
    case.iter().map(|&(r, c)| Message::new(r, c)).collect()
}

#[test]
fn render_matches_hf_apply_chat_template() {
    let tpl = template();
    assert!(tpl.origin().ends_with("chat_template.jinja"));
    for &(name, msgs, thinking, text, ids) in CHAT_CASES {
        let opts = ChatOptions {
            add_generation_prompt: true,
            enable_thinking: thinking,
        };
        let rendered = tpl.render(&messages(msgs), &opts).unwrap();
        assert_eq!(rendered, text, "case {name}");
        // Encoding the rendered text gives HF's ids (tokenize=True uses add_special_tokens=False).
        assert_eq!(tok().encode(&rendered).unwrap(), ids, "case {name}");
    }
}

#[test]
fn spec_section_6_formats() {
    let tpl = template();
    let user = [Message::user("Hello")];
    let off = tpl
        .render(
            &user,
            &ChatOptions {
                add_generation_prompt: true,
                enable_thinking: false,
            },
        )
        .unwrap();
    assert_eq!(
        off,
        "<bos><|turn>user\nHello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    );
    let on = tpl
        .render(
            &user,
            &ChatOptions {
                add_generation_prompt: true,
                enable_thinking: true,
            },
        )
        .unwrap();
    assert_eq!(
        on,
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n"
    );
    let no_gen = tpl.render(&user, &ChatOptions::default()).unwrap();
    assert_eq!(no_gen, "<bos><|turn>user\nHello<turn|>\n");
}

#[test]
fn chat_prompt_ids_match_hf_and_have_one_bos() {
    let t = tok();
    let tpl = template();
    for &(name, msgs, thinking, _, ids) in CHAT_CASES {
        let (system, user) = match msgs {
            [("user", u)] => (None, *u),
            [("system", s), ("user", u)] => (Some(*s), *u),
            _ => continue, // multi-turn: covered by render_matches_hf_apply_chat_template
        };
        let got = chat_prompt_ids(t, Some(&tpl), user, system, thinking).unwrap();
        assert_eq!(got, ids, "case {name}");
        assert_eq!(got.iter().filter(|&&i| i == 2).count(), 1, "case {name}");
        assert_eq!(got[0], 2);
    }
}

#[test]
fn exactly_one_bos_even_if_template_or_text_repeats_it() {
    let t = tok();
    // A template that emits <bos> twice and one that emits none.
    let twice = ChatTemplate::new(
        "{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    let none = ChatTemplate::new(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    let hi = t.encode("Hi").unwrap();
    let mut want = vec![2];
    want.extend(&hi);
    assert_eq!(
        chat_prompt_ids(t, Some(&twice), "Hi", None, false).unwrap(),
        want
    );
    assert_eq!(
        chat_prompt_ids(t, Some(&none), "Hi", None, false).unwrap(),
        want
    );
    // No template: <bos> + raw text; a leading "<bos>" in the text is not duplicated.
    assert_eq!(
        chat_prompt_ids(t, None, "Hi", Some("ignored"), true).unwrap(),
        want
    );
    assert_eq!(raw_prompt_ids(t, "Hi").unwrap(), want);
    assert_eq!(raw_prompt_ids(t, "<bos>Hi").unwrap(), want);
    assert_eq!(raw_prompt_ids(t, "").unwrap(), vec![2]);
}

#[test]
fn template_from_tokenizer_config() {
    let dir = TempDir::new("cfg");
    // Neither file: no template.
    assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
    dir.write("tokenizer_config.json", r#"{"bos_token": "<bos>"}"#);
    assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());

    // A string field, with bos/eos in the AddedToken dict form.
    let cfg = serde_json::json!({
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}",
    });
    dir.write("tokenizer_config.json", &cfg.to_string());
    let tpl = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert!(tpl.origin().ends_with("tokenizer_config.json"));
    let out = tpl
        .render(&[Message::user("x")], &ChatOptions::default())
        .unwrap();
    assert_eq!(out, "<s>[user]x</s>");

    // A list of named templates: "default" is picked.
    let cfg = serde_json::json!({
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages | length }}"},
        ],
    });
    dir.write("tokenizer_config.json", &cfg.to_string());
    let tpl = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(
        tpl.render(&[Message::user("x")], &ChatOptions::default())
            .unwrap(),
        "DEFAULT 1"
    );

    // A list without "default" is an error naming the file and the entries.
    let cfg = serde_json::json!({"chat_template": [{"name": "rag", "template": "R"}]});
    dir.write("tokenizer_config.json", &cfg.to_string());
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("rag"),
        "{msg}"
    );

    // chat_template.jinja wins over the config field.
    dir.write("chat_template.jinja", "JINJA FILE\n");
    let tpl = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert!(tpl.origin().ends_with("chat_template.jinja"));
    // keep_trailing_newline = false, like HF.
    assert_eq!(
        tpl.render(&[], &ChatOptions::default()).unwrap(),
        "JINJA FILE"
    );

    // Malformed config JSON names the file.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    dir.write("tokenizer_config.json", "{");
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn template_errors_and_hf_globals() {
    let raise = ChatTemplate::new(
        "{% if messages | length == 0 %}{{ raise_exception('need at least one message') }}{% endif %}ok",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    let err = raise.render(&[], &ChatOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Template(_)));
    assert!(
        err.to_string().contains("need at least one message"),
        "{err}"
    );
    assert_eq!(
        raise
            .render(&[Message::user("a")], &ChatOptions::default())
            .unwrap(),
        "ok"
    );

    // Python string/dict methods (minijinja-contrib pycompat), tools = none, tojson without
    // HTML escaping.
    let py = ChatTemplate::new(
        "{% set m = messages[0] %}{{ m.content.strip().split(',') | join('|') }};\
         {{ m.content.startswith(' a') }};{{ m.get('missing', 'dflt') }};\
         {{ 'T' if tools else 'F' }};{{ {'k': '<x>'} | tojson }}",
        "<bos>",
        "<eos>",
    )
    .unwrap();
    let out = py
        .render(&[Message::user(" a,b,c ")], &ChatOptions::default())
        .unwrap();
    assert_eq!(out, "a|b|c;True;dflt;F;{\"k\":\"<x>\"}");

    // A syntax error is reported when loading, naming the source.
    let dir = TempDir::new("badtpl");
    dir.write("chat_template.jinja", "{% if %}");
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("chat_template.jinja"), "{err}");
}
