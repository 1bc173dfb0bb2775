#!/usr/bin/env python3
"""Build the tiny Gemma-4-style tokenizer bundled with the dgemma default model.

Writes, next to this script:
  tokenizer.json         HF `tokenizers` file (BPE + byte fallback, Gemma layout), vocab exactly 512
  tokenizer_config.json  bos/eos/pad/unk/mask tokens, tokenizer class (no embedded template)
  chat_template.jinja    the Gemma 4 chat template, byte-for-byte (see CHAT_TEMPLATE below)

Deterministic: no randomness, no dependence on dict/hash order, no third-party trainer. Only the
Python standard library is needed to build. `--check` additionally loads the result with HF
`tokenizers` / `transformers` and prints reference ids and rendered chat prompts;
`--rust-expected` prints the Rust test fixture instead of writing files:
  python make_tokenizer.py --rust-expected > ../../crates/dgemma-tokenizer/tests/common/hf_expected.rs
  cargo fmt -p dgemma-tokenizer

Pipeline (mirrors transformers' GemmaTokenizer, models/gemma/tokenization_gemma.py):
  normalizer     Replace(" " -> "▁")
  pre_tokenizer  Split(" ", merged_with_previous)   (a no-op after the normalizer, as in Gemma)
  model          BPE(unk "<unk>", fuse_unk, byte_fallback)
  post_processor TemplateProcessing "<bos> $A"      (as in Gemma: HF `encode(text)` with
                 add_special_tokens=True prepends <bos>; `apply_chat_template` and the Rust crate
                 encode with add_special_tokens=False, the template emits the only <bos>)
  decoder        Sequence[Replace("▁" -> " "), ByteFallback, Fuse]

Id layout (512):
  0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>                          (Gemma 4 ids)
  5 <|image>  6 <image|>  7 <|image|>  8 <|audio>  9 <audio|>  10 <|audio|>  11 <|video|>
                                    (Gemma 4 has these at 255999/258882/258880/256000/258883/258881/258884)
  46 <|tool>  47 <tool|>  48 <|tool_call>  49 <tool_call|>  50 <|tool_response>  51 <tool_response|>
  52 <|"|>                          (50 per the spec; 46-49, 51, 52 as seen in third-party Gemma 4 fixtures)
  98 <|think|>  100 <|channel>  101 <channel|>  105 <|turn>  106 <turn|>  (Gemma 4 ids)
  107 "\\n"  108 "\\n\\n"           (ordinary pieces, at Gemma's ids)
  256..511  <0x00>..<0xFF>           byte-fallback pieces (id = 256 + byte)
  all other ids < 256: characters (printable ASCII + "▁") then BPE merges learned from TRAINING_TEXT.

Chat template source: ggml-org/llama.cpp, models/templates/google-gemma-4-31B-it.jinja at commit
3fc65063d9c356510b86fc2f15ca8aea711bfc47 ("common : better align to the updated official gemma4
template", blob 98da08eb6be6f7a353d390456a6c4cacf811c9ed). It is the current official Gemma 4
template (same text as embedded in the gemma-4-26B-A4B-it GGUFs): with thinking off the generation
prompt ends with the empty thought channel `<|turn>model\\n<|channel>thought\\n<channel|>`, which is
what the DiffusionGemma processor tests expect.
"""

import argparse
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 512
SPM_SPACE = "\u2581"  # ▁

SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    5: "<|image>",
    6: "<image|>",
    7: "<|image|>",
    8: "<|audio>",
    9: "<audio|>",
    10: "<|audio|>",
    11: "<|video|>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
FIXED_PIECES = {107: "\n", 108: "\n\n"}
BYTE_BASE = 256

# Words that follow `<|turn>` / `<|channel>` without a leading space in the chat format; each gets a
# large pseudo-count so it becomes a single piece (Gemma has them as single tokens too).
FORCED_WORDS = {"user": 400, "model": 400, "system": 400, "thought": 400}

