// Per-node timing of one encode, for finding where the time goes (a developer tool).
//
// Compiled in only with -DMMV_PROFILE (e.g. cmake -DCMAKE_CXX_FLAGS=-DMMV_PROFILE); then
// the environment variable MMV_PROFILE=1 makes every encode run its graph one node at a
// time (the scheduler's eval callback) and print, to stderr, the time per op kind and per
// matmul shape. Running node by node adds a thread barrier per node, so the sum is a little
// above an ordinary encode; the split between ops is what it is for.
#pragma once

#include "ggml-backend.h"

namespace mmv {

class NodeProfiler {
  public:
    // Attach to `sched` just before a compute, when profiling is compiled in and asked for.
    void attach(ggml_backend_sched_t sched);
    // Print the table of the compute since attach() and detach (no-op when not attached).
    void report();

  private:
    ggml_backend_sched_t sched_ = nullptr;
};

}  // namespace mmv
