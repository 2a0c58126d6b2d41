// cuemu's NCCL stand-in (libnccl.so.2 is a link to libcuemu.so): the collectives rlaifd's data-parallel trainer
// calls, between the ranks of one process (each rank a thread, or all of them in one thread inside a group), on
// cuemu's devices (CUEMU_DEVICES). It is not NCCL: no rings or trees, no transport between processes. What it keeps
// of NCCL's contract is what the trainer relies on:
//  - ncclCommInitRank blocks until every rank of the unique id joined; ncclCommInitAll makes them all at once.
//  - The k-th collective of each rank meets the k-th of every other rank of the communicator; they must agree on
//    kind, count, type, operation and root (NCCL would hang or corrupt memory; this fails the call and says why).
//  - Every rank receives the same bytes (the reduction runs once, in rank order, then is copied to each rank).
//  - Between ncclGroupStart and ncclGroupEnd calls are queued; ncclGroupEnd issues them, so one thread may drive
//    all ranks.
//  - A rank that waits longer than CUEMU_NCCL_TIMEOUT_S seconds (default 300) for the others fails its call
//    (ncclSystemError) instead of hanging; ncclCommAbort of one rank fails the waits of the others (ncclRemoteError).
// Every buffer is checked against the bounds of its device allocation, as copies are.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unistd.h>
#include <vector>

#include "check.h"
#include "driver.h"

