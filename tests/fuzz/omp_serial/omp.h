/* The fuzz builds compile the library and the model code without OpenMP
 * (one thread: reproducible, and no libomp needed for clang). These are the
 * few OpenMP calls the sources make, for a team of one. */
#ifndef OSCAR_FUZZ_OMP_SERIAL_H
#define OSCAR_FUZZ_OMP_SERIAL_H
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
#endif
