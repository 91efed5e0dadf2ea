"""Training frameworks that rebuild, save and load models their own way: ultralytics YOLO, Hugging Face
transformers, timm. Each registers what attn_inject needs to know about it in surgery/frameworks.py
(importing this package does: the package root imports it); none of them is imported until one of
its objects is handled."""

from __future__ import annotations

from ..surgery.frameworks import Framework, register_framework
from . import hugging_face, yolo, yolo_checkpoints
from .timm_models import register_timm_model, unregister_timm_model
from .yolo import keep_blocks

register_framework(
    Framework(
        "ultralytics",
        holds=yolo.held_model,
        example_input=yolo.example_input,
        keep=yolo.kept,
        owns=yolo.is_ultralytics_model,
        arch=yolo.arch_of,
        build=yolo.build_model,
        injected=yolo.warn_bare_model,
        load_path=yolo_checkpoints.load_yolo_checkpoint,
    )
)

register_framework(
    Framework(
        "transformers",
        owns=hugging_face.is_transformers_model,
        recipe_changed=hugging_face.recipe_changed,
        load_path=hugging_face.load_folder,
    )
)

__all__ = ["keep_blocks", "register_timm_model", "unregister_timm_model"]
