/* Allocation-failure injection for the test build only (src/core/alloc.h).
 * In a normal build this file compiles to nothing: the library keeps no
 * global mutable state (oscar.h). */
#include "alloc.h"

#ifdef OSCAR_FAULT_INJECTION
/* Atomic: the CPU backend's OpenMP threads could allocate one day, and the
 * counter must not race then. */
static int64_t allocations, failures, fail_at = -1;
static int fail_persistent;

void oscar_fault_reset(void) {
    __atomic_store_n(&allocations, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&failures, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&fail_at, -1, __ATOMIC_SEQ_CST);
    fail_persistent = 0;
}

void oscar_fault_fail_at(int64_t n, int persistent) {
    fail_persistent = persistent;
    __atomic_store_n(&fail_at, n, __ATOMIC_SEQ_CST);
}

int64_t oscar_fault_allocations(void) { return __atomic_load_n(&allocations, __ATOMIC_SEQ_CST); }
int64_t oscar_fault_failures(void) { return __atomic_load_n(&failures, __ATOMIC_SEQ_CST); }

/* 1 if this allocation is to fail. */
static int should_fail(void) {
    const int64_t n = __atomic_fetch_add(&allocations, 1, __ATOMIC_SEQ_CST);
    const int64_t at = __atomic_load_n(&fail_at, __ATOMIC_SEQ_CST);
    if (at < 0 || n < at || (n > at && !fail_persistent)) return 0;
    __atomic_fetch_add(&failures, 1, __ATOMIC_SEQ_CST);
    return 1;
}

void *oscar_fault_malloc(size_t bytes) { return should_fail() ? NULL : malloc(bytes); }
void *oscar_fault_calloc(size_t count, size_t size) { return should_fail() ? NULL : calloc(count, size); }
void *oscar_fault_realloc(void *ptr, size_t bytes) { return should_fail() ? NULL : realloc(ptr, bytes); }
void *oscar_fault_aligned_alloc(size_t alignment, size_t bytes) {
    return should_fail() ? NULL : aligned_alloc(alignment, bytes);
}
#else
/* ISO C wants at least one declaration in a translation unit. */
typedef int oscar_fault_injection_not_built;
#endif
