"""autograd.Function classes: call the kernels' custom ops, save what backward needs, hand gradients back.

One module per family (``cross_entropy``, ``linear``, ``log_probs``, ``distill``) and what they share
(``common``). No loss math and no input validation here: the kernels compute, the functional layer validates and
reduces. What is here: which tensors are saved, which gradients are asked for, and, for vocab-parallel calls, the
one communication autograd itself must do (the sum of each rank's share of the input gradient). One Function per
algorithm, the same for one process and for vocab-parallel ranks: the ``shard`` argument is the only difference.
"""
