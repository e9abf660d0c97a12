"""tests/occupancy.py's resident warps per SM, by hand from the allocation rules (registers per warp in units
of 256, held whole by each of the 4 register partitions; shared memory per block in units of 128 bytes
plus 1 KiB reserved; 64 warps and 32 blocks per SM)."""
from occupancy import SM_LIMITS, resident_warps

SM80, SM90 = SM_LIMITS[80], SM_LIMITS[90]


def test_triton_programs_of_four_warps():
    # 199 registers: 6400 a warp, 2 warps per register partition, 8 per SM = 12.5%
    assert resident_warps(199, 0, 128, SM80) == 8
    # 128: 4096 a warp, 16 warps = 25%; one more register and a partition holds 3 warps: 12
    assert resident_warps(128, 0, 128, SM90) == 16
    assert resident_warps(129, 0, 128, SM90) == 12
    # 32: 64 warps by registers, the SM's warp limit too: 100%
    assert resident_warps(32, 0, 128, SM80) == 64
    # 40 KiB of shared memory (+ 1 KiB reserved) a program: 4 programs in 164 KiB, 5 in 228 KiB
    assert resident_warps(32, 40 * 1024, 128, SM80) == 16
    assert resident_warps(32, 40 * 1024, 128, SM90) == 20


def test_cuda_blocks_of_256_threads():
    # 133 registers: 4352 a warp, 3 warps per register partition, 12 per SM: 1 block of 8 warps = 12.5%
    assert resident_warps(133, 0, 256, SM90) == 8
    # 128: 4096 a warp, 16 warps: 2 blocks = 25%
    assert resident_warps(128, 0, 256, SM90) == 16
    # 32: 64 warps by registers, the SM's warp limit too: 8 blocks = 100%
    assert resident_warps(32, 0, 256, SM80) == 64
    # 48 KiB static shared memory (+ 1 KiB reserved) a block: 3 blocks in 164 KiB, 4 in 228 KiB
    assert resident_warps(32, 48 * 1024, 256, SM80) == 24
    assert resident_warps(32, 48 * 1024, 256, SM90) == 32


def test_the_block_limit():
    assert resident_warps(16, 0, 32, SM90) == 32  # one-warp blocks: 32 blocks at most
