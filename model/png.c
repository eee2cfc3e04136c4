/*
 * png.c - PNG writer. The image data goes into zlib "stored" (uncompressed)
 * deflate blocks, so no compressor is needed; plots are small enough that
 * the size does not matter.
 */
#include "png.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
    crc_ready = 1;
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc;
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static int chunk(FILE *f, const char *type, const uint8_t *data, uint32_t len) {
    uint8_t hdr[8];
    be32(hdr, len);
    memcpy(hdr + 4, type, 4);
    uint32_t crc = crc_update(0xFFFFFFFFu, (const uint8_t *)type, 4);
    crc = crc_update(crc, data, len) ^ 0xFFFFFFFFu;
    uint8_t tail[4];
    be32(tail, crc);
    return fwrite(hdr, 1, 8, f) == 8 && (len == 0 || fwrite(data, 1, len, f) == len) && fwrite(tail, 1, 4, f) == 4
               ? 0 : -1;
}

int png_write_rgb(const char *path, const uint8_t *rgb, int width, int height) {
    if (width <= 0 || height <= 0) { errno = EINVAL; return -1; }
    if (!crc_ready) crc_init();
    size_t stride = (size_t)width * 3 + 1, raw_n = stride * (size_t)height;
    size_t nblocks = (raw_n + 65534) / 65535;
    size_t z_n = 2 + raw_n + nblocks * 5 + 4;
    uint8_t *z = malloc(z_n);
    if (!z) return -1;
    uint8_t *p = z;
    *p++ = 0x78; /* zlib header: deflate, 32K window, no dictionary */
    *p++ = 0x01;
    uint32_t a = 1, b = 0; /* Adler-32 of the raw (filtered) scanlines */
    size_t left = raw_n, row = 0, col = 0;
    while (left > 0) {
        uint16_t len = (uint16_t)(left > 65535 ? 65535 : left);
        left -= len;
        *p++ = left == 0 ? 1 : 0; /* BFINAL, BTYPE=00 (stored) */
        p[0] = (uint8_t)len; p[1] = (uint8_t)(len >> 8);
        p[2] = (uint8_t)~len; p[3] = (uint8_t)(~len >> 8);
        p += 4;
        for (uint16_t i = 0; i < len; i++) {
            uint8_t byte = col == 0 ? 0 /* filter: none */ : rgb[row * (size_t)width * 3 + col - 1];
            *p++ = byte;
            a = (a + byte) % 65521;
            b = (b + a) % 65521;
            if (++col == stride) { col = 0; row++; }
        }
    }
    be32(p, (b << 16) | a);
    p += 4;

    FILE *f = fopen(path, "wb");
    if (!f) { free(z); return -1; }
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    uint8_t ihdr[13];
    be32(ihdr, (uint32_t)width);
    be32(ihdr + 4, (uint32_t)height);
    ihdr[8] = 8;  /* bit depth */
    ihdr[9] = 2;  /* colour type: RGB */
    ihdr[10] = ihdr[11] = ihdr[12] = 0;
    int rc = fwrite(sig, 1, 8, f) == 8 && chunk(f, "IHDR", ihdr, 13) == 0 &&
             chunk(f, "IDAT", z, (uint32_t)(p - z)) == 0 && chunk(f, "IEND", NULL, 0) == 0 ? 0 : -1;
    free(z);
    if (fclose(f) != 0) rc = -1;
    return rc;
}
