// cuemu's cuBLASLt and NVRTC.
//  - cuBLASLt: the one kind of matmul rlaifd asks for (fp16 A, B, C and D, fp32 compute and scale, column-major,
//    optional transposes, no epilogue), computed in fp32 with the result rounded to fp16; captured into graphs like
//    any other stream work.
//  - NVRTC: "compiles" a source by checking that every kernel it declares was built into this library (the same
//    kernels/*.cu, compiled as C++ by tools/cuemu/build.sh), and hands out a module image that names the emulator.
//    A kernel missing from the build is a compile error that says to rebuild.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "driver.h"

namespace {

enum { STATUS_SUCCESS = 0, STATUS_INVALID_VALUE = 7, STATUS_NOT_SUPPORTED = 15 };

struct Desc {
    int compute = 0, scale = 0, transa = 0, transb = 0, epilogue = 1;
};
struct Layout {
    int type = 0;
    uint64_t rows = 0, cols = 0;
    int64_t ld = 0;
    int batch = 1;
};

struct Heuristic {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

// D = alpha op(A) op(B) + beta C, column-major; C is not read when beta is 0 (as cuBLAS).
void matmul(bool ta, bool tb, uint64_t m, uint64_t n, uint64_t k, float alpha, const __half* a, int64_t lda, const __half* b, int64_t ldb, float beta,
            const __half* c, int64_t ldc, __half* d, int64_t ldd) {
    std::vector<float> ar(m * k), bc(n * k);  // op(A) row by row, op(B) column by column
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t l = 0; l < k; l++) ar[i * k + l] = __half2float(ta ? a[l + i * lda] : a[i + l * lda]);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t l = 0; l < k; l++) bc[j * k + l] = __half2float(tb ? b[j + l * ldb] : b[l + j * ldb]);
    std::vector<float> out(m * n);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            const float* x = &ar[i * k];
            const float* y = &bc[j * k];
            float s = 0.0f;
            for (uint64_t l = 0; l < k; l++) s += x[l] * y[l];
            float v = alpha * s;
            if (beta != 0.0f) v += beta * __half2float(c[i + j * ldc]);
            out[i + j * m] = v;
        }
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) d[i + j * ldd] = __float2half_rn(out[i + j * m]);
}

struct Program {
    std::string src, name, log;
};

// The kernel names a source declares: the identifier before the parameter list of each `__global__` function.
std::vector<std::string> kernels_in(const std::string& s) {
    std::vector<std::string> out;
    size_t at = 0;
    while ((at = s.find("__global__", at)) != std::string::npos) {
        at += 10;
        size_t paren = s.find('(', at);
        if (paren == std::string::npos) break;
        std::string head = s.substr(at, paren - at);
        if (head.find("__launch_bounds__") != std::string::npos) {  // skip its argument list
            size_t close = s.find(')', paren);
            paren = s.find('(', close);
            head = s.substr(close + 1, paren - close - 1);
        }
        size_t e = head.find_last_not_of(" \t\r\n");
        size_t b = head.find_last_of(" \t\r\n*", e);
        out.push_back(head.substr(b + 1, e - b));
        at = paren;
    }
    return out;
}

}  // namespace

using namespace cuemu;

extern "C" {

int cublasLtCreate(void** h) {
    static int token;
    *h = &token;
    return STATUS_SUCCESS;
}
int cublasLtDestroy(void*) { return STATUS_SUCCESS; }
size_t cublasLtGetVersion() { return 130000; }

int cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    Desc* x = new Desc();
    x->compute = compute;
    x->scale = scale;
    *d = x;
    return STATUS_SUCCESS;
}
int cublasLtMatmulDescDestroy(void* d) {
    delete static_cast<Desc*>(d);
    return STATUS_SUCCESS;
}
int cublasLtMatmulDescSetAttribute(void* d, int attr, const void* buf, size_t size) {
    Desc* x = static_cast<Desc*>(d);
    int v = 0;
    std::memcpy(&v, buf, size < 4 ? size : 4);
    if (attr == 3) x->transa = v;
    else if (attr == 4) x->transb = v;
    else if (attr == 7) x->epilogue = v;
    else if (attr == 0 || attr == 1) return STATUS_SUCCESS;  // compute / scale type: as created
    else return STATUS_NOT_SUPPORTED;
    return STATUS_SUCCESS;
}
int cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    Layout* x = new Layout();
    x->type = type;
    x->rows = rows;
    x->cols = cols;
    x->ld = ld;
    *l = x;
    return STATUS_SUCCESS;
}
int cublasLtMatrixLayoutDestroy(void* l) {
    delete static_cast<Layout*>(l);
    return STATUS_SUCCESS;
}
int cublasLtMatrixLayoutSetAttribute(void* l, int attr, const void* buf, size_t) {
    if (attr == 5) {  // batch count
        int v;
        std::memcpy(&v, buf, 4);
        static_cast<Layout*>(l)->batch = v;
        return v == 1 ? STATUS_SUCCESS : STATUS_NOT_SUPPORTED;
    }
    return STATUS_SUCCESS;
}
int cublasLtMatmulPreferenceCreate(void** p) {
    static int token;
    *p = &token;
    return STATUS_SUCCESS;
}
int cublasLtMatmulPreferenceDestroy(void*) { return STATUS_SUCCESS; }
int cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return STATUS_SUCCESS; }

