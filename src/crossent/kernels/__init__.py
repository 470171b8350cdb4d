"""Kernels: per-row loss, log-sum-exp and gradients (torch ops and Triton), the fused linear CE's plan, step
and loops, and the ``torch.library`` custom ops that wrap them (``ops``, ``linear_ops``). Nothing is imported
here, so that a kernel module never imports another through this package's initialisation."""
