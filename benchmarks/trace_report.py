"""Where the device time of a profiled train step goes: kernels -> model parts and categories.

  python -m benchmarks.trace_report PREFIX [--steps 3] [--depth 3] [--top 25]

Reads what `benchmarks.train_step --trace PREFIX` writes: PREFIX.trace.json.gz (a jax.profiler
trace of `--steps` steps) and PREFIX.hlo.txt.gz (the optimised HLO of the step). Each device
kernel is matched to its HLO instruction by name (`loop_add_fusion_7` is `%loop_add_fusion.7`;
on the CPU, where the trace has no device, the thunks XLA's CPU runtime records on the host
threads, `add_fusion.7`, play the kernels' part; `ynn_fusion`s there are XNNPACK fusions,
counted as matmuls when their computation holds a dot),
whose `op_name` metadata names the model scope (Flax module path, `transpose(jvp(...))` for the
backward pass). Library GEMM kernels (cuBLAS) and copies carry no HLO name inside XLA's command
buffers; they are attributed to the scope of the kernel that ran just before them on the same
stream and marked `[after]`, a heuristic that holds for the matmul feeding an elementwise
epilogue. Figures are per step (totals / --steps); kernels on concurrent streams are summed.
"""

import argparse
import collections
import gzip
import json
import re

# Scope components that are transformation or control-flow wrappers, not model parts.
_WRAPPERS = re.compile(r'^(jvp\(.*\)|transpose\(.*\)|while|body|cond|branch_\d+_fun|scan|'
                       r'eval_jaxpr|closed_call|checkpoint|remat|rematted_computation|'
                       r'jit\(<lambda>\)|jit\(main\)|pjit)$')
_GEMM = re.compile(r'nvjet|gemm|cutlass|xmma|cublas', re.IGNORECASE)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$', re.M)
_COMPUTATION = re.compile(r'^%([\w.\-]+) \(.*?\{\n(.*?)\n\}', re.M | re.S)


def kernel_key(hlo_name: str) -> str:
  """The kernel name the GPU trace shows for an HLO instruction name."""
  return hlo_name.replace('.', '_').replace('-', '_')


def parse_hlo(text: str) -> dict:
  """{kernel name: (op_name or '', fusion kind or opcode, output shape text, whether the
  fusion's computation holds a dot)}."""
  with_dot = {m.group(1) for m in _COMPUTATION.finditer(text) if ' dot(' in m.group(2)}
  table = {}
  for match in _INSTRUCTION.finditer(text):
    name, rest = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    kind = re.search(r'kind=(k\w+)', rest)
    opcode = re.search(r'\s([a-z][\w\-]*)\(', rest)
    called = re.search(r'calls=%([\w.\-]+)', rest)
    head = rest.split(' fusion(')[0].split(' custom-call(')[0]
    table.setdefault(kernel_key(name), (
        op_name.group(1) if op_name else '',
        kind.group(1) if kind else (opcode.group(1) if opcode else '?'),
        head[:120], bool(called) and called.group(1) in with_dot))
  return table


def scope(op_name: str, depth: int) -> str:
  """'FWD a/b/c' or 'BWD a/b/c': the first `depth` model components of an op_name."""
  direction = 'BWD' if 'transpose(jvp' in op_name else 'FWD'
  parts = [p for p in op_name.split('/') if p and not _WRAPPERS.match(p)]
  # 'AAHR/AAHR.encode_captions' (a module, then its method's scope) is one component.
  parts = [p for p, nxt in zip(parts, parts[1:] + ['']) if not nxt.startswith(p + '.')]
  return f"{direction} {'/'.join(parts[:depth]) or '(top level)'}"


def category(name: str, info) -> str:
  if info is None:
    if _GEMM.search(name):
      return 'gemm (library)'
    if name.lower().startswith(('memcpy', 'memset')):
      return 'copy / memset'
    return 'other'
  kind = info[1]
  if name.startswith('gemm_fusion'):  # Triton GEMMs with fused operands / epilogues
    return 'gemm (XLA fusion)'
  if name.startswith('ynn_fusion'):  # the CPU's XNNPACK fusions: dots, also reductions
    return 'gemm (XNNPACK fusion)' if info[3] else 'XNNPACK fusion without a matmul'
  if kind in ('dot', 'convolution'):  # unfused (the CPU's Eigen matmuls)
    return 'gemm (dot)'
  if kind == 'sort' or name.startswith('sort'):
    return 'sort'
  return {'kLoop': 'elementwise fusion', 'kInput': 'reduction / transpose fusion'}.get(
      kind, f'other ({kind})')


