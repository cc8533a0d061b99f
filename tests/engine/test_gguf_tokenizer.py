"""Tokenizers rebuilt from GGUF metadata agree with llama.cpp's own tokenizer on the same file,
in the same run (llama-cpp-python with vocab_only=True: no weights are loaded), over a corpus
of hard strings. Byte-level BPE per pre-tokenizer (the SmolLM2 vocabulary under each pre-type's
rules) and SentencePiece (a small Gemma-shaped vocabulary; the real Gemma 3 in
test_gguf_gemma.py)."""

from __future__ import annotations

import pytest
from support.tiny_gguf import (
    BPE_SPECIALS,
    HARD_TEXTS,
    SPM_SPECIALS,
    llama_cpp_vocab,
    mismatches,
    random_model,
    smollm2_tokenizer_meta,
    spm_tokenizer_meta,
    write_gguf,
)

from permeant_tui.engine.gguf_reader import open_gguf
from permeant_tui.engine.gguf_tokenizer import tokenizer_from_gguf

CONFIG = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=2048, tie_word_embeddings=True)


def _tiny(tmp_path, tok: dict, name: str, arch: str = "qwen2", model_type: str = "qwen2"):
    config = {**CONFIG, "vocab_size": len(tok["tokenizer.ggml.tokens"])}
    if arch == "gemma3":
        config.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, arch, random_model(model_type, config), config, tok)
    return path


@pytest.fixture(scope="module")
def smol_meta():
    return smollm2_tokenizer_meta()


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-2", "default",
                                 "falcon", "deepseek-r1-qwen", "tekken", "gpt-4o"])
def test_bpe_pre_tokenizers_match_llamacpp(tmp_path, smol_meta, pre):
    path = _tiny(tmp_path, {**smol_meta, "tokenizer.ggml.pre": pre}, pre)
    f = open_gguf(path)
    ours = tokenizer_from_gguf(f.metadata, path)
    llm = llama_cpp_vocab(path)
    texts = HARD_TEXTS + BPE_SPECIALS + ["1234567890123", "x = 1000000 // 7", "a1b22c333d4444"]
    assert mismatches(ours, llm, texts) == []
    assert mismatches(ours, llm, ["Hello", "<|im_start|>x"], add_bos=True) == []


def test_llama3_rules_keep_digit_groups_of_three(tmp_path, smol_meta):
    """What the old fixed Digits(individual) pre-tokenizer got wrong for Llama 3 vocabularies."""
    path = _tiny(tmp_path, {**smol_meta, "tokenizer.ggml.pre": "llama-bpe"}, "llama3")
    ours = tokenizer_from_gguf(open_gguf(path).metadata, path)
    split = ours._tokenizer._tok.pre_tokenizer.pre_tokenize_str("12345 x")
    assert [p for p, _ in split] == ["123", "45", "Ġx"]


@pytest.mark.parametrize("prefix", [False, True])
def test_sentencepiece_matches_llamacpp(tmp_path, prefix):
    """Gemma-shaped SentencePiece vocabulary (no space prefix, like Gemma) and Llama-2 style
    (space prefix, also after every special token)."""
    tok = spm_tokenizer_meta(add_space_prefix=prefix)
    path = _tiny(tmp_path, tok, f"spm-{prefix}", arch="gemma3", model_type="gemma3_text")
    ours = tokenizer_from_gguf(open_gguf(path).metadata, path)
    llm = llama_cpp_vocab(path)
    texts = HARD_TEXTS + SPM_SPECIALS + ["hello world", "the theory of the thing",
                                         "Hello hello HELLO", "return x123 00 café"]
    assert mismatches(ours, llm, texts) == []
    assert mismatches(ours, llm, ["hello", "<start_of_turn>x"], add_bos=True) == []
    if not prefix:  # with a space prefix (Llama 2) decoding adds spaces after special tokens
        for text in texts:
            if "<" not in text:
                assert ours.decode(ours.encode(text)) == text


def test_stop_tokens_come_from_metadata_and_the_template(smol_meta):
    ours = tokenizer_from_gguf(smol_meta)
    im_end = ours.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ours.eos_token_ids
    meta = {**smol_meta, "tokenizer.ggml.eot_token_id": 0}
    assert 0 in tokenizer_from_gguf(meta).eos_token_ids


def test_gguf_without_template_is_a_base_model(smol_meta):
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.chat_template"}
    ours = tokenizer_from_gguf(meta)
    inner = ours._tokenizer
    assert inner.is_base_model and inner.chat_format == "plain transcript (base model)"
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}],
                                    add_generation_prompt=True, tokenize=False)
    assert text.endswith("User: Hi\n\nAssistant:")
