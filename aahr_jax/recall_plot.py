"""A PNG of recall@K curves (both directions), drawn with Pillow (no plotting dependency)."""

import math

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 720, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 20, 40, 50
# (curve name, direction) -> colour; 1K-mean curves are lighter versions of the full-split ones.
COLOURS = {('all', 'i2t'): (31, 119, 180), ('all', 't2i'): (214, 39, 40),
           ('fold_mean', 'i2t'): (140, 190, 230), ('fold_mean', 't2i'): (240, 150, 150)}
LABELS = {'all': 'full split', 'fold_mean': '1K (5-fold mean)'}


def _x(k: int, k_max: int) -> float:
  """Logarithmic K axis: R@1, R@5 and R@10 stay readable next to R@100."""
  span = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
  return MARGIN_LEFT + span * math.log(k) / max(math.log(k_max), 1e-9)


def _y(recall: float) -> float:
  span = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
  return HEIGHT - MARGIN_BOTTOM - span * recall / 100.0


def draw(curves: dict, path: str, title: str) -> None:
  """curves: {'all': {'k': [...], 'i2t': [...], 't2i': [...]}[, 'fold_mean': ...]} (percent)."""
  image = Image.new('RGB', (WIDTH, HEIGHT), 'white')
  pen = ImageDraw.Draw(image)
  k_max = max(max(c['k']) for c in curves.values())
  left, bottom = MARGIN_LEFT, HEIGHT - MARGIN_BOTTOM
  pen.rectangle([left, MARGIN_TOP, WIDTH - MARGIN_RIGHT, bottom], outline='black')
  for recall in range(0, 101, 20):
    y = _y(recall)
    pen.line([left, y, WIDTH - MARGIN_RIGHT, y], fill=(225, 225, 225))
    pen.text((left - 30, y - 6), f'{recall}', fill='black')
  for k in sorted({1, 5, 10, 20, 50, 100, k_max}):
    if k <= k_max:
      x = _x(k, k_max)
      pen.line([x, bottom, x, bottom + 4], fill='black')
      pen.text((x - 6, bottom + 8), str(k), fill='black')
  pen.text((WIDTH // 2 - 30, HEIGHT - 22), 'K (log scale)', fill='black')
  pen.text((8, MARGIN_TOP - 30), 'R@K (%)', fill='black')
  pen.text((MARGIN_LEFT, 10), title, fill='black')
  legend_y = bottom - 20
  for (name, direction), colour in COLOURS.items():
    if name not in curves:
      continue
    curve = curves[name]
    points = [(_x(k, k_max), _y(r)) for k, r in zip(curve['k'], curve[direction])]
    if len(points) == 1:
      points = points * 2
    pen.line(points, fill=colour, width=2)
    label = f'{"image->text" if direction == "i2t" else "text->image"}, {LABELS[name]}'
    pen.line([WIDTH - 260, legend_y, WIDTH - 235, legend_y], fill=colour, width=3)
    pen.text((WIDTH - 228, legend_y - 6), label, fill='black')
    legend_y -= 16
  image.save(path)
