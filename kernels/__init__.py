"""Kernels of dft-peft, each beside its plain torch reference; installed as `dft_peft.kernels`.

A Python started in the repository root finds this folder first when anything imports the unrelated top-level
package `kernels` (transformers does, on import). Imported under that name, this module loads the installed
`kernels` distribution in its own place, so the repository root behaves like any other working directory.
"""

import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ran
        _spec.loader.exec_module(_module)
