"""A tokenizer rebuilt from GGUF metadata, shaped the way mlx_lm's TokenizerWrapper expects.

For `gpt2`-style GGUF vocabularies (SmolLM2 and most llama-3-era models) a `tokenizers` BPE
with a Digits(individual) + ByteLevel pre-tokenizer reproduces llama.cpp's token ids (checked
against llama.cpp's output in tests/test_tokenizer.py). Control tokens (type 3) and
user-defined tokens (type 4) are special: parsed as one token when they occur in text, as
llama.cpp's tokenizer does with parse_special=True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelLoadError

_CONTROL, _USER_DEFINED = 3, 4


class GgufTokenizer:
    """The subset of a Hugging Face tokenizer that mlx_lm and this project use."""

    def __init__(self, tok, vocab: list[str], specials: dict[str, int], bos_id: int | None,
                 eos_id: int | None, chat_template: str | None, add_bos: bool):
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
        self._template: Any = None  # a jinja2 Template, compiled on first use

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


def tokenizer_from_gguf(meta: dict, path: Path | str = "<gguf>"):
    """-> mlx_lm TokenizerWrapper around a GgufTokenizer."""
    import numpy as np
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only BPE 'gpt2' vocabularies);"
            " pass an MLX model directory instead"
        )
    vocab: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = np.array(meta.get("tokenizer.ggml.token_type", np.ones(len(vocab))))

    def sid(key):
        v = meta.get(key)
        return int(v.item()) if v is not None else None

    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                     byte_fallback=False, ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special_ids = [int(i) for i in np.nonzero((types == _CONTROL) | (types == _USER_DEFINED))[0]]
    tok.add_special_tokens([AddedToken(vocab[i], special=True, normalized=False)
                            for i in special_ids])
    specials = {vocab[i]: i for i in special_ids}
    add_bos = bool(meta["tokenizer.ggml.add_bos_token"].item()) \
        if "tokenizer.ggml.add_bos_token" in meta else False
    base = GgufTokenizer(
        tok, vocab, specials, sid("tokenizer.ggml.bos_token_id"), sid("tokenizer.ggml.eos_token_id"),
        meta.get("tokenizer.chat_template"), add_bos,
    )
    eos = {base.eos_token_id} if base.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
        if name in specials:
            eos.add(specials[name])
    return TokenizerWrapper(base, detokenizer_class=BPEStreamingDetokenizer, eos_token_ids=eos)