def device_kernels(trace: dict) -> list[dict]:
  """Complete events of the device processes ('/device:...'), in start order per stream."""
  devices = {e['pid'] for e in trace['traceEvents'] if e.get('ph') == 'M'
             and e.get('name') == 'process_name'
             and str(e.get('args', {}).get('name', '')).startswith('/device:')}
  events = [e for e in trace['traceEvents'] if e.get('ph') == 'X' and e.get('pid') in devices]
  return sorted(events, key=lambda e: (e.get('tid'), e['ts']))


# Thunks that only run other thunks (recorded as well): counted through their contents.
_CPU_CONTAINERS = ('while', 'conditional', 'call')


def cpu_thunks(trace: dict, table: dict) -> list[dict]:
  """A CPU trace's thunk events (host threads, named after their HLO instruction), renamed
  to the kernel-name form; sorted like device kernels. Every thunk is named, so only those
  whose instruction has no op_name (parameter copies) are attributed `[after]`."""
  events = []
  for event in trace['traceEvents']:
    key = kernel_key(str(event.get('name', '')))
    if event.get('ph') == 'X' and key in table and table[key][1] not in _CPU_CONTAINERS:
      events.append(dict(event, name=key))
  return sorted(events, key=lambda e: (e.get('tid'), e['ts']))


def analyse(trace: dict, hlo_text: str, steps: int, depth: int) -> dict:
  table = parse_hlo(hlo_text)
  kernels = device_kernels(trace) or cpu_thunks(trace, table)
  by_scope, by_category, by_kernel = (collections.Counter() for _ in range(3))
  last_scope = {}
  for event in kernels:
    info = table.get(event['name'])
    microseconds = float(event.get('dur', 0))
    if info is not None and info[0]:
      part = scope(info[0], depth)
      last_scope[event.get('tid')] = part
    else:
      part = last_scope.get(event.get('tid'), '(unattributed)') + ' [after]'
    by_scope[part] += microseconds
    by_category[category(event['name'], info)] += microseconds
    by_kernel[event['name']] += microseconds
  per_step = lambda counter: {k: v / steps / 1e3 for k, v in counter.most_common()}
  return {'busy_ms': sum(by_kernel.values()) / steps / 1e3,
          'kernels_per_step': len(kernels) / steps,
          'by_scope_ms': per_step(by_scope), 'by_category_ms': per_step(by_category),
          'by_kernel_ms': per_step(by_kernel),
          'kernel_info': {k: table.get(k) for k in by_kernel}}


def format_report(result: dict, top: int) -> str:
  busy = result['busy_ms']
  lines = [f"busy {busy:.2f} ms per step (summed over GPU streams or CPU threads), "
           f"{result['kernels_per_step']:.0f} kernels per step"]
  for title, key in (('by category', 'by_category_ms'), ('by model part', 'by_scope_ms')):
    lines.append(f'\n{title}:')
    for name, ms in list(result[key].items())[:top]:
      lines.append(f'  {ms:8.3f} ms {100 * ms / busy:5.1f}%  {name}')
  lines.append('\nlargest kernels:')
  for name, ms in list(result['by_kernel_ms'].items())[:top]:
    info = result['kernel_info'].get(name)
    lines.append(f"  {ms:8.3f} ms  {name[:48]:48s} {info[2][:70] if info else ''}")
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('prefix', help='PREFIX of PREFIX.trace.json.gz and PREFIX.hlo.txt.gz')
  parser.add_argument('--steps', type=int, default=3, help='steps in the trace')
  parser.add_argument('--depth', type=int, default=3, help='model scope components kept')
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args(argv)
  try:
    with gzip.open(args.prefix + '.trace.json.gz', 'rt', encoding='utf-8') as f:
      trace = json.load(f)
    with gzip.open(args.prefix + '.hlo.txt.gz', 'rt', encoding='utf-8') as f:
      hlo_text = f.read()
  except OSError as e:
    raise SystemExit(f'trace_report: cannot read {e.filename}: {e.strerror or e}; write the '
                     'files with `python -m benchmarks.train_step ... --trace PREFIX`') from e
  result = analyse(trace, hlo_text, args.steps, args.depth)
  if not result['kernels_per_step']:
    print('no kernel in the trace matches the HLO: are the two files from the same run?')
    return result
  print(format_report(result, args.top))
  return result


if __name__ == '__main__':
  main()
