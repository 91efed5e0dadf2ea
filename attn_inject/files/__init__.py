"""Files: the .safetensors format with its recipe, save/load/replay, adapters, plain checkpoints,
--arch strings, patching a checkpoint, atomic output."""
