// The int64 words that decode_layers (layers/csrc/cpu_ops.c) reads: defined here only. Python
// (models/native_decode.py) asks the compiled library for every value below by name
// (cpu_ops.c decode_abi, layers/native_ops.py decode_abi), so the two sides cannot drift apart.
#ifndef TURBOLLM_DECODE_ABI_H
#define TURBOLLM_DECODE_ABI_H

// A projection, LIN_WORDS words: the function, its call kind (which signature it has), then its
// bound integer arguments in the function's own order, zero-padded (see cpu_ops.c linear_call).
enum { LIN_LOWBIT = 0, LIN_Q8 = 1, LIN_DENSE = 2, LIN_SPARSE = 3, LIN_SPARSE_Q8 = 4 };
enum { LIN_FN = 0, LIN_KIND = 1, LIN_ARGS = 2, LIN_WORDS = 10 };

// A layer, LAYER_WORDS words: norm2 weight, the norm that follows the layer (the next layer's
// norm1, or the model's final norm after the last layer), the qkv / o / gate_up / down
// projections, then the K/V write's and the attention's cache pointers and dtype code, then
// each projection's LoRA slots (the address of its LORA_WORDS words, 0 for none).
enum {
    L_NORM2 = 0, L_NORM_NEXT = 1,
    L_QKV = 2, L_O = L_QKV + LIN_WORDS, L_GATE_UP = L_O + LIN_WORDS,
    L_DOWN = L_GATE_UP + LIN_WORDS,
    L_K_CACHE = L_DOWN + LIN_WORDS, L_V_CACHE, L_K_SCALES, L_V_SCALES, L_CACHE_DTYPE,
    L_LORA_QKV, L_LORA_O, L_LORA_GATE_UP, L_LORA_DOWN,
    LAYER_WORDS
};

// A projection's LoRA slots (layers/lora.py LinearLoRA), LORA_WORDS words: A [slots, K R, in]
// and B [slots, R, out] (fp32, or bf16 when LORA_KIND is LORA_KIND_BF16), the slot rank R, the
// shard count K, the address of the shards' (first output row, rows) pairs, in and out, and the
// address of the real ranks [slots, K] (int64; R is the largest). Added after the projection for
// rows whose slot (the step's S_LORA_SLOTS, -1 for none) is >= 0: cpu_ops.c lora_rows_f32 /
// lora_rows_bf16.
enum { LORA_A = 0, LORA_B, LORA_RANK, LORA_SHARDS, LORA_SPANS, LORA_IN, LORA_OUT, LORA_KIND,
       LORA_RANKS, LORA_WORDS };
enum { LORA_KIND_F32 = 0, LORA_KIND_BF16 = 1 };

// A tensor-parallel rank's shared-memory all-reduce (distributed/csrc/shm_collectives.c),
// AR_WORDS words: the flags (an int64 counter per rank, AR_FLAG_STRIDE words apart), the first
// slot, this rank, the ranks, the bytes of a slot, the timeout (ns); then what the calls
// report: the operation that timed out (0: none), nanoseconds spent and calls made.
enum { AR_FLAGS = 0, AR_SLOTS, AR_RANK, AR_WORLD, AR_SLOT_BYTES, AR_TIMEOUT_NS, AR_FAILED, AR_NS,
       AR_CALLS, AR_WORDS };
enum { AR_FLAG_STRIDE = 8 };
#define SHM_ABI_VALUES(X)                                                                       \
    X(AR_FLAGS) X(AR_SLOTS) X(AR_RANK) X(AR_WORLD) X(AR_SLOT_BYTES) X(AR_TIMEOUT_NS)              \
    X(AR_FAILED) X(AR_NS) X(AR_CALLS) X(AR_WORDS) X(AR_FLAG_STRIDE)

