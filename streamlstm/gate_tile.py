"""The shared-weight gate product's register tile, written in LLVM IR (CPU only).

`lstm_block.block_gates` computes gates[r] = bias + z[r, :K] @ W for a block of sensors. As
Numba loops, the gate tile lives in memory: every pass over a few weight rows loads and stores
each gate again, and LLVM cannot keep a (sensors x gates) tile in registers across the K rows
(the loop vectoriser only widens the innermost loop; it does not promote a tile that spans
loops). Measured, that loop ran the multiply and add ports at about two thirds of their rate.

This intrinsic emits the classic GEMM micro-kernel instead: a tile of ROWS sensors x COLS
vectors of gates (4 x 16 floats, 8 ymm registers with AVX2) is summed over all K in registers:
per weight row two vector loads, four broadcasts of z, eight multiplies and eight adds; the tile
is stored once. Loop order: gate columns outer, sensors inner, so one K x COLS panel of W
(4 KiB at K=65 float32) serves the whole block from L1.

The numbers are `lstm_math.forward_one`'s bit for bit: each gate starts at its bias and adds
z[r, k] * W[k, g] for k = 0, 1, ... K-1 in order, as separate IEEE multiplies and adds (no
fast-math flags: LLVM neither fuses nor reorders them). Only the assignment of gates to vector
lanes differs, which no sum sees.

The caller (`lstm_block.block_gates`) handles what the tile leaves: rows past the last multiple
of ROWS, gate columns past the last multiple of COLS vectors. Arrays must have unit inner
strides (rows may be strided); float32 or float64.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

ROWS = 4  # sensors per tile
COLS = 2  # vectors of gates per tile
VECTOR_BYTES = 32  # one AVX2 register; narrower targets split the vectors, the numbers stay the same


@register_jitable
def lanes(itemsize):
    """Elements per vector of the tile (8 float32, 4 float64)."""
    return VECTOR_BYTES // itemsize


@intrinsic
def tile_gates(typingctx, W, bias, z, gates, n_rows, n_cols):
    """gates[r, g] = bias[g] + sum_k z[r, k] * W[k, g] for r < n_rows (a multiple of ROWS) and
    g < n_cols (a multiple of COLS * lanes), k < W.shape[0], summed in k order."""
    arrays = (W, bias, z, gates)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None
    dtype = W.dtype
    if not isinstance(dtype, types.Float) or any(a.dtype != dtype for a in arrays):
        return None
    if (W.ndim, bias.ndim, z.ndim, gates.ndim) != (2, 1, 2, 2):
        return None

    def codegen(context, builder, sig, args):
        W_ty, b_ty, z_ty, g_ty = sig.args[:4]
        W_a = context.make_array(W_ty)(context, builder, args[0])
        b_a = context.make_array(b_ty)(context, builder, args[1])
        z_a = context.make_array(z_ty)(context, builder, args[2])
        g_a = context.make_array(g_ty)(context, builder, args[3])
        n_rows, n_cols = args[4], args[5]
        intp = context.get_value_type(types.intp)
        fty = context.get_value_type(dtype)
        itemsize = context.get_abi_sizeof(fty)
        vw = lanes(itemsize)
        vty = ir.VectorType(fty, vw)
        vptr = vty.as_pointer()
        fptr = fty.as_pointer()
        K = cgutils.unpack_tuple(builder, W_a.shape, 2)[0]
        sW = cgutils.unpack_tuple(builder, W_a.strides, 2)[0]
        sz = cgutils.unpack_tuple(builder, z_a.strides, 2)[0]
        sg = cgutils.unpack_tuple(builder, g_a.strides, 2)[0]
        i32 = ir.IntType(32)

        def const(v):
            return ir.Constant(intp, v)

        isz = const(itemsize)
        zero_mask = ir.Constant(ir.VectorType(i32, vw), [0] * vw)
        undef = ir.Constant(vty, ir.Undefined)
        # the accumulators: allocas in the entry block, which LLVM promotes to registers
        acc = [[cgutils.alloca_once(builder, vty) for _ in range(COLS)] for _ in range(ROWS)]

        def at(base, offset, ptr_ty):
            return cgutils.pointer_add(builder, base, offset, return_type=ptr_ty)

        def vload(ptr):
            return builder.load(ptr, align=itemsize)

        def row_start(data, r, i, stride):  # address of row r + i
            return at(data, builder.mul(builder.add(r, const(i)), stride), fptr)

        with cgutils.for_range_slice(builder, const(0), n_cols, const(COLS * vw), intp=intp) as (g, _):
            g_off = builder.mul(g, isz)
            with cgutils.for_range_slice(builder, const(0), n_rows, const(ROWS), intp=intp) as (r, _):
                for v in range(COLS):
                    bv = vload(at(b_a.data, builder.add(g_off, const(v * vw * itemsize)), vptr))
                    for i in range(ROWS):
                        builder.store(bv, acc[i][v])
                z_rows = [row_start(z_a.data, r, i, sz) for i in range(ROWS)]
                w_col = at(W_a.data, g_off, fptr)
                with cgutils.for_range(builder, K, intp=intp) as loop:
                    k = loop.index
                    w_row = at(w_col, builder.mul(k, sW), fptr)
                    w = [vload(at(w_row, const(v * vw * itemsize), vptr)) for v in range(COLS)]
                    k_off = builder.mul(k, isz)
                    for i in range(ROWS):
                        zk = builder.load(at(z_rows[i], k_off, fptr))
                        zb = builder.shuffle_vector(builder.insert_element(undef, zk, i32(0)), undef, zero_mask)
                        for v in range(COLS):
                            builder.store(builder.fadd(builder.load(acc[i][v]), builder.fmul(zb, w[v])), acc[i][v])
                for i in range(ROWS):
                    g_row = at(row_start(g_a.data, r, i, sg), g_off, fptr)
                    for v in range(COLS):
                        builder.store(builder.load(acc[i][v]), at(g_row, const(v * vw * itemsize), vptr), align=itemsize)
        return context.get_dummy_value()

    return types.void(W, bias, z, gates, types.intp, types.intp), codegen