namespace {

enum Result { ncclSuccess = 0, ncclSystemError = 2, ncclInternalError = 3, ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6 };
enum DataType { Int8 = 0, Uint8 = 1, Int32 = 2, Uint32 = 3, Int64 = 4, Uint64 = 5, Float16 = 6, Float32 = 7, Float64 = 8, Bfloat16 = 9 };
enum RedOp { Sum = 0, Prod = 1, Max = 2, Min = 3, Avg = 4 };
enum Kind { AllReduce, Broadcast, AllGather };

struct UniqueId {
    char internal[128];
};

size_t type_size(int t) {
    switch (t) {
        case Int8: case Uint8: return 1;
        case Float16: case Bfloat16: return 2;
        case Int32: case Uint32: case Float32: return 4;
        case Int64: case Uint64: case Float64: return 8;
        default: return 0;
    }
}

// One collective call of every rank (the k-th of each).
struct Op {
    Kind kind;
    size_t count;
    int type, op, root;
    std::vector<const void*> send;
    std::vector<void*> recv;
    int arrived = 0;
    bool done = false;
    std::string error;
};

struct Clique {
    int nranks;
    std::mutex m;
    std::condition_variable cv;
    int joined = 0;
    bool aborted = false;
    std::vector<uint64_t> next_seq;  // per rank: its next collective's number
    std::map<uint64_t, std::shared_ptr<Op>> ops;
    explicit Clique(int n) : nranks(n), next_seq(size_t(n), 0) {}
};

struct Comm {
    std::shared_ptr<Clique> clique;
    int rank, device;
    std::string last_error;
};

std::mutex registry_m;
std::map<std::string, std::shared_ptr<Clique>>& registry() {
    static std::map<std::string, std::shared_ptr<Clique>> r;
    return r;
}

std::chrono::seconds timeout() {
    static const long s = [] {
        const char* e = std::getenv("CUEMU_NCCL_TIMEOUT_S");
        const long v = e ? std::atol(e) : 0;
        return v > 0 ? v : 300L;
    }();
    return std::chrono::seconds(s);
}

thread_local std::string last_error;
thread_local int group_depth = 0;
struct Pending {
    Comm* comm;
    std::shared_ptr<Op> op;
};
thread_local std::vector<Pending> group_ops;

int fail(int code, const std::string& why) {
    last_error = why;
    std::fprintf(stderr, "cuemu nccl: %s\n", why.c_str());
    return code;
}

template <class T>
void reduce_into(T* acc, const T* x, size_t n, int op) {
    for (size_t i = 0; i < n; i++) {
        switch (op) {
            case Sum: case Avg: acc[i] = acc[i] + x[i]; break;
            case Prod: acc[i] = acc[i] * x[i]; break;
            case Max: acc[i] = std::max(acc[i], x[i]); break;
            case Min: acc[i] = std::min(acc[i], x[i]); break;
        }
    }
}

// The reduction in float for fp16 (each partial rounded back to fp16, as a ring's steps round).
void reduce_f16(_Float16* acc, const _Float16* x, size_t n, int op) {
    for (size_t i = 0; i < n; i++) {
        const float a = float(acc[i]), b = float(x[i]);
        float r = a + b;
        if (op == Prod) r = a * b;
        if (op == Max) r = std::max(a, b);
        if (op == Min) r = std::min(a, b);
        acc[i] = _Float16(r);
    }
}

template <class T>
void divide(T* acc, size_t n, int by) {
    for (size_t i = 0; i < n; i++) acc[i] = T(acc[i] / T(by));
}

// Runs `o` once every rank arrived (under the clique's lock). Sets o->error on bad arguments.
void execute(Op& o, int nranks) {
    const size_t es = type_size(o.type);
    if (o.kind == Broadcast) {
        std::vector<unsigned char> data(o.count * es);
        std::memcpy(data.data(), o.send[size_t(o.root)], data.size());
        for (void* r : o.recv) std::memcpy(r, data.data(), data.size());
        return;
    }
    if (o.kind == AllGather) {
        std::vector<unsigned char> data(o.count * es * size_t(nranks));
        for (int r = 0; r < nranks; r++) std::memcpy(data.data() + size_t(r) * o.count * es, o.send[size_t(r)], o.count * es);
        for (void* r : o.recv) std::memcpy(r, data.data(), data.size());
        return;
    }
    std::vector<unsigned char> acc(o.count * es);
    std::memcpy(acc.data(), o.send[0], acc.size());
    for (int r = 1; r < nranks; r++) {
        const void* x = o.send[size_t(r)];
        switch (o.type) {
            case Float32: reduce_into(reinterpret_cast<float*>(acc.data()), static_cast<const float*>(x), o.count, o.op); break;
            case Float64: reduce_into(reinterpret_cast<double*>(acc.data()), static_cast<const double*>(x), o.count, o.op); break;
            case Float16: reduce_f16(reinterpret_cast<_Float16*>(acc.data()), static_cast<const _Float16*>(x), o.count, o.op); break;
            case Int32: reduce_into(reinterpret_cast<int32_t*>(acc.data()), static_cast<const int32_t*>(x), o.count, o.op); break;
            case Uint32: reduce_into(reinterpret_cast<uint32_t*>(acc.data()), static_cast<const uint32_t*>(x), o.count, o.op); break;
            case Int64: reduce_into(reinterpret_cast<int64_t*>(acc.data()), static_cast<const int64_t*>(x), o.count, o.op); break;
            case Uint64: reduce_into(reinterpret_cast<uint64_t*>(acc.data()), static_cast<const uint64_t*>(x), o.count, o.op); break;
            case Uint8: reduce_into(reinterpret_cast<uint8_t*>(acc.data()), static_cast<const uint8_t*>(x), o.count, o.op); break;
            case Int8: reduce_into(reinterpret_cast<int8_t*>(acc.data()), static_cast<const int8_t*>(x), o.count, o.op); break;
            default: o.error = "cuemu's NCCL stand-in does not reduce data type " + std::to_string(o.type); return;
        }
    }
    if (o.op == Avg) {
        switch (o.type) {
            case Float32: divide(reinterpret_cast<float*>(acc.data()), o.count, nranks); break;
            case Float64: divide(reinterpret_cast<double*>(acc.data()), o.count, nranks); break;
            case Float16: divide(reinterpret_cast<_Float16*>(acc.data()), o.count, nranks); break;
            default: o.error = "ncclAvg needs a floating-point type"; return;
        }
    }
    for (void* r : o.recv) std::memcpy(r, acc.data(), acc.size());
}

std::string kind_name(Kind k) { return k == AllReduce ? "ncclAllReduce" : k == Broadcast ? "ncclBroadcast" : "ncclAllGather"; }

// Adds this rank's part of its next collective; runs it when it completes the set.
int submit(Comm* c, Kind kind, const void* send, void* recv, size_t count, int type, int op, int root, std::shared_ptr<Op>* out) {
    const size_t es = type_size(type);
    if (!es) return fail(ncclInvalidArgument, kind_name(kind) + ": unknown data type " + std::to_string(type));
    const size_t in_bytes = count * es, out_bytes = kind == AllGather ? in_bytes * size_t(c->clique->nranks) : in_bytes;
    if (kind != Broadcast || c->rank == root) {
        const std::string e = cuemu::device_range_error(send, in_bytes);
        if (!e.empty()) return fail(ncclInvalidArgument, kind_name(kind) + " of rank " + std::to_string(c->rank) + ": the send buffer " + e);
    }
    const std::string e = cuemu::device_range_error(recv, out_bytes);
    if (!e.empty()) return fail(ncclInvalidArgument, kind_name(kind) + " of rank " + std::to_string(c->rank) + ": the receive buffer " + e);
    Clique& q = *c->clique;
    std::lock_guard<std::mutex> g(q.m);
    if (q.aborted) return fail(ncclRemoteError, kind_name(kind) + ": a rank of this communicator aborted");
    const uint64_t seq = q.next_seq[size_t(c->rank)]++;
    auto& slot = q.ops[seq];
    if (!slot) {
        slot = std::make_shared<Op>();
        *slot = Op{kind, count, type, op, root, std::vector<const void*>(size_t(q.nranks)), std::vector<void*>(size_t(q.nranks))};
    } else if (slot->kind != kind || slot->count != count || slot->type != type || slot->op != op || slot->root != root) {
        slot->error = "collective #" + std::to_string(seq) + " differs between ranks: rank " + std::to_string(c->rank) + " calls " +
                      kind_name(kind) + " of " + std::to_string(count) + " elements, another rank " + kind_name(slot->kind) + " of " +
                      std::to_string(slot->count);
    }
    slot->send[size_t(c->rank)] = send;
    slot->recv[size_t(c->rank)] = recv;
    slot->arrived++;
    *out = slot;
    if (slot->arrived == q.nranks) {
        if (slot->error.empty()) execute(*slot, q.nranks);
        slot->done = true;
        q.ops.erase(seq);
        q.cv.notify_all();
    }
    return ncclSuccess;
}

int wait(Comm* c, const std::shared_ptr<Op>& op) {
    Clique& q = *c->clique;
    std::unique_lock<std::mutex> g(q.m);
    if (!q.cv.wait_for(g, timeout(), [&] { return op->done || q.aborted; }))
        return fail(ncclSystemError, kind_name(op->kind) + " of rank " + std::to_string(c->rank) + ": waited " + std::to_string(timeout().count()) +
                                         " s for the other ranks (" + std::to_string(op->arrived) + " of " + std::to_string(q.nranks) +
                                         " arrived; set CUEMU_NCCL_TIMEOUT_S to wait longer)");
    if (!op->done) return fail(ncclRemoteError, kind_name(op->kind) + ": a rank of this communicator aborted");
    if (!op->error.empty()) return fail(ncclInvalidUsage, op->error);
    return ncclSuccess;
}

int collective(void* comm, Kind kind, const void* send, void* recv, size_t count, int type, int op, int root) {
    if (!comm) return fail(ncclInvalidArgument, kind_name(kind) + ": no communicator");
    Comm* c = static_cast<Comm*>(comm);
    std::shared_ptr<Op> o;
    if (const int r = submit(c, kind, send, recv, count, type, op, root, &o)) return r;
    if (group_depth > 0) {
        group_ops.push_back({c, o});
        return ncclSuccess;
    }
    return wait(c, o);
}

std::atomic<uint64_t> id_counter{0};

}  // namespace