# Small original English text; common words get merges.
TRAINING_TEXT = """\
Why is the sky blue? Sunlight is made of many colors. When it passes through the air, the short blue
waves are scattered in every direction by the small molecules of the air, so the sky looks blue to us.
At sunset the light travels a longer way through the air, and more of the blue is scattered away, so
the sun and the clouds look red and orange.

Write a long essay about Portugal. Portugal is a country in the south west of Europe, on the coast of
the Atlantic Ocean. Its capital is Lisbon, a city of hills, old streets and yellow trams. The people of
Portugal have a long history of sailing and trade. In the past their ships went to Africa, to India,
to China and to Brazil, and the language of Portugal is now spoken by many millions of people in the
world. The country is known for its food, its wine, its music and the warm light of its long summer.

The model is a small language model. It reads the text that the user writes and it tries to answer
the question in a helpful way. A good answer is clear and short, and it does not make things up. If
the model does not know the answer, it should say so. The user can ask the model to think about the
problem first; the thought is written in its own channel, and then the model gives the final answer.

This is a test of the system. The system prompt tells the model how to behave. You are a helpful
assistant. Please answer the question below. What is the time? What is your name? Where do you live?
How are you today? I am fine, thank you. It was a good day, and we were happy to see the sun again.

Once upon a time there was a little house by the sea. In the house lived an old man and his dog. Every
morning they walked along the water and looked at the boats. The man would tell the dog stories about
the ships he had seen when he was young, and the dog would listen and wag its tail. One day a storm
came from the west, and the waves were high and white. The man and the dog stayed inside by the fire,
and when the storm was over, they went out again to see what the sea had left on the sand.

Numbers and code: 1, 2, 3, 10, 20, 100, 2024. The function returns a value; if the value is zero, the
loop ends. Print("Hello, world!") and then return. x = y + 1; a[i] = b[j] * 2 - c / 4.
"""


def training_words():
    """Word counts for BPE training: each whitespace-separated word gets the SentencePiece "▁" prefix."""
    counts = Counter()
    for word in TRAINING_TEXT.split():
        counts[SPM_SPACE + word] += 1
    for word, n in FORCED_WORDS.items():
        counts[word] += n
    return counts


def alphabet():
    """Base characters: printable ASCII (space is "▁") in code-point order."""
    chars = [chr(c) for c in range(33, 127)]
    chars.append(SPM_SPACE)
    return chars


def train_bpe(word_counts, base, n_new):
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Returns (new_tokens, merges). Stops when `n_new` new tokens exist or no pair occurs twice.
    """
    known = set(base)
    words = sorted((tuple(w), c) for w, c in word_counts.items())
    for w, _ in words:
        for ch in w:
            assert ch in known, f"training text has a char outside the alphabet: {ch!r}"
    new_tokens, merges = [], []
    while len(new_tokens) < n_new:
        pairs = Counter()
        for w, c in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        a, b = best
        merged = a + b
        merges.append((a, b))
        if merged not in known:
            known.add(merged)
            new_tokens.append(merged)
        out = []
        for w, c in words:
            i, nw = 0, []
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    nw.append(merged)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            out.append((tuple(nw), c))
        words = out
    return new_tokens, merges


def build_vocab():
    vocab = {}  # id -> piece
    vocab.update(SPECIAL_TOKENS)
    vocab.update(FIXED_PIECES)
    for b in range(256):
        vocab[BYTE_BASE + b] = f"<0x{b:02X}>"
    free_ids = [i for i in range(VOCAB_SIZE) if i not in vocab]
    base = alphabet()
    n_new = len(free_ids) - len(base)
    new_tokens, merges = train_bpe(training_words(), base, n_new)
    if len(new_tokens) != n_new:
        sys.exit(f"training text too small: got {len(new_tokens)} merges, need {n_new}")
    for i, piece in zip(free_ids, base + new_tokens):
        vocab[i] = piece
    # "\n\n" is a piece at Gemma's id 108; it needs its merge (put first: highest priority).
    merges.insert(0, ("\n", "\n"))
    assert sorted(vocab) == list(range(VOCAB_SIZE))
    assert len(set(vocab.values())) == VOCAB_SIZE, "duplicate piece"
    return vocab, merges


def build_tokenizer_json(vocab, merges):
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in sorted(SPECIAL_TOKENS.items())
    ]
    bos = SPECIAL_TOKENS[2]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [2], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {vocab[i]: i for i in range(VOCAB_SIZE)},
            "merges": [[a, b] for a, b in merges],
        },
    }


def build_tokenizer_config():
    decoder = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in sorted(SPECIAL_TOKENS.items())
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "left",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
    }


def write(name, text):
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")


# Strings whose ids the Rust tests compare against (see --check).
CHECK_STRINGS = [
    "Hello world! Why is the sky blue?",
    "Write a long essay about Portugal.",
    "the user and the model",
    "line one\nline two\n\nend",
    "  two leading spaces and trailing  ",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600",
    "tab\there ~`|{}",
    "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    "<|think|><|tool_call>call:f{}<tool_call|><|\"|>x<|\"|>",
]
CHAT_CASES = {
    "off": dict(messages=[{"role": "user", "content": "Why is the sky blue?"}], enable_thinking=False),
    "on": dict(messages=[{"role": "user", "content": "Why is the sky blue?"}], enable_thinking=True),
    "system": dict(
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a long essay about Portugal."},
        ],
        enable_thinking=False,
    ),
    "system_on": dict(
        messages=[
            {"role": "system", "content": "  You are a helpful assistant.\n"},
            {"role": "user", "content": "  Hi there \n"},
        ],
        enable_thinking=True,
    ),
    "multi": dict(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello! How are you?"},
            {"role": "user", "content": "Fine."},
        ],
        enable_thinking=False,
    ),
}


def check():
    """Load the written files with HF and print reference values for the Rust tests."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tk = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
    assert tk.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    assert tk.encode("\n", add_special_tokens=False).ids == [107]
    print("# tokenizers: encode(text, add_special_tokens=False).ids")
    for s in CHECK_STRINGS:
        ids = tk.encode(s, add_special_tokens=False).ids
        assert tk.decode(ids, skip_special_tokens=False) == s, (s, tk.decode(ids))
        print(json.dumps(s), ids)
    print("# with add_special_tokens=True (Gemma-style post-processor):",
          tk.encode("Hi", add_special_tokens=True).ids)

    hf = AutoTokenizer.from_pretrained(HERE)
    print("# transformers:", type(hf).__name__, "bos", hf.bos_token_id, "eos", hf.eos_token_id,
          "pad", hf.pad_token_id)
    for name, case in CHAT_CASES.items():
        text = hf.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True,
                                      enable_thinking=case["enable_thinking"])
        ids = hf.apply_chat_template(case["messages"], tokenize=True, add_generation_prompt=True,
                                     enable_thinking=case["enable_thinking"], return_dict=False)
        assert text.count("<bos>") == 1 and ids.count(2) == 1 and ids[0] == 2, (text, ids)
        print(f"## chat {name}")
        print(json.dumps(text))
        print(list(ids))


