"""`dft-peft env`: what a bug report needs — versions, accelerator, and whether the C selection loop is built."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from typing import Any

import torch

from ..kernels import window_cpu

PACKAGES = ("dft-peft", "torch", "peft", "transformers", "accelerate", "triton", "safetensors", "datasets")


def environment() -> dict[str, Any]:
    """Versions of Python and the packages dft-peft runs on, the GPU, and the C loop's state."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    built, reason = window_cpu.status()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "cuda": torch.version.cuda, "gpus": gpus, "cpu_threads": torch.get_num_threads(),
            "c_selection_loop": "built" if built else f"not built: {reason}"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("env", help="versions, GPU and the C loop's state, for a bug report",
                        description="Print what a bug report needs: Python and package versions, the GPUs torch "
                                    "sees, and whether core selection's C loop is built (and why not).",
                        dataclass_types=[]).set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    env = environment()
    print(f"python: {env['python']} ({env['platform']})")
    for name, version in env["packages"].items():
        print(f"{name}: {version or 'not installed'}")
    print(f"CUDA: {env['cuda'] or 'none'}; GPUs: {', '.join(env['gpus']) or 'none'}; CPU threads: "
          f"{env['cpu_threads']}")
    print(f"C selection loop: {env['c_selection_loop']}")
    return 0
