// im2col / col2im for channels-last activations, beside numres.functional.conv.im2col / col2im.
//
// The input is read through the element strides (sn, sh, sw, sc) of its (N, H, W, C) view, so
// any memory layout works; channels-last (sc == 1) makes consecutive threads read consecutive
// addresses.  The patch matrix is (groups, N*OH*OW, kh*kw*Cg), contiguous, with its columns in
// (kh, kw, c) order exactly as the generic im2col builds it:
//
//   cols[g, (b*OH + oh)*OW + ow, (i*kw + j)*Cg + c]
//       = x[b, g*Cg + c, oh*stride_h - pad_h + i*dil_h, ow*stride_w - pad_w + j*dil_w]   (0 in the padding)

template <typename T>
__device__ void im2col_nhwc(const T* __restrict__ x, long long sn, long long sh, long long sw, long long sc,
                            int n, int h, int w, int c_per_group, int groups, int kh, int kw,
                            int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
                            int out_h, int out_w, T* __restrict__ cols)
{
    const int rows = n * out_h * out_w;
    const int width = kh * kw * c_per_group;     // columns of one group's patch matrix
    for (int r = numres_row0(); r < rows; r += numres_row_step()) {
        const int ow = r % out_w;
        const int oh = (r / out_w) % out_h;
        const int b = r / (out_w * out_h);
        for (int q = numres_col0(); q < groups * width; q += numres_col_step()) {
            const int g = q / width;
            const int k = q - g * width;
            const int c = k % c_per_group;
            const int tap = k / c_per_group;
            const int ih = oh * stride_h - pad_h + (tap / kw) * dil_h;
            const int iw = ow * stride_w - pad_w + (tap % kw) * dil_w;
            T value = (T)0;
            if (ih >= 0 && ih < h && iw >= 0 && iw < w)
                value = x[b * sn + ih * sh + iw * sw + (long long)(g * c_per_group + c) * sc];
            cols[((long long)g * rows + r) * width + k] = value;
        }
    }
}

// The adjoint, as a gather: each input element sums the patch entries that copied it,
//
//   dx[b, ih, iw, g*Cg + c] = sum over taps (i, j) of dcols[g, (b*OH + oh)*OW + ow, (i*kw + j)*Cg + c]
//                             for the (oh, ow) with oh*stride_h - pad_h + i*dil_h = ih (and the same in w),
//
// so one thread owns each dx element and no atomics are needed.  Taps are added in (i, j)
// order starting from zero, the order the generic col2im accumulates them in, so the result is
// bit-identical to it.  dcols is contiguous (groups, N*OH*OW, kh*kw*Cg); dx is contiguous NHWC.

template <typename T>
__device__ void col2im_nhwc(const T* __restrict__ dcols, int n, int h, int w, int c_per_group, int groups,
                            int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w,
                            int dil_h, int dil_w, int out_h, int out_w, T* __restrict__ dx)
{
    const int rows = n * h * w;
    const int channels = groups * c_per_group;
    const int width = kh * kw * c_per_group;
    const int out_rows = n * out_h * out_w;
    for (int r = numres_row0(); r < rows; r += numres_row_step()) {
        const int iw = r % w;
        const int ih = (r / w) % h;
        const int b = r / (w * h);
        for (int ch = numres_col0(); ch < channels; ch += numres_col_step()) {
            const int g = ch / c_per_group;
            const int c = ch - g * c_per_group;
            T total = (T)0;
            for (int i = 0; i < kh; ++i) {
                const int oh_span = ih + pad_h - i * dil_h;
                if (oh_span < 0 || oh_span % stride_h != 0 || oh_span / stride_h >= out_h) continue;
                const int oh = oh_span / stride_h;
                for (int j = 0; j < kw; ++j) {
                    const int ow_span = iw + pad_w - j * dil_w;
                    if (ow_span < 0 || ow_span % stride_w != 0 || ow_span / stride_w >= out_w) continue;
                    const int ow = ow_span / stride_w;
                    const long long row = (long long)g * out_rows + (b * out_h + oh) * out_w + ow;
                    total += dcols[row * width + (i * kw + j) * c_per_group + c];
                }
            }
            dx[(long long)r * channels + ch] = total;
        }
    }
}
