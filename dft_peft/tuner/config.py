"""`DFTConfig`: which modules carry a DFT edit and how its core is chosen and stored."""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.config import PeftConfig
from peft.utils import PeftType

from ..checks import check_fields, check_value

VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DFTConfig(PeftConfig):
    """Configuration of a [`DFTModel`].

    A DFT adapter holds, per targeted module, only a sparse delta: the flat indices of the core elements and their
    values. The core is the `top_t` fraction of the targeted parameters where the new-knowledge and old-knowledge
    fine-tuning deltas point in opposite directions and differ most (Delicate Fine-Tuning, §4).

    Args:
        top_t: Fraction of the targeted parameters kept in the core, in (0, 1]. The paper's T%.
        lam: λ, the step taken along Δnew on the core (θ ← θ + λ·core), > 0.
        selection: `"global"` ranks all targeted modules together (one threshold), `"per_module"` keeps `top_t` of
            each module.
        target_modules: Modules to edit, with PEFT's meaning (list of suffixes, regex string or `"all-linear"`).
            The default, `"all-linear"`, is every `nn.Linear`/`Conv1D` except the output head.
        exclude_modules: Modules never edited, with PEFT's meaning.
        layers_to_transform / layers_pattern: Restrict to these layer indices, with PEFT's meaning.
        modules_to_save: Extra modules trained and saved in full, with PEFT's meaning.
        fan_in_fan_out: The target stores its weight as (in, out), like GPT-2's `Conv1D`. Indices always address
            the weight as stored; the flag is set automatically for `Conv1D`.
        value_dtype: dtype of the core values in the saved edit file.
        verify_base_fingerprint: On load, check that each module's base weights match the ones the edit was made
            for. Set to False only to apply an edit to a model you know is compatible (e.g. re-quantized).
    """

    top_t: float = field(default=0.05, metadata={
        "check": "fraction", "help": "Fraction of targeted parameters in the core, in (0, 1]."})
    lam: float = field(default=1.0, metadata={"check": "positive", "help": "λ: step along Δnew on the core, > 0."})
    selection: Literal["global", "per_module"] = field(
        default="global", metadata={"help": "'global': one threshold across modules; 'per_module': one per module."}
    )
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "Modules to edit (PEFT semantics). Default: every linear layer but the output head."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never edited."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to edit."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Target weights are stored as (in, out)."})
    value_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of the core values in the saved file."}
    )
    verify_base_fingerprint: bool = field(
        default=True, metadata={"help": "Refuse to load an edit onto base weights it was not made for."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.DFT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        check_fields(self)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, set)):
            raise ValueError(f"DFTConfig.target_modules must be a list of names or a regex string, got "
                             f"{type(self.target_modules).__name__}")
        if isinstance(self.target_modules, (set, str)) and len(self.target_modules) == 0:
            raise ValueError("DFTConfig.target_modules is empty: name at least one module to edit")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("DFTConfig.layers_pattern is only used together with layers_to_transform")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":
            raise ValueError("DFTConfig.layers_to_transform needs target_modules as a list, not a regex string")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) \
                else self.layers_to_transform
            for index in layers:
                check_value("DFTConfig", "layers_to_transform", index, "non_negative_int")

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.value_dtype]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config; for a local edit also run `preflight` on its weights before any model changes.

        A malformed `adapter_config.json` raises ValueError naming it. When the weights carry a config (stored with
        the cores by `save_pretrained`) whose fields differ from `adapter_config.json`, a save was interrupted after
        its weights were in place: the stored fields win, with a warning, so the directory loads as the edit its
        weights belong to.
        """
        from ..format.checkpoint import read_json_object
        from ..format.edit_file import CONFIG_NAME, WEIGHTS_NAME, edit_config_fields, preflight

        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        local = os.path.isdir(directory)
        path = os.path.join(directory, CONFIG_NAME)
        if local and os.path.exists(path):
            read_json_object(path)  # a file that is not a JSON object raises ValueError naming it, PEFT's reader not
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid DFT config: {err}") from err
        if not local:
            return config
        stored, own = preflight(directory, config.modules_to_save or []), edit_config_fields(config)
        if stored is not None and stored != own:
            warnings.warn(f"{path} does not match the config stored in {WEIGHTS_NAME} (a save interrupted after "
                          "its weights were written): loading the edit its weights belong to", stacklevel=2)
            try:
                config = dataclasses.replace(config, **{k: v for k, v in stored.items() if k in own})
            except (TypeError, ValueError) as err:
                raise ValueError(f"{os.path.join(directory, WEIGHTS_NAME)}: invalid stored config: {err}") from err
            preflight(directory, config.modules_to_save or [])
        config._edit_directory = directory  # checked once more when the adapter is injected: see DFTModel
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save `adapter_config.json` atomically (`replace_config`: always a whole config, the old or the new); when
        the edit's weights are there, also complete the model card."""
        from ..format.edit_file import replace_config
        from ..format.model_card import update_model_card

        replace_config(save_directory, functools.partial(super().save_pretrained, **kwargs))
        update_model_card(save_directory, self.base_model_name_or_path, self.top_t, self.selection)
