"""The tokenizer rebuilt from GGUF metadata reproduces llama.cpp's ids (fixture from llama.cpp)."""

import json
import subprocess
import sys


def test_every_fixture_case_matches_llamacpp(real_model, tokenizer_cases):
    tok = real_model.tokenizer
    mismatches = [c["text"] for c in tokenizer_cases
                  if tok.encode(c["text"], add_special_tokens=False) != c["ids"]]
    assert len(tokenizer_cases) >= 30
    assert mismatches == []


def test_chat_template_renders_fixture_prompts(real_model, greedy_cases):
    tok = real_model.tokenizer
    for c in greedy_cases:
        msgs = [{"role": "system", "content": c["system"]}, {"role": "user", "content": c["user"]}]
        assert tok.apply_chat_template(msgs, add_generation_prompt=True) == c["prompt_ids"]


def test_decode_round_trips_text(real_model, tokenizer_cases):
    tok = real_model.tokenizer
    for c in tokenizer_cases:
        assert tok.decode(c["ids"]) == c["text"]


def test_tokenize_cli_parses_special_tokens(tokenizer_cases):
    text = "<|im_start|>user\nHello, world!<|im_end|>"
    out = subprocess.run([sys.executable, "-m", "permeant_tui.cli", "tokenize", "--json", text],
                         capture_output=True, text=True, check=True)
    ids = json.loads(out.stdout)
    assert ids[0] == 1 and ids[-1] == 2  # <|im_start|> and <|im_end|> as single special ids
    hello = next(c["ids"] for c in tokenizer_cases if c["text"] == "Hello, world!")
    assert ids[-1 - len(hello):-1] == hello
