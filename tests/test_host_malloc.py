"""aahr_jax.host_malloc: freed host memory is reused instead of being unmapped and faulted in
again (the XLA:CPU step's per-step page faults)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mallocs, touches and frees a 64 MiB block (above glibc's largest mmap threshold) from a
# worker thread, as XLA's thread pool does with a step's temporaries, three times; prints the
# minor page faults of the last two rounds.
PROBE = r'''
import ctypes, resource, sys, threading
sys.path.insert(0, sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[2] == 'configure':
  from aahr_jax import host_malloc
  print('configured', host_malloc.configure())

def round_trip():
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  libc.free(block)

def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def in_thread():
  round_trip()
  before = faults()
  round_trip()
  round_trip()
  print('faults', faults() - before)

worker = threading.Thread(target=in_thread)
worker.start()
worker.join()
'''


def _faults(mode: str, **env) -> tuple[int, str]:
  out = subprocess.run([sys.executable, '-c', PROBE, ROOT, mode], capture_output=True, text=True,
                       timeout=60, check=True, env={**os.environ, **env}).stdout
  return int(out.split('faults ')[1]), out


def test_freed_blocks_are_reused_without_page_faults():
  pages = (64 << 20) // os.sysconf('SC_PAGE_SIZE')
  default, _ = _faults('default')
  configured, out = _faults('configure')
  assert 'configured True' in out
  assert default >= pages  # each round maps and faults in the whole block again
  assert configured < pages // 20, (default, configured)


def test_opt_out_keeps_the_c_library_defaults():
  faults, out = _faults('configure', AAHR_JAX_MALLOC='system')
  assert 'configured False' in out
  assert faults >= (64 << 20) // os.sysconf('SC_PAGE_SIZE')
