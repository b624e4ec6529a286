"""The PEFT tuner alone: `DFTConfig`, the DFT layers, `DFTModel` (only PEFT's hooks), scatter-merge dispatch and the
registration of the "DFT" type with PEFT."""
