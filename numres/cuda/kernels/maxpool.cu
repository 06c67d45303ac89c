// Max pooling with saved indices, beside numres.functional.pooling.maxpool2d_forward / backward.
//
// Forward:  y[b, oh, ow, c] = max over the window's taps of x (positions in the padding are
// skipped, which is what padding with -inf does), and argmax[b, oh, ow, c] = i*kw + j of the
// tap that won: the first maximum (a later equal value does not replace it); a NaN wins and
// propagates, the last NaN keeping the index, as in PyTorch's CUDA kernel.  x is read through
// the strides of its NHWC view; y and argmax are contiguous NHWC.

template <typename T>
__device__ void maxpool_forward_nhwc(const T* __restrict__ x, long long sn, long long sh, long long sw, long long sc,
                                     int n, int h, int w, int channels, int kh, int kw,
                                     int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
                                     int out_h, int out_w, T* __restrict__ y, int* __restrict__ argmax)
{
    const int rows = n * out_h * out_w;
    for (int r = numres_row0(); r < rows; r += numres_row_step()) {
        const int ow = r % out_w;
        const int oh = (r / out_w) % out_h;
        const int b = r / (out_w * out_h);
        for (int c = numres_col0(); c < channels; c += numres_col_step()) {
            T best = (T)(-numres_inf());
            int winner = -1;
            for (int i = 0; i < kh; ++i) {
                const int ih = oh * stride_h - pad_h + i * dil_h;
                if (ih < 0 || ih >= h) continue;
                for (int j = 0; j < kw; ++j) {
                    const int iw = ow * stride_w - pad_w + j * dil_w;
                    if (iw < 0 || iw >= w) continue;
                    const T value = x[b * sn + ih * sh + iw * sw + c * sc];
                    if (winner < 0 || value > best || value != value) {
                        best = value;
                        winner = i * kw + j;
                    }
                }
            }
            y[(long long)r * channels + c] = best;
            argmax[(long long)r * channels + c] = winner;
        }
    }
}

// Backward, as a gather: dx[b, ih, iw, c] = sum over taps (i, j), in order, of dy[b, c, oh, ow] for
// each output (oh, ow) whose tap (i, j) lies on (ih, iw) and whose argmax is that tap.  One thread
// owns each dx element (no atomics); the taps are added from zero in window order, as the generic
// backward adds them, so equal inputs give bit-identical gradients.  dy is read through the strides
// of its NHWC view; dx is contiguous NHWC.

template <typename T>
__device__ void maxpool_backward_nhwc(const T* __restrict__ dy, long long sn, long long sh, long long sw, long long sc,
                                      const int* __restrict__ argmax, int n, int h, int w, int channels,
                                      int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w,
                                      int dil_h, int dil_w, int out_h, int out_w, T* __restrict__ dx)
{
    const int rows = n * h * w;
    for (int r = numres_row0(); r < rows; r += numres_row_step()) {
        const int iw = r % w;
        const int ih = (r / w) % h;
        const int b = r / (w * h);
        for (int c = numres_col0(); c < channels; c += numres_col_step()) {
            T total = (T)0;
            for (int i = 0; i < kh; ++i) {
                const int oh_span = ih + pad_h - i * dil_h;
                if (oh_span < 0 || oh_span % stride_h != 0 || oh_span / stride_h >= out_h) continue;
                const int oh = oh_span / stride_h;
                for (int j = 0; j < kw; ++j) {
                    const int ow_span = iw + pad_w - j * dil_w;
                    if (ow_span < 0 || ow_span % stride_w != 0 || ow_span / stride_w >= out_w) continue;
                    const int ow = ow_span / stride_w;
                    const long long out_row = ((long long)b * out_h + oh) * out_w + ow;
                    if (argmax[out_row * channels + c] == i * kw + j)
                        total += dy[b * sn + oh * sh + ow * sw + c * sc];
                }
            }
            dx[(long long)r * channels + c] = total;
        }
    }
}
