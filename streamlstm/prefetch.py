"""Software prefetch for the CPU kernels: ask for an array's cache lines before they are needed.

The shared-weight block forward (`lstm_block`) writes each sensor's state to its BPTT ring: rows
that were last touched a whole window of readings ago, so far out of cache (at B=10,000 the rings
are 160 MB). Stored to as they come, every 256-byte row stalls on its reads for ownership
(measured 120 ns per sensor at B=1,024, 340 ns at B=10,000, one core). Prefetching the next
block's rows while the current block computes (~16 us of arithmetic) hides that latency.

`prefetch_write` is an LLVM intrinsic (`llvm.prefetch`, write intent: x86 `prefetchw`); a hint,
so it changes no result and faults on no address. CPU only: CUDA kernels have no use for it.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

LINE = 64  # bytes per cache line (x86-64, arm64 servers)


@intrinsic
def prefetch_write(typingctx, addr):
    """Prefetch the cache line at the integer address addr, for writing (and reading)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [ptr, i32(1), i32(3), i32(1)])  # write, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(addr), codegen


@register_jitable
def prefetch_array(a):
    """Prefetch every cache line of the contiguous array (or view) a, for writing."""
    start = a.ctypes.data
    end = start + a.size * a.itemsize
    line = start - start % LINE
    while line < end:
        prefetch_write(line)
        line += LINE
