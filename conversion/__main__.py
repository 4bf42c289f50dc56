"""Command line: `python -m conversion {bert,open_clip,...} --src SRC --out OUT [--verify]`."""

import argparse
import importlib
import sys

from conversion import ConversionError, torch_load

# A wrong or refused input file: one `error:` line and this status, as main.py does.
EXIT_BAD_INPUT = 2

# Subcommand name -> module. Each module provides `add_arguments(parser)`, `DESCRIPTION` and
# `run(args) -> int`; it is imported only when chosen, so torch loads only when needed.
SUBCOMMANDS = {
    'bert': 'conversion.bert',
    'open_clip': 'conversion.open_clip',
    'aahr': 'conversion.aahr',
    'vse_infty': 'conversion.vse_infty',
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m conversion', description=__doc__)
  subparsers = parser.add_subparsers(dest='subcommand', required=True, metavar='MODEL',
                                     help=f'one of: {", ".join(SUBCOMMANDS)}')
  modules = {}
  for name, module_name in SUBCOMMANDS.items():
    module = importlib.import_module(module_name)
    modules[name] = module
    sub = subparsers.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
    module.add_arguments(sub)
    torch_load.add_trust_flag(sub)
  args = parser.parse_args(argv)
  try:
    return modules[args.subcommand].run(args)
  except ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == '__main__':
  sys.exit(main())
