//! Tokenizer tests against the bundled reference tokenizer (reference/tokenizer/tokenizer.json).

mod common;

use common::hf_expected::ENCODE_CASES;
use common::{reference_dir, tok, TempDir};
use dgemma_tokenizer::{Error, Tokenizer};

#[test]
fn vocab_and_special_token_ids() {
    let t = tok();
    assert_eq!(t.vocab_size(), 512);
    let table: &[(u32, &str)] = &[
        (0, "<pad>"),
        (1, "<eos>"),
        (2, "<bos>"),
        (3, "<unk>"),
        (4, "<mask>"),
        (5, "<|image>"),
        (6, "<image|>"),
        (7, "<|image|>"),
        (8, "<|audio>"),
        (9, "<audio|>"),
        (10, "<|audio|>"),
        (11, "<|video|>"),
        (46, "<|tool>"),
        (47, "<tool|>"),
        (48, "<|tool_call>"),
        (49, "<tool_call|>"),
        (50, "<|tool_response>"),
        (51, "<tool_response|>"),
        (52, "<|\"|>"),
        (98, "<|think|>"),
        (100, "<|channel>"),
        (101, "<channel|>"),
        (105, "<|turn>"),
        (106, "<turn|>"),
    ];
    for &(id, token) in table {
        assert_eq!(t.token_to_id(token), Some(id), "{token}");
        assert_eq!(t.id_to_token(id).as_deref(), Some(token));
        assert!(t.is_special(id), "{token} should be special");
        // A special-token string inside text encodes to its id.
        assert_eq!(t.encode(token).unwrap(), vec![id], "{token}");
    }
    assert_eq!(t.id_to_token(107).as_deref(), Some("\n"));
    assert_eq!(t.id_to_token(108).as_deref(), Some("\n\n"));
    assert_eq!(t.id_to_token(256).as_deref(), Some("<0x00>"));
    assert_eq!(t.id_to_token(511).as_deref(), Some("<0xFF>"));
    assert!(t.is_byte_token(256) && t.is_byte_token(511) && !t.is_byte_token(107));
    assert!(!t.is_special(107));
    assert_eq!(t.bos_id(), Some(2));
    assert_eq!(t.eos_id(), Some(1));
    assert_eq!(t.pad_id(), Some(0));
    assert_eq!(t.id_to_token(512), None);
}

#[test]
fn newline_is_one_token_and_no_bos_is_added() {
    let t = tok();
    assert_eq!(t.encode("\n").unwrap(), vec![107]);
    assert_eq!(t.encode("\n\n").unwrap(), vec![108]);
    assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
    let ids = t.encode("Hello").unwrap();
    assert_ne!(ids[0], 2);
    for word in ["user", "model", "system", "thought"] {
        assert_eq!(t.encode(word).unwrap().len(), 1, "{word}");
    }
}

#[test]
fn ids_match_python_tokenizers() {
    let t = tok();
    for &(text, expected) in ENCODE_CASES {
        assert_eq!(t.encode(text).unwrap(), expected, "encode({text:?})");
        assert_eq!(
            t.decode(expected, false).unwrap(),
            text,
            "decode of {text:?}"
        );
    }
}

#[test]
fn round_trips() {
    let t = tok();
    let cases = [
        "The quick brown fox jumps over the lazy dog.",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nwindows newlines",
        "Ünïcödé: café, naïve, 日本語, Ελληνικά, русский, 😀🚀",
        "mixed <|turn>user\nhi<turn|> and <bos> in text",
        "0x<0x41> is not a byte token in text",
        "",
    ];
    for text in cases {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }
    // Non-ASCII goes through byte fallback: each byte becomes <0xNN> (id 256 + byte).
    let ids = t.encode("é").unwrap();
    assert_eq!(ids, vec![256 + 0xC3, 256 + 0xA9]);
    assert_eq!(t.decode(&ids, false).unwrap(), "é");
}

#[test]
fn skip_special_tokens() {
    let t = tok();
    let ids = t.encode("<bos><|turn>user\nHi<turn|>\n").unwrap();
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<bos><|turn>user\nHi<turn|>\n"
    );
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi\n");
}

#[test]
fn unknown_id_is_an_error() {
    let t = tok();
    let err = t.decode(&[2, 58, 512], false).unwrap_err();
    match &err {
        Error::UnknownTokenId { id, vocab_size } => {
            assert_eq!((*id, *vocab_size), (512, 512));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("512"), "{err}");
    assert!(matches!(
        t.decode(&[u32::MAX], true),
        Err(Error::UnknownTokenId { id: u32::MAX, .. })
    ));
}

#[test]
fn missing_tokenizer_file_is_a_clear_error() {
    let dir = TempDir::new("missing");
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    match &err {
        Error::FileNotFound { path } => assert!(path.ends_with("tokenizer.json")),
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("not found"),
        "{msg}"
    );

    let err = Tokenizer::from_file(dir.path().join("nope.json")).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn malformed_tokenizer_file_is_a_clear_error() {
    let dir = TempDir::new("malformed");
    dir.write("tokenizer.json", "{ not json");
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // Valid tokenizer.json but broken tokenizer_config.json: names the config file.
    let good = std::fs::read_to_string(reference_dir().join("tokenizer.json")).unwrap();
    dir.write("tokenizer.json", &good);
    dir.write("tokenizer_config.json", "[1, 2");
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    // Without a config the Gemma default special-token names are used.
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.bos_id(), Some(2));
    assert_eq!(t.eos_id(), Some(1));
}

#[test]
fn from_file_and_from_bytes_agree() {
    let path = reference_dir().join("tokenizer.json");
    let a = Tokenizer::from_file(&path).unwrap();
    let b = Tokenizer::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
    let text = "Why is the sky blue?\n日本";
    assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap());
    assert_eq!(a.vocab_size(), b.vocab_size());
}
