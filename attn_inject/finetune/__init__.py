"""Fine-tuning patched models: what trains, parameter groups, the data pipeline, the loop, DDP.

from attn_inject.finetune import param_groups, set_trainable, trainable_summary
set_trainable(model, "attention")            # or "all"
opt = torch.optim.AdamW(param_groups(model, lr=1e-4, attention_lr=1e-3))
print(trainable_summary(model))
"""

from .params import AttentionFirst, attention_blocks, count_parameters, param_groups, set_trainable, trainable_summary

__all__ = [
    "AttentionFirst",
    "attention_blocks",
    "count_parameters",
    "param_groups",
    "set_trainable",
    "trainable_summary",
]
