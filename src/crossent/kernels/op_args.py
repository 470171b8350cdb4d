"""The one place where option objects become custom-op arguments, and are rebuilt from them.

``torch.library`` ops take plain ints, floats, bools and strings, not Python objects. Each option type
(a frozen dataclass or NamedTuple of such fields: :class:`~crossent._options.RowOptions`,
:class:`~crossent.kernels.shard.VocabShard`, ...) is written into an op's schema by :func:`schema`, flattened
by :func:`flatten` at the call and rebuilt by :func:`rebuild` inside the op, all from the type's own
field list: no option list is written out by hand.

Example:
    >>> from crossent._options import RowOptions
    >>> schema(RowOptions)
    'int ignore_index, float label_smoothing, float z_loss, float? softcap'
    >>> flatten(RowOptions(z_loss=1e-4))  # after schema() has seen the type
    (-100, 0.0, 0.0001, None)
    >>> rebuild((-100, 0.0, 0.0001, None), RowOptions)
    [RowOptions(ignore_index=-100, label_smoothing=0.0, z_loss=0.0001, softcap=None)]
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Sequence, Tuple

# Python annotation (as a string: the option modules use `from __future__ import annotations`) -> schema type
_SCHEMA_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str",
                 "Optional[int]": "int?", "Optional[float]": "float?", "Optional[str]": "str?"}  # fmt: skip


def _fields(kind) -> List[Tuple[str, str]]:
    """(name, annotation) of a dataclass's or NamedTuple's fields, in order."""
    if dataclasses.is_dataclass(kind):
        return [(f.name, _annotation(f.type)) for f in dataclasses.fields(kind)]
    return [(name, _annotation(kind.__annotations__[name])) for name in kind._fields]


def _annotation(t) -> str:
    """An annotation as its source text: a string, a ForwardRef (NamedTuple fields) or a plain class."""
    if isinstance(t, str):
        return t
    return getattr(t, "__forward_arg__", None) or t.__name__


def schema(*kinds) -> str:
    """The schema fragment ``"int ignore_index, float label_smoothing, ..."`` of the option types, in order.

    Called when an op is defined (at import); it also records each type's field names on the type, so that
    :func:`flatten` and :func:`rebuild`, which run inside traced code, need no introspection.
    """
    parts = []
    for kind in kinds:
        items = _fields(kind)
        kind._op_field_names = tuple(name for name, _ in items)
        parts += [f"{_SCHEMA_TYPES[annotation]} {name}" for name, annotation in items]
    return ", ".join(parts)


def flatten(*parts) -> Tuple[Any, ...]:
    """The op arguments of option objects, in :func:`schema`'s order."""
    return tuple(getattr(part, name) for part in parts for name in type(part)._op_field_names)


def rebuild(args: Sequence[Any], *kinds) -> list:
    """The option objects from op arguments (:func:`flatten`'s inverse); extra trailing arguments are
    returned as they are, after the objects."""
    out, at = [], 0
    for kind in kinds:
        width = len(kind._op_field_names)
        out.append(kind(*args[at : at + width]))
        at += width
    return out + list(args[at:])
