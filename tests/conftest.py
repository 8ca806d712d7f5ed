import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. This must be set
# before triton is first imported (sr3fast imports it lazily, on first use of the triton backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
