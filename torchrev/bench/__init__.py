"""Importable measuring code for benchmarks and tests: memory, flops and timing."""

from .allocator import AllocatorBytes as AllocatorBytes
from .allocator import allocator_step_peak as allocator_step_peak
from .flops import CountFlops as CountFlops
from .flops import step_flops as step_flops
from .memory import LiveTensorBytes as LiveTensorBytes
from .memory import peak_live_bytes as peak_live_bytes
from .memory import step_memory as step_memory
from .memory import training_step_peak as training_step_peak
from .results import write_results as write_results
from .syncs import SyncCounter as SyncCounter
from .timing import interleaved_times as interleaved_times
from .timing import median_ratio as median_ratio
from .timing import retain_freed_memory as retain_freed_memory
