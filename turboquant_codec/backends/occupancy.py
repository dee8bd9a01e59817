"""Occupancy arithmetic shared by the GPU backends (neither CuPy's RawModule nor the launch path of
the Numba backend exposes an occupancy query): how many blocks of a kernel one SM holds at once."""

from __future__ import annotations


def resident_blocks(regs: int, smem: int, threads: int, sm_regs: int, sm_smem: int, sm_threads: int) -> int:
    """Blocks of a kernel one SM holds at once.

    Parameters
    ----------
    regs : int
        Registers per thread; allocated per warp in units of 256.
    smem : int
        Shared memory per block, static plus dynamic; the driver reserves 1 KB more per block.
    threads : int
        Threads per block.
    sm_regs, sm_smem, sm_threads : int
        The SM's registers, shared memory and threads (device attributes, or a lower cap the
        caller aims at).

    Returns
    -------
    int
        The tightest of the three limits, at least 1.
    """
    regs_per_warp = -(-regs * 32 // 256) * 256
    limits = (sm_regs // (regs_per_warp * -(-threads // 32)), sm_smem // (smem + 1024), sm_threads // threads)
    return max(1, min(limits))
