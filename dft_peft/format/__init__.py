"""The edit-file format: `SparseDelta`, the Elias–Fano index codec, the one reader and writer of edit files, the model
card, and the safetensors checkpoint reader of `build_edit`."""
