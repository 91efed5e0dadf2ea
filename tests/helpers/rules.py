"""The built-in rules as the tests pin them (``rules/*.yaml``, by name): a new rule is added here once."""

BUILTIN_RULES = [
    "basic",
    "bottleneck",
    "conv",
    "inception",
    "inverted_residual",
    "inverted_residual_all",
    "mbconv_se",
    "mmcv_after_conv2",
    "mobilenetv3_se",
    "regnet_se",
    "residual",
]
