"""CLIP-style BPE tokenizers: small ones learned from a corpus, and the real CLIP vocabulary.

Tiny models: no installed package ships CLIP's BPE vocabulary, and the real one (49,408
tokens) would dominate a tiny text encoder, so we learn byte-level BPE merges on the
world's own corpus and lay the result out exactly as CLIP does: the 256 byte symbols, the
same with `</w>`, the learned merges in order, then `<|startoftext|>` and `<|endoftext|>`.
`CLIPTokenizer.from_pretrained(folder)` then loads it like any CLIP tokenizer; words the
corpus never saw still split into byte pieces, never into `<|endoftext|>`.

The shapes base model uses the real CLIP merges, taken from the open-clip-torch wheel on
PyPI (`fetch_clip_bpe`), in the same layout, so narrative words get real tokens.
"""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex
from transformers import CLIPTokenizer

CLIP_BPE_PACKAGE = "open-clip-torch==3.3.0"  # its wheel bundles OpenAI's CLIP BPE (MIT)
CLIP_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # 49,408 tokens = 2 x 256 bytes + merges + 2 specials
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word split: contractions, letter runs, single digits, punctuation runs.
CLIP_WORD_REGEX = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode symbol, in GPT-2/CLIP order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return dict(sorted(symbols.items(), key=lambda kv: (kv[0] not in printable, kv[0])))


def learn_bpe_merges(corpus: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[str]:
    """Learn up to `num_merges` CLIP-style BPE merges (`"a b"` strings) from `corpus`.

    Classic BPE over CLIP's pre-tokenisation (lower-cased, NFC, CLIP's word pattern, bytes as
    symbols, `</w>` on the last symbol). Ties go to the lexicographically smallest pair, so the
    result is the same in every process. (`tokenizers`' trainer breaks ties by hash order,
    which differs between processes: a tiny model's vocabulary would change run to run.)
    """
    symbols_of = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus:
        for word in CLIP_WORD_REGEX.findall(unicodedata.normalize("NFC", line).lower()):
            symbols = [symbols_of[byte] for byte in word.encode("utf-8")]
            words[(*symbols[:-1], symbols[-1] + END_OF_WORD)] += 1
    merges: list[str] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < min_frequency:
            break
        merges.append(" ".join(best))
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(word[index] + word[index + 1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)


def write_clip_tokenizer(merges: list[str], out_dir: str | Path, model_max_length: int) -> Path:
    """Write `vocab.json`, `merges.txt` and configs for a CLIP tokenizer; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    tokens += [merge.replace(" ", "") for merge in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def build_clip_tokenizer(
    corpus: Iterable[str],
    out_dir: str | Path,
    num_merges: int,
    model_max_length: int,
    min_frequency: int = 2,
) -> CLIPTokenizer:
    """Train merges on `corpus`, write them to `out_dir` and load them as a `CLIPTokenizer`.

    Raises RuntimeError if the loaded tokenizer lost the vocabulary (a transformers-5 pitfall).
    """
    merges = learn_bpe_merges(corpus, num_merges, min_frequency)
    folder = write_clip_tokenizer(merges, out_dir, model_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if tokenizer.vocab_size <= 2 * len(bytes_to_unicode()):
        raise RuntimeError(f"tokenizer in {folder} loaded without its vocabulary")
    return tokenizer


def clip_merges(bpe_gz: str | Path) -> list[str]:
    """Return the real CLIP merges from OpenAI's `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    return lines[1 : CLIP_NUM_MERGES + 1]


def fetch_clip_bpe(cache_dir: Path) -> Path:
    """Return CLIP's BPE file, taken from the open-clip-torch wheel on PyPI on first use.

    Only the wheel is downloaded (no dependencies, nothing installed). Raises RuntimeError
    when pip cannot fetch it.
    """
    target = cache_dir / Path(CLIP_BPE_MEMBER).name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", folder]
        result = subprocess.run([*command, CLIP_BPE_PACKAGE], capture_output=True, text=True)
        wheels = list(Path(folder).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {CLIP_BPE_PACKAGE}: {result.stderr[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.write_bytes(wheel.read(CLIP_BPE_MEMBER))
    return target
