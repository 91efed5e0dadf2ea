"""The built-in YAML rules; this folder ships inside the wheel as ``attn_inject.builtin_rules``."""
