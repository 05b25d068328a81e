"""Line plots drawn with PIL (matplotlib is not a dependency): axes, ticks, labels, a legend.

Used for the bits/dim-per-timestep picture of `--mode=bpd` (the paper's rate figure).
"""

import io
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from ddpm_jax import storage

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
_SIZE = (900, 560)
_MARGIN = dict(left=95, right=30, top=50, bottom=70)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
  except (TypeError, ValueError, OSError):
    return ImageFont.load_default()


def linear_ticks(lo: float, hi: float, *, target: int = 6) -> list[float]:
  """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / target
  power = 10.0 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.ceil(lo / step - 1e-9) * step
  return [first + i * step for i in range(int(math.floor((hi - first) / step + 1e-9)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
  """Powers of ten in [lo, hi] (with 2x and 5x when fewer than three decades are shown)."""
  first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
  mults = (1,) if last - first >= 3 else (1, 2, 5)
  return [
    m * 10.0**e
    for e in range(first, last + 1)
    for m in mults
    if lo * (1 - 1e-9) <= m * 10.0**e <= hi * (1 + 1e-9)
  ]


def _tick_label(value: float) -> str:
  if value == 0:
    return "0"
  if abs(value) >= 1e4 or abs(value) < 1e-2:
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
  return f"{value:g}"


def line_plot(
  path: str, x, series: dict, *, title: str, x_label: str, y_label: str, log_y: bool = False
) -> str:
  """Writes a PNG of one or more lines y(x). `series` maps legend names to y arrays of len(x).

  On a log axis, values below 1e-6 of the largest (zeros, rounding noise) are drawn at that floor.
  """
  x = np.asarray(x, np.float64)
  ys = {name: np.asarray(y, np.float64) for name, y in series.items()}
  assert all(y.shape == x.shape for y in ys.values()), {k: v.shape for k, v in ys.items()}
  finite = np.concatenate([y[np.isfinite(y)] for y in ys.values()])
  if log_y:
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    floor = top * 1e-6
    ys = {k: np.maximum(v, floor) for k, v in ys.items()}
    y_lo, y_hi = max(float(np.nanmin(np.concatenate(list(ys.values())))), floor), top
    y_lo, y_hi = 10 ** math.floor(math.log10(y_lo)), 10 ** math.ceil(math.log10(y_hi))
    to_axis = math.log10
  else:
    y_lo, y_hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ticks = linear_ticks(y_lo, y_hi if y_hi > y_lo else y_lo + 1)
    y_lo, y_hi = min(ticks[0], y_lo), max(ticks[-1], y_hi)
    to_axis = float
  x_lo, x_hi = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1

  image = Image.new("RGB", _SIZE, "white")
  draw = ImageDraw.Draw(image)
  small, large = _font(15), _font(19)
  left, top = _MARGIN["left"], _MARGIN["top"]
  right, bottom = _SIZE[0] - _MARGIN["right"], _SIZE[1] - _MARGIN["bottom"]
  a_lo, a_hi = to_axis(y_lo), to_axis(y_hi)
  px = lambda v: left + (v - x_lo) / (x_hi - x_lo) * (right - left)
  py = lambda v: bottom - (to_axis(v) - a_lo) / ((a_hi - a_lo) or 1.0) * (bottom - top)

  for value in linear_ticks(x_lo, x_hi):
    draw.line([(px(value), top), (px(value), bottom)], fill=(232, 232, 232))
    draw.line([(px(value), bottom), (px(value), bottom + 6)], fill="black")
    draw.text((px(value), bottom + 9), _tick_label(value), fill="black", font=small, anchor="mt")
  for value in log_ticks(y_lo, y_hi) if log_y else linear_ticks(y_lo, y_hi):
    draw.line([(left, py(value)), (right, py(value))], fill=(232, 232, 232))
    draw.line([(left - 6, py(value)), (left, py(value))], fill="black")
    draw.text((left - 9, py(value)), _tick_label(value), fill="black", font=small, anchor="rm")
  draw.rectangle([left, top, right, bottom], outline="black")

  for i, (name, y) in enumerate(ys.items()):
    colour = _COLOURS[i % len(_COLOURS)]
    points = [(px(a), py(b)) for a, b in zip(x, y) if np.isfinite(b)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    elif points:
      draw.ellipse(
        [points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=colour
      )
    draw.line(
      [(right - 230, top + 18 + 22 * i), (right - 200, top + 18 + 22 * i)], fill=colour, width=3
    )
    draw.text((right - 192, top + 18 + 22 * i), name, fill="black", font=small, anchor="lm")

  draw.text(((left + right) / 2, 14), title, fill="black", font=large, anchor="mt")
  draw.text(((left + right) / 2, _SIZE[1] - 12), x_label, fill="black", font=small, anchor="mb")
  label = Image.new("RGB", (bottom - top, 24), "white")
  ImageDraw.Draw(label).text(
    ((bottom - top) / 2, 12), y_label, fill="black", font=small, anchor="mm"
  )
  image.paste(label.rotate(90, expand=True), (8, top))

  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())
  return path
