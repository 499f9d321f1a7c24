"""The precision policy, written down once (as diffusers' training examples): the frozen weights in
the low-precision dtype of --mixed_precision; the trained parameters, the ESD target and the loss in fp32;
the trained model's forwards under autocast (see :class:`esd.core.views.UNetViews`). Saved weights take
--save_precision."""

import torch

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision
SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
