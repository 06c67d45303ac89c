// numres CUDA kernels: definitions shared by every kernel file.
//
// Most kernels in numres are plain per-thread maps over a 2-D index space
//   x (columns: channels, classes, or im2col columns)  and  y (rows: pixels or samples),
// walked with grid-stride loops, so any launch grid covers any problem size.  They use no
// shared memory, no barrier and no atomic: each output element is written by exactly one
// thread.  The few *block* kernels (the BatchNorm finalize kernels) give each block one item
// (a channel), walk the items with a grid-stride loop over blocks, and reduce across the
// block's threads in shared memory with __syncthreads; they need blockDim.x to be a power of
// two no larger than NUMRES_BLOCK_THREADS.  No kernel uses atomics, so results are
// reproducible.  The same source builds with nvcc/NVRTC for the GPU and with g++ under shim.h
// for the CPU, where the tests run it (block kernels as cooperative fibers that meet at each
// barrier) and compare it with the generic NumPy ops.
//
// Index arithmetic is 32-bit per dimension (the Python side checks that every extent fits),
// with 64-bit (long long) only for memory offsets.

__device__ __forceinline__ int numres_row0() { return (int)(blockIdx.y * blockDim.y + threadIdx.y); }
__device__ __forceinline__ int numres_row_step() { return (int)(gridDim.y * blockDim.y); }
__device__ __forceinline__ int numres_col0() { return (int)(blockIdx.x * blockDim.x + threadIdx.x); }
__device__ __forceinline__ int numres_col_step() { return (int)(gridDim.x * blockDim.x); }

// The most threads a block kernel may be launched with (the size of its shared arrays).
#define NUMRES_BLOCK_THREADS 256

// Tree reduction of two values per thread across a block: afterwards a[0] and b[0] hold the
// block's sums, added in a fixed order (reproducible).  Every thread of the block must call it;
// a[threadIdx.x] and b[threadIdx.x] must hold the thread's values on entry.
__device__ __forceinline__ void numres_block_sum2(double* a, double* b)
{
    const unsigned t = threadIdx.x;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) {
            a[t] += a[t + half];
            b[t] += b[t + half];
        }
        __syncthreads();
    }
}

// +infinity without any header (NVRTC compiles with none).
__device__ __forceinline__ double numres_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

// One fused multiply-add, a * b + c rounded once, so forward and backward recompute equal values.
__device__ __forceinline__ float numres_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double numres_fma(double a, double b, double c) { return fma(a, b, c); }

// max(v, 0) with PyTorch's treatment of NaN (it propagates) and -0.0 (becomes +0.0).
template <typename T>
__device__ __forceinline__ T numres_relu(T v) { return v <= (T)0 ? (T)0 : v; }
