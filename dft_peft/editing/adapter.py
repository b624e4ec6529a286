"""`adapter_to_edit`: the DFT adapter an edit extends, wrapped or created as needed and put back on failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel, get_peft_model
from torch import nn

from ..format.sparse import SparseDelta
from ..tuner.config import DFTConfig
from ..tuner.model import DFTModel


@contextmanager
def adapter_to_edit(
    model: nn.Module, config: DFTConfig | None, adapter_name: str, caller: str
) -> Iterator[PeftModel]:
    """The DFT `PeftModel` whose adapter `adapter_name` an edit extends, all put back as it was if the block fails.

    A plain model is wrapped (`get_peft_model`, adapter "default"); a DFT `PeftModel` gets the adapter if it lacks
    it. On an error the wrapping or the new adapter is removed, or an existing adapter's values are restored (copies:
    training the core changes the live values in place; indices are only ever replaced, never changed in place).
    """
    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, DFTModel):
            raise ValueError(f"{caller} needs a DFT PeftModel, got one of type {model.peft_type}")
        peft_model, existed = model, adapter_name in model.peft_config
        if not existed:
            model.add_adapter(adapter_name, config or DFTConfig())
    else:
        if adapter_name != "default":
            raise ValueError(f"a new DFT model's adapter is named 'default'; pass a PeftModel to {caller} another "
                             "adapter")
        try:
            peft_model, existed = get_peft_model(model, config or DFTConfig()), False
        except ValueError as err:
            raise ValueError(f"the model has none of the modules DFTConfig.target_modules names: {err}") from err
    tuner: DFTModel = peft_model.base_model
    before = {}
    if existed:
        before = {name: SparseDelta(d.indices, d.values.detach().clone(), d.shape)
                  for name, d in tuner.get_core(adapter_name).items()}
    try:
        yield peft_model
    except BaseException:
        if existed:
            layers = tuner.dft_layers()
            for name, delta in before.items():
                layers[name].set_sparse_delta(adapter_name, delta)
        else:
            tuner._rollback(adapter_name)
        raise
