"""Reading back the small JSON files a run writes (config.json, best.json, index metadata):
damage (a truncated copy, a hand edit) is one line naming the file, the fault and the remedy."""

import json
import os


class DamagedFile(ValueError):
  """A file the project wrote and reads back is missing parts or is not the JSON it wrote."""


def read(path: str, remedy: str, expect: type = dict):
  """The JSON value in `path` (of type `expect`); DamagedFile if it cannot be parsed.

  `remedy` says what to do, e.g. 'rebuild it with `...`'. A missing file raises
  FileNotFoundError as open() does: callers decide whether absence is normal.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    value = json.loads(raw.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise DamagedFile(f'{path} is damaged: not UTF-8 text ({e.reason} at byte {e.start}); '
                      f'{remedy}') from None
  except json.JSONDecodeError as e:
    what = 'empty' if not raw.strip() else f'not valid JSON ({e})'
    raise DamagedFile(f'{path} is damaged: {what}; {remedy}') from None
  if not isinstance(value, expect):
    raise DamagedFile(f'{path} is damaged: expected a JSON {expect.__name__}, found '
                      f'{type(value).__name__}; {remedy}')
  return value


def write_atomically(path: str, value, **dump_args) -> None:
  """Writes `path` through a temporary file and a rename: a crash leaves the old or the new."""
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, **dump_args)
  os.replace(path + '.tmp', path)
