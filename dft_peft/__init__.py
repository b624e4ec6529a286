"""dft-peft: Delicate Fine-Tuning (DFT) as a PEFT method.

`import dft_peft` registers the `"DFT"` PEFT type, so `get_peft_model(model, DFTConfig(...))`,
`PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` resolve it.
"""

from .editing.build import build_edit
from .editing.rounds import EditArguments, EditReport, edit
from .evaluation.metrics import EditMetrics, evaluate, locality_reference
from .evaluation.requests import EditRequest, load_requests
from .format.sparse import SparseDelta
from .selection import select_core
from .selection.sharded import Shard, gather_core
from .tuner.config import DFTConfig
from .tuner.layer import DFTLayer
from .tuner.model import DFTModel
from .tuner.registration import register

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
