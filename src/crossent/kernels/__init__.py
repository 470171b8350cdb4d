"""Row kernels behind ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op each.

``impl`` picks the backend: ``"torch"`` (torch ops, any device) or ``"triton"`` (GPU, or CPU under
``TRITON_INTERPRET=1``). The ops are the only entry points the autograd layer uses.
"""

from crossent.kernels.ops import ce_backward, ce_backward_inplace, ce_forward, ce_target_grad

__all__ = ["ce_forward", "ce_backward", "ce_backward_inplace", "ce_target_grad"]
