"""Mutation check: each critical behaviour changed by one line must make its test fail.

    python tests/mutations.py              # every mutation (tens of minutes on 2 CPU cores)
    python tests/mutations.py momentum_0.9995 tie_rank_t2i   # some, by name
    python tests/mutations.py --list

First the chosen tests run once unmutated (they must pass). Then for each mutation the committed
tree (HEAD; with --worktree the checkout's tracked and untracked files as they are) is copied to
a temporary folder, one line is changed there (`old` -> `new`, which must occur exactly once in
the file), and the test that covers the behaviour is run with this checkout's .venv. A mutation
is caught when that test fails (pytest exit status 1); it survives when the test passes. Status
0 when every mutation is caught. tests/MUTATIONS.md explains the list. Not part of `make test`
(pytest collects only test_*.py files).
"""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TIMEOUT = 1800  # seconds for one mutation's test run


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  path: str  # file changed, relative to the repository root
  old: str
  new: str
  test: str  # pytest node id that must fail


MUTATIONS = (
    Mutation('resume_restarts_epoch', 'aahr_jax/train.py',
             'seed=config.seed, text=text, start_step=start_step,',
             'seed=config.seed, text=text, start_step=start_step - start_step % steps_per_epoch,',
             'tests/test_train.py::test_train_checkpoint_resume_is_exact_and_eval_reproduces'),
    Mutation('nan_guard_opt_state', 'aahr_jax/aahr_step.py',
             'opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state,',
             'opt_state = jax.tree.map(lambda new, old: new, opt_state,',
             'tests/test_aahr_step.py::test_non_finite_batch_skips_the_update'),
    Mutation('nan_guard_batch_stats', 'aahr_jax/aahr_step.py',
             'batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), batch_stats,',
             'batch_stats = jax.tree.map(lambda new, old: new, batch_stats,',
             'tests/test_aahr_step.py::test_non_finite_batch_skips_the_update'),
    Mutation('momentum_0.9995', 'aahr_jax/aahr_step.py',
             'm = moco_cfg.momentum\n', 'm = moco_cfg.momentum + 0.0005\n',
             'tests/test_aahr_step.py::test_gates_terms_queues_and_momentum'),
    Mutation('momentum_0.996', 'aahr_jax/aahr_step.py',
             'm = moco_cfg.momentum\n', 'm = moco_cfg.momentum - 0.003\n',
             'tests/test_aahr_step.py::test_gates_terms_queues_and_momentum'),
    Mutation('tie_rank_i2t_pessimistic', 'aahr_jax/blockwise_ranks.py',
             'i2t_pessimistic=i2t_gt + i2t_ties,',
             'i2t_pessimistic=i2t_gt + i2t_ties + (i2t_ties > 0),',
             'tests/test_evaluate.py::test_ties_follow_the_original_argsort'),
    Mutation('tie_rank_t2i_pessimistic', 'aahr_jax/blockwise_ranks.py',
             't2i_pessimistic=t2i_gt + t2i_ties,',
             't2i_pessimistic=t2i_gt + t2i_ties + (t2i_ties > 0),',
             'tests/test_evaluate.py::test_ties_follow_the_original_argsort'),
    Mutation('tie_rank_i2t_own_captions', 'aahr_jax/blockwise_ranks.py',
             'i2t_ties = row_eq[first:last, rows].sum(0) - own[rows]',
             'i2t_ties = row_eq[first:last, rows].sum(0) - 1',
             'tests/test_evaluate.py::test_ties_follow_the_original_argsort'),
    Mutation('recall_at_k', 'aahr_jax/metrics.py',
             "out[f'{name}_r{k}'] = float(100.0 * np.mean(ranks < k))",
             "out[f'{name}_r{k}'] = float(100.0 * np.mean(ranks <= k))",
             'tests/test_metrics.py'),
    Mutation('median_rank', 'aahr_jax/metrics.py',
             "out[f'{name}_medr'] = float(np.floor(np.median(ranks)) + 1)",
             "out[f'{name}_medr'] = float(np.median(ranks) + 1)",
             'tests/test_metrics.py'),
    Mutation('mean_rank', 'aahr_jax/metrics.py',
             "out[f'{name}_meanr'] = float(ranks.mean() + 1)",
             "out[f'{name}_meanr'] = float(ranks.mean())",
             'tests/test_metrics.py'),
    Mutation('gate_graph_step', 'aahr_jax/losses.py',
             'graph_on = iter_count >= graph_from', 'graph_on = iter_count > graph_from',
             'tests/test_aahr_step.py::test_gates_terms_queues_and_momentum'),
    Mutation('gate_swav_step', 'aahr_jax/losses.py',
             'swav_on = iter_count > swav_after', 'swav_on = iter_count >= swav_after',
             'tests/test_aahr_step.py::test_gates_terms_queues_and_momentum'),
    Mutation('gate_moco_queue_full', 'aahr_jax/losses.py',
             'moco_on = (moco_count + 1) > (moco_queue_length / batch_size)',
             'moco_on = moco_count > (moco_queue_length / batch_size)',
             'tests/test_aahr_step.py::test_gates_terms_queues_and_momentum'),
    Mutation('sinkhorn_iterations', 'aahr_jax/losses.py',
             'for _ in range(iterations):', 'for _ in range(iterations - 1):',
             'tests/test_aahr_losses.py::test_swav_parity'),
    Mutation('enqueue_order', 'aahr_jax/losses.py',
             'queue = jax.lax.dynamic_update_slice(queue, keys.T, (jnp.zeros_like(pointer), pointer))',
             'queue = jax.lax.dynamic_update_slice(queue, keys[::-1].T, '
             '(jnp.zeros_like(pointer), pointer))',
             'tests/test_aahr_losses.py::test_enqueue_is_a_ring_buffer'),
    Mutation('batch_rows_of_a_process', 'aahr_jax/sharding.py',
             'return rows.start // size, global_batch_size // size',
             'return 0, global_batch_size // size',
             'tests/test_multiprocess.py::test_two_processes_match_one_process_on_8_devices'),
)


