// The shared-memory all-reduce of distributed/shm_allreduce.py, in C, for the one-call decode
// loop (layers/csrc/cpu_ops.c decode_layers) of tensor-parallel ranks: a decode step makes two
// all-reduces per layer, and leaving C for each (as the module path does) cost ~0.5 ms a call
// in Python's barrier and dispatch.
//
// Same segment, same protocol, same bits as the Python class, so a rank may mix the two
// (the C loop for decode steps, the module path for prompts): every rank copies its values
// into its slot of set (op % 2), publishes op + 1 in its flag, waits until every flag reached
// op + 1, then sums the slots in rank order 0, 1, ... (one add at a time: the bits of torch's
// copy_ then add_). The operation count lives in the rank's own flag, which both sides read.
// x86 keeps stores in order, so a peer's flag is seen after its slot data (shm_supported).
#include <immintrin.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "decode_abi.h"

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// Wait until every rank's flag reached target; 0 when they did, -1 past the timeout. Spins
// with a pause, yielding every 64 spins (2-core machines run the ranks and the engine on
// shared cores), and reads the clock only every 4096.
static int wait_all(volatile int64_t *flags, int64_t world, int64_t target, int64_t timeout_ns) {
    int64_t deadline = 0;
    for (uint64_t spins = 1;; spins++) {
        int64_t r = 0;
        while (r < world && flags[r * AR_FLAG_STRIDE] >= target) r++;
        if (r == world) return 0;
        _mm_pause();
        if ((spins & 63) == 0) {
            sched_yield();
            if ((spins & 4095) == 0) {
                const int64_t now = now_ns();
                if (!deadline) deadline = now + timeout_ns;
                else if (now > deadline) return -1;
            }
        }
    }
}

// y[0 .. n) <- the sum over ranks of their y, in slot-sized parts. ctx: AR_WORDS words
// (decode_abi.h). After a timeout ctx[AR_FAILED] is set and this and later calls do nothing:
// the caller checks it and raises.
void shm_all_reduce_f32(int64_t *ctx, float *y, int64_t n) {
    if (ctx[AR_FAILED]) return;
    const int64_t t0 = now_ns();
    volatile int64_t *flags = (volatile int64_t *)ctx[AR_FLAGS];
    char *slots = (char *)ctx[AR_SLOTS];
    const int64_t rank = ctx[AR_RANK], world = ctx[AR_WORLD], slot_bytes = ctx[AR_SLOT_BYTES];
    const int64_t per = slot_bytes / (int64_t)sizeof(float);
    for (int64_t a = 0; a < n; a += per) {
        const int64_t m = n - a < per ? n - a : per;
        const int64_t op = flags[rank * AR_FLAG_STRIDE];
        char *set = slots + (op % 2) * world * slot_bytes;
        memcpy(set + rank * slot_bytes, y + a, m * sizeof(float));
        __atomic_store_n(&flags[rank * AR_FLAG_STRIDE], op + 1, __ATOMIC_RELEASE);
        if (wait_all(flags, world, op + 1, ctx[AR_TIMEOUT_NS])) {
            ctx[AR_FAILED] = op + 1;
            return;
        }
        const float *s0 = (const float *)set;
        for (int64_t i = 0; i < m; i++) {
            float v = s0[i];
            for (int64_t r = 1; r < world; r++) v += ((const float *)(set + r * slot_bytes))[i];
            y[a + i] = v;
        }
    }
    ctx[AR_NS] += now_ns() - t0;
    ctx[AR_CALLS] += 1;
}

// The AR_* words' indexes, for Python (distributed/shm_allreduce.py)
DEFINE_ABI_EXPORT(shm_abi, SHM_ABI_VALUES)
