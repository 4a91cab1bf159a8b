"""Thin Prefect tasks: each reads inputs from paths, calls one ``neuroal`` function, writes its
output to a path derived from its inputs and returns a small reference. MLflow (``tracking``),
DVC and git (``versioning``) are called from here and nowhere in ``neuroal``."""
