"""One Markdown report from the JSON files of benchmarks/train_step.py runs (gpu_suite.sh).

  python -m benchmarks.suite_report a.json b.json [--markdown results.md]

Missing or unreadable files are listed, not fatal: a suite cut short still reports what ran.
"""

import argparse
import json
import os

from benchmarks import train_step


def report(paths: list[str]) -> str:
  parts, missing = [], []
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      missing.append(f'{os.path.basename(path)} ({type(e).__name__})')
      continue
    parts.append(train_step.table(data))
    first = data
  if not parts:
    return 'No results: ' + ', '.join(missing) + '\n'
  software = ', '.join(f'{k} {v}' for k, v in first['software'].items())
  head = [f"Device: {first['device']}. Date: {first['date']}. Software: {software}.", '']
  tail = ([''] + [f'Not run or cut short before writing results: {", ".join(missing)}.']
          if missing else [])
  return '\n'.join(head + ['\n\n'.join(parts)] + tail) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('paths', nargs='+')
  parser.add_argument('--markdown', default='')
  args = parser.parse_args()
  text = report(args.paths)
  if args.markdown:
    with open(args.markdown, 'w', encoding='utf-8') as f:
      f.write(text)
  print(text)


if __name__ == '__main__':
  main()