def _rust_str(s):
    out = '"'
    for ch in s:
        if ch == '"':
            out += '\\"'
        elif ch == "\\":
            out += "\\\\"
        elif ch == "\n":
            out += "\\n"
        elif ch == "\t":
            out += "\\t"
        elif 32 <= ord(ch) < 127:
            out += ch
        else:
            out += "\\u{%x}" % ord(ch)
    return out + '"'


def rust_expected():
    """The Rust test fixture crates/dgemma-tokenizer/tests/common/hf_expected.rs, from HF."""
    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tk = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(HERE)
    lines = [
        "//! Reference values computed from reference/tokenizer with HF Python:",
        "//! `tokenizers.Tokenizer.encode(s, add_special_tokens=False).ids` and",
        "//! `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, add_generation_prompt=True,",
        "//! enable_thinking=...)` (tokenize=False for the text, tokenize=True for the ids).",
        "//! Generated by `reference/tokenizer/make_tokenizer.py --rust-expected`; do not edit by hand.",
        f"//! tokenizers {tokenizers.__version__}, transformers {transformers.__version__}.",
        "",
        "pub const ENCODE_CASES: &[(&str, &[u32])] = &[",
    ]
    for s in CHECK_STRINGS:
        lines.append(f"    ({_rust_str(s)}, &{tk.encode(s, add_special_tokens=False).ids}),")
    lines += [
        "];",
        "",
        "/// (name, messages as (role, content), enable_thinking, rendered text, ids)",
        "pub type ChatCase = (",
        "    &'static str,",
        "    &'static [(&'static str, &'static str)],",
        "    bool,",
        "    &'static str,",
        "    &'static [u32],",
        ");",
        "",
        "pub const CHAT_CASES: &[ChatCase] = &[",
    ]
    for name, case in CHAT_CASES.items():
        kw = dict(add_generation_prompt=True, enable_thinking=case["enable_thinking"])
        text = hf.apply_chat_template(case["messages"], tokenize=False, **kw)
        ids = hf.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kw)
        msgs = ", ".join(f"({_rust_str(m['role'])}, {_rust_str(m['content'])})" for m in case["messages"])
        lines += [
            "    (",
            f"        {_rust_str(name)},",
            f"        &[{msgs}],",
            f"        {'true' if case['enable_thinking'] else 'false'},",
            f"        {_rust_str(text)},",
            f"        &{list(ids)},",
            "    ),",
        ]
    lines.append("];")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="after writing, load with HF tokenizers/transformers and print reference values")
    ap.add_argument("--rust-expected", action="store_true",
                    help="print the Rust test fixture (tests/common/hf_expected.rs) instead of writing files")
    args = ap.parse_args()
    if args.rust_expected:
        sys.stdout.write(rust_expected())
        return
    vocab, merges = build_vocab()
    write("tokenizer.json", json.dumps(build_tokenizer_json(vocab, merges), ensure_ascii=False, indent=2) + "\n")
    write("tokenizer_config.json", json.dumps(build_tokenizer_config(), ensure_ascii=False, indent=2) + "\n")
    write("chat_template.jinja", CHAT_TEMPLATE)
    if args.check:
        check()


