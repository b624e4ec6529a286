"""`DFTModel`: the PEFT tuner that injects DFT layers, accumulates cores and (de)serialises edit files."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from ..checks import check_value
from ..format.edit_file import (
    CONFIG_KEY,
    MODULES_TO_SAVE,
    PEFT_PREFIX,
    UNCHECKED_WARNING,
    check_extra_tensors,
    decode_module,
    edit_config_fields,
    encode_config,
    encode_module,
    group_parts,
    is_config_key,
    preflight,
)
from ..format.sparse import SparseDelta, coalesce, normalize_core_names
from .config import DFTConfig
from .layer import DFTLayer, dft_layer_class

FSDP_PREFIX = "_fsdp_wrapped_module."


class DFTModel(BaseTuner):
    """Delicate Fine-Tuning as a PEFT tuner.

    Each targeted module becomes a [`DFTLayer`] whose adapters are sparse deltas. An adapter starts empty (the
    identity); [`add_core`] accumulates cores selected by [`dft_peft.select_core`] (or the edit loop in
    [`dft_peft.edit`]). Merging writes the deltas into the weights in place and unmerging restores them bit-exactly.
    `save_pretrained` writes only the cores: Elias–Fano coded indices and values in `config.value_dtype`, with a
    checksum per module and the config's DFT fields stored beside them.

    Loading an edit file (`PeftModel.from_pretrained`, `load_adapter`) adds exactly that adapter's DFT parts (and the
    weights of the modules its config lists in `modules_to_save`): any other key, raw indices or another adapter's
    tensors are refused, as are corrupt files (checksums; files written before them load with a warning). A load that
    fails leaves the model as it was: modules, weights and `requires_grad`.

    `save_pretrained` is atomic as a whole: after a crash at any point the directory loads as the previous complete
    edit or the new one. PEFT replaces `adapter_model.safetensors` by an atomic rename, then `adapter_config.json` is
    replaced atomically (written in a temporary directory beside it, flushed, renamed); between the two renames the
    weights' stored config is the one that loads (see `DFTConfig.from_pretrained`). A successful save leaves no
    temporary file.

    Example:
        ```py
        >>> import dft_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, dft_peft.DFTConfig(top_t=0.05))
        >>> model.add_core(core)  # {module name: SparseDelta}
        >>> model.save_pretrained("edit/")
        ```
    """

    prefix: str = "dft_"
    tuner_layer_cls = DFTLayer
    target_module_mapping: dict[str, list[str]] = {}
    # The adapter the last injection created, until a load fills it: a failed load removes only an adapter it created.
    _fresh_adapter: str | None = None

    # --- injection ------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        # Remember what injection changes on the user's model, so a failed load can give it back untouched.
        if not any(isinstance(m, DFTLayer) for m in model.modules()):
            self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """PEFT's injection; for a config read from a local edit (`DFTConfig.from_pretrained`), that edit's weights
        are checked first, so a load that would fail in PEFT's code (no weights file, `modules_to_save` without
        weights) is refused before the model changes."""
        config = self.peft_config[adapter_name]
        directory = config.__dict__.pop("_edit_directory", None)
        if directory is not None:
            preflight(directory, config.modules_to_save or [], require_weights=True)
        super().inject_adapter(model, adapter_name, **kwargs)
        self._fresh_adapter = adapter_name

    def _create_and_replace(
        self,
        config: DFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, DFTLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: DFTConfig, adapter_name: str, target: nn.Module) -> DFTLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = dft_layer_class(base)
        if isinstance(base, HFConv1D) and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True for Conv1D targets (weights stored as (in, out))",
                          stacklevel=3)
            config.fan_in_fan_out = True
        elif isinstance(base, nn.Linear) and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False for torch.nn.Linear targets", stacklevel=3)
            config.fan_in_fan_out = False
        return layer_cls(target, adapter_name, config)

    # --- cores ----------------------------------------------------------------------------------------------

    def dft_layers(self) -> dict[str, DFTLayer]:
        """Base-model module name → DFT layer."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, DFTLayer)}

    def _layers_with(self, adapter_name: str) -> dict[str, DFTLayer]:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; existing adapters: {sorted(self.peft_config)}")
        return {n: m for n, m in self.dft_layers().items() if adapter_name in m.dft_values}

    def get_core(self, adapter_name: str = "default") -> dict[str, SparseDelta]:
        """The adapter's sparse deltas, keyed by base-model module name (empty modules included)."""
        return {name: layer.sparse_delta(adapter_name) for name, layer in self._layers_with(adapter_name).items()}

    def add_core(
        self, core: Mapping[str, SparseDelta], adapter_name: str = "default", lam: float | None = None, *,
        consume: bool = False,
    ) -> None:
        """Accumulate `lam · core` into an adapter: union of indices, values summed where they coincide.

        `core` maps module names (as the base model's `named_modules()` gives them, PEFT's `base_model.model.`
        prefix accepted) to `SparseDelta`s. Everything is validated before anything changes. `lam` defaults to
        the adapter config's `lam`. With `consume=True` (a dict the caller drops anyway) each module's delta leaves
        `core` as the adapter takes its copy, so a large core is never held twice.
        """
        layers = self._layers_with(adapter_name)
        lam = self.peft_config[adapter_name].lam if lam is None else lam
        check_value("add_core", "lam", lam, "positive")
        if consume and not isinstance(core, dict):
            raise TypeError(f"add_core(consume=True) needs a dict it can empty, got {type(core).__name__}")
        given, core = core, normalize_core_names(core)
        for name, delta in core.items():
            if name not in layers:
                raise ValueError(f"core names module {name!r}, which has no DFT adapter {adapter_name!r} "
                                 f"(targeted modules: {sorted(layers)[:5]}...)")
            layer = layers[name]
            if delta.numel != layer.base_numel:
                raise ValueError(f"core for {name!r} has {delta.numel} elements but the module's weight has "
                                 f"{layer.base_numel} (shape {layer.base_shape})")
            delta.validate(f"core[{name!r}]")
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before add_core")
        if self._fresh_adapter == adapter_name:
            self._fresh_adapter = None
        if consume:
            given.clear()  # the validated deltas are now held only here, and leave one module at a time
        for name in list(core):
            delta = core.pop(name)
            if delta.nnz:
                layers[name].add_sparse_delta(adapter_name, delta.scaled(lam) if lam != 1 else delta)

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
    ) -> None:
        """Create `adapter_name` = Σ weights[i] · adapters[i] (a sparse sum: union of indices); weights are finite
        real numbers of any sign, checked before anything changes."""
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("add_weighted_adapter needs as many weights as adapters, at least one")
        for i, weight in enumerate(weights):
            check_value("add_weighted_adapter", f"weights[{i}]", weight, "finite")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        cores = [self.get_core(a) for a in adapters]
        names = sorted(set().union(*cores))
        config = copy.deepcopy(self.peft_config[adapters[0]])
        config.target_modules = set(names)
        config.exclude_modules = None
        config.layers_to_transform = None
        config.layers_pattern = None
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)
        layers = self.dft_layers()
        for name in names:
            parts = [c[name].scaled(w) for c, w in zip(cores, weights) if name in c]
            layers[name].set_sparse_delta(adapter_name, coalesce(parts, layers[name].base_shape))
        self._fresh_adapter = None
        self.set_adapter(self.active_adapters)

    # --- edit files -----------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: DFTConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Encode each non-empty sparse delta (Elias–Fano coded indices, values in `config.value_dtype`, checksum) and
        the config's DFT fields, stored with the cores so that weights and config cannot come apart."""
        out: dict[str, torch.Tensor] = {CONFIG_KEY: encode_config(edit_config_fields(config))}
        for name, layer in _named_dft_layers(model).items():
            values = state_dict.get(f"{name}.dft_values.{adapter_name}")
            indices = state_dict.get(f"{name}.dft_indices.{adapter_name}")
            if values is None or indices is None or indices.numel() == 0:
                continue
            parts = encode_module(name, SparseDelta(indices, values.detach(), layer.base_shape),
                                  config.torch_value_dtype, layer.base_fingerprint)
            out.update({f"{name}.{part}.{adapter_name}": tensor for part, tensor in parts.items()})
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: DFTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Decode and validate every core of an edit file, then size the adapter to receive it.

        Only this adapter's DFT parts and the weights of its `modules_to_save` enter the model: any other key is
        refused. Nothing in the model changes unless the whole file is valid; on an invalid file the injection PEFT
        did for this load is rolled back too, so the user's model is as it was before the call.
        """
        tuner = _tuner_of(model)
        fresh = tuner is not None and tuner._fresh_adapter == adapter_name
        if tuner is not None:
            tuner._fresh_adapter = None
        try:
            decoded, extras = _decode_edit_file(model, config, adapter_name, state_dict)
        except Exception:
            if fresh:
                tuner._rollback(adapter_name)
            raise
        out = dict(extras)
        for name, layer in _named_dft_layers(model).items():
            if adapter_name not in layer.dft_values:
                continue
            delta = decoded.get(name) or SparseDelta.empty(layer.base_shape)
            layer.set_sparse_delta(adapter_name, delta)
            out[f"{name}.dft_indices.{adapter_name}"] = layer.dft_indices[adapter_name]
            out[f"{name}.dft_values.{adapter_name}"] = layer.dft_values[adapter_name].detach()
        return out

    def _rollback(self, adapter_name: str) -> None:
        """Remove `adapter_name`; when it was the only one, give the base model back as it was before injection."""
        if len(self.peft_config) > 1:
            self.delete_adapter(adapter_name)
            return
        self._unload_and_optionally_merge(merge=False)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._base_requires_grad.get(name, param.requires_grad))


def _named_dft_layers(model: nn.Module) -> dict[str, DFTLayer]:
    """State-dict prefix → DFT layer, as the state dict of `model` names them (FSDP wrapping stripped)."""
    return {
        name.replace(FSDP_PREFIX, ""): module for name, module in model.named_modules() if isinstance(module, DFTLayer)
    }


def _decode_edit_file(
    model: nn.Module, config: DFTConfig, adapter_name: str, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, SparseDelta], dict[str, torch.Tensor]]:
    """Validate an edit file's tensors → (module prefix → SparseDelta, this adapter's `modules_to_save` weights)."""
    layers = {n: m for n, m in _named_dft_layers(model).items() if adapter_name in m.dft_values}
    # A file saved from a PeftModel names modules with PEFT's prefix; a model with directly injected layers lacks it.
    aliases = {n if n.startswith(PEFT_PREFIX) else PEFT_PREFIX + n: n for n in layers}
    groups, others = group_parts((k, v) for k, v in state_dict.items() if not is_config_key(k))
    if others:  # PEFT has renamed a listed module's weights to its copy: `<module>.modules_to_save.<adapter>.<name>`
        copies = {k: v for k, v in model.state_dict().items() if f"{MODULES_TO_SAVE}{adapter_name}." in k}
        check_extra_tensors(others, copies, "the edit file")
    decoded, unchecked = {}, False
    for prefix, parts in groups.items():
        name = prefix if prefix in layers else aliases.get(prefix)
        if name is None:
            raise ValueError(f"the edit changes module {prefix.removeprefix(PEFT_PREFIX)!r}, which this model has no "
                             "DFT layer for: was it made for another base model or with other target_modules?")
        if name in decoded:
            raise ValueError(f"the edit file holds module {name.removeprefix(PEFT_PREFIX)!r} twice")
        layer = layers[name]
        decoded[name], checked = decode_module(prefix.removeprefix(PEFT_PREFIX), parts, layer.base_numel,
                                               layer.base_shape,
                                               layer.base_fingerprint if config.verify_base_fingerprint else None)
        unchecked |= not checked
    if unchecked:
        warnings.warn(UNCHECKED_WARNING.format(path="the edit file"), stacklevel=4)
    return decoded, others


def _tuner_of(model: nn.Module) -> DFTModel | None:
    tuner = model if isinstance(model, DFTModel) else getattr(model, "base_model", None)
    return tuner if isinstance(tuner, DFTModel) else None
