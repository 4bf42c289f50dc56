"""OpenCLIP's evaluation image transform on the host with PIL (docs/data.md 2.4).

open_clip (v2.24 to 3.x) evaluates with: torchvision Resize(size) of the shorter side, bicubic
(PIL resampling, longer side int(size * long / short)) -> CenterCrop(size) (offsets rounded with
Python's round) -> convert to RGB -> /255 -> (x - mean) / std. Done here with PIL, not
jax.image.resize, whose bicubic kernel and antialiasing differ. Output is NHWC float32, what
aahr_jax.models.clip.encode_image takes.
"""

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """torchvision's (width, height) for Resize(size) on the shorter side."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """torchvision CenterCrop: zero padding when the image is smaller, then a rounded-offset crop."""
  width, height = img.size
  if size > width or size > height:
    padded = Image.new(img.mode, (max(width, size), max(height, size)))
    padded.paste(img, ((size - width) // 2 if size > width else 0,
                       (size - height) // 2 if size > height else 0))
    img = padded
    width, height = img.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, size: int) -> np.ndarray:
  """One PIL image -> float32 [size, size, 3], normalised with the CLIP mean and std."""
  target = resized_size(*img.size, size)
  if target != img.size:
    img = img.resize(target, resample=Image.BICUBIC)
  img = center_crop(img, size)
  if img.mode != 'RGB':
    img = img.convert('RGB')
  x = np.asarray(img, np.float32) / 255.0
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def load_image(path: str, size: int) -> np.ndarray:
  """Reads and preprocesses one image file; OSError/ValueError if it does not decode."""
  with Image.open(path) as img:
    img.load()
    return preprocess(img, size)
