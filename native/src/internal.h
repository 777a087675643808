// Helpers shared by the library's translation units (not part of the C ABI).
#pragma once

#include "mmvision.h"

#include <string>

namespace mmv {
// Record `message` as this thread's last error and return `status`.
mmv_status fail(mmv_status status, const std::string & message);
void clear_error();
}  // namespace mmv
