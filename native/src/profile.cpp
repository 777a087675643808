// Per-node timing of one encode (see profile.h).
#include "profile.h"

#ifdef MMV_PROFILE
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>
#endif

namespace mmv {

#ifdef MMV_PROFILE
namespace {

using Clock = std::chrono::steady_clock;

struct Totals {
    std::map<std::string, std::pair<double, int>> by_key;  // key -> (seconds, count)
    Clock::time_point last;
    double total = 0;
};
Totals g_totals;

std::string key_of(const ggml_tensor * t) {
    // custom ops by their name (host_kernels.cpp names its own)
    std::string k = (t->op == GGML_OP_CUSTOM || t->op == GGML_OP_MAP_CUSTOM1) && t->name[0] ? t->name : ggml_op_desc(t);
    if (t->op == GGML_OP_CUSTOM && k != "host_linear") {
        char buf[64];
        std::snprintf(buf, sizeof buf, " [%lld,%lld,%lld]", (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2]);
        return k + buf;
    }
    if ((t->op == GGML_OP_MUL_MAT || t->op == GGML_OP_CUSTOM) && t->src[0] && t->src[1]) {
        const ggml_tensor * a = t->src[0];
        const ggml_tensor * b = t->src[1];
        char buf[160];
        std::snprintf(buf, sizeof buf, " %s[%lld,%lld,%lld] x %s[%lld,%lld,%lld]%s", ggml_type_name(a->type),
                      (long long) a->ne[0], (long long) a->ne[1], (long long) a->ne[2], ggml_type_name(b->type),
                      (long long) b->ne[0], (long long) b->ne[1], (long long) b->ne[2],
                      ggml_is_contiguous(b) ? "" : " (b strided)");
        k += buf;
    } else if (t->op == GGML_OP_CPY || t->op == GGML_OP_CONT) {
        k += std::string(" ") + ggml_type_name(t->src[0]->type) + "->" + ggml_type_name(t->type);
    }
    return k;
}

bool eval_cb(ggml_tensor * t, bool ask, void *) {
    if (ask) return true;  // observe every node: the scheduler then computes one node at a time
    const Clock::time_point now = Clock::now();
    const double s = std::chrono::duration<double>(now - g_totals.last).count();
    auto & e = g_totals.by_key[key_of(t)];
    e.first += s;
    e.second += 1;
    g_totals.total += s;
    g_totals.last = Clock::now();  // the bookkeeping above is not charged to the next node
    return true;
}

}  // namespace

void NodeProfiler::attach(ggml_backend_sched_t sched) {
    const char * env = std::getenv("MMV_PROFILE");
    if (env == nullptr || env[0] == '\0' || env[0] == '0') return;
    sched_ = sched;
    g_totals = Totals();
    g_totals.last = Clock::now();
    ggml_backend_sched_set_eval_callback(sched, eval_cb, nullptr);
}

void NodeProfiler::report() {
    if (sched_ == nullptr) return;
    ggml_backend_sched_set_eval_callback(sched_, nullptr, nullptr);
    sched_ = nullptr;
    std::vector<std::pair<std::string, std::pair<double, int>>> rows(g_totals.by_key.begin(), g_totals.by_key.end());
    std::sort(rows.begin(), rows.end(), [](const auto & a, const auto & b) { return a.second.first > b.second.first; });
    std::fprintf(stderr, "MMV_PROFILE: %.1f ms in %zu node kinds\n", g_totals.total * 1e3, rows.size());
    for (const auto & r : rows) {
        std::fprintf(stderr, "%9.1f ms %5.1f%% %5d  %s\n", r.second.first * 1e3, 100.0 * r.second.first / g_totals.total,
                     r.second.second, r.first.c_str());
    }
}

#else

void NodeProfiler::attach(ggml_backend_sched_t) {}
void NodeProfiler::report() {}

#endif

}  // namespace mmv
