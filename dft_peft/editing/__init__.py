"""Editing: the rounds of `edit`, its arguments and report, the delta sources behind one `FineTune` interface (full
fine-tune, LoRA, core values), training, the model's own old answers, the output anchor, and `build_edit`."""
