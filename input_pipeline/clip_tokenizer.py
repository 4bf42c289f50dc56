"""CLIP byte-level BPE tokenisation with the ids of `open_clip.tokenize`, on the fast `tokenizers`.

open_clip cleans each caption in Python (ftfy, HTML unescape twice, whitespace collapse, lower
case), splits it with one regex, byte-encodes each piece and applies BPE with a '</w>' end-of-word
marker. We do the same cleaning, then let a `tokenizers` BPE built from open_clip's merges file do
the splitting and merging. Rows are `<start_of_text> pieces <end_of_text>` padded with 0 to the
context length; longer captions are cut and end with `<end_of_text>`, as open_clip does.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os

import numpy as np
import tokenizers

CONTEXT_LENGTH = 77
START_TOKEN, END_TOKEN = '<start_of_text>', '<end_of_text>'
# open_clip's split: contractions, letter runs, single digits, runs of other non-space symbols.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
NUM_MERGES = 49152 - 256 - 2   # open_clip uses merges file lines 1..48894


def default_bpe_path() -> str:
  """The merges file shipped in the open_clip package (found without importing torch)."""
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('open_clip is not installed, so its BPE merges file '
                            '(bpe_simple_vocab_16e6.txt.gz) cannot be found; pass bpe_path.')
  return os.path.join(spec.submodule_search_locations[0], 'bpe_simple_vocab_16e6.txt.gz')


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (the BPE alphabet)."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  table = {b: chr(b) for b in printable}
  for extra, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + extra)
  return table


def clean(text: str) -> str:
  """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse spaces, lower."""
  import ftfy
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split()).lower()


class CLIPTokenizer:
  """Captions -> (n, context_length) int32 ids, equal to `open_clip.tokenize`."""

  def __init__(self, bpe_path: str | None = None, context_length: int = CONTEXT_LENGTH):
    self.bpe_path = bpe_path or default_bpe_path()
    self.context_length = context_length
    with gzip.open(self.bpe_path, 'rt', encoding='utf-8') as f:
      merges = [tuple(line.split()) for line in f.read().split('\n')[1:NUM_MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + '</w>' for c in alphabet] + [''.join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}   # a repeated token keeps its last id
    self.vocab_size = len(tokens)
    self.start_id, self.end_id = vocab[START_TOKEN], vocab[END_TOKEN]

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges,
                                                     end_of_word_suffix='</w>'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        # invert=True: the regex matches the pieces; the rest (whitespace) is dropped.
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior='removed',
                                        invert=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # open_clip's regex matches its special tokens first, so literal ones map to their ids.
    tok.add_special_tokens([START_TOKEN, END_TOKEN])
    self._tok = tok

  def encode(self, text: str) -> list[int]:
    """BPE ids of one caption, without start/end tokens or truncation."""
    return self._tok.encode(clean(text), add_special_tokens=False).ids

  def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = context_length or self.context_length
    encodings = self._tok.encode_batch([clean(t) for t in texts], add_special_tokens=False)
    ids = np.zeros((len(texts), length), np.int32)
    for row, encoding in enumerate(encodings):
      tokens = [self.start_id, *encoding.ids, self.end_id][:length]
      tokens[-1] = self.end_id      # a cut caption still ends with <end_of_text>
      ids[row, :len(tokens)] = tokens
    return ids


@functools.lru_cache(maxsize=2)
def get_tokenizer(bpe_path: str | None = None) -> CLIPTokenizer:
  return CLIPTokenizer(bpe_path)


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Drop-in for `open_clip.tokenize`, returning numpy int32."""
  return get_tokenizer()(texts, context_length)
