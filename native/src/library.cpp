// Library-wide entry points: versions, last-error storage, device enumeration.
#include "mmvision.h"
#include "internal.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstring>
#include <string>

#ifndef MMV_GGML_BUILD_VERSION
#error "MMV_GGML_BUILD_VERSION must be defined by the build"
#endif

#ifndef MMV_VERSION_STRING
#define MMV_VERSION_STRING "0.1.0"
#endif

namespace {
thread_local std::string g_last_error;

void copy_str(char * dst, size_t cap, const char * src) {
    if (cap == 0) return;
    std::strncpy(dst, src ? src : "", cap - 1);
    dst[cap - 1] = '\0';
}
}  // namespace

namespace mmv {
mmv_status fail(mmv_status status, const std::string & message) {
    g_last_error = message;
    return status;
}
void clear_error() { g_last_error.clear(); }
}  // namespace mmv

extern "C" {

int32_t mmv_abi_version(void) { return MMV_ABI_VERSION; }
const char * mmv_version(void) { return MMV_VERSION_STRING; }
const char * mmv_ggml_version(void) { return ggml_version(); }
const char * mmv_ggml_commit(void) { return ggml_commit(); }
const char * mmv_ggml_build_version(void) { return MMV_GGML_BUILD_VERSION; }
const char * mmv_last_error(void) { return g_last_error.c_str(); }

int32_t mmv_device_count(void) {
    try {
        return static_cast<int32_t>(ggml_backend_dev_count());
    } catch (...) {
        return 0;
    }
}

mmv_status mmv_device_get_info(int32_t index, mmv_device_info * out) {
    if (out == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "out is NULL");
    try {
        if (index < 0 || static_cast<size_t>(index) >= ggml_backend_dev_count()) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "device index out of range");
        }
        ggml_backend_dev_t dev = ggml_backend_dev_get(static_cast<size_t>(index));
        std::memset(out, 0, sizeof(*out));
        copy_str(out->name, sizeof(out->name), ggml_backend_dev_name(dev));
        copy_str(out->description, sizeof(out->description), ggml_backend_dev_description(dev));
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        copy_str(out->backend, sizeof(out->backend), reg ? ggml_backend_reg_name(reg) : "");
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_CPU: out->type = MMV_DEVICE_CPU; break;
            case GGML_BACKEND_DEVICE_TYPE_GPU: out->type = MMV_DEVICE_GPU; break;
            case GGML_BACKEND_DEVICE_TYPE_IGPU: out->type = MMV_DEVICE_IGPU; break;
            default: out->type = MMV_DEVICE_ACCEL; break;
        }
        size_t free_b = 0, total_b = 0;
        ggml_backend_dev_memory(dev, &free_b, &total_b);
        out->memory_free = free_b;
        out->memory_total = total_b;
        mmv::clear_error();
        return MMV_OK;
    } catch (const std::exception & e) {
        return mmv::fail(MMV_ERR_INTERNAL, e.what());
    } catch (...) {
        return mmv::fail(MMV_ERR_INTERNAL, "unknown error");
    }
}

}  // extern "C"
