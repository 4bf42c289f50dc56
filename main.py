"""The one entry point; the command line lives in aahr_jax/cli.py (also the `aahr-jax` command).

  python main.py --config configs/demo.py --workdir runs/demo                 # train + evaluate
  python main.py --config configs/demo.py --workdir runs/demo --mode eval     # re-evaluate
  python main.py --help                                                       # every flag and mode
"""

from aahr_jax import cli

if __name__ == '__main__':
  cli.run()
