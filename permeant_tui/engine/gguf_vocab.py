"""`tokenizers.Tokenizer` objects rebuilt from a GGUF vocabulary, tokenizing as llama.cpp does.

Two vocabulary kinds (`tokenizer.ggml.model`):

- "gpt2": byte-level BPE. llama.cpp splits the text with a list of regexes chosen by
  `tokenizer.ggml.pre` (each regex splits the pieces the previous one left; text between
  matches is kept as its own piece), maps bytes to GPT-2's printable characters and applies the
  merges. The regexes below are llama.cpp's (src/llama-vocab.cpp, `llm_tokenizer_bpe`), as
  `Split(..., "isolated")` pre-tokenizers in the same order. Llama 3's family also looks a whole
  piece up in the vocabulary before merging (`ignore_merges`).
- "llama": SentencePiece (Gemma, Llama 2, Mistral v0.1). llama.cpp's SPM tokenizer starts from
  characters and repeatedly merges the adjacent pair whose concatenation is a vocabulary token
  with the highest score, falling back to `<0xXX>` byte tokens. That is a BPE whose merge ranks
  are the scores of the merged pieces: the merges are derived here from the vocabulary as
  Hugging Face's SentencePiece converter does, with byte fallback. Spaces become "▁"; a space
  is prefixed only when `tokenizer.ggml.add_space_prefix` says so (Gemma: no).

Control, unknown and user-defined tokens are matched in raw text before any of this (llama.cpp
`tokenizer_st_partition` with parse_special=True): added tokens, not normalized.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS
          + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS
          + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _family(names: str, regexes: list[str], ignore_merges: bool = False) -> dict:
    return {n: (regexes, ignore_merges) for n in names.split()}


# tokenizer.ggml.pre -> (regexes in order, ignore_merges), as llama.cpp's llama-vocab.cpp
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    **_family("default", [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
              [_LLAMA3], ignore_merges=True),
    **_family("dbrx smaug-bpe chatglm-bpe", [_LLAMA3]),
    **_family("glm4 glm5", [_LLAMA3], ignore_merges=True),
    **_family("falcon", [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]),
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
              [r"\p{N}", _GPT2]),
    **_family("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum "
              "modern-bert mpt olmo jais trillion granite-docling exaone4 jina-v1-en "
              "jina-v2-code roberta-bpe", [_GPT2]),
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open",
              [_QWEN2]),
    **_family("qwen35", [_QWEN35]),
    **_family("tekken", [_TEKKEN], ignore_merges=True),
    **_family("gpt-4o llama4 kanana2 talkie minimax-m2", [_GPT4O]),
}
# pre-tokenizers for which llama.cpp adds a BOS token unless the file says otherwise
ADD_BOS_BY_DEFAULT = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                      "midm-2.0", "lfm2", "tekken"}


def special_tokens(vocab: list[str], types) -> list:
    """AddedTokens for what llama.cpp partitions out of raw text: control and unknown tokens
    (special: skipped by decode(skip_special_tokens=True)) and user-defined ones (not)."""
    from tokenizers import AddedToken

    out = []
    for i, t in enumerate(types):
        if t in (_CONTROL, _UNKNOWN, _USER_DEFINED) and vocab[i]:
            out.append(AddedToken(vocab[i], special=(t != _USER_DEFINED), normalized=False))
    return out


def bpe_tokenizer(meta: dict, vocab: list[str], types, path: Path | str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}); pass an MLX model directory instead")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                     byte_fallback=False, ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens(vocab, types))
    return tok


def spm_merges(vocab: list[str], scores, types) -> list[tuple[int, int]]:
    """Merge ranks equivalent to SentencePiece-BPE scores (HF's SentencePieceExtractor):
    every split of a vocabulary piece into two vocabulary pieces, ordered by the piece's score
    (highest first), ties by the pieces' ids. Returned as id pairs (cacheable as numbers)."""
    import numpy as np

    get = {t: i for i, t in enumerate(vocab)}.get
    neg = (-np.asarray(scores, dtype=np.float64)).tolist()
    skip = set(np.nonzero(np.asarray(types) == _BYTE)[0].tolist())
    found: list[tuple[float, int, int, int]] = []
    add = found.append
    for i, piece in enumerate(vocab):
        if len(piece) < 2 or i in skip:
            continue
        for k in range(1, len(piece)):
            li = get(piece[:k])
            if li is not None:
                ri = get(piece[k:])
                if ri is not None:
                    add((neg[i], i, li, ri))
    found.sort()
    return [(li, ri) for _, _, li, ri in found]


def _cached_spm_merges(vocab, scores, types, cache_key: str | None) -> list[tuple[str, str]]:
    """spm_merges, kept as an int32 array beside the cached weights (seconds -> milliseconds
    for Gemma's 514,847 merges); the key is the GGUF's content digest."""
    import numpy as np

    from .atomic import write_atomic
    from .weights_cache import LOADER_VERSION, models_cache_dir

    path = models_cache_dir() / "tokenizers" / f"{cache_key}-spm-merges-v{LOADER_VERSION}.npy"
    if cache_key is not None and path.is_file():
        try:
            pairs = np.load(path, allow_pickle=False)
            if pairs.ndim == 2 and pairs.shape[1] == 2 and (pairs.size == 0 or
                                                            int(pairs.max()) < len(vocab)):
                return _pairs_as_strings(vocab, pairs)
        except (OSError, ValueError):
            pass  # rebuilt below
    arr = np.asarray(spm_merges(vocab, scores, types), dtype=np.int32).reshape(-1, 2)
    if cache_key is not None:
        try:
            write_atomic(path, lambda f: np.save(f, arr, allow_pickle=False), durable=False)
        except OSError:
            pass  # a cache, not a requirement
    return _pairs_as_strings(vocab, arr)


def _pairs_as_strings(vocab: list[str], pairs) -> list[tuple[str, str]]:
    import numpy as np

    words = np.empty(len(vocab), dtype=object)
    words[:] = vocab
    return list(zip(words[pairs[:, 0]].tolist(), words[pairs[:, 1]].tolist(), strict=True))


def spm_tokenizer(meta: dict, vocab: list[str], types, path: Path | str,
                  cache_key: str | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers

    if "tokenizer.ggml.scores" not in meta:
        raise ModelLoadError(f"{path}: SentencePiece GGUF vocabulary without scores")
    scores = meta["tokenizer.ggml.scores"]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)},
                     merges=_cached_spm_merges(vocab, scores, types, cache_key),
                     unk_token=vocab[int(unk)] if unk is not None else None,
                     byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens(special_tokens(vocab, types))
    return tok
