// Token embedding gather: out[t, :] = table[ids[t], :]. An id outside the vocabulary writes zeros and sets *err
// to 1 + its position (the host turns that into an error naming the token).
#include "common.cuh"

extern "C" __global__ void embedding_gather_f16(__half* __restrict__ out, const __half* __restrict__ table, const int* __restrict__ ids,
                                                int n_tokens, int dim, int vocab, int* __restrict__ err) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    if (!ok && threadIdx.x == 0) atomicCAS(err, 0, t + 1);
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        out[(long long)t * dim + d] = ok ? table[(long long)id * dim + d] : __float2half(0.0f);
}

// Backward (training the embedding table): dtable[ids[t], :] += dout[t, :], fp32 accumulation with atomics (a
// token repeated in the batch adds up). Ids were checked by the forward. grid (n_tokens), block 128.
extern "C" __global__ void embedding_bwd_f32(float* __restrict__ dtable, const __half* __restrict__ dout, const int* __restrict__ ids,
                                             int n_tokens, int dim, int vocab) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int id = ids[t];
    if (id < 0 || id >= vocab) return;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) atomicAdd(dtable + (long long)id * dim + d, __half2float(dout[(long long)t * dim + d]));
}
