// Fused softmax cross-entropy with label smoothing, beside numres.functional.loss.
//
// For logits z (N, C), targets t and smoothing eps, row by row (one thread per row; the loss is a
// tiny part of a training step, and this keeps the kernel a plain per-thread map):
//
//   lse_i  = max_c z_ic + log sum_c exp(z_ic - max_c z_ic)            (stable log-sum-exp, in double)
//   loss_i = lse_i - (1 - eps) z_{i,t_i} - (eps / C) sum_c z_ic
//
// which is -(1 - eps) log p_{i,t_i} - (eps / C) sum_c log p_ic with log p = z - lse.
// A row whose target equals ignore_index (PyTorch's -100 by default) has loss 0 and gradient 0.
// Any other target outside [0, C) makes loss_i NaN: a kernel cannot raise, and a NaN loss is seen.

template <typename T>
__device__ void softmax_xent_forward(const T* __restrict__ logits, int rows, int classes,
                                     const long long* __restrict__ target, long long ignore_index,
                                     double smoothing, double* __restrict__ lse, T* __restrict__ loss)
{
    if (numres_col0() != 0) return;
    for (int i = numres_row0(); i < rows; i += numres_row_step()) {
        const T* z = logits + (long long)i * classes;
        double top = -numres_inf();
        for (int c = 0; c < classes; ++c)
            if ((double)z[c] > top || z[c] != z[c]) top = (double)z[c];
        double sum_exp = 0.0, sum_z = 0.0;
        for (int c = 0; c < classes; ++c) {
            sum_exp += exp((double)z[c] - top);
            sum_z += (double)z[c];
        }
        const double row_lse = top + log(sum_exp);
        const long long t = target[i];
        const bool valid = t >= 0 && t < classes;
        const double picked = valid ? (double)z[t] : numres_inf() - numres_inf();    // NaN
        lse[i] = row_lse;
        loss[i] = t == ignore_index ? (T)0 : (T)(row_lse - (1.0 - smoothing) * picked - smoothing / classes * sum_z);
    }
}

// dlogits[i, c] = (exp(z_ic - lse_i) - (1 - eps) [c = t_i] - eps / C) * s_i, where the upstream
// gradient s_i is dloss_value (dloss_mode 0), dloss[0] * dloss_value (mode 1: a device scalar)
// or dloss[i] (mode 2: reduction "none"); 0 for a row whose target is ignore_index.
template <typename T>
__device__ void softmax_xent_backward(const T* __restrict__ logits, const double* __restrict__ lse,
                                      const long long* __restrict__ target, long long ignore_index, int rows,
                                      int classes, double smoothing, const T* __restrict__ dloss, double dloss_value,
                                      int dloss_mode, T* __restrict__ dlogits)
{
    for (int i = numres_row0(); i < rows; i += numres_row_step()) {
        const long long t = target[i];
        const bool valid = t >= 0 && t < classes;
        double s = dloss_value;
        if (dloss_mode == 1) s = (double)dloss[0] * dloss_value;
        if (dloss_mode == 2) s = (double)dloss[i];
        for (int c = numres_col0(); c < classes; c += numres_col_step()) {
            const long long at = (long long)i * classes + c;
            double p = exp((double)logits[at] - lse[i]) - smoothing / classes;
            if (c == t) p -= 1.0 - smoothing;
            dlogits[at] = t == ignore_index ? (T)0 : valid ? (T)(p * s) : (T)(numres_inf() - numres_inf());
        }
    }
}
