"""twinbid shop floor: the physical side -- clocks, simulated assets, transport times.

Depends on the standard library only; never imports ``agents``, ``scenarios``, ``protocol`` or
``registry``. See ``docs/shopfloor.md``.
"""

from .asset import Asset, Estimate, ExecutionRecord, Job, JobState, JobStatus
from .breakdowns import Breakdown, Breakdowns
from .clock import (
    CLOCK_KINDS,
    DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS,
    AcceleratedClock,
    Clock,
    RealClock,
    Timer,
    VirtualClock,
    make_clock,
)
from .durations import DurationModel, Fixed, Normal, Triangular, Uniform, parse_duration
from .execution_log import ExecutionLog
from .simulated import SimulatedAsset
from .transport import Distances
from .warehouse import Warehouse
from .workstation import Workstation

__all__ = [
    "CLOCK_KINDS",
    "DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS",
    "AcceleratedClock",
    "Asset",
    "Breakdown",
    "Breakdowns",
    "Clock",
    "Distances",
    "DurationModel",
    "Estimate",
    "ExecutionLog",
    "ExecutionRecord",
    "Fixed",
    "Job",
    "JobState",
    "JobStatus",
    "Normal",
    "RealClock",
    "SimulatedAsset",
    "Timer",
    "Triangular",
    "Uniform",
    "VirtualClock",
    "Warehouse",
    "Workstation",
    "make_clock",
    "parse_duration",
]
