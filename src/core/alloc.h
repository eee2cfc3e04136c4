/*
 * The library's host allocations. In a normal build these are the C
 * library's functions, with no state of any kind. The fault-injection test
 * build (-DOSCAR_FAULT_INJECTION, tests/CMakeLists.txt) routes them through
 * a counter that can fail the Nth allocation (src/core/fault.c), so that a
 * test can walk N over every allocation of a workload, as SQLite does.
 */
#ifndef OSCAR_ALLOC_H
#define OSCAR_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef OSCAR_FAULT_INJECTION
void *oscar_fault_malloc(size_t bytes);
void *oscar_fault_calloc(size_t count, size_t size);
void *oscar_fault_realloc(void *ptr, size_t bytes);
void *oscar_fault_aligned_alloc(size_t alignment, size_t bytes);
#define OSCAR_MALLOC(n) oscar_fault_malloc(n)
#define OSCAR_CALLOC(n, s) oscar_fault_calloc((n), (s))
#define OSCAR_REALLOC(p, n) oscar_fault_realloc((p), (n))
#define OSCAR_ALIGNED_ALLOC(a, n) oscar_fault_aligned_alloc((a), (n))

/* Test control (test build only). Allocations are numbered from 0 since the
 * last oscar_fault_reset. oscar_fault_fail_at(n, persistent): allocation n
 * fails, and with persistent every later one too; n < 0 disarms. */
void oscar_fault_reset(void);
void oscar_fault_fail_at(int64_t n, int persistent);
int64_t oscar_fault_allocations(void); /* attempted since the reset          */
int64_t oscar_fault_failures(void);    /* of which failed on purpose          */
#else
#define OSCAR_MALLOC(n) malloc(n)
#define OSCAR_CALLOC(n, s) calloc((n), (s))
#define OSCAR_REALLOC(p, n) realloc((p), (n))
#define OSCAR_ALIGNED_ALLOC(a, n) aligned_alloc((a), (n))
#endif

#endif /* OSCAR_ALLOC_H */
