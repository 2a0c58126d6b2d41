// Log-probabilities of given tokens: out[r] = logits[r, labels[r]] - logsumexp(logits[r, :]). The lm_head GEMM
// writes fp32 logits (fp16 would overflow the softmax's range on large vocabularies). One block per row.
#include "common.cuh"

extern "C" __global__ void logprob_gather_f32(float* __restrict__ out, float* __restrict__ lse_out, const float* __restrict__ logits,
                                              const int* __restrict__ labels, int vocab) {
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const float* row = logits + r * vocab;
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = fmaxf(mx, row[c]);
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += __expf(row[c] - mx);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const float lse = mx + logf(s);
        const int y = labels[r];
        out[r] = (y >= 0 && y < vocab) ? row[y] - lse : NAN;
        if (lse_out) lse_out[r] = lse;
    }
}
