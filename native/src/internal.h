// Helpers shared by the library's translation units (not part of the C ABI).
#pragma once

#include "mmvision.h"

#include <new>
#include <stdexcept>
#include <string>

namespace mmv {
// Record `message` as this thread's last error and return `status`.
mmv_status fail(mmv_status status, const std::string & message);
void clear_error();

// An error with a status, thrown inside the library and turned into (status, message) at the
// C boundary.
struct Error : std::runtime_error {
    mmv_status status;
    Error(mmv_status s, const std::string & m) : std::runtime_error(m), status(s) {}
};

// The C boundary of every entry point: run `f` (which returns a status), clear the thread's
// last error on success, and turn any exception into a status and a message ("... while
// `doing`").
template <typename F> mmv_status guarded(const std::string & doing, F && f) {
    try {
        mmv_status st = f();
        if (st == MMV_OK) clear_error();
        return st;
    } catch (const Error & e) {
        return fail(e.status, e.what());
    } catch (const std::bad_alloc &) {
        return fail(MMV_ERR_OUT_OF_MEMORY, "out of memory while " + doing);
    } catch (const std::exception & e) {
        return fail(MMV_ERR_INTERNAL, e.what());
    } catch (...) {
        return fail(MMV_ERR_INTERNAL, "unknown error while " + doing);
    }
}
}  // namespace mmv
