"""Data: tfds builders for the SCAN precomp layout, the synthetic demo world, Grain loaders."""
