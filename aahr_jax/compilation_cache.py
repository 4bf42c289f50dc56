"""JAX's persistent compilation cache for `main.py`: a resumed, re-evaluated or repeated run loads
its compiled steps instead of compiling them again (the tests' tiny demo run: 28.6 s -> 14.5 s on
the 2-core CPU; the unrolled BERT-base step takes minutes to compile on a GPU).

The cache is keyed by the program, its shardings, the devices, jax/jaxlib and the XLA flags,
so an entry is only reused for the same computation: results are those of a fresh compile.
XLA:CPU also checks, when it loads an entry, that the host has every CPU feature the entry was
compiled for (an entry from another machine type is rejected and compiled again, never run).
On some Intel CPUs jax 0.9-0.10 rejects every CPU entry that way (jax-ml/jax#38445, logged as
"Target machine feature +prefer-no-gather is not supported"): the cache then never hits on the
CPU there, and costs only the writes.
JAX writes entries from process 0 only: multi-host runs share one directory (on the bucket mount
of a TPU pod slice, on the cluster's shared file system) or the other processes compile for
themselves.
"""

import os
import sys

import jax

# JAX's own variable for the directory; when set it is used unless --compilation_cache_dir is.
ENV_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
# The local default evicts least recently used entries beyond this size.
DEFAULT_MAX_BYTES = 4 * 2**30


def default_directory() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'aahr_jax', 'xla')


def resolve(flag_value: str | None) -> str | None:
  """The directory to use: the flag, else $JAX_COMPILATION_CACHE_DIR, else the default; None
  when the flag is 'off' (or empty)."""
  if flag_value is None:
    return os.environ.get(ENV_VARIABLE) or default_directory()
  if flag_value.strip().lower() in ('', 'off', 'none'):
    return None
  return flag_value


def enable(flag_value: str | None) -> str | None:
  """Points JAX's persistent cache at the resolved directory; returns it, or None if off.

  Must run before the first compilation. A local directory that cannot be created leaves the
  cache off with a warning: compiling again is slower but never wrong.
  """
  directory = resolve(flag_value)
  if directory is None:
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  local = '://' not in directory
  if local:
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
      os.makedirs(directory, exist_ok=True)
      if not os.access(directory, os.W_OK):
        raise PermissionError(f'{directory} is not writable')
    except OSError as e:
      print(f'warning: compilation cache off ({e}); pass --compilation_cache_dir=DIR with a '
            'writable DIR, or --compilation_cache_dir=off to silence this', file=sys.stderr)
      jax.config.update('jax_compilation_cache_dir', None)
      return None
  jax.config.update('jax_compilation_cache_dir', directory)
  if local and directory == default_directory():
    jax.config.update('jax_compilation_cache_max_size', DEFAULT_MAX_BYTES)
  return directory
