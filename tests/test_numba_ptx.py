"""Every Numba CUDA kernel compiles to PTX for sm_90 (H100/H200) without a GPU.

The suite runs under Numba's CUDA simulator, which never types the kernels; so the compilation runs
in subprocesses (the module's kernels and each warp attention configuration, concurrently) with
``NUMBA_ENABLE_CUDASIM`` unset, over the argument types the host code passes (Python ints -> int64,
bools -> boolean, floats -> float64, C-contiguous device arrays). A kernel added to the module
without a signature here fails the test.
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
    from turboquant_codec.backends import numba_kernels as nk
    from turboquant_codec.backends import numba_warp_attention as nw

    f32_1, i32_1 = T.float32[::1], T.int32[::1]
    f32_2, f64_3, f32_3 = T.float32[:, ::1], T.float64[:, :, ::1], T.float32[:, :, ::1]
    u8_2, u16_2, i32_2 = T.uint8[:, ::1], T.uint16[:, ::1], T.int32[:, ::1]
    i, b, f64, f32 = T.int64, T.boolean, T.float64, T.float32
    INPUTS = [T.float32[:, ::1], T.float16[:, ::1], T.uint16[:, ::1]]  # uint16 = bfloat16 bits

    def signatures(x):
        return {
            "encode_kernel": (x, b, u16_2, b, i, u8_2, i32_1, i, f32_3, f32_3, f32_2, f32_2, i32_2,
                               i, i, b),
            "decode_kernel": (u8_2, u16_2, b, i, f32_2, i, f32_3, f32_3, f32_2, i32_2, i, b, f64),
            "query_kernel": (x, b, u16_2, b, i, f32_2, i, f32_3, f32_3, i, b),
            "scores_kernel": (f32_2, u8_2, f32_3, i, i, f32_2, i32_2, i, f64),
            "attention_kernel": (f32_2, x, b, u8_2, u8_2, x, x, b, i, i, i, i, i, i, f32, i, i, i,
                                  i, f32_2, i32_2, i, f64, f32_2, i32_2, i, f64, f32_2, f32_2, f32_3),
            "combine_rows_kernel": (f32_2, f32_2, f32_3, i, u16_2, b, i, f32_2, f32_3, f32_3, i, b),
            "energy_kernel": (x, b, i, i, f64_3),
        }

    kernels = sorted(
        name for name, obj in vars(nk).items()
        if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")
    )
    missing = sorted(set(kernels) - set(signatures(INPUTS[0])))
    if missing:
        sys.exit(f"kernels without a PTX signature in the test: {missing}")
    part = sys.argv[1]
    if part == "kernels":
        # Kernels that read no float input compile once; the others once per input dtype.
        todo = sorted({(name, sig) for x in INPUTS for name, sig in signatures(x).items()}, key=str)
        for name, sig in todo:
            ptx, _ = cuda.compile_ptx(getattr(nk, name).py_func, sig, cc=(9, 0))
            assert ".target sm_90" in ptx, name
            if name == "energy_kernel":
                # Squares in float64 (a float32 square overflows past ~1.8e19: the channel choice
                # of vectors at 1e30 fell to index order on the GPU).
                assert "mul.f32" not in ptx and ("fma.rn.f64" in ptx or "mul.rn.f64" in ptx), ptx
        print("compiled", len(todo))
    else:
        # A warp attention kernel, built per (K config, V config, GQA group).
        from turboquant_codec.config import CodecConfig as C
        u32_1 = T.uint32[::1]
        warp_sig = (f32_2, u32_1, u32_1, i, i, i, f32, f32_2, f32_2, f32_2, f32_2, f32_3)
        k_bits, k_mode, v_bits, v_mode, d, heads = part.split(",")
        kc, vc = C(int(d), float(k_bits), k_mode), C(int(d), float(v_bits), v_mode)
        kern, _ = nw.fast_attention_kernel(kc, vc, int(heads))
        ptx, _ = cuda.compile_ptx(kern.py_func, warp_sig, cc=(9, 0))
        assert ".target sm_90" in ptx and ".f64" not in ptx and ".local" not in ptx, part
        print("compiled warp", part)
    """
)
# The warp attention configurations compiled: split and single groups, QJL signs on K and on V, 1,
# 4 and 8 heads. Each is fully unrolled code costing NVVM ~2 CPU minutes, hence three, not every
# pairing; they compile concurrently with the module's kernels (separate processes).
WARP_CONFIGS = ["3.5,mse,3.5,mse,128,4", "3,prod,2.5,mse,64,1", "2,mse,3.5,prod,32,8"]


def test_every_kernel_compiles_to_sm90_ptx() -> None:
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    procs = {
        part: subprocess.Popen([sys.executable, "-c", SCRIPT, part], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for part in ["kernels", *WARP_CONFIGS]
    }
    try:
        for part, proc in procs.items():
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, part + "\n" + out[-3000:] + err[-6000:]
            # kernels: 4 reading float inputs x 3 input dtypes, 3 reading none (decode, scores, combine)
            want = "compiled 15" if part == "kernels" else f"compiled warp {part}"
            assert want in out, (part, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
