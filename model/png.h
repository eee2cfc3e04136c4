/* png.h - a dependency-free PNG writer (8-bit RGB, uncompressed deflate). */
#ifndef OSCAR_MODEL_PNG_H
#define OSCAR_MODEL_PNG_H
#include <stdint.h>
/* rgb: [height][width][3]. Returns 0, or -1 (errno set) if writing fails. */
int png_write_rgb(const char *path, const uint8_t *rgb, int width, int height);
#endif
