// Fused BatchNorm (+ReLU) over channels-last rows, beside numres.functional.batchnorm.
//
// The input is an (m, C) matrix of rows (m = N*H*W; a free view of a channels-last activation).
// Per channel c, with xhat = (x - mean) * invstd and scale = weight * invstd:
//
//   forward   y  = xhat * weight + bias = fma(x - mean, scale, bias)       (then max(y, 0) if relu)
//   backward  g  = dy * [y > 0] (relu) or dy;   dbias = sum g;   dweight = sum g * xhat
//             dx = scale * (g - dbias / m - xhat * dweight / m)          (training)
//             dx = scale * g                                               (evaluation)
//
// Reductions are done in one pass over the data, in double, by a grid of "lanes": lane l sums
// rows l, l + L, l + 2L, ... of every channel it owns and writes its partial result to
// partial[c, l] (channel-major, so a channel's L partials are contiguous); a finalize kernel
// then runs one block per channel, its threads read the L partials (coalesced) and add them in
// a shared-memory tree (numres_block_sum2).  No atomics, so results are reproducible.
// The variance uses sums of d = x - K with K = x[0, c] (a shifted-data one-pass formula):
//   mean = K + S/m,   var = SS/m - (S/m)^2,   S = sum d,  SS = sum d^2,
// which does not lose precision to cancellation when |mean| >> std.

// Partial sums of the shifted data: psum[c, l] = sum d, psumsq[c, l] = sum d^2 over lane l's rows.
template <typename T>
__device__ void bn_partial_moments(const T* __restrict__ x, int rows, int channels,
                                   double* __restrict__ psum, double* __restrict__ psumsq)
{
    const int lane = numres_row0();
    for (int c = numres_col0(); c < channels; c += numres_col_step()) {
        const double shift = (double)x[c];
        double sum = 0.0, sumsq = 0.0;
        for (int r = lane; r < rows; r += numres_row_step()) {
            const double d = (double)x[(long long)r * channels + c] - shift;
            sum += d;
            sumsq += d * d;
        }
        const long long at = (long long)c * numres_row_step() + lane;
        psum[at] = sum;
        psumsq[at] = sumsq;
    }
}

// The finalize kernels' reduction: channel c's lanes of two (channels, lanes) partial-sum arrays,
// added by the block's threads; afterwards a[0] and b[0] hold the two sums.  Every thread calls it.
__device__ __forceinline__ void bn_sum_lanes(const double* __restrict__ pa, const double* __restrict__ pb, int c,
                                             int lanes, double* a, double* b)
{
    const int t = (int)threadIdx.x;
    double sum_a = 0.0, sum_b = 0.0;
    for (int l = t; l < lanes; l += (int)blockDim.x) {
        sum_a += pa[(long long)c * lanes + l];
        sum_b += pb[(long long)c * lanes + l];
    }
    a[t] = sum_a;
    b[t] = sum_b;
    numres_block_sum2(a, b);
}

// Per channel: batch mean and variance from the partials, the running-statistics update
// (PyTorch's: running = (1 - momentum) running + momentum batch, with the unbiased variance),
// and the values the apply/backward kernels use.  momentum is read from momentum_ptr[0] when
// momentum_on_device != 0 (PyTorch's cumulative average, 1 / num_batches_tracked, lives on the device).
// A block kernel: block b handles channels b, b + gridDim.x, ...; its threads add the channel's
// lanes in shared memory, and thread 0 writes the results.
template <typename T>
__device__ void bn_finalize_moments(const T* __restrict__ x, const double* __restrict__ psum,
                                    const double* __restrict__ psumsq, int lanes, int rows, int channels,
                                    const T* __restrict__ weight, double eps, int update_running, double momentum,
                                    const double* __restrict__ momentum_ptr, int momentum_on_device,
                                    T* __restrict__ running_mean, T* __restrict__ running_var,
                                    T* __restrict__ mean_out, T* __restrict__ invstd_out, T* __restrict__ scale_out)
{
    __shared__ double sum_shared[NUMRES_BLOCK_THREADS];
    __shared__ double sumsq_shared[NUMRES_BLOCK_THREADS];
    for (int c = (int)blockIdx.x; c < channels; c += (int)gridDim.x) {
        bn_sum_lanes(psum, psumsq, c, lanes, sum_shared, sumsq_shared);
        if (threadIdx.x == 0) {
            const double shifted_mean = sum_shared[0] / rows;
            const double mean = (double)x[c] + shifted_mean;
            double var = sumsq_shared[0] / rows - shifted_mean * shifted_mean;
            if (var < 0.0) var = 0.0;
            const double invstd = 1.0 / sqrt(var + eps);
            if (update_running) {
                const double m = momentum_on_device ? momentum_ptr[0] : momentum;
                running_mean[c] = (T)((1.0 - m) * (double)running_mean[c] + m * mean);
                running_var[c] = (T)((1.0 - m) * (double)running_var[c] + m * var * rows / (rows - 1.0));
            }
            mean_out[c] = (T)mean;
            invstd_out[c] = (T)invstd;
            scale_out[c] = (T)(invstd * (double)weight[c]);
        }
        __syncthreads();            // thread 0 has read the sums before the next channel overwrites them
    }
}

