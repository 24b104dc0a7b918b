"""The operator classes of an op table: one name each, torch-free.

Every op-table row has one ``op_class`` (the rules that assign it are in
:mod:`cohw_utils.spine.costs`): ``contraction`` (GEMMs, convolutions, attention), ``normalization``,
``element-wise``, ``data movement`` (copies, gathers, layout changes that move bytes), ``view``
(metadata only: no bytes, no FLOPs) and ``other`` (sorting, search, random numbers...).
A per-rank table of a sharded model (:mod:`cohw_utils.views.parallel`) has one more class,
``communication``: a collective (all-reduce, all-gather, send...), whose time is the link's,
not the chip's; it is kept out of :data:`OP_CLASSES`, which lists the classes of one device's work. Kept here,
below every layer, so that code which only reads tables (the views, a warm ``predict``) need not
import torch.

Used by every chapter that groups costs by operator class (2, 4.1-4.3).
"""
from __future__ import annotations

CONTRACTION = "contraction"
NORMALIZATION = "normalization"
ELEMENTWISE = "element-wise"
DATA_MOVEMENT = "data movement"
VIEW = "view"
OTHER = "other"
COMMUNICATION = "communication"
OP_CLASSES = (CONTRACTION, NORMALIZATION, ELEMENTWISE, DATA_MOVEMENT, VIEW, OTHER)
