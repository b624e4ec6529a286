"""dft-peft: Delicate Fine-Tuning (DFT) as a PEFT method.

`import dft_peft` registers the `"DFT"` PEFT type, so `get_peft_model(model, DFTConfig(...))`,
`PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` resolve it.
"""

from .editing.arguments import EditArguments
from .editing.build import build_edit
from .editing.old_answers import generate_old_answers
from .editing.report import EditReport, RoundReport
from .editing.rounds import edit
from .evaluation.analysis import inspect_edit
from .evaluation.metrics import EditMetrics, evaluate, locality_reference
from .evaluation.requests import EditRequest, load_requests, save_requests, to_requests
from .format.sparse import SparseDelta
from .selection import Shard, gather_core, select_core
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
    "RoundReport",
    "Shard",
    "SparseDelta",
    "build_edit",
    "edit",
    "evaluate",
    "gather_core",
    "generate_old_answers",
    "inspect_edit",
    "load_requests",
    "locality_reference",
    "save_requests",
    "select_core",
    "to_requests",
]