# ---------------------------------------------------------------------------------------------------
# Gemma 4 chat template, verbatim. Source: github.com/ggml-org/llama.cpp
# models/templates/google-gemma-4-31B-it.jinja @ 3fc65063d9c356510b86fc2f15ca8aea711bfc47
# (blob 98da08eb6be6f7a353d390456a6c4cacf811c9ed, 16448 bytes, md5 e29ba282707607681d60c0fa7f3e9bf3).
CHAT_TEMPLATE = r"""{%- macro format_parameters(properties, required) -%}
    {%- set standard_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
    {%- set ns = namespace(found_first=false) -%}
    {%- for key, value in properties | dictsort -%}
        {%- set add_comma = false -%}
        {%- if key not in standard_keys -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {{ key }}:{
            {%- if value['description'] -%}
                description:<|"|>{{ value['description'] }}<|"|>
                {%- set add_comma = true -%}
            {%- endif -%}
            {%- if value['type'] | upper == 'STRING' -%}
                {%- if value['enum'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    enum:{{ format_argument(value['enum']) }}
                {%- endif -%}
            {%- elif value['type'] | upper == 'ARRAY' -%}
                {%- if value['items'] is mapping and value['items'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    items:{
                    {%- set ns_items = namespace(found_first=false) -%}
                    {%- for item_key, item_value in value['items'] | dictsort -%}
                        {%- if item_value is not none -%}
                            {%- if ns_items.found_first %},{% endif -%}
                            {%- set ns_items.found_first = true -%}
                            {%- if item_key == 'properties' -%}
                                properties:{
                                {%- if item_value is mapping -%}
                                    {{- format_parameters(item_value, value['items']['required'] | default([])) -}}
                                {%- endif -%}
                                }
                            {%- elif item_key == 'required' -%}
                                required:[
                                {%- for req_item in item_value -%}
                                    <|"|>{{- req_item -}}<|"|>
                                    {%- if not loop.last %},{% endif -%}
                                {%- endfor -%}
                                ]
                            {%- elif item_key == 'type' -%}
                                {%- if item_value is string -%}
                                    type:{{ format_argument(item_value | upper) }}
                                {%- else -%}
                                    type:{{ format_argument(item_value | map('upper') | list) }}
                                {%- endif -%}
                            {%- else -%}
                                {{ item_key }}:{{ format_argument(item_value) }}
                            {%- endif -%}
                        {%- endif -%}
                    {%- endfor -%}
                    }
                {%- endif -%}
            {%- endif -%}
            {%- if value['nullable'] %}
                {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                nullable:true
            {%- endif -%}
            {%- if value['type'] | upper == 'OBJECT' -%}
                {%- if value['properties'] is defined and value['properties'] is mapping -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    properties:{
                    {{- format_parameters(value['properties'], value['required'] | default([])) -}}
                    }
                {%- elif value is mapping -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    properties:{
                    {{- format_parameters(value, value['required'] | default([])) -}}
                    }
                {%- endif -%}
                {%- if value['required'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    required:[
                    {%- for item in value['required'] | default([]) -%}
                        <|"|>{{- item -}}<|"|>
                        {%- if not loop.last %},{% endif -%}
                    {%- endfor -%}
                    ]
                {%- endif -%}
            {%- endif -%}
            {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
            type:<|"|>{{ value['type'] | upper }}<|"|>}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool_data) -%}
    declaration:{{- tool_data['function']['name'] -}}{description:<|"|>{{- tool_data['function']['description'] -}}<|"|>
    {%- set params = tool_data['function']['parameters'] -%}
    {%- if params -%}
        ,parameters:{
        {%- if params['properties'] -%}
            properties:{ {{- format_parameters(params['properties'], params['required']) -}} },
        {%- endif -%}
        {%- if params['required'] -%}
            required:[
            {%- for item in params['required'] -%}
                <|"|>{{- item -}}<|"|>
                {{- ',' if not loop.last -}}
            {%- endfor -%}
            ],
        {%- endif -%}
        {%- if params['type'] -%}
            type:<|"|>{{- params['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    {%- if 'response' in tool_data['function'] -%}
        {%- set response_declaration = tool_data['function']['response'] -%}
        ,response:{
        {%- if response_declaration['description'] -%}
            description:<|"|>{{- response_declaration['description'] -}}<|"|>,
        {%- endif -%}
        {%- if response_declaration['type'] | upper == 'OBJECT' -%}
            type:<|"|>{{- response_declaration['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    }
{%- endmacro -%}
{%- macro format_argument(argument, escape_keys=True) -%}
    {%- if argument is string -%}
        {{- '<|"|>' + argument + '<|"|>' -}}
    {%- elif argument is boolean -%}
        {{- 'true' if argument else 'false' -}}
    {%- elif argument is mapping -%}
        {{- '{' -}}
        {%- set ns = namespace(found_first=false) -%}
        {%- for key, value in argument | dictsort -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {%- if escape_keys -%}
                {{- '<|"|>' + key + '<|"|>' -}}
            {%- else -%}
                {{- key -}}
            {%- endif -%}
            :{{- format_argument(value, escape_keys=escape_keys) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif argument is sequence -%}
        {{- '[' -}}
        {%- for item in argument -%}
            {{- format_argument(item, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- argument -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- macro format_tool_response_block(tool_name, response) -%}
    {{- '<|tool_response>' -}}
    {%- if response is mapping -%}
        {{- 'response:' + tool_name + '{' -}}
        {%- for key, value in response | dictsort -%}
            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- '}' -}}
    {%- else -%}
        {{- 'response:' + tool_name + '{value:' + format_argument(response, escape_keys=False) + '}' -}}
    {%- endif -%}
    {{- '<tool_response|>' -}}
{%- endmacro -%}

{%- set ns = namespace(prev_message_type=None) -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{#- Handle System/Tool Definitions Block -#}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}

    {#- Inject Thinking token at the very top of the FIRST system turn -#}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>\n' -}}
        {%- set ns.prev_message_type = 'think' -%}
    {%- endif -%}

    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}

    {%- if tools -%}
        {%- for tool in tools %}
            {{- '<|tool>' -}}
            {{- format_function_declaration(tool) | trim -}}
            {{- '<tool|>' -}}
        {%- endfor %}
        {%- set ns.prev_message_type = 'tool' -%}
    {%- endif -%}

    {{- '<turn|>\n' -}}
{%- endif %}

{#- Pre-scan: find last user message index for reasoning guard -#}
{%- set ns_turn = namespace(last_user_idx=-1) -%}
{%- for i in range(loop_messages | length) -%}
    {%- if loop_messages[i]['role'] == 'user' -%}
        {%- set ns_turn.last_user_idx = i -%}
    {%- endif -%}
{%- endfor -%}

{#- Loop through messages -#}
{%- for message in loop_messages -%}
    {%- if message['role'] != 'tool' -%}
    {%- set ns.prev_message_type = None -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {#- Detect continuation: suppress duplicate <|turn>model when previous non-tool message was also assistant -#}
    {%- set prev_nt = namespace(role=None, found=false) -%}
    {%- if loop.index0 > 0 -%}
        {%- for j in range(loop.index0 - 1, -1, -1) -%}
            {%- if not prev_nt.found -%}
                {%- if loop_messages[j]['role'] != 'tool' -%}
                    {%- set prev_nt.role = loop_messages[j]['role'] -%}
                    {%- set prev_nt.found = true -%}
                {%- endif -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- set continue_same_model_turn = (role == 'model' and prev_nt.role == 'assistant') -%}
    {%- if not continue_same_model_turn -%}
        {{- '<|turn>' + role + '\n' }}
    {%- endif -%}

    {#- Render reasoning/reasoning_content as thinking channel -#}
    {%- set thinking_text = message.get('reasoning') or message.get('reasoning_content') -%}
    {%- if thinking_text and loop.index0 > ns_turn.last_user_idx and message.get('tool_calls') -%}
        {{- '<|channel>thought\n' + thinking_text + '\n<channel|>' -}}
    {%- endif -%}

            {%- if message['tool_calls'] -%}
                {%- for tool_call in message['tool_calls'] -%}
                    {%- set function = tool_call['function'] -%}
                    {{- '<|tool_call>call:' + function['name'] + '{' -}}
                    {%- if function['arguments'] is mapping -%}
                        {%- set ns_args = namespace(found_first=false) -%}
                        {%- for key, value in function['arguments'] | dictsort -%}
                            {%- if ns_args.found_first %},{% endif -%}
                            {%- set ns_args.found_first = true -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                        {%- endfor -%}
                    {%- elif function['arguments'] is string -%}
                        {{- function['arguments'] -}}
                    {%- endif -%}
                    {{- '}<tool_call|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_call' -%}
            {%- endif -%}

            {%- set ns_tr_out = namespace(flag=false) -%}
            {%- if message.get('tool_responses') -%}
                {#- Legacy: tool_responses embedded on the assistant message (Google/Gemma native) -#}
                {%- for tool_response in message['tool_responses'] -%}
                    {{- format_tool_response_block(tool_response['name'] | default('unknown'), tool_response['response']) -}}
                    {%- set ns_tr_out.flag = true -%}
                    {%- set ns.prev_message_type = 'tool_response' -%}
                {%- endfor -%}
            {%- elif message.get('tool_calls') -%}
                {#- OpenAI Chat Completions: forward-scan consecutive role:tool messages -#}
                {%- set ns_tool_scan = namespace(stopped=false) -%}
                {%- for k in range(loop.index0 + 1, loop_messages | length) -%}
                    {%- if ns_tool_scan.stopped -%}
                    {%- elif loop_messages[k]['role'] != 'tool' -%}
                        {%- set ns_tool_scan.stopped = true -%}
                    {%- else -%}
                        {%- set follow = loop_messages[k] -%}
                        {#- Resolve tool_call_id to function name -#}
                        {%- set ns_tname = namespace(name=follow.get('name') | default('unknown')) -%}
                        {%- for tc in message['tool_calls'] -%}
                            {%- if tc.get('id') == follow.get('tool_call_id') -%}
                                {%- set ns_tname.name = tc['function']['name'] -%}
                            {%- endif -%}
                        {%- endfor -%}
                        {#- Handle content as string or content-parts array -#}
                        {%- set tool_body = follow.get('content') -%}
                        {%- if tool_body is string -%}
                            {{- format_tool_response_block(ns_tname.name, tool_body) -}}
                        {%- elif tool_body is sequence and tool_body is not string -%}
                            {%- set ns_txt = namespace(s='') -%}
                            {%- for part in tool_body -%}
                                {%- if part.get('type') == 'text' -%}
                                    {%- set ns_txt.s = ns_txt.s + (part.get('text') | default('')) -%}
                                {%- endif -%}
                            {%- endfor -%}
                            {{- format_tool_response_block(ns_tname.name, ns_txt.s) -}}
                        {%- else -%}
                            {{- format_tool_response_block(ns_tname.name, tool_body) -}}
                        {%- endif -%}
                        {%- set ns_tr_out.flag = true -%}
                        {%- set ns.prev_message_type = 'tool_response' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

            {%- if message['content'] is string -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(message['content']) -}}
                {%- else -%}
                    {{- message['content'] | trim -}}
                {%- endif -%}
            {%- elif message['content'] is sequence -%}
                {%- for item in message['content'] -%}
                    {%- if item['type'] == 'text' -%}
                        {%- if role == 'model' -%}
                            {{- strip_thinking(item['text']) -}}
                        {%- else -%}
                            {{- item['text'] | trim -}}
                        {%- endif -%}
                    {%- elif item['type'] == 'image' -%}
                        {{- '<|image|>' -}}
                        {%- set ns.prev_message_type = 'image' -%}
                    {%- elif item['type'] == 'audio' -%}
                        {{- '<|audio|>' -}}
                        {%- set ns.prev_message_type = 'audio' -%}
                    {%- elif item['type'] == 'video' -%}
                        {{- '<|video|>' -}}
                        {%- set ns.prev_message_type = 'video' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

        {%- if ns.prev_message_type == 'tool_call' and not ns_tr_out.flag -%}
            {{- '<|tool_response>' -}}
        {%- elif not (ns_tr_out.flag and not message.get('content')) -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {%- if ns.prev_message_type != 'tool_response' and ns.prev_message_type != 'tool_call' -%}
        {{- '<|turn>model\n' -}}
        {%- if not enable_thinking | default(false) -%}
            {{- '<|channel>thought\n<channel|>' -}}
        {%- endif -%}
    {%- endif -%}
{%- endif -%}
"""

if __name__ == "__main__":
    main()
