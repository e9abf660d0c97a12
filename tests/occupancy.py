"""Resident warps per SM (occupancy) of a compiled kernel on sm_80 and sm_90, from its registers, shared
memory and block size: the one formula of both compile gates (tests/compile_gate.py for the Triton
kernels, tests/test_cuda_compile.py for the CUDA ones) and of benchmarks/gpu_check.py."""
from dataclasses import dataclass

# Memory-bound kernels stream HBM with little arithmetic per byte: only many resident warps keep enough
# bytes in flight to reach the memory bandwidth. Both gates fail one below this.
MIN_MEMORY_BOUND_OCCUPANCY = 0.25  # 16 of 64 warps per SM


@dataclass(frozen=True)
class SmLimits:
    """What one SM of a compute capability holds (CUDA C++ Programming Guide, technical specifications per
    compute capability), allocated as cuda_occupancy.h does."""

    shared_bytes: int                      # shared memory usable by blocks
    registers: int = 65536
    register_partitions: int = 4           # the register file is split over the SM's 4 schedulers
    register_unit: int = 256               # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    shared_unit: int = 128                 # shared memory is allocated per block in units of 128 bytes
    shared_reserved_per_block: int = 1024  # by the driver


SM_LIMITS = {80: SmLimits(shared_bytes=164 * 1024), 90: SmLimits(shared_bytes=228 * 1024)}


def resident_warps(registers: int, shared_bytes: int, threads: int, limits: SmLimits) -> int:
    """Warps resident on one SM for a kernel of `registers` per thread and `shared_bytes` of shared memory,
    launched in blocks of `threads`: whole blocks, as many as the registers (ceil(32 registers / 256) * 256
    a warp; each register partition holds whole warps), the shared memory (plus the 1 KiB the driver
    reserves per block), the warp slots and the block slots allow. Occupancy is this over
    limits.max_warps."""
    warps_per_block = _round_up(threads, 32) // 32
    registers_per_warp = _round_up(registers * 32, limits.register_unit)
    warps_by_registers = (limits.registers // limits.register_partitions // registers_per_warp
                          * limits.register_partitions)
    shared_per_block = _round_up(shared_bytes + limits.shared_reserved_per_block, limits.shared_unit)
    blocks = min(warps_by_registers // warps_per_block, limits.shared_bytes // shared_per_block,
                 limits.max_warps // warps_per_block, limits.max_blocks)
    return blocks * warps_per_block


def _round_up(value, unit):
    return -(-value // unit) * unit
