// The stand-in sm_90 driver's cuLaunchKernelEx (benchmarks/sm90.py, StandInLaunch), built against the CUDA driver
// API's own header (the triton wheel's cuda.h), so that it reads a launch configuration as the driver does.
//
// - stand_in_launch: the launch as a no-op (the host-overhead probe: what a native replay costs before the driver);
// - recording_launch: keeps each launch's configuration, attributes and parameters (tests of the direct launch,
//   tests/ops/test_direct_launch.py); parameters are read as 8-byte cells up to the null after the last (what
//   csrc/eager.cpp passes; the driver itself reads as many as the kernel declares, each in its size);
// - failing_launch: answers CUDA_ERROR_INVALID_VALUE (the replay must raise);
// - the context functions a direct launch calls first: stand_in_get_current (a thread always has a context), and
//   recording_get_current / _set_current / _retain_primary / _get_device (a thread starts without one; what the
//   replay did to get one is kept: context_state).
#include <stdint.h>
#include <string.h>

#include "cuda.h"

#define MAX_LAUNCHES 256
#define MAX_PARAMS 64
#define MAX_ATTRS 4

typedef struct {
  unsigned int grid[3], block[3], shared, num_attrs;
  unsigned long long stream, function;
  int attr_id[MAX_ATTRS], attr_value[MAX_ATTRS];
  int num_params;
  unsigned long long params[MAX_PARAMS];
} Recorded;

static Recorded recorded[MAX_LAUNCHES];
static int recorded_count = 0;

CUresult stand_in_launch(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  (void)config, (void)f, (void)params, (void)extra;
  return CUDA_SUCCESS;
}

CUresult failing_launch(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  (void)config, (void)f, (void)params, (void)extra;
  return CUDA_ERROR_INVALID_VALUE;
}

CUresult recording_launch(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  if (recorded_count >= MAX_LAUNCHES || extra != NULL || config->numAttrs > MAX_ATTRS) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  Recorded *r = &recorded[recorded_count++];
  memset(r, 0, sizeof(*r));
  r->grid[0] = config->gridDimX, r->grid[1] = config->gridDimY, r->grid[2] = config->gridDimZ;
  r->block[0] = config->blockDimX, r->block[1] = config->blockDimY, r->block[2] = config->blockDimZ;
  r->shared = config->sharedMemBytes;
  r->stream = (unsigned long long)(uintptr_t)config->hStream;
  r->function = (unsigned long long)(uintptr_t)f;
  r->num_attrs = config->numAttrs;
  for (unsigned int i = 0; i < config->numAttrs; ++i) {
    r->attr_id[i] = (int)config->attrs[i].id;
    r->attr_value[i] = config->attrs[i].value.programmaticStreamSerializationAllowed;
  }
  while (r->num_params < MAX_PARAMS && params[r->num_params] != NULL) {
    memcpy(&r->params[r->num_params], params[r->num_params], sizeof(unsigned long long));
    ++r->num_params;
  }
  return CUDA_SUCCESS;
}

int recorded_launches(void) { return recorded_count; }
const Recorded *recorded_launch(int i) { return i >= 0 && i < recorded_count ? &recorded[i] : NULL; }
void clear_recorded(void) { recorded_count = 0; }

static CUcontext recorded_context = NULL;
static int context_sets = 0, retained_device = -1;

CUresult stand_in_get_current(CUcontext *context) {
  *context = (CUcontext)(uintptr_t)0x1;
  return CUDA_SUCCESS;
}

CUresult recording_get_current(CUcontext *context) {
  *context = recorded_context;
  return CUDA_SUCCESS;
}

CUresult recording_set_current(CUcontext context) {
  recorded_context = context;
  ++context_sets;
  return CUDA_SUCCESS;
}

CUresult recording_retain_primary(CUcontext *context, CUdevice device) {
  *context = (CUcontext)(uintptr_t)0xC0;
  retained_device = (int)device;
  return CUDA_SUCCESS;
}

CUresult recording_get_device(CUdevice *device, int ordinal) {
  *device = (CUdevice)(ordinal + 100);  // not the ordinal: the replay must pass this on
  return CUDA_SUCCESS;
}

void context_state(int *sets, int *device, unsigned long long *context) {
  *sets = context_sets, *device = retained_device, *context = (unsigned long long)(uintptr_t)recorded_context;
}

void clear_context(void) { recorded_context = NULL, context_sets = 0, retained_device = -1; }
