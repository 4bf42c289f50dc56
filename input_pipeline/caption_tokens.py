"""A split's captions tokenised once into flat WordPiece arrays, and batch-level augmentation.

Tokenising per example in the training loop costs ~40 us a caption; doing it once when a split is
opened (~30 us a caption, in Rust batches) and keeping three flat int32 arrays (a few bytes per
piece) leaves only vectorised numpy work per batch. The augmentation is AAHR's word-level one
(docs/data.md 2.1), applied to whole batches at once with the same per-word rule.
"""

import dataclasses

import numpy as np

from input_pipeline import bert_tokenizer

ENCODE_CHUNK = 20000
SPECIAL_IDS = (bert_tokenizer.PAD_ID, bert_tokenizer.UNK_ID, bert_tokenizer.CLS_ID,
               bert_tokenizer.SEP_ID, bert_tokenizer.MASK_ID)


@dataclasses.dataclass(frozen=True)
class WordAugment:
  """AAHR's word-level augmentation: each word is selected with probability `select`; a
  selected word has all its pieces replaced by [MASK] (share `mask`), by uniformly drawn
  vocabulary ids (share `random`), or is deleted (share `delete`). The released code's values.
  `exclude_special`: random ids never [PAD]/[UNK]/[CLS]/[SEP]/[MASK] (quirk Q19 corrected; the
  original draws from the whole vocabulary)."""
  select: float = 0.2
  mask: float = 0.5
  random: float = 0.1
  delete: float = 0.4
  exclude_special: bool = False

  def __post_init__(self):
    shares = (self.mask, self.random, self.delete)
    if not 0 <= self.select <= 1 or min(shares) < 0 or abs(sum(shares) - 1) > 1e-9:
      raise ValueError(f'config.data.token_aug_probs = select {self.select}, mask {self.mask}, '
                       f'random {self.random}, delete {self.delete}: expected select in [0, 1] '
                       'and non-negative mask + random + delete = 1')


@dataclasses.dataclass
class CaptionTokens:
  """Caption c has pieces pieces[piece_start[c]:piece_start[c+1]] (no [CLS]/[SEP]); piece k
  belongs to word piece_word[k] (0-based within its caption); caption c has num_words[c] words."""
  pieces: np.ndarray        # int32 [P]
  piece_word: np.ndarray    # int32 [P]
  piece_start: np.ndarray   # int64 [C + 1]
  num_words: np.ndarray     # int32 [C]
  vocab_size: int

  @property
  def lengths(self) -> np.ndarray:
    """Token lengths with [CLS] and [SEP], before augmentation."""
    return np.diff(self.piece_start).astype(np.int32) + 2


def tokenize(captions: list[str], vocab_path: str | None = None) -> CaptionTokens:
  tokenizer = bert_tokenizer.get_tokenizer(vocab_path)
  pieces, piece_word, counts, words = [], [], [], []
  for lo in range(0, len(captions), ENCODE_CHUNK):
    for grouped in tokenizer.word_pieces_batch(captions[lo:lo + ENCODE_CHUNK]):
      flat = [p for w in grouped for p in w]
      pieces.append(np.asarray(flat, np.int32))
      piece_word.append(np.repeat(np.arange(len(grouped), dtype=np.int32),
                                  [len(w) for w in grouped]))
      counts.append(len(flat))
      words.append(len(grouped))
  start = np.zeros(len(captions) + 1, np.int64)
  np.cumsum(counts, out=start[1:])
  empty = np.zeros(0, np.int32)
  return CaptionTokens(np.concatenate(pieces) if pieces else empty,
                       np.concatenate(piece_word) if piece_word else empty,
                       start, np.asarray(words, np.int32), tokenizer.vocab_size)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + n) for each (s, n)."""
  total = int(lengths.sum())
  offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
  return np.arange(total) - offsets + np.repeat(starts, lengths)


def _skip_special(ids: np.ndarray) -> np.ndarray:
  """Uniform ids over [0, V - 5) -> uniform over the vocabulary without SPECIAL_IDS."""
  for special in sorted(SPECIAL_IDS):  # ascending: each shift can only meet later specials
    ids = ids + (ids >= special)
  return ids


def encode_batch(tokens: CaptionTokens, captions: np.ndarray, max_len: int,
                 rng: np.random.Generator | None = None, augment: WordAugment = WordAugment()):
  """[CLS] pieces [SEP] of each caption, padded with 0 to max_len: (ids [B, L], len [B],
  truncated [B]). With `rng`, the word-level augmentation first (`WordAugment`): one
  u ~ U[0,1) per word; with the defaults u < 0.1 -> every piece [MASK]; u < 0.12 -> every piece
  a uniform vocabulary id; u < 0.2 -> the word is deleted; otherwise kept. The draws are made
  for the whole batch in caption order, so a batch's result depends only on `rng`."""
  captions = np.asarray(captions, np.int64)
  starts = tokens.piece_start[captions]
  counts = tokens.piece_start[captions + 1] - starts
  index = _ranges(starts, counts)
  pieces = tokens.pieces[index]
  row = np.repeat(np.arange(len(captions)), counts)
  if rng is not None:
    words = tokens.num_words[captions].astype(np.int64)
    u = rng.random(int(words.sum()))
    if augment.exclude_special:
      random_ids = _skip_special(rng.integers(0, tokens.vocab_size - len(SPECIAL_IDS),
                                              size=len(pieces), dtype=np.int64))
    else:
      random_ids = rng.integers(0, tokens.vocab_size, size=len(pieces), dtype=np.int64)
    word_of_piece = np.repeat(np.cumsum(words) - words, counts) + tokens.piece_word[index]
    draw = u[word_of_piece]
    to_mask = augment.select * augment.mask
    to_random = augment.select * (augment.mask + augment.random)
    pieces = np.where(draw < to_mask, bert_tokenizer.MASK_ID,
                      np.where(draw < to_random, random_ids, pieces)).astype(np.int32)
    kept = ~((draw >= to_random) & (draw < augment.select))
    pieces, row = pieces[kept], row[kept]
    counts = np.bincount(row, minlength=len(captions))
  lengths = counts + 2
  truncated = lengths > max_len
  position = np.arange(len(pieces)) - np.repeat(np.cumsum(counts) - counts, counts) + 1
  fits = position < max_len - 1
  ids = np.zeros((len(captions), max_len), np.int32)
  ids[:, 0] = bert_tokenizer.CLS_ID
  ids[row[fits], position[fits]] = pieces[fits]
  lengths = np.minimum(lengths, max_len).astype(np.int32)
  ids[np.arange(len(captions)), lengths - 1] = bert_tokenizer.SEP_ID
  return ids, lengths, truncated
