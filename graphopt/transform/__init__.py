"""Passes and pipelines: Pass, PassResult, PassContext, registry, pipeline syntax, PassManager."""

from graphopt.transform.instruments import (
    DumpIRInstrument,
    NumericCheckInstrument,
    PassInstrument,
    PassRecord,
    TimingInstrument,
    VerifyInstrument,
)
from graphopt.transform.manager import PassManager, PipelineResult, optimize
from graphopt.transform.pass_base import Pass, PassContext, PassError, PassResult, Rewrite
from graphopt.transform.pipeline import OPT_LEVELS, format_pipeline, parse_pipeline, with_contrib_ops
from graphopt.transform.registry import ENTRY_POINT_GROUP, get_pass, list_passes, register_pass

__all__ = [
    "ENTRY_POINT_GROUP", "OPT_LEVELS", "DumpIRInstrument", "NumericCheckInstrument", "Pass", "PassContext",
    "PassError", "PassInstrument", "PassManager", "PassRecord", "PassResult", "PipelineResult", "Rewrite",
    "TimingInstrument", "VerifyInstrument", "format_pipeline", "get_pass", "list_passes", "optimize",
    "parse_pipeline", "register_pass", "with_contrib_ops",
]
