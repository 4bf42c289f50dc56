"""aahr-jax: a JAX/Flax reimplementation of AAHR and the VSE-infinity / HREM / CHAN family."""