int cublasLtMatmulAlgoGetHeuristic(void*, void* d, void* a, void* b, void* c, void*, void*, int requested, void* results, int* returned) {
    const Desc* x = static_cast<const Desc*>(d);
    const Layout *la = static_cast<Layout*>(a), *lb = static_cast<Layout*>(b), *lc = static_cast<Layout*>(c);
    *returned = 0;
    if (requested < 1) return STATUS_INVALID_VALUE;
    if (x->compute != 68 || x->scale != 0 || x->epilogue != 1 || la->type != 2 || lb->type != 2 || lc->type != 2) return STATUS_NOT_SUPPORTED;
    Heuristic h{};
    h.state = STATUS_SUCCESS;
    h.waves = 1.0f;
    std::memcpy(results, &h, sizeof h);
    *returned = 1;
    return STATUS_SUCCESS;
}

int cublasLtMatmul(void*, void* desc, const void* alpha, const void* a, void* adesc, const void* b, void* bdesc, const void* beta, const void* c,
                   void* cdesc, void* d, void* ddesc, const void*, void*, size_t, void* stream) {
    const Desc x = *static_cast<const Desc*>(desc);
    const Layout la = *static_cast<Layout*>(adesc), lb = *static_cast<Layout*>(bdesc), lc = *static_cast<Layout*>(cdesc),
                 ld = *static_cast<Layout*>(ddesc);
    const uint64_t m = ld.rows, n = ld.cols, k = x.transa ? la.rows : la.cols;
    const uint64_t bk = x.transb ? lb.cols : lb.rows, bn = x.transb ? lb.rows : lb.cols, am = x.transa ? la.cols : la.rows;
    if (am != m || bk != k || bn != n || lc.rows != m || lc.cols != n) {
        std::fprintf(stderr, "cuemu: cublasLtMatmul with inconsistent layouts (m %lu n %lu k %lu)\n", (unsigned long)m, (unsigned long)n, (unsigned long)k);
        return STATUS_INVALID_VALUE;
    }
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    const __half *pa = static_cast<const __half*>(a), *pb = static_cast<const __half*>(b), *pc = static_cast<const __half*>(c);
    __half* pd = static_cast<__half*>(d);
    for (const Layout* l : {&la, &lb, &lc, &ld})
        if (l->ld < int64_t(l->rows)) {
            std::fprintf(stderr, "cuemu: cublasLtMatmul with a leading dimension %ld below its %lu rows\n", (long)l->ld, (unsigned long)l->rows);
            return STATUS_INVALID_VALUE;
        }
    // Checked when it runs (a graph replay included): each matrix inside one live device allocation, D not
    // overlapping A or B (cuBLAS leaves that undefined).
    const int r = submit(stream, [=] {
        const char* names[] = {"A", "B", "C", "D"};
        const void* ptrs[] = {pa, pb, pc, pd};
        const Layout* ls[] = {&la, &lb, &lc, &ld};
        size_t bytes[4];
        for (int i = 0; i < 4; i++) {
            bytes[i] = ls[i]->rows && ls[i]->cols ? ((ls[i]->cols - 1) * uint64_t(ls[i]->ld) + ls[i]->rows) * sizeof(__half) : 0;
            if (i == 2 && be == 0.0f) continue;  // C is not read
            const std::string e = device_range_error(ptrs[i], bytes[i]);
            if (!e.empty()) return operation_failed("cublasLtMatmul (m " + std::to_string(m) + ", n " + std::to_string(n) + ", k " + std::to_string(k) + "): matrix " + names[i] + " is " + e);
        }
        const auto overlap = [&](int i) {
            const uintptr_t a0 = uintptr_t(ptrs[i]), d0 = uintptr_t(pd);
            return bytes[i] && bytes[3] && a0 < d0 + bytes[3] && d0 < a0 + bytes[i];
        };
        if (overlap(0) || overlap(1)) return operation_failed("cublasLtMatmul: the output D overlaps an input (A or B)");
        matmul(x.transa, x.transb, m, n, k, al, pa, la.ld, pb, lb.ld, be, pc, lc.ld, pd, ld.ld);
    });
    return r == CUDA_SUCCESS ? STATUS_SUCCESS : 13;  // CUBLAS_STATUS_EXECUTION_FAILED
}

int nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return 0;
}
const char* nvrtcGetErrorString(int r) { return r == 0 ? "NVRTC_SUCCESS" : "NVRTC_ERROR_COMPILATION (cuemu)"; }
int nvrtcCreateProgram(void** prog, const char* src, const char* name, int, const char* const*, const char* const*) {
    Program* p = new Program();
    p->src = src ? src : "";
    p->name = name ? name : "source";
    *prog = p;
    return 0;
}
int nvrtcDestroyProgram(void** prog) {
    delete static_cast<Program*>(*prog);
    *prog = nullptr;
    return 0;
}
int nvrtcCompileProgram(void* prog, int, const char* const*) {
    Program* p = static_cast<Program*>(prog);
    for (const auto& k : kernels_in(p->src))
        if (!find_kernel(k))
            p->log += "cuemu: kernel " + k + " of " + p->name + " is not in this emulator build; rerun tools/cuemu/build.sh\n";
    return p->log.empty() ? 0 : 6;
}
int nvrtcGetPTXSize(void* prog, size_t* size) {
    *size = std::strlen("// cuemu ") + static_cast<Program*>(prog)->name.size() + 2;
    return 0;
}
int nvrtcGetPTX(void* prog, char* out) {
    std::string s = "// cuemu " + static_cast<Program*>(prog)->name + "\n";
    std::memcpy(out, s.c_str(), s.size() + 1);
    return 0;
}
int nvrtcGetProgramLogSize(void* prog, size_t* size) {
    *size = static_cast<Program*>(prog)->log.size() + 1;
    return 0;
}
int nvrtcGetProgramLog(void* prog, char* out) {
    const std::string& l = static_cast<Program*>(prog)->log;
    std::memcpy(out, l.c_str(), l.size() + 1);
    return 0;
}

}  // extern "C"
