"""Shared-memory limits, layouts and occupancy arithmetic shared by the GPU backends (neither CuPy's
RawModule nor the launch path of the Numba backend exposes an occupancy query): how many blocks of a
kernel one SM holds at once."""

from __future__ import annotations

from dataclasses import dataclass

# Shared memory a block gets without opting in: the Numba kernels stay within it (static arrays);
# a RawModule kernel that needs more opts in once per build (``max_dynamic_shared_size_bytes``).
STATIC_SMEM_LIMIT = 48 * 1024
# Shared memory a block may opt into on sm_90 (H100/H200): cupy_raw's and cupy_paged's budget.
SM90_SMEM_OPTIN = 227 * 1024


@dataclass(frozen=True)
class SharedLayout:
    """One kernel's dynamic shared memory: named parts (bytes each) in the order the kernel carves
    them."""

    parts: tuple[tuple[str, int], ...]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel asks for."""
        return sum(size for _, size in self.parts)

    def offset(self, name: str) -> int:
        """Byte offset of part ``name``."""
        at = 0
        for part, size in self.parts:
            if part == name:
                return at
            at += size
        raise KeyError(name)


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
