"""The CLIP BPE tokenizer of Stable Diffusion, built from the vocabulary a package ships.

open_clip and openai-clip both ship ``bpe_simple_vocab_16e6.txt.gz``; CLIP's
vocabulary is derived from it (byte symbols, their end-of-word forms, the merges,
and the two special tokens), which is exactly what ``CLIPTokenizer`` needs as
``vocab.json`` + ``merges.txt``. No download, no network.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def find_bpe_vocab() -> Path:
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root) / VOCAB_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{VOCAB_FILE} not found: install open-clip-torch (or openai-clip), which ships it"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(find_bpe_vocab()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` with the real 49408-token vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="antipers-bpe-") as tmp:
        vocab_path, merges_path = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_path.write_text(json.dumps(vocab))
        merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            str(vocab_path),
            str(merges_path),
            model_max_length=model_max_length,
            pad_token="<|endoftext|>",
        )
