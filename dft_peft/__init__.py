"""dft-peft: Delicate Fine-Tuning (DFT) as a PEFT method.

`import dft_peft` registers the `"DFT"` PEFT type, so `get_peft_model(model, DFTConfig(...))`,
`PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` resolve it.
"""

from .build import build_edit
from .config import DFTConfig
from .core import select_core
from .data import EditRequest, load_requests
from .distributed import Shard, gather_core
from .edit import EditArguments, EditReport, edit
from .layer import DFTLayer
from .metrics import EditMetrics, evaluate, locality_reference
from .model import DFTModel
from .registration import register
from .sparse import SparseDelta

register(DFTConfig, DFTModel)

__all__ = [
    "DFTConfig",
    "DFTLayer",
    "DFTModel",
    "EditArguments",
    "EditMetrics",
    "EditReport",
    "EditRequest",
    "Shard",
    "SparseDelta",
    "build_edit",
    "edit",
    "evaluate",
    "gather_core",
    "load_requests",
    "locality_reference",
    "select_core",
]
