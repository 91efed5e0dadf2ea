"""The examples. Most run as plain scripts; ``finetune_digits`` reuses the fine-tuning benchmark's code
and runs from the repository root as ``.venv/bin/python -m examples.finetune_digits``."""
