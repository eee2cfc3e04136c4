/*
 * fuzz_npy - the .npy reader of `oscar eval-kv` (tools/oscar/npy.c) on
 * arbitrary files. It must refuse a file with a message, or return an array
 * whose shape multiplies to its count and whose every float was read from
 * the file (the data is the file's tail, compared byte for byte).
 */
#include "fuzz_common.h"

#include "npy.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64], err[512] = "";
    int fd = fuzz_memfile(data, size, path, sizeof path);
    if (fd < 0) return 0;
    npy_array a;
    if (npy_read_f32(path, &a, err, sizeof err) == 0) {
        int64_t count = 1;
        for (int i = 0; i < a.ndim; i++) {
            FUZZ_REQUIRE(a.shape[i] >= 0, "negative extent");
            count *= a.shape[i];
        }
        FUZZ_REQUIRE(count == a.count, "shape multiplies to %lld, count is %lld", (long long)count,
                     (long long)a.count);
        FUZZ_REQUIRE((size_t)a.count * 4 <= size, "%lld floats from a %zu-byte file", (long long)a.count, size);
        FUZZ_REQUIRE(a.count == 0 || memcmp(a.data, data + size - (size_t)a.count * 4, (size_t)a.count * 4) == 0,
                     "the data is not the file's last %lld floats", (long long)a.count);
        npy_free(&a);
    } else {
        FUZZ_REQUIRE(err[0] != 0, "refused without a message");
        FUZZ_REQUIRE(a.data == NULL && a.count == 0, "a refused file left an array behind");
    }
    close(fd);
    return 0;
}
