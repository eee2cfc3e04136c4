/*
 * Shared by the fuzz harnesses (tests/fuzz/fuzz_*.c). Each harness defines
 * LLVMFuzzerTestOneInput; it is linked either with libFuzzer
 * (tests/fuzz/run.sh, scripts/fuzz.sh) or with replay_main.c, which runs
 * the committed seeds and regression inputs as an ordinary ctest test.
 *
 * The parsers under test read files by path, so an input is handed to them
 * as an anonymous in-memory file (memfd) named by /proc/self/fd/N.
 */
#ifndef OSCAR_FUZZ_COMMON_H
#define OSCAR_FUZZ_COMMON_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A property the harness checks failed: abort, so that libFuzzer saves the
 * input and the replay test fails. */
#define FUZZ_REQUIRE(cond, ...)                                                     \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "fuzz property failed at %s:%d: ", __FILE__, __LINE__);  \
            fprintf(stderr, __VA_ARGS__);                                           \
            fputc('\n', stderr);                                                    \
            abort();                                                                \
        }                                                                           \
    } while (0)

/* Writes data to a fresh memfd; path receives its /proc name. Returns the fd
 * (close it when done) or -1. */
static inline int fuzz_memfile(const uint8_t *data, size_t size, char *path, size_t path_size) {
    int fd = memfd_create("oscar-fuzz", 0);
    if (fd < 0) return -1;
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        done += (size_t)w;
    }
    snprintf(path, path_size, "/proc/self/fd/%d", fd);
    return fd;
}

#endif