// Evaluation mode: the same per-channel values from the running statistics.
template <typename T>
__device__ void bn_eval_params(const T* __restrict__ running_mean, const T* __restrict__ running_var,
                               const T* __restrict__ weight, double eps, int channels,
                               T* __restrict__ mean_out, T* __restrict__ invstd_out, T* __restrict__ scale_out)
{
    if (numres_row0() != 0) return;
    for (int c = numres_col0(); c < channels; c += numres_col_step()) {
        const double invstd = 1.0 / sqrt((double)running_var[c] + eps);
        mean_out[c] = running_mean[c];
        invstd_out[c] = (T)invstd;
        scale_out[c] = (T)(invstd * (double)weight[c]);
    }
}

// y = fma(x - mean, scale, bias), then the ReLU when asked.
template <typename T>
__device__ __forceinline__ T bn_affine(T x, T mean, T scale, T bias)
{
    return numres_fma((T)(x - mean), scale, bias);
}

template <typename T>
__device__ void bn_apply(const T* __restrict__ x, int rows, int channels, const T* __restrict__ mean,
                         const T* __restrict__ scale, const T* __restrict__ bias, int relu, T* __restrict__ y)
{
    for (int r = numres_row0(); r < rows; r += numres_row_step()) {
        for (int c = numres_col0(); c < channels; c += numres_col_step()) {
            const long long at = (long long)r * channels + c;
            const T value = bn_affine(x[at], mean[c], scale[c], bias[c]);
            y[at] = relu ? numres_relu(value) : value;
        }
    }
}

// The upstream gradient after the fused ReLU's mask, recomputing y > 0 exactly as forward did.
template <typename T>
__device__ __forceinline__ T bn_masked_grad(T dy, T x, T mean, T scale, T bias, int relu)
{
    return (relu && !(bn_affine(x, mean, scale, bias) > (T)0)) ? (T)0 : dy;
}

// Partial sums for backward: pg[c, l] = sum g, pgx[c, l] = sum g * (x - mean) over lane l's rows.
template <typename T>
__device__ void bn_backward_partials(const T* __restrict__ dy, const T* __restrict__ x, int rows, int channels,
                                     const T* __restrict__ mean, const T* __restrict__ scale,
                                     const T* __restrict__ bias, int relu,
                                     double* __restrict__ pg, double* __restrict__ pgx)
{
    const int lane = numres_row0();
    for (int c = numres_col0(); c < channels; c += numres_col_step()) {
        double sum_g = 0.0, sum_gx = 0.0;
        for (int r = lane; r < rows; r += numres_row_step()) {
            const long long at = (long long)r * channels + c;
            const T g = bn_masked_grad(dy[at], x[at], mean[c], scale[c], bias[c], relu);
            sum_g += (double)g;
            sum_gx += (double)g * ((double)x[at] - (double)mean[c]);
        }
        const long long at = (long long)c * numres_row_step() + lane;
        pg[at] = sum_g;
        pgx[at] = sum_gx;
    }
}

// Per channel: dbias, dweight, and the coefficients of dx = scale * g - shift - (x - mean) * slope:
//   shift = scale * dbias / m,   slope = scale * invstd * dweight / m     (both 0 in evaluation mode).
// A block kernel, like bn_finalize_moments.
template <typename T>
__device__ void bn_backward_finalize(const double* __restrict__ pg, const double* __restrict__ pgx, int lanes,
                                     int rows, int channels, const T* __restrict__ invstd,
                                     const T* __restrict__ scale, int training,
                                     T* __restrict__ dweight, T* __restrict__ dbias,
                                     T* __restrict__ shift_out, T* __restrict__ slope_out)
{
    __shared__ double g_shared[NUMRES_BLOCK_THREADS];
    __shared__ double gx_shared[NUMRES_BLOCK_THREADS];
    for (int c = (int)blockIdx.x; c < channels; c += (int)gridDim.x) {
        bn_sum_lanes(pg, pgx, c, lanes, g_shared, gx_shared);
        if (threadIdx.x == 0) {
            const double total_g = g_shared[0];
            const double grad_weight = gx_shared[0] * (double)invstd[c];
            dbias[c] = (T)total_g;
            dweight[c] = (T)grad_weight;
            shift_out[c] = training ? (T)((double)scale[c] * total_g / rows) : (T)0;
            slope_out[c] = training ? (T)((double)scale[c] * (double)invstd[c] * grad_weight / rows) : (T)0;
        }
        __syncthreads();            // thread 0 has read the sums before the next channel overwrites them
    }
}

template <typename T>
__device__ void bn_backward_dx(const T* __restrict__ dy, const T* __restrict__ x, int rows, int channels,
                               const T* __restrict__ mean, const T* __restrict__ scale, const T* __restrict__ bias,
                               int relu, const T* __restrict__ shift, const T* __restrict__ slope, T* __restrict__ dx)
{
    for (int r = numres_row0(); r < rows; r += numres_row_step()) {
        for (int c = numres_col0(); c < channels; c += numres_col_step()) {
            const long long at = (long long)r * channels + c;
            const T g = bn_masked_grad(dy[at], x[at], mean[c], scale[c], bias[c], relu);
            const T centred = (T)(x[at] - mean[c]);
            dx[at] = numres_fma(scale[c], g, -numres_fma(centred, slope[c], shift[c]));
        }
    }
}
