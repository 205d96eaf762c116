/* The parts of onnxruntime's C API the custom ops call, declared here (no header ships with the wheel).
   OrtApi is a table of function pointers whose slots never move (the header only appends), so each function
   is reached by its slot number; OrtCustomOp's layout is the header's, through KernelComputeV2. */
#ifndef EDGELMM_ORT_API_H
#define EDGELMM_ORT_API_H
#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtShape;
typedef struct OrtAllocator {  /* the header's first fields */
    uint32_t version;
    void *(*Alloc)(struct OrtAllocator *, size_t);
    void (*Free)(struct OrtAllocator *, void *);
} OrtAllocator;
typedef void *OrtApiSlot;
typedef struct { const OrtApiSlot *(*GetApi)(uint32_t version); const char *(*GetVersionString)(void); } OrtApiBase;

enum { SLOT_CREATE_STATUS = 0, SLOT_CREATE_DOMAIN = 26, SLOT_DOMAIN_ADD = 27, SLOT_ADD_DOMAIN = 28,
       SLOT_MUTABLE_DATA = 51, SLOT_ELEMENT_TYPE = 60, SLOT_DIMS_COUNT = 61, SLOT_DIMS = 62,
       SLOT_TYPE_AND_SHAPE = 65, SLOT_ATTR_FLOAT = 85, SLOT_ATTR_INT64 = 86, SLOT_INPUT_COUNT = 88, SLOT_OUTPUT_COUNT = 89,
       SLOT_INPUT = 90, SLOT_OUTPUT = 91, SLOT_RELEASE_STATUS = 93, SLOT_RELEASE_SHAPE = 99, SLOT_RELEASE_ALLOCATOR = 132,
       SLOT_PARALLEL_FOR = 274, SLOT_KERNEL_INFO_ALLOCATOR = 278 };
enum { T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT32 = 6, T_FLOAT16 = 10 };
enum { REQUIRED = 0, OPTIONAL = 1 };
#define OP_API_VERSION 16   /* the OrtCustomOp fields below: CreateKernelV2 / KernelComputeV2 */
#define RUNTIME_API_VERSION 20  /* asked of GetApi: KernelContext_ParallelFor is slot 274 */

extern const OrtApiSlot *ort_api;
#define CALL(slot, type, ...) (((type)ort_api[slot])(__VA_ARGS__))
#define CHECK(expr) do { OrtStatus *s_ = (expr); if (s_) return s_; } while (0)

typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, const OrtApiSlot *, const OrtKernelInfo *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const OrtApiSlot *, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
} OrtCustomOp;

/* A status carrying msg (ORT_FAIL). */
OrtStatus *op_error(const char *msg);
/* Integer / float attribute `name`, or `fallback` when the node does not set it. */
int64_t op_attr_int(const OrtKernelInfo *info, const char *name, int64_t fallback);
float op_attr_float(const OrtKernelInfo *info, const char *name, float fallback);
/* Input i's data, checked to be of element type `type`; NULL data for a missing optional input. dims (up to
   8) and rank are filled when given. */
OrtStatus *op_input(OrtKernelContext *ctx, size_t i, int type, void **data, int64_t *dims, size_t *rank);
/* Input i's data, required, of element type `type` and `elements` elements in all. */
OrtStatus *op_input_sized(OrtKernelContext *ctx, size_t i, int type, void **data, int64_t elements);
/* Output i allocated (or the bound buffer fetched) with the given dims, and its data (an error when absent). */
OrtStatus *op_output(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t rank, void **data);
/* The same for an optional output: NULL data when the node does not produce it. */
OrtStatus *op_optional_output(OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t rank, void **data);
/* *out: a new kernel of `size` bytes, zeroed but for its first member, an OrtAllocator *: the kernel's CPU
   allocator, onnxruntime's arena, so an op's scratch reuses memory the graph's activations freed (malloc'd
   scratch came on top of the arena's peak). op_kernel_destroy releases both. */
OrtStatus *op_kernel_create(const OrtKernelInfo *info, size_t size, void **out);
void op_kernel_destroy(void *kernel);
/* bytes from / back to the allocator (thread-safe); NULL when it gives none (onnxruntime's arena throws
   instead when out of memory, which ends the process). */
void *op_alloc(OrtAllocator *allocator, size_t bytes);
void op_free(OrtAllocator *allocator, void *p);
/* fn(data, 0..tasks-1) on onnxruntime's intra-op threads. */
OrtStatus *op_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t tasks, void *data);

extern OrtCustomOp matmul_nbits_op, gelu_mlp_nbits_op, group_query_attention_op, group_query_attention_half_cache_op,
    group_query_attention_int8_cache_op, qkv_group_query_attention_op, qkv_group_query_attention_half_cache_op,
    qkv_group_query_attention_int8_cache_op, skip_layer_norm_op, skip_simplified_layer_norm_op;
#endif
