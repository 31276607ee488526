"""Compile the CUDA kernels to machine code for a GPU, without a GPU.

    python tools/compile_kernels.py            # the pinned configs, sm_90
    python tools/compile_kernels.py --all      # every forward config as well
    python tools/compile_kernels.py --arch 80  # another compute capability

The Triton interpreter runs the kernels' arithmetic on the CPU but never
lowers them; this lowers them (Triton's front end, the LLVM passes, ptxas)
for each operand dtype with every optional feature on, so that an error only
a compiler sees (an unsupported construct, a layout, too much shared memory)
shows up before device time is spent.  Prints each kernel's shared memory.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules import Triton

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cce_inductor.kernels import triton_backward, triton_forward  # noqa: E402

_SCALARS = {"N", "V", "D", "N_BUCKET", "stride_en", "stride_ed", "stride_cv", "stride_cd",
            "stats_stride", "rec_cols", "first_block", "num_blocks", "acc_v0"}
_INT_POINTERS = {"targets_ptr": "*i64", "best_index_ptr": "*i64", "keep_ptr": "*i32",
                 "rank_ptr": "*i32", "ticket_ptr": "*i32", "counter_ptr": "*i32",
                 "sorted_rows_ptr": "*i32", "starts_ptr": "*i32"}
_OPERANDS = {"e_ptr", "c_ptr", "bias_ptr"}


def compile_kernel(fn, operand: str, accumulator: str, constexprs: dict, num_warps: int,
                   num_stages: int, target: GPUTarget):
    """Compiles ``fn`` with pointer types chosen from the argument names."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _SCALARS:
            signature[name] = "i32"
        elif name in ("logit_scale", "softcap"):
            signature[name] = "fp32"
        elif name in _INT_POINTERS:
            signature[name] = _INT_POINTERS[name]
        elif name in _OPERANDS:
            signature[name] = f"*{operand}"
        elif name in ("grad_e_ptr", "grad_c_ptr"):
            signature[name] = f"*{accumulator}"
        else:
            signature[name] = "*fp32"
    source = ASTSource(fn, signature, constexprs={
        (fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--all", action="store_true", help="every forward config")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    features = dict(HAS_BIAS=True, HAS_SOFTCAP=True, UPCAST=False)
    for operand, itemsize in (("bf16", 2), ("fp32", 4)):
        configs = triton_forward.candidate_configs(triton_forward._FORWARD_GPU_CONFIGS,
                                                   itemsize)
        for n, v, d, warps, stages in configs if args.all else configs[:1]:
            kernel = compile_kernel(
                triton_forward._forward_kernel, operand, operand,
                dict(features, HAS_WEIGHT=True, SMOOTHING=True, RECORD=True, ENTROPY=True,
                     ARGMAX=True, ARGMAX_ROUND=1 if itemsize == 2 else 0,
                     DOT_PRECISION="tf32", GROUP_N=triton_forward.GROUP_N,
                     REC_N=triton_forward.REC_N, REC_V=triton_forward.REC_V,
                     BLOCK_N=n, BLOCK_V=v, BLOCK_D=d), warps, stages, target)
            print(f"forward {operand} {(n, v, d, warps, stages)}: "
                  f"{kernel.metadata.shared} B shared", flush=True)
        compile_kernel(triton_backward._target_kernel, operand, operand,
                       dict(features, NEED_E=True, BLOCK_N=triton_backward.TARGET_BLOCK_N,
                            BLOCK_D=64), 4, 1, target)
        print(f"target {operand}: ok", flush=True)
        for accumulator in sorted({operand, "fp32"}):
            for rows in (2048, 8192):
                n, v, d, warps, stages = triton_backward.grad_config(rows, 2304, itemsize)
                kernel = compile_kernel(
                    triton_backward._tile_kernel, operand, accumulator,
                    dict(features, HAS_WEIGHT=True, SMOOTHING=True, ENTROPY=True,
                         FILTER=True, NEED_E=True,
                         NEED_C=True, NEED_BIAS=True, DOT_PRECISION="tf32",
                         BLOCK_N=n, BLOCK_V=v, BLOCK_D=d), warps, stages, target)
                print(f"tiles {operand} (accumulating in {accumulator}) "
                      f"{(n, v, d, warps, stages)}: {kernel.metadata.shared} B shared",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
