// A CPU stand-in for the CUDA execution model.
//
// With this header first, g++ compiles numres's CUDA sources as C++: the CUDA qualifiers vanish,
// blockIdx/threadIdx/blockDim/gridDim become globals, and a launch runs on one CPU thread:
//
// * NUMRES_SHIM_RUN_GRID (map kernels) calls the kernel once for every (block, thread) in turn.
//   That is a faithful execution of a kernel with no shared memory, no barriers and no atomics,
//   whose threads never read what another thread writes.
// * NUMRES_SHIM_RUN_BLOCKS (block kernels) runs the blocks one after another, and the threads of a
//   block as cooperative fibers (ucontext), each on its own stack: a thread runs until it reaches
//   __syncthreads() or returns, then the next thread runs; when every thread of the block waits
//   at the barrier, they all resume, one after another, up to the next barrier.  __shared__
//   variables become statics, which all threads of the running block see - as shared memory is.
//   A barrier that some threads of a block reach while others have returned (divergent
//   __syncthreads, undefined on a GPU) is reported through numres_shim_take_error(), as is a
//   __syncthreads() in a map kernel.
//
// numres_shim_set_order(1) runs the threads (and blocks) in reverse, so a test can check that the
// result does not depend on the order threads run in between barriers.
#include <cmath>
#include <cstring>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct numres_dim3 { unsigned x, y, z; };
static numres_dim3 blockIdx, threadIdx, blockDim, gridDim;
static int numres_shim_reverse = 0;

extern "C" void numres_shim_set_order(int reverse) { numres_shim_reverse = reverse; }

// 0: no error since the last call.  1: divergent __syncthreads.  2: __syncthreads outside a block kernel.
static int numres_shim_error = 0;
extern "C" int numres_shim_take_error()
{
    const int error = numres_shim_error;
    numres_shim_error = 0;
    return error;
}

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

// --- block kernels: the threads of a block as fibers ---------------------------------------------------

enum numres_fiber_state { NUMRES_FIBER_READY, NUMRES_FIBER_AT_BARRIER, NUMRES_FIBER_DONE };

struct numres_fiber {
    ucontext_t context;
    numres_fiber_state state;
};

static ucontext_t numres_shim_scheduler;
static std::vector<numres_fiber> numres_shim_fibers;
static std::vector<char> numres_shim_stacks;
static unsigned numres_shim_current = 0;
static bool numres_shim_in_block = false;
static void (*numres_shim_body)(void*) = nullptr;
static void* numres_shim_body_arg = nullptr;
static const size_t numres_shim_stack_bytes = 64 * 1024;

inline void __syncthreads()
{
    if (!numres_shim_in_block) {            // a map kernel runs its threads one by one: no barrier possible
        numres_shim_error = 2;
        return;
    }
    numres_fiber& self = numres_shim_fibers[numres_shim_current];
    self.state = NUMRES_FIBER_AT_BARRIER;
    swapcontext(&self.context, &numres_shim_scheduler);
}

inline void numres_shim_fiber_main()
{
    numres_shim_body(numres_shim_body_arg);
    numres_shim_fibers[numres_shim_current].state = NUMRES_FIBER_DONE;
}   // returns to uc_link: the scheduler

template <typename Body>
void numres_shim_run_block(Body& body, unsigned threads)
{
    numres_shim_fibers.resize(threads);
    if (numres_shim_stacks.size() < threads * numres_shim_stack_bytes)
        numres_shim_stacks.resize(threads * numres_shim_stack_bytes);
    numres_shim_body = [](void* argument) { (*static_cast<Body*>(argument))(); };
    numres_shim_body_arg = &body;
    for (unsigned t = 0; t < threads; ++t) {
        numres_fiber& fiber = numres_shim_fibers[t];
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = numres_shim_stacks.data() + t * numres_shim_stack_bytes;
        fiber.context.uc_stack.ss_size = numres_shim_stack_bytes;
        fiber.context.uc_link = &numres_shim_scheduler;
        makecontext(&fiber.context, numres_shim_fiber_main, 0);
        fiber.state = NUMRES_FIBER_READY;
    }
    numres_shim_in_block = true;
    for (;;) {                                  // one phase: every live thread runs to its next barrier or end
        for (unsigned k = 0; k < threads; ++k) {
            const unsigned t = numres_shim_index(k, threads);
            numres_fiber& fiber = numres_shim_fibers[t];
            if (fiber.state == NUMRES_FIBER_DONE) continue;
            fiber.state = NUMRES_FIBER_READY;
            threadIdx = numres_dim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
            numres_shim_current = t;
            swapcontext(&numres_shim_scheduler, &fiber.context);
        }
        unsigned waiting = 0, done = 0;
        for (const numres_fiber& fiber : numres_shim_fibers) {
            waiting += fiber.state == NUMRES_FIBER_AT_BARRIER;
            done += fiber.state == NUMRES_FIBER_DONE;
        }
        if (done == threads) break;
        if (waiting != threads) {               // some returned while others wait: a divergent barrier
            numres_shim_error = 1;
            break;                              // the waiting fibers are abandoned (their stacks are reused)
        }
    }
    numres_shim_in_block = false;
}

#define NUMRES_SHIM_RUN_BLOCKS(GRID, BLOCK, CALL)                                                       \
    do {                                                                                              \
        gridDim = GRID;                                                                               \
        blockDim = BLOCK;                                                                             \
        const unsigned numres_blocks = gridDim.x * gridDim.y * gridDim.z;                             \
        const unsigned numres_threads = blockDim.x * blockDim.y * blockDim.z;                         \
        auto numres_call = [&]() { CALL; };                                                           \
        for (unsigned numres_kb = 0; numres_kb < numres_blocks; ++numres_kb) {                        \
            const unsigned numres_b = numres_shim_index(numres_kb, numres_blocks);                    \
            blockIdx = numres_dim3{numres_b % gridDim.x, (numres_b / gridDim.x) % gridDim.y,          \
                                   numres_b / (gridDim.x * gridDim.y)};                               \
            numres_shim_run_block(numres_call, numres_threads);                                       \
        }                                                                                             \
    } while (0)
