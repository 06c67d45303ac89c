// A CPU stand-in for the CUDA execution model, for kernels that are plain per-thread maps.
//
// With this header first, g++ compiles numres's CUDA sources as C++: the CUDA qualifiers vanish,
// blockIdx/threadIdx/blockDim/gridDim become globals, and NUMRES_SHIM_RUN_GRID runs a launch by
// calling the kernel once for every (block, thread) in turn.  That is a faithful execution of a
// kernel with no shared memory, no barriers and no atomics, whose threads never read what another
// thread writes - the only kind numres has.  numres_shim_set_order(1) runs the threads in reverse,
// so a test can check that the result does not depend on the order threads run in.
#include <cmath>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct numres_dim3 { unsigned x, y, z; };
static numres_dim3 blockIdx, threadIdx, blockDim, gridDim;
static int numres_shim_reverse = 0;

extern "C" void numres_shim_set_order(int reverse) { numres_shim_reverse = reverse; }

inline double __longlong_as_double(long long bits)
{
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

using std::exp;
using std::fma;
using std::fmaf;
using std::log;
using std::sqrt;

// Visit index k of [0, count) forwards, or backwards when the reverse order is on.
inline unsigned numres_shim_index(unsigned k, unsigned count)
{
    return numres_shim_reverse ? count - 1 - k : k;
}

#define NUMRES_SHIM_RUN_GRID(GRID, BLOCK, CALL)                                                         \
    do {                                                                                              \
        gridDim = GRID;                                                                               \
        blockDim = BLOCK;                                                                             \
        const unsigned numres_blocks = gridDim.x * gridDim.y * gridDim.z;                             \
        const unsigned numres_threads = blockDim.x * blockDim.y * blockDim.z;                         \
        for (unsigned numres_kb = 0; numres_kb < numres_blocks; ++numres_kb) {                        \
            const unsigned numres_b = numres_shim_index(numres_kb, numres_blocks);                    \
            blockIdx = numres_dim3{numres_b % gridDim.x, (numres_b / gridDim.x) % gridDim.y,          \
                                   numres_b / (gridDim.x * gridDim.y)};                               \
            for (unsigned numres_kt = 0; numres_kt < numres_threads; ++numres_kt) {                   \
                const unsigned numres_t = numres_shim_index(numres_kt, numres_threads);               \
                threadIdx = numres_dim3{numres_t % blockDim.x, (numres_t / blockDim.x) % blockDim.y,  \
                                        numres_t / (blockDim.x * blockDim.y)};                        \
                CALL;                                                                                 \
            }                                                                                         \
        }                                                                                             \
    } while (0)
