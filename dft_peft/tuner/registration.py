"""Registers DFT with PEFT.

PEFT resolves a method by its `PeftType` member, and `register_peft_method` refuses names that have no member, so an
out-of-tree method has to add one. `PeftType` is a `str` enum: we create the member the way `EnumType` does and enter
it in every lookup table (`PeftType.DFT`, `PeftType("DFT")`, `PeftType["DFT"]`, iteration), then register the config
and tuner classes. Both steps are idempotent, so importing `dft_peft` twice (or reloading it) is harmless.
"""

from __future__ import annotations

import importlib.metadata

try:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method
except ImportError as err:  # the registration API moved: say which release, not just which name
    raise ImportError(f"dft-peft registers DFT through PEFT's method registry, which peft "
                      f"{importlib.metadata.version('peft')} does not have ({err}); install a tested release: "
                      "pip install 'peft>=0.18,<0.22'") from err

DFT_NAME = "DFT"


def ensure_peft_type_member(name: str = DFT_NAME) -> PeftType:
    """Return `PeftType[name]`, adding the member if this PEFT version does not have it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # Class attribute access (`PeftType.DFT`): set it the way EnumType exposes members.
    type.__setattr__(PeftType, name, member)
    if PeftType[name] is not member or PeftType(name) is not member or member not in list(PeftType):
        raise RuntimeError(f"could not add {name!r} to peft.utils.PeftType; this PEFT version is not supported")
    return member


def register(config_cls, model_cls) -> None:
    """Make `"DFT"` resolvable by get_peft_model, PeftConfig/PeftModel.from_pretrained and AutoPeftModel*."""
    peft_type = ensure_peft_type_member()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type), PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered == (model_cls, config_cls):
        return
    # A reload of dft_peft brings new class objects: drop the stale entries before registering again.
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        mapping.pop(peft_type, None)
    register_peft_method(name=DFT_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
