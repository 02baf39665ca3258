"""The one node selector: which nodes a user (or the accuracy search) keeps out of quantization.

Node names are matched by patterns: a glob (``conv*``, ``block[12]_*``, matched against the whole
name, case-sensitive) or ``re:`` followed by a regular expression searched anywhere in the name
(``re:^head\\.`` anchors it). Exact names (the float nodes an accuracy search or a recipe hands
over) are a separate set, so a name holding ``*``, ``?`` or ``[`` never needs escaping. Op types are
included (empty: every type the caller supports) or excluded by exact name.

Every place that asks "is this node excluded?" (static planning, the Relu/Clip fold, the dynamic,
weight-only and fp16 modes) asks a ``NodeSelector``, so a pattern means the same thing everywhere.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from quantcli.core.options import StrEnum

__all__ = ["Exclusion", "ExclusionKind", "NodeSelector", "first_matching_pattern", "pattern_matches"]

#: prefix of a regular-expression pattern (``re:^encoder\.``); anything else is a glob
REGEX_PREFIX = "re:"


def pattern_matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` (a glob, or ``re:`` + a regex searched in the name) matches node ``name``."""
    if pattern.startswith(REGEX_PREFIX):
        return re.search(pattern[len(REGEX_PREFIX) :], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def first_matching_pattern(patterns: Iterable[str], name: str) -> str | None:
    """The first of ``patterns`` that matches ``name``, or None."""
    return next((p for p in patterns if pattern_matches(p, name)), None)


class ExclusionKind(StrEnum):
    """Why a selector leaves a node out."""

    OP_TYPE_EXCLUDED = "op-type-excluded"
    OP_TYPE_NOT_SELECTED = "op-type-not-selected"
    NAME_PATTERN = "name-pattern"
    NAME = "name"


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A node the selector leaves out: the kind of rule and the pattern or name that matched."""

    kind: ExclusionKind
    matched: str = ""


@dataclass(frozen=True, slots=True)
class NodeSelector:
    """Node-name patterns, exact names and op-type include/exclude, checked in that documented order.

    Attributes:
        patterns: node-name patterns (glob, or ``re:`` + regex) left out.
        names: exact node names left out (no pattern syntax).
        op_types: op types selected; empty selects every op type.
        exclude_op_types: op types left out (checked before ``op_types``).
    """

    patterns: tuple[str, ...] = ()
    names: frozenset[str] = field(default_factory=frozenset)
    op_types: frozenset[str] = field(default_factory=frozenset)
    exclude_op_types: frozenset[str] = field(default_factory=frozenset)

    def name_exclusion(self, name: str) -> Exclusion | None:
        """Why the node called ``name`` is left out by its name (patterns first, then exact names), or None."""
        pattern = first_matching_pattern(self.patterns, name)
        if pattern is not None:
            return Exclusion(ExclusionKind.NAME_PATTERN, pattern)
        if name in self.names:
            return Exclusion(ExclusionKind.NAME, name)
        return None

    def op_type_exclusion(self, op_type: str) -> Exclusion | None:
        """Why nodes of ``op_type`` are left out, or None (exclusions first, then the selected types)."""
        if op_type in self.exclude_op_types:
            return Exclusion(ExclusionKind.OP_TYPE_EXCLUDED, op_type)
        if self.op_types and op_type not in self.op_types:
            return Exclusion(ExclusionKind.OP_TYPE_NOT_SELECTED, op_type)
        return None

    def explicit_exclusion(self, node: onnx.NodeProto) -> Exclusion | None:
        """Why ``node`` is left out by name or by an excluded op type, or None; the op types selected are not asked.

        For nodes that are absorbed rather than quantized (a Relu/Clip folded into its producer): an
        op type outside ``op_types`` may still be absorbed, an op type in ``exclude_op_types`` may not.
        """
        if node.op_type in self.exclude_op_types:
            return Exclusion(ExclusionKind.OP_TYPE_EXCLUDED, node.op_type)
        return self.name_exclusion(node.name)

    def exclusion(self, node: onnx.NodeProto) -> Exclusion | None:
        """Why ``node`` is left out (op type first, then name), or None when it is selected."""
        return self.op_type_exclusion(node.op_type) or self.name_exclusion(node.name)

    def excluded_names(self, nodes: Iterable[onnx.NodeProto]) -> frozenset[str]:
        """Names of ``nodes`` left out by their name (op types are not consulted)."""
        return frozenset(n.name for n in nodes if self.name_exclusion(n.name) is not None)
