"""`python -m dft_peft.cli` (as `torchrun -m dft_peft.cli edit ...` runs it): the `dft-peft` command."""

from . import main

raise SystemExit(main())
