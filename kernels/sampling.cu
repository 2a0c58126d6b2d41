// Greedy token choice on the device. A batch-1 decode step at temperature 0 needs only the index of the largest
// logit; picking it here saves the copy of the logits row to the host, its widening to f32 and the host's scan,
// time in which the GPU would sit idle between two steps. argmax_step_f16 also writes the pick where the next
// step's embedding gather reads it and advances the step's position and sequence length, so a captured decode
// step replays step after step with nothing uploaded.
// Sampling with a temperature stays on the host (engine/src/sampling.rs): the repetition penalty, top-k/top-p and
// each answer's own generator make it a per-answer walk over the vocabulary that the daemon keeps reproducible
// on both backends.
#include "common.cuh"

#define ARGMAX_THREADS 1024

// Keeps (v, i) when it beats (bv, bi): a larger value, or the same value at a smaller index.
__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

// ids[r] = the index of the largest of logits[r * vocab ..][0 .. vocab), the first one on ties: what
// sampling::argmax returns for the row widened to f32 (a NaN is never picked, and a row whose first logit is NaN,
// or whose largest is -inf, gives 0, as nothing compares greater than its first). When pos and lens are not null,
// pos[r] and lens[r] grow by one (the next step's position and the sequence's length). grid (rows), block 1024.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_step_f16(int* __restrict__ ids, const __half* __restrict__ logits, int vocab,
                                                                            int* __restrict__ pos, int* __restrict__ lens) {
    __shared__ float sv[ARGMAX_THREADS / WARP];
    __shared__ int si[ARGMAX_THREADS / WARP];
    const int r = blockIdx.x, lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const __half* row = logits + (long long)r * vocab;
    // Each thread scans its columns in increasing order: a strictly larger value is the only one that wins.
    float bv = -INFINITY;
    int bi = vocab;
    if (vocab % 8 == 0 && reinterpret_cast<unsigned long long>(row) % 16 == 0) {
        // 8 logits in one 16-byte load, 4 loads per thread in flight: the scan is a few L2 round trips, not one
        // per logit.
        const uint4* row8 = reinterpret_cast<const uint4*>(row);
#pragma unroll 4
        for (int c = threadIdx.x; c < vocab / 8; c += ARGMAX_THREADS) {
            const uint4 w = row8[c];
            const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[k]));
                if (f.x > bv) {
                    bv = f.x;
                    bi = 8 * c + 2 * k;
                }
                if (f.y > bv) {
                    bv = f.y;
                    bi = 8 * c + 2 * k + 1;
                }
            }
        }
    } else {
        for (int c = threadIdx.x; c < vocab; c += ARGMAX_THREADS) {
            const float v = __half2float(row[c]);
            if (v > bv) {
                bv = v;
                bi = c;
            }
        }
    }
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) argmax_merge(bv, bi, __shfl_xor_sync(FULL_MASK, bv, o), __shfl_xor_sync(FULL_MASK, bi, o));
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < ARGMAX_THREADS / WARP ? sv[lane] : -INFINITY;
        bi = lane < ARGMAX_THREADS / WARP ? si[lane] : vocab;
#pragma unroll
        for (int o = WARP / 2; o > 0; o >>= 1) argmax_merge(bv, bi, __shfl_xor_sync(FULL_MASK, bv, o), __shfl_xor_sync(FULL_MASK, bi, o));
        if (lane == 0) {
            const float first = __half2float(row[0]);
            ids[r] = (bv == -INFINITY || first != first || bi >= vocab) ? 0 : bi;
            if (pos) pos[r] += 1;
            if (lens) lens[r] += 1;
        }
    }
}