// The step, S_WORDS words: h, x, qkv, attn, o, gu, act buffers; T, hidden, inter, H, KVH, D,
// qkv row stride, q_size, qk_size; cos and sin tables [max_position, D/2], positions, slots;
// block tables, their width, each row's sequence and context; block size, window; the K/V
// write and attention functions; token ids, embedding table and its type (EMBED_*), the first
// layer's norm1 weight (scale and eps are decode_layers' float arguments); each row's LoRA slot
// (int64 [T], -1: none) or 0 when no row has an adapter; on a tensor-parallel rank the
// all-reduce function and its AR_WORDS words, which the o and down projections' partial sums go
// through (0, 0 in one process). One list (an
// X-macro) makes both the enum and the exported names, so no field can miss from Python's view.
#define DECODE_STEP_FIELDS(X)                                                                   \
    X(S_H) X(S_X) X(S_QKV) X(S_ATTN) X(S_O) X(S_GU) X(S_ACT) X(S_T) X(S_HIDDEN) X(S_INTER)      \
    X(S_HEADS) X(S_KVH) X(S_D) X(S_STRIDE) X(S_QSIZE) X(S_QKSIZE) X(S_COS) X(S_SIN) X(S_POS)    \
    X(S_SLOTS) X(S_TABLES) X(S_MAXB) X(S_SEQ) X(S_CTX) X(S_BS) X(S_WINDOW) X(S_WRITE)          \
    X(S_ATTEND) X(S_IDS) X(S_EMBED) X(S_EMBED_KIND) X(S_NORM1) X(S_LORA_SLOTS)   \
    X(S_ALLREDUCE) X(S_ALLREDUCE_CTX)
#define DECODE_ABI_ENUM_(name) name,
enum { DECODE_STEP_FIELDS(DECODE_ABI_ENUM_) S_WORDS };
#undef DECODE_ABI_ENUM_

// Embedding table types; EMBED_NONE: the caller has put the embeddings in h already
enum { EMBED_F32 = 0, EMBED_BF16 = 1, EMBED_F16 = 2, EMBED_NONE = 3 };

// Every name above, as exported to Python
#define DECODE_ABI_VALUES(X)                                                                    \
    X(LIN_LOWBIT) X(LIN_Q8) X(LIN_DENSE) X(LIN_SPARSE) X(LIN_SPARSE_Q8) X(LIN_FN) X(LIN_KIND)     \
    X(LIN_ARGS) X(LIN_WORDS)                                                                                \
    X(L_NORM2) X(L_NORM_NEXT) X(L_QKV) X(L_O) X(L_GATE_UP) X(L_DOWN) X(L_K_CACHE) X(L_V_CACHE)  \
    X(L_K_SCALES) X(L_V_SCALES) X(L_CACHE_DTYPE) X(L_LORA_QKV) X(L_LORA_O) X(L_LORA_GATE_UP)     \
    X(L_LORA_DOWN) X(LAYER_WORDS) X(LORA_A) X(LORA_B) X(LORA_RANK) X(LORA_SHARDS) X(LORA_SPANS)  \
    X(LORA_IN) X(LORA_OUT) X(LORA_KIND) X(LORA_RANKS) X(LORA_WORDS) X(LORA_KIND_F32)             \
    X(LORA_KIND_BF16) SHM_ABI_VALUES(X)                                                         \
    DECODE_STEP_FIELDS(X) X(S_WORDS)                                                            \
    X(EMBED_F32) X(EMBED_BF16) X(EMBED_F16) X(EMBED_NONE)

// Defines `void NAME(int64_t *sizes, int64_t *values, char *names)`, which gives Python
// (native_build.read_abi) the values of LIST (an X-macro of names above) with their names: with
// values == NULL, sizes[0] = how many there are and sizes[1] = the bytes of their names
// (space-separated, with the final NUL); else values and names are filled, in the same order.
#define ABI_ENTRY_(name) {#name, name},
#define DEFINE_ABI_EXPORT(NAME, LIST)                                                           \
    void NAME(int64_t *sizes, int64_t *values, char *names) {                                   \
        static const struct { const char *name; int64_t value; } table[] = {LIST(ABI_ENTRY_)};  \
        const int64_t count = sizeof table / sizeof table[0];                                   \
        int64_t bytes = 0;                                                                      \
        for (int64_t i = 0; i < count; i++) {                                                   \
            if (values != NULL) {                                                               \
                values[i] = table[i].value;                                                     \
                sprintf(names + bytes, i ? " %s" : "%s", table[i].name);                        \
            }                                                                                   \
            bytes += (i > 0) + (int64_t)strlen(table[i].name);                                  \
        }                                                                                       \
        sizes[0] = count;                                                                       \
        sizes[1] = bytes + 1;                                                                   \
    }

#endif
