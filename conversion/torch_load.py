"""Opens PyTorch files without running code from them, unless the user says `--trust_pickle`.

A `.pt/.pth/.bin` file is a pickle: loading it the ordinary way (`torch.load(weights_only=False)`)
calls whatever functions the file names, so a shared checkpoint can run any program. Files are
read with `weights_only=True`, which rebuilds only tensors, storages, containers and numbers, plus
the classes in ALLOWED_CLASSES. Anything else is refused with one line naming the file, what it
asked for and the flag; there is no silent retry with full unpickling. TorchScript archives
(OpenAI's CLIP `.pt`) hold code by design and are refused the same way.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
import zipfile

from conversion import ConversionError

TRUST_FLAG = '--trust_pickle'
TRUST_HELP = ('load a checkpoint that needs full unpickling, or a TorchScript archive, the way '
              'PyTorch does: this runs code from the file, so use it only for files you trust')

# The released AAHR, HREM and VSE-infinity checkpoints pickle the training options
# (`'opt': argparse.Namespace` of strings, numbers, booleans and lists) next to the state dicts;
# HF, open_clip and timm weight files need nothing beyond torch's own weights-only set.
ALLOWED_CLASSES = (argparse.Namespace,)

# OpenCLIP's copies of OpenAI's CLIP weights, in its own layout, as a file that is not a pickle.
OPENAI_CLIP_ALTERNATIVE = ('convert the safetensors copy of the same weights instead '
                           '(open_clip_model.safetensors from the Hugging Face repository that '
                           "open_clip lists for the model's 'openai' weights, e.g. "
                           'timm/vit_base_patch32_clip_224.openai for ViT-B-32)')


# Before 2.6 a crafted file could run code through the weights-only loader too (CVE-2025-32434).
FIRST_SAFE_TORCH = (2, 6)


class UntrustedFileError(ConversionError):
  """The file needs code execution to load and the user did not pass --trust_pickle."""


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(TRUST_FLAG, action='store_true', help=TRUST_HELP)


def trust_requested(args: argparse.Namespace) -> bool:
  """The flag's value; arguments built by hand (tests, notebooks) without it get the safe load."""
  return bool(getattr(args, 'trust_pickle', False))


def is_torchscript_archive(path: pathlib.Path) -> bool:
  """TorchScript zips carry `<archive>/constants.pkl` (and `code/`); torch.save files do not."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.split('/', 1)[-1] == 'constants.pkl' for name in archive.namelist())


def load(path: str | pathlib.Path, trust_pickle: bool = False):
  """The object in a torch file; with trust_pickle the file may run code (TorchScript: its
  state_dict)."""
  import torch
  path = pathlib.Path(path)
  if is_torchscript_archive(path):
    if not trust_pickle:
      raise UntrustedFileError(
          f'{path} is a TorchScript archive (the format of OpenAI\'s CLIP .pt files); loading '
          f'one runs the code inside it: {OPENAI_CLIP_ALTERNATIVE}, or pass {TRUST_FLAG} if you '
          'trust the file.')
    return torch.jit.load(str(path), map_location='cpu').state_dict()
  if trust_pickle:
    return torch.load(str(path), map_location='cpu', weights_only=False)
  version = tuple(int(part) for part in re.findall(r'\d+', torch.__version__)[:2])
  if version < FIRST_SAFE_TORCH:
    raise UntrustedFileError(
        f'cannot read {path} safely with torch {torch.__version__}: before 2.6 its weights-only '
        'loader could be made to run code (CVE-2025-32434); install the torch of '
        f'requirements.txt, or pass {TRUST_FLAG} if you trust the file.')
  with torch.serialization.safe_globals(list(ALLOWED_CLASSES)):
    try:
      return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      wanted = _refused_part(path, str(e))
      if wanted is None:
        raise  # damaged rather than refused: the caller says so
      raise UntrustedFileError(
          f'{path} refused: loading it would call {wanted}, which is none of the tensors, '
          'containers, numbers and argparse.Namespace that checkpoints hold (a pickle that calls '
          f'other things can run any code); pass {TRUST_FLAG} only if you trust the file (it '
          'then runs code from the file).') from None


def _refused_part(path: pathlib.Path, message: str) -> str | None:
  """What the file asks for beyond the allowed set (call inside safe_globals), or None when the
  weights-only unpickler failed for another reason (a damaged file)."""
  import torch
  try:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
  except Exception:  # legacy (non-zip) files cannot be listed; the error message names one
    names = []
  names = names or re.findall(r'GLOBAL ([\w.]+)', message)
  if names:
    return ', '.join(dict.fromkeys(names))
  unsupported = [line.strip() for line in message.splitlines() if 'nsupported' in line]
  return f'something other than tensors ({unsupported[0][:160]})' if unsupported else None
