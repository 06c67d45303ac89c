// ReLU and the residual join over rows, beside numres.functional.activation.
// All four are elementwise over a contiguous (rows, cols) matrix (a channels-last activation seen
// as (N*H*W, C)); relu follows PyTorch: NaN propagates, and the mask is y > 0.

template <typename T>
__device__ void relu_forward_rows(const T* __restrict__ x, int rows, int cols, T* __restrict__ y)
{
    for (int r = numres_row0(); r < rows; r += numres_row_step())
        for (int c = numres_col0(); c < cols; c += numres_col_step())
            y[(long long)r * cols + c] = numres_relu(x[(long long)r * cols + c]);
}

// dx = dy where y > 0, else 0.
template <typename T>
__device__ void relu_backward_rows(const T* __restrict__ dy, const T* __restrict__ y, int rows, int cols,
                                   T* __restrict__ dx)
{
    for (int r = numres_row0(); r < rows; r += numres_row_step())
        for (int c = numres_col0(); c < cols; c += numres_col_step()) {
            const long long at = (long long)r * cols + c;
            dx[at] = y[at] > (T)0 ? dy[at] : (T)0;
        }
}

// y = max(a + b, 0): the end of a residual block.
template <typename T>
__device__ void add_relu_rows(const T* __restrict__ a, const T* __restrict__ b, int rows, int cols,
                              T* __restrict__ y)
{
    for (int r = numres_row0(); r < rows; r += numres_row_step())
        for (int c = numres_col0(); c < cols; c += numres_col_step()) {
            const long long at = (long long)r * cols + c;
            y[at] = numres_relu((T)(a[at] + b[at]));
        }
}

// y = a + b: two gradients meeting at a residual fork.
template <typename T>
__device__ void add_rows(const T* __restrict__ a, const T* __restrict__ b, int rows, int cols, T* __restrict__ y)
{
    for (int r = numres_row0(); r < rows; r += numres_row_step())
        for (int c = numres_col0(); c < cols; c += numres_col_step()) {
            const long long at = (long long)r * cols + c;
            y[at] = a[at] + b[at];
        }
}
