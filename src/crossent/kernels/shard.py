"""Which columns of a C-class head a tensor holds, and which process group holds the rest."""

from __future__ import annotations

from typing import NamedTuple, Optional


class VocabShard(NamedTuple):
    """The columns ``[vocab_start, vocab_start + V_s)`` of ``num_classes`` classes; ``group_name`` names the
    ``torch.distributed`` process group whose ranks hold the other columns (None: this process holds them
    all, e.g. the whole row, or the vocabulary pieces of one fused block)."""

    vocab_start: int
    num_classes: int
    group_name: Optional[str] = None

    @staticmethod
    def whole(num_classes: int) -> "VocabShard":
        """All ``num_classes`` columns, in this process."""
        return VocabShard(0, num_classes, None)

    def is_whole(self, width: int) -> bool:
        """Whether a tensor ``width`` columns wide holds every class, with no other rank involved."""
        return self.vocab_start == 0 and self.num_classes == width and self.group_name is None