def export_head(dest: str) -> None:
  """The committed tree (HEAD), unaffected by edits in progress in the checkout."""
  os.makedirs(dest)
  archive = subprocess.run(['git', 'archive', '--format=tar', 'HEAD'], cwd=ROOT,
                           capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)


def checkout_files() -> list[str]:
  """The checkout as it is: tracked and untracked files git does not ignore (deleted ones
  skipped)."""
  out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
                       cwd=ROOT, capture_output=True, check=True).stdout.decode()
  return sorted({p for p in out.split('\0') if p and os.path.isfile(os.path.join(ROOT, p))})


def copy_checkout(dest: str) -> None:
  for path in checkout_files():
    os.makedirs(os.path.dirname(os.path.join(dest, path)) or dest, exist_ok=True)
    shutil.copy2(os.path.join(ROOT, path), os.path.join(dest, path))


def apply(mutation: Mutation, dest: str) -> None:
  path = os.path.join(dest, mutation.path)
  with open(path, encoding='utf-8') as f:
    text = f.read()
  count = text.count(mutation.old)
  if count != 1:
    raise ValueError(f'{mutation.path}: the line to mutate for {mutation.name!r} occurs {count} '
                     f'times (expected once): {mutation.old!r}; update tests/mutations.py')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text.replace(mutation.old, mutation.new))


def pytest(tests: list[str], dest: str, cache: str) -> tuple[int | None, float, str]:
  """(pytest's exit status or None on a timeout, seconds, the last lines of its output)."""
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=cache)  # shared by the runs: unchanged steps load
  command = [os.path.join(ROOT, '.venv', 'bin', 'python'), '-m', 'pytest', '-q', '-x',
             '-p', 'no:cacheprovider', *tests]
  start = time.time()
  try:
    result = subprocess.run(command, cwd=dest, env=env, capture_output=True, text=True,
                            timeout=TEST_TIMEOUT, check=False)
  except subprocess.TimeoutExpired:
    return None, time.time() - start, ''
  lines = (result.stdout + result.stderr).strip().splitlines()
  failure = [line for line in lines if line.startswith('E ')][:1]  # the first assertion line
  tail = '\n'.join(failure + lines[-3:])
  return result.returncode, time.time() - start, tail


def verdict(status: int | None) -> str:
  if status is None:
    return f'error (timeout {TEST_TIMEOUT} s)'
  return {1: 'caught', 0: 'SURVIVED'}.get(status, f'error (pytest status {status})')


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('names', nargs='*', help='mutations to run (default: all)')
  parser.add_argument('--list', action='store_true', help='list the mutations and exit')
  parser.add_argument('--worktree', action='store_true',
                      help='mutate the checkout as it is (uncommitted and untracked files '
                      'included) instead of the committed tree')
  parser.add_argument('--no-baseline', action='store_true',
                      help='skip running the chosen tests unmutated first')
  args = parser.parse_args()
  by_name = {m.name: m for m in MUTATIONS}
  if args.list:
    for m in MUTATIONS:
      print(f'{m.name:28s} {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}\n'
            f'{"":28s} must fail: {m.test}')
    return 0
  unknown = [n for n in args.names if n not in by_name]
  if unknown:
    print(f'error: unknown mutation(s) {unknown}; see --list', file=sys.stderr)
    return 2
  chosen = [by_name[n] for n in args.names] if args.names else list(MUTATIONS)
  results = []
  source = copy_checkout if args.worktree else export_head
  with tempfile.TemporaryDirectory(prefix='aahr_mutations_') as work:
    cache = os.path.join(work, 'xla_cache')
    if not args.no_baseline:  # a failing test would 'catch' every mutation: refuse that
      dest = os.path.join(work, 'baseline')
      source(dest)
      tests = sorted({m.test for m in chosen})
      status, seconds, tail = pytest(tests, dest, cache)
      print(f'{"baseline (no mutation)":28s} {"passed" if status == 0 else "FAILED":10s} '
            f'{seconds:6.0f} s  {len(tests)} test ids', flush=True)
      if status != 0:
        print('    ' + tail.replace('\n', '\n    '))
        print('error: the tests fail without a mutation; fix them first', file=sys.stderr)
        return 2
      shutil.rmtree(dest, ignore_errors=True)
    for mutation in chosen:
      dest = os.path.join(work, mutation.name)
      source(dest)
      apply(mutation, dest)
      code, seconds, tail = pytest([mutation.test], dest, cache)
      status = verdict(code)
      results.append((mutation, status))
      print(f'{mutation.name:28s} {status:10s} {seconds:6.0f} s  {mutation.test}', flush=True)
      shown = tail if status != 'caught' else tail.split('\n')[0]  # caught: how it failed
      print('    ' + shown[:300].replace('\n', '\n    '), flush=True)
      shutil.rmtree(dest, ignore_errors=True)
  caught = sum(status == 'caught' for _, status in results)
  print(f'{caught} of {len(results)} mutations caught')
  return 0 if caught == len(results) else 1


if __name__ == '__main__':
  sys.exit(main())
