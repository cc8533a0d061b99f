"""A tokenizer rebuilt from GGUF metadata, shaped the way mlx_lm's TokenizerWrapper expects.

The `tokenizers.Tokenizer` itself comes from `gguf_vocab.py` (byte-level BPE per llama.cpp
pre-tokenizer, or SentencePiece), checked against llama.cpp's own tokenizer on the same file
in tests/engine/test_gguf_tokenizer.py. Here: the wrapper, the chat format and the stop tokens.

- Chat template: the GGUF's `tokenizer.chat_template`, rendered in a sandboxed Jinja
  environment. A file without one is a base model: Gemma files get Gemma's turn format
  (`<start_of_turn>user ... <end_of_turn>`), others a plain "Role: text" transcript;
  `chat_format` and `is_base_model` say which, for the UI and `status`.
- Stop tokens: the metadata's EOS, EOT and EOM ids, plus the token the chat format itself
  writes after an assistant turn (found by rendering one, not from a list of known names).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

_CONTROL, _USER_DEFINED = 3, 4

# Gemma's own turn format (google/gemma-3-*-it), text only: the base model has no template.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
PLAIN_TRANSCRIPT = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{{ (message['role'] | capitalize) + ': ' + (message['content'] | trim) + '\n\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


class GgufTokenizer:
    """The subset of a Hugging Face tokenizer that mlx_lm and this project use."""

    def __init__(self, tok, vocab: list[str], specials: dict[str, int], bos_id: int | None,
                 eos_id: int | None, chat_template: str | None, add_bos: bool,
                 chat_format: str = "gguf template"):
        self._tok = tok
        self._vocab = vocab
        self._ids = {t: i for i, t in enumerate(vocab)}
        self.specials = specials
        self.bos_token_id = bos_id
        self.eos_token_id = eos_id
        self.bos_token = vocab[bos_id] if bos_id is not None else None
        self.eos_token = vocab[eos_id] if eos_id is not None else None
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.chat_format = chat_format
        self._template: Any = None  # a jinja2 Template, compiled on first use

    @property
    def is_base_model(self) -> bool:
        """No chat template in the file: the chat format is ours, not the model's training."""
        return self.chat_format != "gguf template"

    def __len__(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> list[str]:
        return self._vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._vocab[ids]
        return [self._vocab[i] for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._ids.get(tokens)
        return [self._ids.get(t) for t in tokens]

    def apply_chat_template(self, messages, tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs):
        if self.chat_template is None:
            raise ModelLoadError("this model has no chat template in its metadata")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        kwargs.pop("return_dict", None)
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
        )
        return self.encode(text) if tokenize else text


GEMMA_FORMAT = "gemma turns (base model)"
PLAIN_FORMAT = "plain transcript (base model)"


def chat_format_of_meta(meta: dict, specials) -> str:
    """How a GGUF's turns are rendered: its own template ("gguf template"), or for a base model
    without one Gemma's turn format (a gemma file with `<start_of_turn>`) or a plain
    transcript. `specials`: the control / user-defined token names."""
    if meta.get("tokenizer.chat_template") is not None:
        return "gguf template"
    gemma = str(meta.get("general.architecture", "")).startswith("gemma") and \
        "<start_of_turn>" in specials
    return GEMMA_FORMAT if gemma else PLAIN_FORMAT


def _sid(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    v = int(v.item() if hasattr(v, "item") else v)
    return v if v >= 0 else None


def end_of_turn_id(tok: GgufTokenizer) -> int | None:
    """The special token the chat format writes right after an assistant's text, if any."""
    marker = "\u2063reply\u2063"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing about stops
        return None
    _, found, after = text.partition(marker)
    if not found or not after:
        return None
    ids = tok.encode(after)
    return ids[0] if ids and ids[0] in tok.specials.values() else None


def tokenizer_from_gguf(meta: dict, path: Path | str = "<gguf>", cache_key: str | None = None):
    """-> mlx_lm TokenizerWrapper around a GgufTokenizer. `cache_key` (the file's digest) lets
    a SentencePiece vocabulary's derived merges be cached."""
    import numpy as np
    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        SPMStreamingDetokenizer,
        TokenizerWrapper,
    )

    from .gguf_vocab import ADD_BOS_BY_DEFAULT, bpe_tokenizer, spm_tokenizer

    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{path}: GGUF file has no tokenizer vocabulary")
    vocab: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(vocab))), dtype=np.int64)
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    if kind == "gpt2":
        tok = bpe_tokenizer(meta, vocab, types, path)
        detok = BPEStreamingDetokenizer
        add_bos_default = pre in ADD_BOS_BY_DEFAULT
    elif kind == "llama":
        tok = spm_tokenizer(meta, vocab, types, path, cache_key)
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        detok = partial(SPMStreamingDetokenizer, trim_space=prefix)
        add_bos_default = True
    else:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (BPE 'gpt2' and "
            "SentencePiece 'llama' vocabularies are); pass an MLX model directory instead")
    special_ids = [int(i) for i in np.nonzero((types == _CONTROL) | (types == _USER_DEFINED))[0]]
    specials = {vocab[i]: i for i in special_ids}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    template = meta.get("tokenizer.chat_template")
    chat_format = chat_format_of_meta(meta, specials)
    if template is None:
        template = GEMMA_TURNS if chat_format == GEMMA_FORMAT else PLAIN_TRANSCRIPT
    base = GgufTokenizer(tok, vocab, specials, _sid(meta, "tokenizer.ggml.bos_token_id"),
                         _sid(meta, "tokenizer.ggml.eos_token_id"), template, add_bos,
                         chat_format)
    eos = {i for i in (_sid(meta, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
           if i is not None}
    turn_end = end_of_turn_id(base)
    if turn_end is not None:
        eos.add(turn_end)
    return TokenizerWrapper(base, detokenizer_class=detok, eos_token_ids=eos)
