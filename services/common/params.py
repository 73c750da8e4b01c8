"""A query parameter refused, and why: the one shape in which the operators' queries (metrics'
figures, payments' reports) name what is wrong with a request. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamError:
    parameter: str
    detail: str
