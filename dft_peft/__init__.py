"""dft-peft: Delicate Fine-Tuning (DFT) as a PEFT method.

`import dft_peft` registers the `"DFT"` PEFT type, so `get_peft_model(model, DFTConfig(...))`,
`PeftConfig.from_pretrained`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` resolve it.
"""

from .config import DFTConfig
from .core import select_core
from .layer import DFTLayer
from .model import DFTModel
from .registration import register
from .sparse import SparseDelta

register(DFTConfig, DFTModel)

__all__ = ["DFTConfig", "DFTLayer", "DFTModel", "SparseDelta", "select_core"]
