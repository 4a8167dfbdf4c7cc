"""How many programs of a kernel fit on one Hopper SM (H100, H200), from its registers per thread,
warps and shared memory: the arithmetic behind ncu's "Block Limit Registers / Shared Mem", for
bench/kernels_static.py's compiled configs (no GPU needed)."""

from __future__ import annotations

# Hopper's SM (H100, H200): 64K 32-bit registers, allocated per warp in units of 256; 228 KiB of
# shared memory, of which each program also takes 1 KiB for the driver; at most 64 warps and 32
# programs. The shared-memory limit is the one under the largest carveout (228 KiB): where another
# limit binds first the driver may take a smaller one, and ncu's "Block Limit Shared Mem" is then
# lower (dx on the H100: 2 under a 132 KiB carveout, where registers allow 2 anyway). Otherwise ncu's
# limits agree with programs_per_sm (bench/NOTES_kernels.md Run 15; tests/kernels/test_sm90_compile.py).
SM_REGISTERS, SM_SHARED, DRIVER_SHARED, SM_WARPS, SM_PROGRAMS = 65536, 228 * 1024, 1024, 64, 32


def programs_per_sm(registers: int, warps: int, shared_bytes: int) -> tuple[int, int]:
    """-> (programs per SM that the registers allow, programs that shared memory allows); the SM runs
    the smaller number (capped by 64 warps and 32 programs), and occupancy is that times warps / 64."""
    per_warp = -(-registers * 32 // 256) * 256
    cap = min(SM_PROGRAMS, SM_WARPS // warps)
    return (min(cap, SM_REGISTERS // (per_warp * warps)),
            min(cap, SM_SHARED // (shared_bytes + DRIVER_SHARED)))
