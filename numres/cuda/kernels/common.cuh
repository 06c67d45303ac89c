// numres CUDA kernels: definitions shared by every kernel file.
//
// Every kernel in numres is a plain per-thread map over a 2-D index space
//   x (columns: channels, classes, or im2col columns)  and  y (rows: pixels or samples),
// walked with grid-stride loops, so any launch grid covers any problem size.  There is no
// shared memory, no barrier and no atomic: each output element is written by exactly one
// thread.  That makes the same source build with nvcc/NVRTC for the GPU and with g++ under
// shim.h for the CPU, where the tests run it and compare it with the generic NumPy ops.
//
// Index arithmetic is 32-bit per dimension (the Python side checks that every extent fits),
// with 64-bit (long long) only for memory offsets.

__device__ __forceinline__ int numres_row0() { return (int)(blockIdx.y * blockDim.y + threadIdx.y); }
__device__ __forceinline__ int numres_row_step() { return (int)(gridDim.y * blockDim.y); }
__device__ __forceinline__ int numres_col0() { return (int)(blockIdx.x * blockDim.x + threadIdx.x); }
__device__ __forceinline__ int numres_col_step() { return (int)(gridDim.x * blockDim.x); }

// +infinity without any header (NVRTC compiles with none).
__device__ __forceinline__ double numres_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

// One fused multiply-add, a * b + c rounded once, so forward and backward recompute equal values.
__device__ __forceinline__ float numres_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double numres_fma(double a, double b, double c) { return fma(a, b, c); }

// max(v, 0) with PyTorch's treatment of NaN (it propagates) and -0.0 (becomes +0.0).
template <typename T>
__device__ __forceinline__ T numres_relu(T v) { return v <= (T)0 ? (T)0 : v; }
