"""Kernels of dft-peft, each beside its plain torch reference; installed as `dft_peft.kernels`.

This file imports nothing, so that the folder, found as a top-level `kernels` by a Python started in the repository
root, is inert when transformers probes for the unrelated `kernels` package. Callers import the modules directly.
"""
