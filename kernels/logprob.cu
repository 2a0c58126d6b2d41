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

// Training (DPO/SFT) on fp16 logits, one block of rows at a time: the caller computes the logits of a block of rows
// with one GEMM, and these kernels reduce each row to its log-prob and log-sum-exp, or turn the block in place
// into the gradient, so the softmax over the vocabulary exists for one row block at most.

// out[r] = logits[r, labels[r]] - lse[r]; lse_out[r] = logsumexp(logits[r, :]) (fp32). One block per row.
extern "C" __global__ void logprob_gather_f16(float* __restrict__ out, float* __restrict__ lse_out, const __half* __restrict__ logits,
                                              const int* __restrict__ labels, int vocab) {
    __shared__ float scratch[32];
    const long long r = blockIdx.x;
    const __half* row = logits + r * vocab;
    float mx = -INFINITY;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = fmaxf(mx, __half2float(row[c]));
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += __expf(__half2float(row[c]) - mx);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const float lse = mx + logf(s);
        const int y = labels[r];
        out[r] = (y >= 0 && y < vocab) ? __half2float(row[y]) - lse : NAN;
        if (lse_out) lse_out[r] = lse;
    }
}

// In place: logits[r, c] <- dlogp[r] * ([c == labels[r]] - exp(logits[r, c] - lse[r])), the gradient of
// sum_r dlogp[r] * logp[r] with respect to the logits (dlogp[r] already carries the DPO weight and the loss
// scale). lse from logprob_gather_f16 on the same logits. One block per row.
extern "C" __global__ void logprob_bwd_f16(__half* __restrict__ logits, const float* __restrict__ lse, const int* __restrict__ labels,
                                           const float* __restrict__ dlogp, int vocab) {
    const long long r = blockIdx.x;
    __half* row = logits + r * vocab;
    const float l = lse[r], w = dlogp[r];
    const int y = labels[r];
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float g = w * ((c == y ? 1.0f : 0.0f) - __expf(__half2float(row[c]) - l));
        row[c] = __float2half_rn(g);
    }
}
