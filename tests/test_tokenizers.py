"""Our tokenizers give the reference ids: open_clip.tokenize for CLIP, transformers for BERT."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import pytest

from input_pipeline import bert_tokenizer, clip_tokenizer

HANDWRITTEN = [
    'A man riding a wave on top of a surfboard.',
    "IT'S a dog's   life\tin\nthe city; they're HERE, I'll go, we've won, he'd say, I'm O'Neil",
    'Café déjà vu — naïve façade in São Paulo, Zürich & Ångström; crème brûlée, jalapeño.',
    '12,345 apples, 3.5 oranges, $19.99, 42%, 10:30pm, 2nd place, 1st-class, 2024-01-31',
    '&amp;lt;b&amp;gt; bold &quot;quoted&quot; &#39;single&#39; &nbsp;space',
    'Ã©tÃ© mojibake â€œquotesâ€\x9d',
    '日本語のテキスト and 中文字符 mixed with Ελληνικά, русский текст, العربية',
    'emoji 😀🎉👍🏽 and symbols ©®™ ½ ¼ → ← ∑ √ ∞',
    '<end_of_text> literal <start_of_text> tokens',
    '', '   ', '.', '!!!???...', 'a', 'x' * 300, 'supercalifragilisticexpialidocious' * 4,
    ' '.join(['word'] * 100), 'non\xa0breaking\u2009thin\u200bzero width',
    'Tab\tseparated\tvalues\r\nand CRLF', 'UPPER lower MiXeD CaSe',
    "rock 'n' roll, ''double'' quotes, ``latex``", 'e-mail: someone@example.com http://x.org/a?b=c',
]
WORDS = ('a man woman child dog cat two three people sitting standing on in at near the of with '
         'red blue green large small riding bike street table pizza plate grass field water '
         'Frisbee GIRAFFE Kitchen bathroom skateboard motorcycle train bus').split()
EXTRAS = ['café', 'naïve', 'Zürich', 'résumé', 'piñata', 'Ærø', 'straße', 'İstanbul', 'ﬁne',
          "it's", "don't", "O'Brien", 'isn’t', '12', '3.14', '1,000', '50%', '#1', '$5', '10:45',
          ',', '.', '!', '?', ';', ':', '-', '—', '…', '(', ')', '"', "'", '/', '&', '@', '*',
          '&amp;', '&quot;', '日本', '😀', 'Ω', 'ß', 'ﬀ', '\t', '  ', '\n']


def varied_captions(n=300, seed=0):
  rng = np.random.default_rng(seed)
  captions = list(HANDWRITTEN)
  while len(captions) < n:
    length = int(rng.choice([3, 8, 12, 20, 40, 90]))   # 90 words runs past 77 CLIP tokens
    pool = WORDS if rng.random() < 0.5 else WORDS + EXTRAS
    pieces = [pool[i] for i in rng.integers(0, len(pool), length)]
    joiners = [' ' if rng.random() < 0.85 else '' for _ in pieces]
    captions.append(''.join(p + j for p, j in zip(pieces, joiners)))
  return captions


def test_clip_ids_equal_open_clip():
  open_clip = pytest.importorskip('open_clip')
  captions = varied_captions()
  ours = clip_tokenizer.tokenize(captions)
  want = open_clip.tokenize(captions).numpy()
  assert ours.shape == want.shape == (len(captions), 77)
  bad = [captions[i] for i in np.nonzero((ours != want).any(axis=1))[0]]
  assert not bad, f'{len(bad)} captions differ, e.g. {bad[:3]}'
  assert (ours[:, 0] == 49406).all() and (ours == 49407).sum(axis=1).min() == 1


def test_clip_truncation_and_context_length():
  open_clip = pytest.importorskip('open_clip')
  long = ' '.join(['giraffe'] * 200)
  for length in (77, 16):
    ours = clip_tokenizer.tokenize([long, 'a cat'], context_length=length)
    np.testing.assert_array_equal(ours, open_clip.tokenize([long, 'a cat'], length).numpy())
    assert ours[0, -1] == 49407


def test_bert_ids_equal_transformers():
  transformers = pytest.importorskip('transformers')
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
  vocab_path = bert_tokenizer.default_vocab_path()
  with open(vocab_path, encoding='utf-8') as f:
    vocab = {line.rstrip('\n'): i for i, line in enumerate(f)}
  # transformers 5: pass the vocab dict (vocab_file= silently yields a 5-token vocabulary).
  fast = transformers.BertTokenizer(vocab=vocab)
  slow = BertTokenizerLegacy(vocab_file=vocab_path)   # the pure-Python one the originals used
  assert len(fast) == len(slow) == 30522
  ours = bert_tokenizer.BertTokenizer()
  for caption in varied_captions():
    mine = ours.encode(caption)
    assert mine == fast(caption)['input_ids'], caption
    assert mine == slow(caption)['input_ids'], caption
