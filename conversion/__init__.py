"""PyTorch -> Flax weight conversion: `python -m conversion <model> --src SRC --out OUT [--verify]`.

Each converter reads a PyTorch checkpoint on the CPU, maps every key through an explicit table
to a Flax parameter path, checks the result against the Flax model's parameter shapes and writes
one `.safetensors` file ('/'-joined paths, config in the metadata) that the model's `load()`
reads. Problems with the user's input raise `ConversionError`; the CLI prints them as one line.
"""


class ConversionError(Exception):
  """The checkpoint or the command line cannot be converted; the message says why and what to do."""
