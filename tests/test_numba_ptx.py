"""Every Numba CUDA kernel compiles to PTX for sm_90 (H100/H200) without a GPU.

The suite runs under Numba's CUDA simulator, which never types the kernels; so the compilation runs
in a subprocess with ``NUMBA_ENABLE_CUDASIM`` unset, over the argument types the host code passes
(Python ints -> int64, bools -> boolean, floats -> float64, C-contiguous device arrays). A kernel
added to the module without a signature here fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    from numba import cuda, types as T
    from numba.cuda.dispatcher import CUDADispatcher
    from turboquant_codec.backends import numba_cuda as nc

    f32_1, i32_1 = T.float32[::1], T.int32[::1]
    f32_2, f64_3, f32_3 = T.float32[:, ::1], T.float64[:, :, ::1], T.float32[:, :, ::1]
    u8_2, u16_2, i32_2 = T.uint8[:, ::1], T.uint16[:, ::1], T.int32[:, ::1]
    i, b, f64, f32 = T.int64, T.boolean, T.float64, T.float32
    INPUTS = [T.float32[:, ::1], T.float16[:, ::1], T.uint16[:, ::1]]  # uint16 = bfloat16 bits

    def signatures(x):
        return {
            "_encode_kernel": (x, b, u16_2, b, i, u8_2, i32_1, i, f32_3, f32_3, f32_2, f32_2, i32_2,
                               i, i, b),
            "_decode_kernel": (u8_2, u16_2, b, i, f32_2, i, f32_3, f32_3, f32_2, i32_2, i, b, f64),
            "_query_kernel": (x, b, u16_2, b, i, f32_2, i, f32_3, f32_3, i, b),
            "_scores_kernel": (f32_2, u8_2, f32_3, i, i, f32_2, i32_2, i, f64),
            "_attention_kernel": (f32_2, x, b, u8_2, u8_2, x, x, b, i, i, i, i, i, i, f32, i, i, i,
                                  i, f32_2, i32_2, i, f64, f32_2, i32_2, i, f64, f32_2, f32_2, f32_3),
            "_combine_kernel": (f32_2, f32_2, f32_3, i, u16_2, b, i, f32_2, i, f32_3, f32_3, i, b),
            "_combine_rows_kernel": (f32_2, f32_2, f32_3, i, u16_2, b, i, f32_2, f32_3, f32_3, i, b),
            "_energy_kernel": (x, b, i, i, f64_3),
        }

    kernels = sorted(
        name for name, obj in vars(nc).items()
        if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")
    )
    missing = sorted(set(kernels) - set(signatures(INPUTS[0])))
    if missing:
        sys.exit(f"kernels without a PTX signature in the test: {missing}")
    # Kernels that read no float input compile once; the others once per input dtype.
    todo = sorted({(name, sig) for x in INPUTS for name, sig in signatures(x).items()}, key=str)
    for name, sig in todo:
        ptx, _ = cuda.compile_ptx(getattr(nc, name).py_func, sig, cc=(9, 0))
        assert ".target sm_90" in ptx, name
        print("ok", name, len(ptx))
    # The warp attention kernels are built per (K config, V config, GQA group): compile a spread
    # that covers split and single groups, QJL signs on either side and 1, 4 and 8 heads. Each one
    # is fully unrolled code that costs NVVM ~2 CPU minutes, hence three, not every pairing.
    from turboquant_codec.config import CodecConfig as C
    u32_1 = T.uint32[::1]
    warp_sig = (f32_2, u32_1, u32_1, i, i, i, f32, f32_2, f32_2, f32_2, f32_2, f32_3)
    built = 0
    for kc, vc, heads in [(C(128, 3.5), C(128, 3.5), 4), (C(64, 3, "prod"), C(64, 2.5), 1),
                          (C(32, 2), C(32, 3.5, "prod"), 8)]:
        kern, _ = nc._fast_attention_kernel(kc, vc, heads)
        ptx, _ = cuda.compile_ptx(kern.py_func, warp_sig, cc=(9, 0))
        assert ".target sm_90" in ptx and ".f64" not in ptx and ".local" not in ptx, (kc, vc, heads)
        built += 1
    print("compiled", len(todo), "warp", built)
    """
)


def test_every_kernel_compiles_to_sm90_ptx() -> None:
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled 16 warp 3" in proc.stdout, proc.stdout
