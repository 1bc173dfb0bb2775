//! StreamDecoder: chunked decoding equals one-shot decoding.

mod common;

use common::tok;
use dgemma_tokenizer::{Error, StreamDecoder};
use proptest::prelude::*;

/// Feeds `ids` in chunks of the given sizes (cycled), then finishes.
fn stream(ids: &[u32], chunks: &[usize], skip: bool) -> (String, Vec<String>) {
    let mut dec = StreamDecoder::new(tok(), skip);
    let mut out = String::new();
    let mut pieces = Vec::new();
    let mut pos = 0;
    let mut k = 0;
    while pos < ids.len() {
        let n = chunks
            .get(k % chunks.len().max(1))
            .copied()
            .unwrap_or(1)
            .max(1);
        let end = (pos + n).min(ids.len());
        let piece = dec.push(&ids[pos..end]).unwrap();
        out.push_str(&piece);
        pieces.push(piece);
        pos = end;
        k += 1;
    }
    let tail = dec.finish().unwrap();
    out.push_str(&tail);
    pieces.push(tail);
    (out, pieces)
}

#[test]
fn split_character_is_printed_whole() {
    let t = tok();
    let ids = t.encode("日本 ok").unwrap();
    // 日 and 本 are three byte-fallback pieces each.
    assert!(ids[..6].iter().all(|&i| t.is_byte_token(i)));
    let mut dec = StreamDecoder::new(t, false);
    assert_eq!(dec.push(&ids[..2]).unwrap(), "");
    assert_eq!(dec.pending_len(), 2);
    assert_eq!(dec.push(&ids[2..4]).unwrap(), "");
    assert_eq!(dec.push(&ids[4..]).unwrap(), "日本 ok");
    assert_eq!(dec.pending_len(), 0);
    assert_eq!(dec.finish().unwrap(), "");

    // Text before a trailing byte run is emitted at once; the run waits for its end.
    let ids = t.encode("the é").unwrap();
    let mut dec = StreamDecoder::new(t, false);
    let first = dec.push(&ids[..ids.len() - 1]).unwrap();
    assert_eq!(first, "the ");
    assert_eq!(dec.finish().unwrap(), "\u{FFFD}"); // lone 0xC3, as a one-shot decode gives
    assert_eq!(
        t.decode(&ids[..ids.len() - 1], false).unwrap(),
        "the \u{FFFD}"
    );
}

#[test]
fn canvas_sized_chunks_and_special_tokens() {
    let t = tok();
    let text = "<|channel>thought\nLet me think.<channel|>The answer is 42. Ünïcödé 😀!<turn|>";
    let ids = t.encode(text).unwrap();
    for skip in [false, true] {
        let one_shot = t.decode(&ids, skip).unwrap();
        for chunk in [1, 2, 3, 7, 256] {
            assert_eq!(
                stream(&ids, &[chunk], skip).0,
                one_shot,
                "chunk {chunk} skip {skip}"
            );
        }
    }
    assert_eq!(
        t.decode(&ids, true).unwrap(),
        "thought\nLet me think.The answer is 42. Ünïcödé 😀!"
    );
}

#[test]
fn unknown_id_is_rejected_without_changing_state() {
    let t = tok();
    let mut dec = StreamDecoder::new(t, false);
    let ids = t.encode("é").unwrap();
    assert_eq!(dec.push(&ids[..1]).unwrap(), "");
    let err = dec.push(&[ids[1], 9999]).unwrap_err();
    assert!(
        matches!(err, Error::UnknownTokenId { id: 9999, .. }),
        "{err:?}"
    );
    assert_eq!(dec.pending_len(), 1);
    assert_eq!(dec.push(&ids[1..]).unwrap(), "");
    assert_eq!(dec.finish().unwrap(), "é");
}

fn id_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..256,   // specials and ordinary pieces
        2 => 256u32..512, // byte-fallback pieces (arbitrary, often invalid UTF-8)
        2 => prop::sample::select(vec![256 + 0xC3, 256 + 0xA9, 256 + 0xE6, 256 + 0x97, 256 + 0xA5]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn stream_equals_one_shot_on_random_ids(
        ids in prop::collection::vec(id_strategy(), 0..80),
        chunks in prop::collection::vec(1usize..10, 1..8),
        skip in any::<bool>(),
    ) {
        let one_shot = tok().decode(&ids, skip).unwrap();
        let (streamed, _) = stream(&ids, &chunks, skip);
        prop_assert_eq!(streamed, one_shot);
    }

    #[test]
    fn stream_equals_one_shot_on_encoded_text(
        text in "\\PC{0,40}",
        chunks in prop::collection::vec(1usize..6, 1..8),
        skip in any::<bool>(),
    ) {
        // "▁" itself decodes to " " (Gemma's normalizer/decoder pair), so leave it out.
        prop_assume!(!text.contains('\u{2581}'));
        let ids = tok().encode(&text).unwrap();
        prop_assert_eq!(tok().decode(&ids, false).unwrap(), text.clone());
        let (streamed, pieces) = stream(&ids, &chunks, skip);
        prop_assert_eq!(&streamed, &tok().decode(&ids, skip).unwrap());
        // Valid text never yields a replacement character mid-stream.
        if !skip {
            prop_assert_eq!(&streamed, &text);
            for p in &pieces {
                let bad = p.contains(char::REPLACEMENT_CHARACTER)
                    && !text.contains(char::REPLACEMENT_CHARACTER);
                prop_assert!(!bad, "replacement character in piece {:?}", p);
            }
        }
    }
}