extern "C" {

int ncclGetVersion(int* v) {
    *v = 23000;  // the NCCL 2.30 API that cudarc's "nccl" feature binds
    return ncclSuccess;
}

const char* ncclGetErrorString(int r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclSystemError: return "unhandled system error (cuemu NCCL stand-in)";
        case ncclInvalidArgument: return "invalid argument (cuemu NCCL stand-in)";
        case ncclInvalidUsage: return "invalid usage (cuemu NCCL stand-in)";
        case ncclRemoteError: return "remote process exited or there was a network error (cuemu NCCL stand-in)";
        default: return "internal error (cuemu NCCL stand-in)";
    }
}

const char* ncclGetLastError(void*) { return last_error.c_str(); }

int ncclGetUniqueId(UniqueId* id) {
    std::memset(id->internal, 0, sizeof id->internal);
    const auto t = std::chrono::steady_clock::now().time_since_epoch().count();
    std::snprintf(id->internal, sizeof id->internal, "cuemu-nccl %d %llu %lld", int(getpid()), (unsigned long long)id_counter++, (long long)t);
    return ncclSuccess;
}

int ncclCommInitRank(void** comm, int nranks, UniqueId id, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return fail(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    const std::string key(id.internal, strnlen(id.internal, sizeof id.internal));
    if (key.rfind("cuemu-nccl ", 0) != 0) return fail(ncclInvalidArgument, "ncclCommInitRank: the unique id was not made by ncclGetUniqueId");
    std::shared_ptr<Clique> q;
    {
        std::lock_guard<std::mutex> g(registry_m);
        auto& slot = registry()[key];
        if (!slot) slot = std::make_shared<Clique>(nranks);
        q = slot;
    }
    if (q->nranks != nranks) return fail(ncclInvalidUsage, "ncclCommInitRank: ranks disagree on the number of ranks");
    std::unique_lock<std::mutex> g(q->m);
    q->joined++;
    q->cv.notify_all();
    // Every rank joins before any returns, as NCCL's initialization does (between processes this stand-in never
    // completes: it has no transport).
    if (!q->cv.wait_for(g, timeout(), [&] { return q->joined >= q->nranks || q->aborted; }))
        return fail(ncclSystemError, "ncclCommInitRank: rank " + std::to_string(rank) + " waited " + std::to_string(timeout().count()) + " s for " +
                                         std::to_string(q->nranks - q->joined) + " more ranks (cuemu's stand-in joins ranks of one process only)");
    g.unlock();
    {
        std::lock_guard<std::mutex> r(registry_m);
        if (registry().count(key) && registry()[key] == q && q->joined >= q->nranks) registry().erase(key);
    }
    *comm = new Comm{q, rank, cuemu::current_device(), ""};
    return ncclSuccess;
}

int ncclCommInitAll(void** comms, int ndev, const int* devlist) {
    if (ndev < 1) return fail(ncclInvalidArgument, "ncclCommInitAll: no devices");
    auto q = std::make_shared<Clique>(ndev);
    q->joined = ndev;
    for (int i = 0; i < ndev; i++) {
        const int d = devlist ? devlist[i] : i;
        if (d < 0 || d >= cuemu::device_count())
            return fail(ncclInvalidArgument, "ncclCommInitAll: device " + std::to_string(d) + " of " + std::to_string(cuemu::device_count()) + " (CUEMU_DEVICES)");
        comms[i] = new Comm{q, i, d, ""};
    }
    return ncclSuccess;
}

int ncclCommCount(void* comm, int* n) {
    *n = static_cast<Comm*>(comm)->clique->nranks;
    return ncclSuccess;
}
int ncclCommUserRank(void* comm, int* r) {
    *r = static_cast<Comm*>(comm)->rank;
    return ncclSuccess;
}
int ncclCommCuDevice(void* comm, int* d) {
    *d = static_cast<Comm*>(comm)->device;
    return ncclSuccess;
}

int ncclCommAbort(void* comm) {
    if (!comm) return ncclSuccess;
    Comm* c = static_cast<Comm*>(comm);
    {
        std::lock_guard<std::mutex> g(c->clique->m);
        // A rank that leaves with collectives the others still wait for fails them; one that leaves in step does not.
        bool waited_on = !c->clique->ops.empty();
        if (waited_on) c->clique->aborted = true;
        c->clique->cv.notify_all();
    }
    delete c;
    return ncclSuccess;
}
int ncclCommDestroy(void* comm) { return ncclCommAbort(comm); }
int ncclCommFinalize(void*) { return ncclSuccess; }

int ncclGroupStart() {
    group_depth++;
    return ncclSuccess;
}

int ncclGroupEnd() {
    if (group_depth == 0) return fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--group_depth > 0) return ncclSuccess;
    std::vector<Pending> ops;
    ops.swap(group_ops);
    int status = ncclSuccess;
    for (auto& p : ops) {
        const int r = wait(p.comm, p.op);
        if (r && !status) status = r;
    }
    return status;
}

int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, void* comm, void*) {
    return collective(comm, AllReduce, send, recv, count, type, op, 0);
}
int ncclBroadcast(const void* send, void* recv, size_t count, int type, int root, void* comm, void*) {
    return collective(comm, Broadcast, send, recv, count, type, Sum, root);
}
int ncclAllGather(const void* send, void* recv, size_t count, int type, void* comm, void*) {
    return collective(comm, AllGather, send, recv, count, type, Sum, 0);
}

}  // extern "C"
