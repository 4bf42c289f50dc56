"""The multi-positive block of an evaluation: printed lines, a bar chart, TensorBoard scalars."""

import os

from PIL import Image, ImageDraw

from aahr_jax import multi_positive

WIDTH, HEIGHT = 720, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 20, 50, 60
COLOURS = {'i2t': (31, 119, 180), 't2i': (214, 39, 40)}
DIRECTION_NAMES = {'i2t': 'Image to text', 't2i': 'Text to image'}


def columns(metrics: dict) -> list[tuple[str, str]]:
  """(result key without direction, label) of the metrics present, in print order."""
  out = [(key, label) for key, _, label in multi_positive.ECCV_METRICS]
  out += [(f'cxc_r{k}', f'CxC R@{k}') for k in multi_positive.CXC_KS if f'i2t_cxc_r{k}' in metrics]
  if 'i2t_pmrp' in metrics:
    out.append(('pmrp', 'PMRP'))
  return out


def format_block(result: dict) -> list[str]:
  """The printed block: one line per direction, percent."""
  m = result['metrics']
  cols = columns(m)
  lines = [f'Multi-positive ({result["ground_truth"]}; {result["library"]}; '
           f'{result["queries"]["i2t"]:,} image and {result["queries"]["t2i"]:,} caption queries):',
           ' ' * 15 + ''.join(f'{label:>10}' for _, label in cols)]
  for d in multi_positive.DIRECTIONS:
    lines.append(f'{DIRECTION_NAMES[d]:<15}' + ''.join(f'{m[f"{d}_{k}"]:>10.1f}' for k, _ in cols))
  ties = result['ties']
  if any(ties.values()):
    lines.append(f'  lists ordered inside exact ties by the original argsort rule: '
                 f'{ties["i2t_tied"]} images, {ties["t2i_tied"]} captions')
  return lines


def draw(result: dict, path: str, title: str) -> None:
  """Bars per metric, one per direction (percent)."""
  m = result['metrics']
  cols = columns(m)
  image = Image.new('RGB', (WIDTH, HEIGHT), 'white')
  pen = ImageDraw.Draw(image)
  bottom, right = HEIGHT - MARGIN_BOTTOM, WIDTH - MARGIN_RIGHT
  span_y = bottom - MARGIN_TOP
  pen.rectangle([MARGIN_LEFT, MARGIN_TOP, right, bottom], outline='black')
  for value in range(0, 101, 20):
    y = bottom - span_y * value / 100
    pen.line([MARGIN_LEFT, y, right, y], fill=(225, 225, 225))
    pen.text((MARGIN_LEFT - 30, y - 6), str(value), fill='black')
  group = (right - MARGIN_LEFT) / len(cols)
  bar = group / 3
  for g, (key, label) in enumerate(cols):
    x0 = MARGIN_LEFT + g * group + bar / 2
    for j, d in enumerate(multi_positive.DIRECTIONS):
      value = m[f'{d}_{key}']
      x = x0 + j * bar
      pen.rectangle([x, bottom - span_y * value / 100, x + bar - 2, bottom], fill=COLOURS[d])
      pen.text((x, bottom - span_y * value / 100 - 12), f'{value:.1f}', fill='black')
    pen.text((x0, bottom + 8), label, fill='black')
  pen.text((MARGIN_LEFT, 8), title, fill='black')
  pen.text((MARGIN_LEFT, 24), f'{result["ground_truth"]} (percent)', fill='black')
  for j, d in enumerate(multi_positive.DIRECTIONS):
    y = HEIGHT - 22
    x = MARGIN_LEFT + 200 * j
    pen.rectangle([x, y, x + 14, y + 10], fill=COLOURS[d])
    pen.text((x + 20, y - 1), DIRECTION_NAMES[d], fill='black')
  image.save(path)


def write_tensorboard(result: dict, workdir: str, split_name: str, step: int = 0) -> None:
  """Scalars eval_<split>/multi_positive/<direction>_<metric> in <workdir>/tensorboard."""
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
  try:
    for key, value in result['metrics'].items():
      writer.add_scalar(f'eval_{split_name}/multi_positive/{key}', value, step)
  finally:
    writer.close()
