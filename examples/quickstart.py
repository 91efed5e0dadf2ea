"""Plan, inject and check: ECA after every bottleneck of a timm ResNet-50.

python examples/quickstart.py
"""

import timm
import torch

from attn_inject import inject, plan

model = timm.create_model("resnet50", pretrained=False).eval()  # pretrained=True with hub access
x = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    before = model(x)

for site in plan(model, "eca", after="bottleneck"):  # a dry run: nothing changes
    print(site)

model = inject(model, "eca", after="bottleneck")  # same object, same class, new blocks
with torch.no_grad():
    after = model(x)
print("bitwise identical:", torch.equal(before, after))
# ECA takes timm's empty attention slot `se`, so the keys are those of timm's ecaresnet50d
print("new parameters:", [k for k in model.state_dict() if ".se." in k][:3], "...")
